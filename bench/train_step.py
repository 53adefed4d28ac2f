"""Training-step benchmark: forward + backward of the medium Qwen-Image / Z-Image transformers, turbojax vs diffusers.

Same models, weights and inputs as `bench/forward.py` (its model building is reused). The loss is the mean square of
the output. For each model and dtype it times, alternating run by run in one process:

  * turbojax jitted forward of the loss, and jitted `value_and_grad` w.r.t. every parameter;
  * turbojax forward and `value_and_grad` w.r.t. a LoRA only (rank `--lora-rank` on the distillation targets:
    attention projections and MLPs of the blocks), built with `turbojax.lora.unmerged` roles as distillation does;
  * diffusers eager forward (`torch.no_grad()`), and forward + `loss.backward()` w.r.t. every parameter; with peft
    installed, also with a LoRA of the same rank on the same modules (base frozen).

It prints fwd+bwd / fwd for both frameworks (the FLOP ratio is about 3: the backward runs every GEMM twice, once for
the input and once for the weight gradient), the speed-up over diffusers, the GEMM floor of the backward (every
transposed product of the backward timed alone, in the layout autodiff produces) and, with `--profile 1`, a per-op
profile of the compiled turbojax fwd+bwd (a `jax.profiler` trace, op time summed per HLO instruction and mapped to
the JAX operation that emitted it). The gradient of the patch embedder is compared with torch's as a sanity check.

Run:  python bench/train_step.py [--models qwen_image,z_image] [--dtypes fp32,bf16] [--iters 5] [--profile 1]
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import forward as fwdbench  # noqa: E402
from gemm_floor import qwen_image_gemms, z_image_gemms  # noqa: E402
from timing import best_ms  # noqa: E402
from op_profile import print_profile, profile_ops  # noqa: E402
from turbojax.lora import init_adapter  # noqa: E402
from turbojax.lora.unmerged import factors_of, make_role  # noqa: E402

DTYPES = fwdbench.DTYPES
TARGET_RATIO = 3.5     # issue 14: fwd+bwd <= 3.5 x forward
TARGET_SPEEDUP = 1.25  # issue 14: >= 1.25x faster than diffusers' fwd+bwd
# LoRA targets: the distillation default (turbojax.distill.config) and the same modules in diffusers' names.
LORA_TARGETS = {
    "qwen_image": ([r"transformer_blocks\.attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
                    r"transformer_blocks\.(img|txt)_mlp\.fc[12]"],
                   r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                   r"to_add_out)|(img|txt)_mlp\.net\.(0\.proj|2))"),
    "z_image": ([r"layers\.attention\.(to_q|to_k|to_v|to_out)", r"layers\.feed_forward\.(gate|up|down)"],
                r"layers\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123])"),
}
# Gradient sanity check: the first linear of the model, whose gradient depends on every layer's backward.
GRAD_PROBE = {"qwen_image": ("img_in", "img_in.weight"), "z_image": ("x_embedder", "all_x_embedder.2-1.weight")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="qwen_image,z_image")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--iters", type=int, default=5, help="timed runs per measurement (alternating)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--text-pad", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--scan-layers", type=int, choices=(0, 1), default=1)
    p.add_argument("--remat", default="none", help="turbojax remat policy of the block bodies")
    p.add_argument("--lora-rank", type=int, default=64, help="0 = skip the LoRA measurements")
    p.add_argument("--torch", type=int, choices=(0, 1), default=1, help="0 = turbojax only (no diffusers timing)")
    p.add_argument("--gemm-floor", type=int, choices=(0, 1), default=1)
    p.add_argument("--profile", type=int, choices=(0, 1), default=1, help="per-op profile of the compiled fwd+bwd")
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--json", dest="json_out")
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    a.dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if any(m not in LORA_TARGETS for m in a.models):
        p.error(f"--models takes qwen_image and/or z_image, got {a.models}")
    if any(d not in DTYPES for d in a.dtypes):
        p.error(f"--dtypes takes fp32 and/or bf16, got {a.dtypes}")
    return a


def timed_group(fns: dict, iters: int, warmup: int) -> dict:
    """Best and median ms of each `fn()` (which blocks), the functions alternating run by run (shared-host drift
    hits them all alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
            cpu[k].append((time.process_time() - c0) * 1e3)
    # CPU time of this process (all threads): on a contended host the wall clock of a long program is inflated
    # by preemption more often than a short one's, so ratios of CPU times are the steadier figure there.
    return {k: {"best_ms": min(t), "median_ms": statistics.median(t), "all_ms": t, "cpu_best_ms": min(cpu[k]),
                "cpu_median_ms": statistics.median(cpu[k])} for k, t in times.items()}


# ---------------------------------------------------------------------------------------------------------------
# turbojax side
# ---------------------------------------------------------------------------------------------------------------

def jax_apply(kind, inputs, jdt):
    """(`apply(model, data) -> output array`, data): the inputs rounded to the compute dtype exactly like forward.py
    does. They are passed as arguments: closed-over arrays would be compile-time constants that XLA folds."""
    tdt = DTYPES["fp32" if jdt == jnp.float32 else "bf16"][1]
    if kind == "z_image":
        data = {"x": tuple(jnp.asarray(torch.tensor(v).to(tdt).float().numpy()).astype(jdt) for v in inputs["x"]),
                "cap": tuple(jnp.asarray(torch.tensor(v).to(tdt).float().numpy()).astype(jdt)
                             for v in inputs["cap_feats"]),
                "t": jnp.asarray(inputs["t"])}
        return (lambda m, d: jnp.stack(m.forward(d["x"], d["t"], d["cap"]))), data
    data = {k: jnp.asarray(torch.tensor(v).to(tdt).float().numpy()).astype(jdt)
            for k, v in inputs.items() if isinstance(v, np.ndarray) and k != "timestep"}
    data["timestep"] = jnp.asarray(inputs["timestep"])
    shapes = tuple(tuple(s) for s in inputs["img_shapes"][0])
    return (lambda m, d: m.forward(d["hidden_states"], d["encoder_hidden_states"], d["encoder_hidden_states_mask"],
                                   d["timestep"], shapes)), data


def mse(out):
    return jnp.mean(jnp.square(out.astype(jnp.float32)))


def jax_fns(kind, ours, apply_data, lora_rank):
    """Jitted turbojax measurements and their single (tuple) argument; the `*_bwd` ones return (loss, grads)."""
    apply, data = apply_data
    graphdef, state = nnx.split(ours)

    def loss_full(st, d):
        return mse(apply(nnx.merge(graphdef, st), d))
    fns = {"fwd": jax.jit(lambda a: loss_full(*a)), "fwd_bwd": jax.jit(lambda a: jax.value_and_grad(loss_full)(*a))}
    args = {"fwd": (state, data), "fwd_bwd": (state, data)}
    if lora_rank:
        adapter = init_adapter(ours, LORA_TARGETS[kind][0], lora_rank, float(lora_rank), rng=jax.random.key(1))
        # b = 0 would make the LoRA branch a no-op that XLA could simplify away; a small b keeps it honest.
        adapter = {p: {**e, "b": e["b"] + 0.01} for p, e in adapter.items()}
        role = make_role(graphdef, state, adapter)

        # The frozen base is an argument too (not a constant), as in a training step.
        def loss_lora(f, base, d):
            return mse(apply(role.model(base, f), d))
        fns["lora_fwd"] = jax.jit(lambda a: loss_lora(*a))
        fns["lora_fwd_bwd"] = jax.jit(lambda a: jax.value_and_grad(loss_lora)(*a))
        args["lora_fwd"] = args["lora_fwd_bwd"] = (factors_of(adapter), state, data)
    return fns, args


# ---------------------------------------------------------------------------------------------------------------
# diffusers side
# ---------------------------------------------------------------------------------------------------------------

def torch_call(kind, inputs, tdt):
    if kind == "z_image":
        xs = [torch.tensor(v).to(tdt) for v in inputs["x"]]
        cs = [torch.tensor(v).to(tdt) for v in inputs["cap_feats"]]
        t = torch.tensor(inputs["t"])
        return lambda m: torch.stack(m(xs, t, cs, return_dict=False)[0])
    arr = {k: torch.tensor(v).to(tdt) for k, v in inputs.items() if isinstance(v, np.ndarray)}
    shapes = inputs["img_shapes"]
    return lambda m: m(**arr, img_shapes=shapes).sample


def torch_fns(tm, call, lora_model=None):
    def fwd():
        with torch.no_grad():
            return call(tm).float().pow(2).mean().item()

    def make_bwd(model):
        params = [p for p in model.parameters() if p.requires_grad]

        def bwd():
            for p in params:
                p.grad = None
            loss = call(model).float().pow(2).mean()
            loss.backward()
            return loss.item()
        return bwd
    fns = {"fwd": fwd, "fwd_bwd": make_bwd(tm)}
    if lora_model is not None:
        def lora_fwd():
            with torch.no_grad():
                return call(lora_model).float().pow(2).mean().item()
        fns["lora_fwd"], fns["lora_fwd_bwd"] = lora_fwd, make_bwd(lora_model)
    return fns


def torch_lora_model(kind, tm, rank):
    """A copy of the diffusers model with a peft LoRA on the distillation targets, base frozen (None without
    peft)."""
    try:
        from peft import LoraConfig
    except ImportError:
        return None
    m = copy.deepcopy(tm)
    m.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS[kind][1], init_lora_weights=True))
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_B" in n:
            with torch.no_grad():
                p.add_(0.01)
    return m


