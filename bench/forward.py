"""Forward-pass benchmark: turbojax transformers (jitted) vs diffusers (eager): Qwen-Image and Z-Image.

Both models hold the same weights (the diffusers state dict is loaded into ours through the converter path, exactly as
`turbojax.convert` does for a checkpoint), see the same inputs, and are timed in the same process, one after the
other, in fp32 and in bf16. The machine's matmul throughput is measured in the same run so that the model figures can
be read as a fraction of what this machine can do.

FLOP count (multiply-add = 2 FLOPs; B batch, N image tokens, L text tokens, S = N + L, D = heads x head_dim,
C = in_channels, Dt = joint_attention_dim, P = patch^2 x out_channels, nl = layers):
  * per block, linears:   2*B*S*D*D * (3 qkv + 1 out + 2*4 MLP) = 24*B*S*D^2
  * per block, attention: QK^T 2*B*S*S*D + PV 2*B*S*S*D      =  4*B*S^2*D
  * stem/head linears:    2*B*(N*C*D + L*Dt*D + N*D*P)
  * per-sample linears:   2*B*(256*D + D*D + nl*2*6*D*D + 2*D*D)  (timestep MLP, block and output modulation)
Z-Image (single stream, same D, N and L; F = int(D/3*8) SwiGLU width; Np, Lp padded to multiples of 32;
nr refiner layers): per joint layer 2*B*S*(4*D^2 + 3*D*F) + 4*B*S^2*D with S = Np + Lp, the noise refiner the same
over Np tokens, the context refiner over Lp tokens, plus the patch / caption embedders and the final projection.
Norms, RoPE, GELU, softmax and residual adds are not counted (they are memory-bound, not FLOP-bound).

Run:  python bench/forward.py [--dtypes fp32,bf16] [--iters 10] [--layers 4] [--tokens 1024] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Runnable as `python bench/forward.py` from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from gemm_floor import gemm_floor, qwen_image_gemms, z_image_gemms  # noqa: E402
from turbojax.convert.params import load_into  # noqa: E402
from turbojax.models.registry import config_from_dict, get_family  # noqa: E402

DTYPES = {"fp32": (jnp.float32, torch.float32), "bf16": (jnp.bfloat16, torch.bfloat16)}
# Agreement bounds relative to the output scale: fp32 must match to round-off (the parity tests use 1e-4); bf16 only
# has an 8-bit mantissa and both models round differently inside every op, so a few percent is the expected spread.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}
NOISY = 1.25
TARGETS = {"fp32": 1.25, "bf16": 2.5}  # issue targets: turbojax speed-up over diffusers  # median/best ratio above which the timings are flagged as disturbed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="qwen_image,z_image", help="comma-separated subset of qwen_image,z_image")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    p.add_argument("--iters", type=int, default=10, help="timed runs per implementation and dtype")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (the first jitted call compiles)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1024, help="image tokens (packed 2x2 patches), laid out as h x w")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--text-pad", type=int, default=0, help="trailing text tokens masked out (0 = all valid)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attention-impl", default="auto",
                   help="turbojax attention_impl; 'auto' picks the fastest for the backend ('chunked' on CPU)")
    p.add_argument("--scan-layers", type=int, choices=(0, 1), default=1,
                   help="1 (model default): blocks stacked and run with lax.scan; 0: one jitted block per layer")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--gemm-floor", type=int, choices=(0, 1), default=1,
                   help="1: also time every GEMM shape of the forward alone (see bench/gemm_floor.py)")
    p.add_argument("--profile", type=int, choices=(0, 1), default=0,
                   help="1: also print a per-op profile of each compiled turbojax forward (bench/op_profile.py)")
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--json", dest="json_out", default=None, help="write all figures to this JSON file")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(m not in ("qwen_image", "z_image") for m in args.models):
        p.error(f"--models takes qwen_image and/or z_image, got {args.models}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        p.error(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")
    return args


def grid(tokens: int) -> tuple[int, int]:
    """Most square h x w factorisation of the image token count (h <= w)."""
    h = int(math.isqrt(tokens))
    while tokens % h:
        h -= 1
    return h, tokens // h


def ceil32(n: int) -> int:
    return -(-n // 32) * 32


def model_flops(kind, cfg, batch: int, n_img: int, n_txt: int) -> dict[str, float]:
    if kind == "z_image":
        d, f, nl, nr = cfg.dim, int(cfg.dim / 3 * 8), cfg.n_layers, cfg.n_refiner_layers
        ni, nt = ceil32(n_img), ceil32(n_txt)
        s = ni + nt

        def layer(tokens):
            return 2 * batch * tokens * (4 * d * d + 3 * d * f), 4 * batch * tokens * tokens * d
        parts = [layer(s)] * nl + [layer(ni)] * nr + [layer(nt)] * nr
        linears = sum(p[0] for p in parts) + 2 * batch * (ni * 64 * d + nt * cfg.cap_feat_dim * d + ni * d * 64)
        attn = sum(p[1] for p in parts)
        return {"linears": float(linears), "attention": float(attn), "total": float(linears + attn)}
    d, s, nl = cfg.inner_dim, n_img + n_txt, cfg.num_layers
    linears = nl * 24 * batch * s * d * d
    linears += 2 * batch * (n_img * cfg.in_channels * d + n_txt * cfg.joint_attention_dim * d + n_img * d * cfg.out_dim)
    linears += 2 * batch * (256 * d + d * d + nl * 2 * 6 * d * d + 2 * d * d)
    attn = nl * 4 * batch * s * s * d
    return {"linears": float(linears), "attention": float(attn), "total": float(linears + attn)}


def timed(fn, iters: int, warmup: int) -> dict[str, float]:
    """Wall-clock of `fn()` (which must block until its result exists): best and median over `iters` runs, in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"best_ms": min(times), "median_ms": statistics.median(times), "all_ms": times}


