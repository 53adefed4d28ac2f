"""End-to-end pipeline benchmark on a medium Qwen-Image configuration (random weights, this machine).

  1. Wall time per image broken into text encode / transformer steps / VAE decode, for the 2-step turbo preset
     (sigma [1, 0.75, 0], no CFG: 2 transformer evaluations) against the 50-step true-CFG base preset
     (100 evaluations), measured in the same run. Target: >= 40x faster end to end.
  2. VAE decode at 2048x2048: tiled vs untiled, time and peak host memory (each in its own subprocess, peak RSS
     read from /proc/self/status VmHWM).

Medium config: transformer 8 heads x 64 (joint dim 512), 512x512 images (1024 image tokens); text encoder 4 layers,
hidden 512 (Qwen2.5-VL layout); Qwen-Image VAE with z_dim 16 and base_dim 8 (`--vae-base-dim`; the real VAE has 96).
The end-to-end ratio depends on how heavy the VAE decode is next to one transformer evaluation, so the headline
transformer depth (`--layers proportional`) is the one whose XLA FLOP count per evaluation stands to the medium VAE
decode as the real 20B's stands to the real VAE at 1328^2 (15.6:1, 17 layers); the 4-layer transformer of
`bench/forward.py` is run too (`--compare-layers`). The VAE's GFLOP/s at medium and at real width are measured to
show how far the small-channel medium VAE is from the real one's efficiency. See bench/README.md.

Run:  python bench/pipeline.py [--dtype float32|bfloat16] [--size 512] [--decode-size 2048] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "a red fox sitting in fresh snow under a pine tree, morning light, photograph"


def transformer_flops(cfg, size: int, text_len: int = 64) -> float:
    """XLA's FLOP count of one transformer forward."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from turbojax.models.qwen_image import QwenImageTransformer
    # Reference attention and unrolled blocks: XLA's cost analysis counts a while-loop body once, so a scan over
    # layers or the chunked attention's loops would leave most of the FLOPs out.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: QwenImageTransformer(cfg, rngs=nnx.Rngs(0), scan_layers=False,
                                                                            attention_impl="xla")))
    n = (size // 16) ** 2
    fn = jax.jit(lambda s, x, c, t: nnx.merge(graphdef, s).forward(x, c, None, t, ((1, size // 16, size // 16),)))
    sds = jax.ShapeDtypeStruct
    return fn.lower(state, sds((1, n, cfg.in_channels), jnp.float32), sds((1, text_len, cfg.joint_attention_dim),
                    jnp.float32), sds((1,), jnp.float32)).cost_analysis()["flops"]


def vae_decode_flops(cfg, size: int) -> float:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from turbojax.models.vae_qwen_image import AutoencoderKLQwenImage
    # Reference attention: the chunked one loops, and XLA's cost analysis counts a loop body once.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKLQwenImage(cfg, rngs=nnx.Rngs(0),
                                                                              attention_impl="xla")))
    fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode_nhwc(z, tiled=False))
    return fn.lower(state, jax.ShapeDtypeStruct((1, size // 8, size // 8, cfg.z_dim), jnp.float32)
                    ).cost_analysis()["flops"]


MEDIUM_TRANSFORMER = dict(num_layers=4, attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
                          axes_dims_rope=(8, 28, 28))


def flop_proportions(args) -> dict:
    """How heavy the VAE decode is next to one transformer evaluation, real models vs the medium configs, and the
    transformer depth ("proportional") whose FLOPs per evaluation stand to the medium VAE decode as the real 20B's
    stand to the real VAE at 1328^2."""
    import math

    from turbojax.models.qwen_image import QWEN_IMAGE_20B, QwenImageConfig
    from turbojax.models.vae_qwen_image import QWEN_IMAGE_VAE, QwenImageVAEConfig
    real_t, real_v = transformer_flops(QWEN_IMAGE_20B, 1328, 100), vae_decode_flops(QWEN_IMAGE_VAE, 1328)
    med_v = vae_decode_flops(QwenImageVAEConfig(base_dim=args.vae_base_dim, z_dim=16), args.size)
    one, two = (transformer_flops(QwenImageConfig(**{**MEDIUM_TRANSFORMER, "num_layers": n}), args.size)
                for n in (1, 2))
    per_layer, stem = two - one, 2 * one - two
    proportional = max(1, math.ceil((real_t / real_v * med_v - stem) / per_layer))
    out = dict(real_transformer=real_t, real_vae=real_v, medium_vae=med_v, proportional_layers=proportional,
               medium_transformer={n: stem + n * per_layer for n in sorted({proportional, *args.compare_layers})})
    print(f"FLOPs per transformer eval / VAE decode: real 20B + VAE at 1328^2 {real_t:.3g} / {real_v:.3g} "
          f"({real_t / real_v:.1f}:1)", flush=True)
    for n, t in out["medium_transformer"].items():
        tag = " (proportional: the real ratio)" if n == proportional else ""
        print(f"  medium at {args.size}^2, {n} layers: {t:.3g} / {med_v:.3g} ({t / med_v:.1f}:1){tag}", flush=True)
    return out


def medium_components(dtype, attention_impl="auto", vae_base_dim=8, layers=4):
    from flax import nnx

    from turbojax.models.qwen_image import QwenImageConfig, QwenImageTransformer
    from turbojax.models.qwen_llm import Qwen2_5_VLTextConfig, QwenLLM
    kw = dict(param_dtype=dtype, dtype=dtype, attention_impl=attention_impl)
    transformer = QwenImageTransformer(QwenImageConfig(**{**MEDIUM_TRANSFORMER, "num_layers": layers}),
                                       rngs=nnx.Rngs(0), **kw)
    llm = QwenLLM(Qwen2_5_VLTextConfig(vocab_size=512, hidden_size=512, intermediate_size=1024,
                                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                       head_dim=64, mrope_section=(8, 12, 12)), rngs=nnx.Rngs(1), **kw)
    vae = medium_vae(attention_impl, vae_base_dim)
    return transformer, llm, vae


def medium_vae(attention_impl="auto", base_dim=8):
    from flax import nnx

    from turbojax.models.vae_qwen_image import AutoencoderKLQwenImage, QwenImageVAEConfig
    return AutoencoderKLQwenImage(QwenImageVAEConfig(base_dim=base_dim, z_dim=16), rngs=nnx.Rngs(2),
                                  attention_impl=attention_impl)


def bench_presets(args, layers: int) -> dict:
    import jax.numpy as jnp

    from turbojax import schedules
    from turbojax.pipelines import Text2ImagePipeline
    from turbojax.testing import tiny_qwen_tokenizer

    dtype = jnp.dtype(args.dtype)
    transformer, llm, vae = medium_components(dtype, vae_base_dim=args.vae_base_dim, layers=layers)
    print(f"-- transformer {layers} layers", flush=True)
    tok = tiny_qwen_tokenizer([PROMPT], vocab_size=400)
    pipe = Text2ImagePipeline("qwen_image", transformer, vae, llm, tok, schedules.QWEN_IMAGE, name="medium")
    presets = {
        "turbo_2step": dict(steps=2, guidance=1.0, scheduler="qwen_image_lightning", negative_prompt=None),
        "base_50step_cfg4": dict(steps=50, guidance=4.0, scheduler=None, negative_prompt=" "),
    }
    results = {}
    for name, kw in presets.items():
        call = dict(width=args.size, height=args.size, seed=0, **kw)
        pipe([PROMPT], **call)  # compile every stage for this shape
        best = None
        for _ in range(args.iters if name == "turbo_2step" else 1):
            t = {}
            t0 = time.perf_counter()
            pipe([PROMPT], timings=t, **call)
            t["total"] = time.perf_counter() - t0
            best = t if best is None or t["total"] < best["total"] else best
        results[name] = best
        print(f"{name:18s} total {best['total']:8.3f} s | text {best['text_encode']:.3f} s | transformer "
              f"{best['transformer']:.3f} s ({best['steps']} steps) | VAE decode {best['vae_decode']:.3f} s",
              flush=True)
    ratio = results["base_50step_cfg4"]["total"] / results["turbo_2step"]["total"]
    tr = results["base_50step_cfg4"]["transformer"] / results["turbo_2step"]["transformer"]
    print(f"end-to-end speed-up of the 2-step preset: {ratio:.1f}x (target >= 40x); transformer stage alone "
          f"{tr:.1f}x", flush=True)
    results["speedup_end_to_end"], results["speedup_transformer"] = ratio, tr
    return results


def vae_efficiency(args, flops: dict) -> dict:
    """GFLOP/s of the VAE decode at the medium width and at the real width (base 96, random weights, decoded at
    `--efficiency-size`), against the transformer's: tells whether the medium VAE runs as efficiently as the real
    one, i.e. whether its share of the medium pipeline's time stands for the real pipeline's."""
    import jax
    import jax.numpy as jnp

    from turbojax.models.vae_qwen_image import QWEN_IMAGE_VAE

    def rate(base_dim, size, model_flops):
        vae = medium_vae(base_dim=base_dim)
        z = jax.random.normal(jax.random.key(0), (1, size // 8, size // 8, vae.config.z_dim), jnp.float32)
        jax.block_until_ready(vae.decode_nhwc(z, tiled=False))
        best = float("inf")
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(vae.decode_nhwc(z, tiled=False))
            best = min(best, time.perf_counter() - t0)
        return {"seconds": best, "gflops": model_flops / best / 1e9}

    real_size = args.efficiency_size
    out = {"medium": rate(args.vae_base_dim, args.size, flops["medium_vae"]),
           "real_width": rate(QWEN_IMAGE_VAE.base_dim, real_size, vae_decode_flops(QWEN_IMAGE_VAE, real_size))}
    print(f"VAE decode efficiency: medium (base {args.vae_base_dim}, {args.size}^2) {out['medium']['gflops']:.0f} "
          f"GFLOP/s; real width (base {QWEN_IMAGE_VAE.base_dim}, {real_size}^2) {out['real_width']['gflops']:.0f} "
          f"GFLOP/s ({out['real_width']['seconds']:.2f} s)", flush=True)
    return out


def decode_child(mode: str, size: int, tile: int, base_dim: int) -> None:
    """Runs in a subprocess: decode one size x size image and print time + peak RSS as JSON."""
    import jax
    import jax.numpy as jnp
    vae = medium_vae(base_dim=base_dim)
    z = jax.random.normal(jax.random.key(0), (1, size // 8, size // 8, vae.config.z_dim), jnp.float32)
    tiled = mode == "tiled"
    if tiled:
        vae.enable_tiling(tile, tile, tile * 3 // 4, tile * 3 // 4)
    jax.block_until_ready(vae.decode_nhwc(z, tiled=tiled))  # compile
    t0 = time.perf_counter()
    jax.block_until_ready(vae.decode_nhwc(z, tiled=tiled))
    dt = time.perf_counter() - t0
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"mode": mode, "seconds": dt, "peak_rss_gib": hwm / 2**20}))


def bench_decode(args) -> dict:
    out = {}
    for mode in ("tiled", "untiled"):
        r = subprocess.run([sys.executable, __file__, "--decode-child", mode, "--decode-size", str(args.decode_size),
                            "--tile", str(args.tile), "--vae-base-dim", str(args.vae_base_dim)], capture_output=True, text=True, env=os.environ.copy())
        if r.returncode != 0:
            out[mode] = {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"}
        else:
            out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"decode {args.decode_size}x{args.decode_size} {mode:8s}: {out[mode]}", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--layers", default="proportional",
                   help="transformer depth for the headline comparison: an integer, or 'proportional' (default): "
                        "the depth whose FLOPs per evaluation stand to the VAE decode as in the real models")
    p.add_argument("--compare-layers", default="4",
                   help="comma-separated further depths to run the presets at (default 4, the forward benchmark's "
                        "medium transformer); empty for none")
    p.add_argument("--decode-size", type=int, default=2048)
    p.add_argument("--tile", type=int, default=512, help="tile size in pixels for the tiled decode")
    p.add_argument("--vae-base-dim", type=int, default=8,
                   help="medium VAE width (the real Qwen-Image VAE has 96)")
    p.add_argument("--efficiency-size", type=int, default=256,
                   help="image size of the real-width VAE decode timed for the efficiency line (0 to skip)")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--decode-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.decode_child:
        return decode_child(args.decode_child, args.decode_size, args.tile, args.vae_base_dim)
    try:
        layers = None if args.layers == "proportional" else int(args.layers)
    except ValueError:
        p.error(f"--layers takes an integer or 'proportional', got {args.layers!r}")
    try:
        args.compare_layers = [int(x) for x in args.compare_layers.split(",") if x.strip()]
    except ValueError:
        p.error(f"--compare-layers takes comma-separated integers, got {args.compare_layers!r}")
    import jax
    print(f"device: {jax.devices()[0].device_kind}, dtype {args.dtype}", flush=True)
    flops = flop_proportions(args)
    layers = layers or flops["proportional_layers"]
    results = {"flops": flops, "headline_layers": layers, "presets": {}}
    for n in [layers] + [c for c in args.compare_layers if c != layers]:
        results["presets"][n] = bench_presets(args, n)
    if args.efficiency_size:
        results["vae_efficiency"] = vae_efficiency(args, flops)
    head = results["presets"][layers]
    print(f"\nheadline ({layers} layers): 2-step preset {head['speedup_end_to_end']:.1f}x faster end to end than "
          "the 50-step true-CFG preset (target >= 40x)"
          + "".join(f"; {n} layers: {r['speedup_end_to_end']:.1f}x" for n, r in results["presets"].items()
                    if n != layers), flush=True)
    if not args.skip_decode:
        results["decode"] = bench_decode(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