# ---------------------------------------------------------------------------------------------------------------
# GEMM floor of the backward and per-op profile
# ---------------------------------------------------------------------------------------------------------------

def backward_gemms(fwd_gemms: dict) -> dict:
    """For each forward product `[M, K] x [K, N]` the two of its backward, as (kind, M, K, N):
    `dX = dY [M, N] x W^T` (contracting N of both stored operands) and `dW = X^T x dY` (contracting M)."""
    g = collections.Counter()
    for (m, k, n), c in fwd_gemms.items():
        g[("dx", m, k, n)] += c
        g[("dw", m, k, n)] += c
    return g


def backward_floor(fwd_gemms: dict, jdt, tdt, iters: int) -> dict:
    rng = np.random.default_rng(0)
    f32 = jnp.float32
    dx = jax.jit(lambda dy, w: jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())),
                                                   preferred_element_type=f32).astype(dy.dtype))
    dw = jax.jit(lambda x, dy: jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())),
                                                   preferred_element_type=f32).astype(dy.dtype))
    total, rows = {"jax_ms": 0.0, "torch_ms": 0.0}, []
    for (kind, m, k, n), c in sorted(backward_gemms(fwd_gemms).items(), key=lambda kv: -np.prod(kv[0][1:]) * kv[1]):
        if kind == "dx":
            a, b = rng.standard_normal((m, n)), rng.standard_normal((k, n))
            jf, tf = dx, (lambda a, b: a @ b.T)
        else:
            a, b = rng.standard_normal((m, k)), rng.standard_normal((m, n))
            jf, tf = dw, (lambda a, b: a.T @ b)
        ja, jb = jnp.asarray(a, jdt), jnp.asarray(b, jdt)
        ta, tb = torch.tensor(a).to(tdt), torch.tensor(b).to(tdt)
        tj = best_ms(lambda: jf(ja, jb).block_until_ready(), iters)
        tt = best_ms(lambda: tf(ta, tb), iters)
        rows.append({"kind": kind, "m": m, "k": k, "n": n, "count": c, "jax_ms": tj, "torch_ms": tt})
        total["jax_ms"] += c * tj
        total["torch_ms"] += c * tt
    return {**total, "shapes": rows}