def timed_pair(fn_a, fn_b, iters: int, warmup: int) -> tuple[dict, dict]:
    """Like `timed` for two functions, alternating them run by run: this host's speed drifts by tens of percent
    over seconds (shared cores), and alternating exposes both implementations to the same drift."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times = ([], [])
    for _ in range(iters):
        for fn, acc in zip((fn_a, fn_b), times):
            t0 = time.perf_counter()
            fn()
            acc.append((time.perf_counter() - t0) * 1e3)
    return tuple({"best_ms": min(t), "median_ms": statistics.median(t), "all_ms": t} for t in times)


def matmul_peaks(n: int, iters: int) -> dict[str, dict]:
    """GFLOP/s of a square n x n matmul: jitted JAX fp32/bf16 (the peak we quote) and torch fp32/bf16 (reference)."""
    flops = 2.0 * n ** 3
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    out = {}
    # fp32 accumulation and result, as in turbojax's Linear: for bf16 inputs XLA:CPU only takes its fast GEMM path
    # when asked for an fp32 result.
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    for name, (jdt, tdt) in DTYPES.items():
        ja, jb = jnp.asarray(a, jdt), jnp.asarray(b, jdt)
        t = timed(lambda: mm(ja, jb).block_until_ready(), iters, 2)
        out[f"jax_{name}"] = {**t, "gflops": flops / t["best_ms"] / 1e6}
        ta, tb = torch.tensor(a).to(tdt), torch.tensor(b).to(tdt)
        # torch's bf16 GEMM crawls on CPUs without bf16 units (AMX / AVX512-BF16); a few runs are enough there.
        t = timed(lambda: torch.matmul(ta, tb), iters if name == "fp32" else max(2, iters // 3), 1)
        out[f"torch_{name}"] = {**t, "gflops": flops / t["best_ms"] / 1e6}
    return out


def cpu_summary() -> str:
    """CPU model and the matmul-relevant ISA flags (bf16 speed differs by 10x+ between hosts with and without AMX)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(isa) or 'no AVX2'}"


