"""Per-op profile of a compiled JAX function on XLA:CPU: a `jax.profiler` trace (XLA:CPU emits one event per
executed thunk, named after its HLO instruction), op time summed per instruction and mapped back to the JAX
operation that emitted it (the `op_name` metadata of the compiled HLO). Shared by `forward.py`, `train_step.py` and
`vae_floor.py`. XLA:CPU runs independent thunks concurrently (e.g. the weight conversions at the start of a
program), so op times can add up to more than the wall time, and on a shared host each op's time includes the
moments it was preempted: read shares, and compare profiles taken in the same run.

Not every thunk's work is inside its event: a `dot` that XLA:CPU hands to Eigen (not a `ynn_fusion`) is dispatched
to Eigen's pool and its event ends at the dispatch, so its time shows up as gaps between events. `untraced_ms` is
that time per run: the gaps longer than 0.1 ms during which no event is open."""
from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

import jax


def _hlo_sources(hlo_text: str) -> dict:
    """HLO instruction name -> short description (opcode, fusion kind, shape, JAX op path) from the compiled HLO."""
    out = {}
    pat = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(")
    for line in hlo_text.splitlines():
        m = pat.match(line)
        if not m:
            continue
        name, shape, op = m.groups()
        # op_name is the JAX transformation/primitive path, e.g. ".../transpose(jvp())/while/body/dot_general":
        # `transpose(jvp())` marks the backward, the tail names the primitive.
        opn = re.search(r'op_name="([^"]*)"', line)
        what = "/".join(opn.group(1).split("/")[1:])[-80:] if opn else ""
        kind = re.search(r"kind=(k\w+)", line)
        out[name] = f"{op}{'/' + kind.group(1) if kind else ''} {shape[:40]} {what}".strip()
    return out


def profile_ops(fn, arg, runs: int = 3, top: int = 15) -> dict:
    """Per-op time of the compiled `fn(arg)` from a `jax.profiler` trace (XLA:CPU emits one event per executed
    thunk, named after its HLO instruction); loop bodies count every iteration."""
    hlo = fn.lower(arg).compile().as_text()
    names = _hlo_sources(hlo)
    jax.block_until_ready(fn(arg))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(runs):
                jax.block_until_ready(fn(arg))
        files = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        if not files:
            return {"error": "no perfetto trace written"}
        data = json.load(gzip.open(files[0]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    per = collections.Counter()
    spans = []
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name in names:
            per[name] += e.get("dur", 0) / 1e3 / runs
            spans.append((e["ts"], e["ts"] + e.get("dur", 0)))
    total = sum(per.values())
    ops = [{"op": n, "ms": ms, "share": ms / total if total else 0.0, "what": names[n]} for n, ms in
           per.most_common(top)]
    by_kind, by_op = collections.Counter(), collections.Counter()
    for n, ms in per.items():
        kind = names[n].split(" ")[0]
        by_kind[kind] += ms
        # backward ops carry `transpose(` in their JAX path; the path's last element names the primitive
        path = names[n].split(" ")[-1]
        phase = "bwd" if "transpose(" in path else "fwd"
        by_op[f"{phase} {'gemm' if 'ynn' in n or kind == 'dot' else kind} {path.split('/')[-1]}"] += ms
    return {"total_ms": total, "top": ops, "by_kind": dict(by_kind.most_common(12)),
            "by_op": dict(by_op.most_common(20)), "untraced_ms": _untraced_us(spans) / 1e3 / runs}


def _untraced_us(spans) -> float:
    """Gaps longer than 0.1 ms between events (the few host-side returns between runs are counted too: they are
    tens of microseconds)."""
    gaps, end = 0.0, None
    for s, e in sorted(spans):
        if end is not None and s - end > 100:
            gaps += s - end
        end = e if end is None else max(end, e)
    return gaps


def print_profile(p: dict, what: str) -> None:
    print(f"  per-op profile of {what} ({p['total_ms']:.1f} ms of op time per run, plus "
          f"{p.get('untraced_ms', 0.0):.1f} ms between events: Eigen dots, runtime):")
    for o in p["top"]:
        print(f"    {o['ms']:7.2f} ms {100 * o['share']:5.1f}%  {o['op'][:28]:28s} {o['what'][:110]}")
    print("    by op kind (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in p["by_kind"].items()))
    print("    by phase / kind / JAX primitive (ms, share):")
    for k, v in p["by_op"].items():
        print(f"      {v:8.1f} {100 * v / p['total_ms']:5.1f}%  {k}")