# ---------------------------------------------------------------------------------------------------------------

def run_case(a, kind, name, tm, sd, fam, cfg, inputs, fl):
    jdt, tdt = DTYPES[name]
    tm.to(tdt)
    ours = fwdbench.load_ours(fam, cfg, sd, jdt, a)
    ours.remat = a.remat
    jfns, jargs = jax_fns(kind, ours, jax_apply(kind, inputs, jdt), a.lora_rank)
    res = {"compile_s": {}}
    for k, fn in jfns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(jargs[k]))
        res["compile_s"][k] = time.perf_counter() - t0
    fns = {f"turbojax {k}": (lambda fn=fn, k=k: jax.block_until_ready(fn(jargs[k]))) for k, fn in jfns.items()}
    # Minor page faults of one warm call: memory XLA:CPU maps fresh on every call (its temporaries and outputs
    # when they are too large for the allocator to keep), each page zeroed by the kernel on first touch.
    res["page_faults"] = {}
    for k, fn in fns.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        res["page_faults"][k] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    if a.torch:
        call = torch_call(kind, inputs, tdt)
        for p in tm.parameters():
            p.requires_grad_(True)
        lora_tm = torch_lora_model(kind, tm, a.lora_rank) if a.lora_rank else None
        fns.update({f"diffusers {k}": fn for k, fn in torch_fns(tm, call, lora_tm).items()})
    res["times"] = timed_group(fns, a.iters, a.warmup)

    # gradient sanity: the patch embedder's kernel gradient against torch's weight gradient (transposed)
    if a.torch:
        ours_key, torch_key = GRAD_PROBE[kind]
        _, g = jfns["fwd_bwd"](jargs["fwd_bwd"])
        gj = np.asarray(g[ours_key]["kernel"][...], np.float64).T
        for p in tm.parameters():
            p.grad = None
        call(tm).float().pow(2).mean().backward()
        gt = dict(tm.named_parameters())[torch_key].grad.double().numpy()
        res["grad_rel_diff"] = float(np.abs(gj - gt).max() / np.abs(gt).max())
        for p in tm.parameters():
            p.requires_grad_(False)
            p.grad = None
    if a.gemm_floor:
        shapes = (z_image_gemms if kind == "z_image" else qwen_image_gemms)(cfg, a.batch, *fl["tokens"])
        res["backward_floor"] = backward_floor(shapes, jdt, tdt, a.iters)
    if a.profile:
        res["profile"] = profile_ops(jfns["fwd_bwd"], jargs["fwd_bwd"], top=a.profile_top)
    return res


