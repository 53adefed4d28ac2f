"""Compile the steps for the topology and read per-device memory, FLOPs and a roofline step-time estimate.

Memory is `compiled.memory_analysis()` (per device): total = argument + output + temp - alias (MaxText's estimate).
A compile that runs out of HBM raises RESOURCE_EXHAUSTED; it is reported as `fits: false` with the compiler's own
figures: its total requirement (arguments included), from which temp = total - (argument + output - alias), the
argument / output bytes coming from the shardings of the abstract arguments and outputs. `peak_bytes` is the
compiler's own peak (`peak_memory_in_bytes`: arguments + live temporaries), the figure its HBM check uses.

FLOPs: `cost_analysis()` is per device but counts a `lax.scan` (or while-loop) body once, so the scanned block
stack is undercounted by its depth. The corrected figure compiles the same step twice more with the block scans
unrolled (`turbojax.nn.blocks.unrolled_scans`) at 1 and 2 layers: per_layer = F(2) - F(1), non_loop = F(1) - per_layer, and
flops = non_loop + num_layers x per_layer (remat's recomputation included, as it is in the unrolled programs). The
same correction is applied to `bytes accessed`. Pallas kernels (splash attention) are not counted by the cost
model, so with a Pallas attention the small copies are compiled twice: with the XLA attention for the FLOPs (the
same matmuls, 4*B*H*L^2*Dh per forward and about twice that for the backward, counted by the compiler for every
attention call of the step whatever the method does) and with the configured attention for the bytes accessed
(the XLA attention's fp32 logits traffic would inflate them).

Step time is an ESTIMATE, a roofline: max(flops / (0.5 x bf16 peak), bytes accessed / HBM bandwidth) per device,
with the published chip peaks (`scale.md` §3); collectives, overlap and kernel efficiency are not modelled.
"""
from __future__ import annotations

import re
import time

import jax
import numpy as np

from turbojax.plan.topology import Chip

MFU_ASSUMED = 0.5  # fraction of the bf16 peak assumed reachable in the estimate (an assumption, not a measurement)
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def _shard_bytes(tree) -> int:
    """Per-device bytes of abstract arrays (their shard shapes where they carry a sharding)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sh = getattr(x, "sharding", None)
        shape = sh.shard_shape(x.shape) if sh is not None and hasattr(sh, "shard_shape") else x.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            itemsize = 8  # a threefry key: two uint32
        else:
            itemsize = np.dtype(x.dtype).itemsize
        total += int(np.prod(shape, dtype=np.int64)) * itemsize
    return total


def _figure(text: str, what: str) -> int | None:
    m = re.search(what + r"[^(]*\(([\d.]+)([KMGT]?)\)", text)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def out_of_memory(err: Exception) -> dict | None:
    """The compiler's figures from an out-of-HBM error, or None if `err` is something else."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    line = next((l.strip() for l in text.splitlines() if "memory" in l.lower()), text.strip().splitlines()[0])
    # Two wordings; both figures are the whole requirement, arguments included (checked on a toy program: a 10 GiB
    # argument and 8 GiB of temporaries give "HLO temporaries (18.00G)")
    used = re.search(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", text)  # "CompileTimeHbmOom"
    used = int(float(used.group(1)) * _UNITS[used.group(2)]) if used else _figure(text, "HLO temporaries")
    return {"message": line[:400], "used_bytes": used, "hbm_bytes": _figure(text, "available HBM")}


def compile_step(step) -> dict:
    """Lower and compile one step; memory and raw cost, or the out-of-HBM figures."""
    t0 = time.perf_counter()
    lowered = step.fn.lower(*step.args)
    out_abstract = lowered.out_info
    try:
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError; only the out-of-HBM case is ours to report
        oom = out_of_memory(e)
        if oom is None:
            raise
        r = {"oom": oom, "argument_bytes": _shard_bytes(step.args), "output_bytes": _shard_bytes(out_abstract),
             "alias_bytes": _shard_bytes(step.args[0]),  # the donated state
             "temp_bytes": None, "compile_seconds": round(time.perf_counter() - t0, 1)}
        if oom["used_bytes"] is not None:  # the compiler's total, less what the arguments and outputs hold
            r["temp_bytes"] = oom["used_bytes"] - (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"])
        return r
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"peak_bytes": int(getattr(m, "peak_memory_in_bytes", 0)) or None,
            "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
            "flops_raw": float(cost.get("flops", 0.0)), "bytes_accessed_raw": float(cost.get("bytes accessed", 0.0)),
            "compile_seconds": round(time.perf_counter() - t0, 1)}


def cost_only(step) -> tuple[float, float]:
    """(flops, bytes accessed) per device of a step (used on the small unrolled copies)."""
    cost = step.fn.lower(*step.args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def corrected(f1: float, f2: float, num_layers: int) -> float:
    per_layer = f2 - f1
    return (f1 - per_layer) + num_layers * per_layer


def summarise(r: dict, chip: Chip) -> dict:
    """The JSON record of one step."""
    temp = r.get("temp_bytes")
    total = None if temp is None else r["argument_bytes"] + r["output_bytes"] + temp - r["alias_bytes"]
    fits = "oom" not in r and total is not None and total <= chip.hbm_bytes
    flops, nbytes = r.get("flops_per_device"), r.get("bytes_per_device")
    est = None
    if flops is not None:
        est = max(flops / (chip.peak_flops * MFU_ASSUMED), (nbytes or 0.0) / chip.hbm_bytes_per_s)
    out = {"argument_bytes": r["argument_bytes"], "output_bytes": r["output_bytes"], "alias_bytes": r["alias_bytes"],
           "temp_bytes": temp, "total_bytes": total, "hbm_bytes": chip.hbm_bytes, "fits": bool(fits),
           "flops_per_device": flops, "est_step_seconds": None if est is None else round(est, 4),
           "bytes_accessed_per_device": nbytes, "flops_method": r.get("flops_method"),
           "compile_seconds": r.get("compile_seconds"),
           # the compiler's own peak (arguments + live temporaries); its out-of-HBM check is against this figure
           "peak_bytes": r.get("peak_bytes") or (r["oom"].get("used_bytes") if "oom" in r else None)}
    if "oom" in r:
        out["compiler_error"] = r["oom"]["message"]
    return out