def build_models(args, kind):
    from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel

    hd = args.head_dim
    # Same axis split ratio as the published model (16, 56, 56) / 128, rounded to even sizes.
    frame = hd // 8 - (hd // 8) % 2
    height = (hd - frame) // 2 - ((hd - frame) // 2) % 2
    axes = (frame, height, hd - frame - height)
    torch.manual_seed(0)
    if kind == "z_image":  # same width, heads, depth and token counts; 16 latent channels, 2x2 patches
        tm = ZImageTransformer2DModel(dim=args.heads * hd, n_layers=args.layers, n_refiner_layers=2,
                                      n_heads=args.heads, n_kv_heads=args.heads, cap_feat_dim=args.heads * hd,
                                      in_channels=16, axes_dims=[hd // 4, 3 * hd // 8, 3 * hd // 8],
                                      axes_lens=[1536, 512, 512]).eval()
    else:
        tm = QwenImageTransformer2DModel(num_layers=args.layers, attention_head_dim=hd, num_attention_heads=args.heads,
                                         joint_attention_dim=args.heads * hd, in_channels=64, out_channels=16,
                                         axes_dims_rope=axes).eval()
    # Default inits zero some projections; noise on every weight makes the output agreement check meaningful.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    fam = get_family(kind)
    cfg = config_from_dict(fam, dict(tm.config), "benchmark torch model")
    return tm, sd, fam, cfg


def load_ours(fam, cfg, sd, jdt, args):
    abstract = nnx.eval_shape(lambda: fam.model_cls(cfg, rngs=nnx.Rngs(0), param_dtype=jdt, dtype=jdt,
                                                    attention_impl=args.attention_impl,
                                                    scan_layers=bool(args.scan_layers)))
    return load_into(abstract, fam, sd.__getitem__, {k: v.shape for k, v in sd.items()}, "benchmark torch model",
                     progress=False)


def make_inputs(args, cfg, kind):
    h, w = grid(args.tokens)
    rng = np.random.default_rng(0)
    b, l = args.batch, args.text_tokens
    if kind == "z_image":  # lists of per-sample latents [16, 1, 2h, 2w] and caption features [L, D]
        return dict(x=[rng.standard_normal((cfg.in_channels, 1, 2 * h, 2 * w)).astype(np.float32) for _ in range(b)],
                    cap_feats=[rng.standard_normal((l - args.text_pad, cfg.cap_feat_dim)).astype(np.float32)
                               for _ in range(b)],
                    t=np.full((b,), 0.5, np.float32), grid=(h, w))
    mask = np.ones((b, l), np.float32)
    if args.text_pad:
        mask[:, l - args.text_pad:] = 0
    return dict(hidden_states=rng.standard_normal((b, h * w, cfg.in_channels)).astype(np.float32),
                encoder_hidden_states=rng.standard_normal((b, l, cfg.joint_attention_dim)).astype(np.float32),
                encoder_hidden_states_mask=mask,
                timestep=np.full((b,), 0.5, np.float32),
                img_shapes=[[(1, h, w)]] * b)


def forward_fns(kind, tm_d, ours, inputs, tdt, jdt):
    """(torch forward, jax forward) on bit-identical inputs rounded to the compute dtype on the host."""
    if kind == "z_image":
        t_x = [torch.tensor(v).to(tdt) for v in inputs["x"]]
        t_c = [torch.tensor(v).to(tdt) for v in inputs["cap_feats"]]
        j_x = [jnp.asarray(v.float().numpy()).astype(jdt) for v in t_x]
        j_c = [jnp.asarray(v.float().numpy()).astype(jdt) for v in t_c]
        t_t = torch.tensor(inputs["t"])

        def torch_fwd():
            with torch.no_grad():
                return torch.stack(tm_d(t_x, t_t, t_c, return_dict=False)[0])

        def jax_fwd():
            return jnp.stack(ours(j_x, jnp.asarray(inputs["t"]), j_c, return_dict=False)[0]).block_until_ready()
        return torch_fwd, jax_fwd
    arrays = {k: v for k, v in inputs.items() if isinstance(v, np.ndarray)}
    t_in = {k: torch.tensor(v).to(tdt) for k, v in arrays.items()}
    j_in = {k: jnp.asarray(t_in[k].float().numpy()).astype(jdt) for k in arrays}
    j_in["timestep"] = jnp.asarray(inputs["timestep"])  # ours takes sigma in fp32 and rounds it like the reference
    shapes = inputs["img_shapes"]

    def torch_fwd():
        with torch.no_grad():
            return tm_d(**t_in, img_shapes=shapes).sample

    def jax_fwd():
        return ours(**j_in, img_shapes=shapes).block_until_ready()
    return torch_fwd, jax_fwd


def run_dtype(name, args, tm, sd, fam, cfg, inputs, kind):
    jdt, tdt = DTYPES[name]
    tm_d = tm.to(tdt)  # in place: fp32 runs first, so the fp32 reference output exists before the cast
    ours = load_ours(fam, cfg, sd, jdt, args)
    torch_fwd, jax_fwd = forward_fns(kind, tm_d, ours, inputs, tdt, jdt)

    t0 = time.perf_counter()
    jax_fwd()
    compile_s = time.perf_counter() - t0
    res_ours, res_torch = timed_pair(jax_fwd, torch_fwd, args.iters, args.warmup)
    out_ours = np.asarray(jax_fwd(), np.float64)
    out_torch = torch_fwd().double().numpy()
    if args.profile:
        profile_forward(kind, ours, inputs, jdt, args.profile_top, f"the {kind} {name} forward")
    return res_ours, res_torch, out_ours, out_torch, compile_s


def profile_forward(kind, ours, inputs, jdt, top: int, what: str) -> dict:
    """Per-op profile of the compiled turbojax forward, weights and inputs passed as arguments (as `jax_fwd`)."""
    import train_step  # its input builder; imported here because it imports this module
    from op_profile import print_profile, profile_ops
    apply, data = train_step.jax_apply(kind, inputs, jdt)
    graphdef, state = nnx.split(ours)
    fn = jax.jit(lambda a: apply(nnx.merge(graphdef, a[0]), a[1]))
    prof = profile_ops(fn, (state, data), top=top)
    if "top" in prof:
        print_profile(prof, what)
    return prof


def fmt_table(rows) -> str:
    head = ("model", "impl", "dtype", "best ms", "median ms", "GFLOP/s", "% of peak", "speed-up (best)", "speed-up (median)")
    lines = [head] + [(r["model"], r["impl"], r["dtype"], f"{r['best_ms']:.1f}", f"{r['median_ms']:.1f}", f"{r['gflops']:.1f}",
                       f"{r['pct_peak']:.1f}", f"{r['speedup']:.2f}x", f"{r['speedup_median']:.2f}x") for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    print(f"host: {cpu_summary()}\n"
          f"jax {jax.__version__} ({jax.devices()[0].platform} x{jax.device_count()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")

    peaks = matmul_peaks(args.matmul_size, args.iters)

    from turbojax.nn.attention import resolve_impl
    print(f"turbojax: attention_impl={args.attention_impl} (-> {resolve_impl(args.attention_impl)}), "
          f"scan_layers={bool(args.scan_layers)}")
    rows, agreement, flops, floors, h, w = [], {}, {}, {}, *grid(args.tokens)
    for kind in args.models:
        tm, sd, fam, cfg = build_models(args, kind)
        inputs = make_inputs(args, cfg, kind)
        fl = flops[kind] = model_flops(kind, cfg, args.batch, h * w, args.text_tokens)
        print(f"\n{kind}: {args.layers} layers, {args.heads} heads x {args.head_dim} (D={args.heads * args.head_dim}); "
              f"batch {args.batch}, {h}x{w}={h * w} image + {args.text_tokens} text tokens ({args.text_pad} masked); "
              f"FLOPs per forward {fl['total'] / 1e9:.2f} G (linears {fl['linears'] / 1e9:.2f} G, attention "
              f"{fl['attention'] / 1e9:.2f} G)", flush=True)
        ref32 = None
        for name in ("fp32", "bf16"):
            if name not in args.dtypes:
                continue
            res_ours, res_torch, out_ours, out_torch, compile_s = run_dtype(name, args, tm, sd, fam, cfg, inputs,
                                                                            kind)
            for impl, res in (("diffusers", res_torch), ("turbojax", res_ours)):
                rows.append({"model": kind, "impl": impl, "dtype": name,
                             **{k: res[k] for k in ("best_ms", "median_ms", "all_ms")},
                             "gflops": fl["total"] / res["best_ms"] / 1e6,
                             "speedup": res_torch["best_ms"] / res["best_ms"],
                             "speedup_median": res_torch["median_ms"] / res["median_ms"]})
            rows[-1]["compile_s"] = compile_s
            scale = float(np.abs(out_torch).max())
            diff = float(np.abs(out_ours - out_torch).max())
            entry = {"max_abs_diff": diff, "output_scale": scale, "rel_diff": diff / scale,
                     "tolerance": TOLERANCE[name]}
            if name == "fp32":
                ref32 = out_torch
            elif ref32 is not None:
                # How far each bf16 model is from the fp32 reference: ours should be no worse than diffusers'.
                entry["turbojax_vs_fp32_ref"] = float(np.abs(out_ours - ref32).max() / np.abs(ref32).max())
                entry["diffusers_vs_fp32_ref"] = float(np.abs(out_torch - ref32).max() / np.abs(ref32).max())
            entry["ok"] = entry["rel_diff"] <= TOLERANCE[name]
            agreement[f"{kind} {name}"] = entry
            if args.gemm_floor:
                shapes = (z_image_gemms if kind == "z_image" else qwen_image_gemms)(cfg, args.batch, h * w,
                                                                                    args.text_tokens)
                floors[f"{kind} {name}"] = {**gemm_floor(shapes, *DTYPES[name], iters=args.iters),
                                            "diffusers_ms": res_torch["best_ms"], "turbojax_ms": res_ours["best_ms"]}

    # Measure the matmul peak again after the models and keep the better of the two, so that a contended moment
    # at the start cannot deflate the peak (and inflate the "% of peak" column).
    for key, again in matmul_peaks(args.matmul_size, args.iters).items():
        if again["gflops"] > peaks[key]["gflops"]:
            peaks[key] = again
    print(f"\nmatmul {args.matmul_size}^3 GFLOP/s (best of {args.iters}, before and after the models):")
    for k, v in peaks.items():
        print(f"  {k:11s} {v['gflops']:7.1f}   ({v['best_ms']:.1f} ms)")
    for r in rows:
        # "Peak" = the best matmul rate measured on this host at this dtype, by either framework.
        peak = max(peaks[f"jax_{r['dtype']}"]["gflops"], peaks[f"torch_{r['dtype']}"]["gflops"])
        r["pct_peak"] = 100 * r["gflops"] / peak

    print(f"\nforward time ({args.iters} alternating runs after {args.warmup} warm-up; GFLOP/s and % of peak use the "
          "best run; peak = best measured matmul rate at the same dtype; speed-up = diffusers ms / impl ms):")
    print(fmt_table(rows))
    noisy = [f"{r['model']} {r['impl']} {r['dtype']}" for r in rows if r["median_ms"] > NOISY * r["best_ms"]]
    if noisy:
        print(f"warning: median > {NOISY}x best for {', '.join(noisy)}: the host was contended during the run, "
              "trust the best-run figures (or rerun)")
    if floors:
        print("\nGEMM floor (every matrix product of one forward timed alone, best of "
              f"{args.iters}, summed; ceiling = diffusers forward / JAX GEMM floor = the largest speed-up any JAX "
              "forward could reach here if everything but its GEMMs were free):")
        for name, f in floors.items():
            f["ceiling"] = f["diffusers_ms"] / f["jax_ms"]
            f["turbojax_non_gemm_ms"] = f["turbojax_ms"] - f["jax_ms"]
            f["diffusers_non_gemm_ms"] = f["diffusers_ms"] - f["torch_ms"]
            print(f"  {name}: JAX GEMMs {f['jax_ms']:.1f} ms, torch GEMMs {f['torch_ms']:.1f} ms; forward "
                  f"turbojax {f['turbojax_ms']:.1f} ms ({f['turbojax_non_gemm_ms']:+.1f} ms beyond its GEMMs), "
                  f"diffusers {f['diffusers_ms']:.1f} ms ({f['diffusers_non_gemm_ms']:+.1f} ms); ceiling "
                  f"{f['ceiling']:.2f}x (target {TARGETS[name.split()[-1]]}x)")
    print("\noutput agreement (turbojax vs diffusers, same dtype; rel = max abs diff / max |diffusers output|):")
    for name, e in agreement.items():
        extra = ""
        if "turbojax_vs_fp32_ref" in e:
            extra = (f"; vs fp32 reference: turbojax {e['turbojax_vs_fp32_ref']:.2e}, "
                     f"diffusers {e['diffusers_vs_fp32_ref']:.2e}")
        print(f"  {name}: max abs diff {e['max_abs_diff']:.3e} (output scale {e['output_scale']:.3g}, rel "
              f"{e['rel_diff']:.2e}, bound {e['tolerance']:.0e}: {'ok' if e['ok'] else 'FAIL'}){extra}")
    total_s = time.perf_counter() - t_start
    print(f"\ntotal benchmark time {total_s:.0f} s")

    if args.json_out:
        report = {"config": {k: v for k, v in vars(args).items() if k != "json_out"},
                  "shape": {"layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
                            "image_tokens": h * w, "text_tokens": args.text_tokens},
                  "versions": {"jax": jax.__version__, "torch": torch.__version__},
                  "torch_threads": torch.get_num_threads(),
                  "flops": flops, "matmul_peaks": peaks, "gemm_floor": floors, "results": rows, "agreement": agreement, "total_s": total_s}
        Path(args.json_out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json_out}")
    return 0 if all(e["ok"] for e in agreement.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