def report(kind, name, r):
    t = {k: v["best_ms"] for k, v in r["times"].items()}
    med = {k: v["median_ms"] for k, v in r["times"].items()}
    print(f"\n{kind} {name}: best (median) ms of {len(next(iter(r['times'].values()))['all_ms'])} alternating runs")
    for k in r["times"]:
        print(f"  {k:26s} {t[k]:8.1f}  ({med[k]:.1f})   CPU {r['times'][k]['cpu_median_ms']:.0f}")
    cpu = {k: v["cpu_median_ms"] for k, v in r["times"].items()}
    j, d = t["turbojax fwd_bwd"] / t["turbojax fwd"], None
    r["ratio_cpu"] = cpu["turbojax fwd_bwd"] / cpu["turbojax fwd"]
    line = (f"  fwd+bwd / fwd: turbojax {j:.2f}x (median runs {med['turbojax fwd_bwd'] / med['turbojax fwd']:.2f}x, "
            f"median CPU time {r['ratio_cpu']:.2f}x; target <= {TARGET_RATIO})")
    if "diffusers fwd_bwd" in t:
        d = t["diffusers fwd_bwd"] / t["diffusers fwd"]
        sp = t["diffusers fwd_bwd"] / t["turbojax fwd_bwd"]
        line += f", diffusers {d:.2f}x; speed-up over diffusers fwd+bwd {sp:.2f}x (target >= {TARGET_SPEEDUP})"
        r["speedup"] = sp
    print(line)
    r["ratio"], r["diffusers_ratio"] = j, d
    if "turbojax lora_fwd_bwd" in t:
        lj = t["turbojax lora_fwd_bwd"] / t["turbojax lora_fwd"]
        line = f"  LoRA only: turbojax fwd+bwd / fwd {lj:.2f}x"
        if "diffusers lora_fwd_bwd" in t:
            line += (f", diffusers {t['diffusers lora_fwd_bwd'] / t['diffusers lora_fwd']:.2f}x; speed-up "
                     f"{t['diffusers lora_fwd_bwd'] / t['turbojax lora_fwd_bwd']:.2f}x")
        print(line)
    if "diffusers fwd_bwd" in t:
        print(f"  median CPU time, diffusers fwd+bwd / turbojax fwd+bwd: "
              f"{cpu['diffusers fwd_bwd'] / cpu['turbojax fwd_bwd']:.2f}x; diffusers fwd+bwd / fwd "
              f"{cpu['diffusers fwd_bwd'] / cpu['diffusers fwd']:.2f}x")
    noisy = [k for k in t if med[k] > fwdbench.NOISY * t[k]]
    if noisy:
        print(f"  warning: median > {fwdbench.NOISY}x best for {', '.join(noisy)} (contended host)")
    if r.get("page_faults"):
        pf = r["page_faults"]
        print("  minor page faults per warm call: " + ", ".join(
            f"{k.split()[-1]} {v} (~{v * resource.getpagesize() / 2**20:.0f} MiB)" for k, v in pf.items()))
    if "grad_rel_diff" in r:
        print(f"  patch-embedder gradient vs torch: rel max diff {r['grad_rel_diff']:.2e}")
    if "backward_floor" in r:
        f = r["backward_floor"]
        print(f"  backward GEMM floor (transposed products timed alone): JAX {f['jax_ms']:.1f} ms, torch "
              f"{f['torch_ms']:.1f} ms; turbojax backward (fwd+bwd - fwd) "
              f"{t['turbojax fwd_bwd'] - t['turbojax fwd']:.1f} ms")
    if "profile" in r and "top" in r["profile"]:
        print_profile(r["profile"], "the compiled fwd+bwd")

def main(argv=None) -> int:
    a = parse_args(argv)
    print(f"host: {fwdbench.cpu_summary()}\njax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); attention_impl={a.attention_impl}, scan_layers={bool(a.scan_layers)}, "
          f"remat={a.remat}, LoRA rank {a.lora_rank}")
    h, w = fwdbench.grid(a.tokens)
    results = {}
    for kind in a.models:
        tm, sd, fam, cfg = fwdbench.build_models(a, kind)
        inputs = fwdbench.make_inputs(a, cfg, kind)
        fl = fwdbench.model_flops(kind, cfg, a.batch, h * w, a.text_tokens)
        fl["tokens"] = (h * w, a.text_tokens)
        print(f"\n{kind}: {a.layers} layers, {a.heads}x{a.head_dim}, batch {a.batch}, {h * w} image + "
              f"{a.text_tokens} text tokens; forward {fl['total'] / 1e9:.2f} GFLOP, fwd+bwd ~{3 * fl['total'] / 1e9:.2f}")
        for name in a.dtypes:
            r = run_case(a, kind, name, tm, sd, fam, cfg, inputs, fl)
            report(kind, name, r)
            results[f"{kind} {name}"] = r
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"config": {k: v for k, v in vars(a).items() if k != "json_out"},
                                                "results": results}, indent=2, default=str))
        print(f"wrote {a.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
