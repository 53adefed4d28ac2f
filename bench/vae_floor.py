"""Qwen-Image VAE decode against its convolution floor: every convolution of one decode timed alone, summed.

A decode can never be faster than its convolutions (and the mid-block attention's two products). Timing each
convolution shape of the decode in isolation (jitted, same shape and dtype, the form the model runs: NHWC x HWIO,
fp32 accumulation, bias, rounded once; `turbojax.models.vae_flux.conv_nhwc`) and summing with multiplicities gives
the time XLA:CPU's convolution kernels need for the decode's arithmetic. `decode / floor` is then what the rest
(norms, SiLU, nearest upsampling, residual adds, layout copies) costs, and the per-shape GFLOP/s say which
convolutions bound the whole. With `--torch 1` the same convolutions are timed in torch (channels-last, oneDNN) as
a second opinion on whether a slow shape is slow in XLA or on this CPU.

The convolution list is derived from the config (`decode_convs`) and checked against the traced decode at startup
(`traced_convs`: every `conv_general_dilated` of the jaxpr), so it is exactly what the model runs.

Run:  python bench/vae_floor.py [--configs medium,real] [--dtypes fp32] [--iters 10] [--profile 1] [--json out.json]
      medium = base_dim 8 at 512^2 (bench/pipeline.py's medium VAE), real = base_dim 96 (the published width) at 256^2
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from timing import best_ms  # noqa: E402
from turbojax.models.vae_flux import conv_nhwc  # noqa: E402
from turbojax.models.vae_qwen_image import AutoencoderKLQwenImage, QwenImageVAEConfig, _decode_fn  # noqa: E402

Conv = tuple[int, int, int, int, int]  # (H, W, Cin, Cout, k): stride 1, "same" padding, batch 1, output H x W
Gemm = tuple[int, int, int]            # (M, K, N)
CONFIGS = {"medium": (8, 512), "real": (96, 256)}  # name -> (base_dim, image size)
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def decode_convs(cfg: QwenImageVAEConfig, size: int) -> dict[Conv, int]:
    """Convolution shapes -> count of one `decode_nhwc` of a `size` x `size` image, from the config (mirrors
    `Decoder3d`: conv_in, mid block, up blocks with their upsamplers, conv_out; plus `post_quant_conv`)."""
    g: dict[Conv, int] = collections.Counter()
    mult = tuple(cfg.dim_mult)
    dims = [cfg.base_dim * u for u in (mult[-1],) + mult[::-1]]
    h = size // cfg.spatial_compression_ratio

    def resnet(cin, cout):
        g[(h, h, cin, cout, 3)] += 1
        g[(h, h, cout, cout, 3)] += 1
        if cin != cout:
            g[(h, h, cin, cout, 1)] += 1  # shortcut

    g[(h, h, cfg.z_dim, cfg.z_dim, 1)] += 1      # post_quant_conv
    g[(h, h, cfg.z_dim, dims[0], 3)] += 1        # conv_in
    resnet(dims[0], dims[0])                     # mid block: resnet, attention, resnet
    g[(h, h, dims[0], 3 * dims[0], 1)] += 1      # to_qkv
    g[(h, h, dims[0], dims[0], 1)] += 1          # proj
    resnet(dims[0], dims[0])
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:  # the previous upsampler halved the channels
            cin //= 2
        for j in range(cfg.num_res_blocks + 1):
            resnet(cin if j == 0 else cout, cout)
        if i != len(mult) - 1:
            h *= 2
            g[(h, h, cout, cout // 2, 3)] += 1   # nearest x2, then a 3x3 conv halving the channels
    g[(h, h, dims[-1], cfg.input_channels, 3)] += 1  # conv_out
    return g


def decode_attention_gemms(cfg: QwenImageVAEConfig, size: int) -> dict[Gemm, int]:
    """The mid-block's single-head attention over the latent grid: `Q K^T` and `P V`."""
    s, c = (size // cfg.spatial_compression_ratio) ** 2, cfg.base_dim * cfg.dim_mult[-1]
    return {(s, c, s): 1, (s, s, c): 1}


def conv_flops(convs: dict[Conv, int]) -> float:
    return float(sum(2 * h * w * k * k * ci * co * n for (h, w, ci, co, k), n in convs.items()))


def gemm_flops(gemms: dict[Gemm, int]) -> float:
    return float(sum(2 * m * k * n * c for (m, k, n), c in gemms.items()))


def _eqns(jaxpr):
    """Every equation of a jaxpr, recursing into sub-jaxprs (jit, custom_vjp, loops)."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def traced_convs(vae: AutoencoderKLQwenImage, size: int) -> dict[Conv, int]:
    """The convolutions the traced `decode_nhwc` actually runs, in `decode_convs`' form."""
    r, z = vae.config.spatial_compression_ratio, vae.config.z_dim
    graphdef, state = nnx.split((vae.post_quant_conv, vae.decoder))
    jaxpr = jax.make_jaxpr(lambda s, x: _decode_fn(nnx.merge(graphdef, s), x))(
        state, jax.ShapeDtypeStruct((1, size // r, size // r, z), jnp.float32))
    g: dict[Conv, int] = collections.Counter()
    for e in _eqns(jaxpr.jaxpr):
        if e.primitive.name != "conv_general_dilated":
            continue
        kh, kw, ci, co = e.invars[1].aval.shape
        _, h, w, _ = e.outvars[0].aval.shape
        if kh != kw or e.params["window_strides"] != (1, 1):
            raise ValueError(f"unexpected convolution in the decode: kernel {kh}x{kw}, strides "
                             f"{e.params['window_strides']}")
        g[(h, w, ci, co, kh)] += 1
    return g


def conv_floor(convs: dict[Conv, int], dtype, iters: int, with_torch: bool) -> dict:
    """Sum over shapes of count x best time of one convolution (JAX jitted, and torch channels-last), in ms."""
    rng = np.random.default_rng(0)
    rows, total = [], {"jax_ms": 0.0, "torch_ms": 0.0 if with_torch else None}
    for (h, w, ci, co, k), n in sorted(convs.items(), key=lambda kv: -conv_flops({kv[0]: kv[1]})):
        x = jnp.asarray(rng.standard_normal((1, h, w, ci)), dtype)
        wt = jnp.asarray(rng.standard_normal((k, k, ci, co)) / np.sqrt(k * k * ci), dtype)
        b = jnp.asarray(rng.standard_normal((co,)), dtype)
        p = ((k // 2, k // 2),) * 2
        fn = jax.jit(lambda x, wt, b, p=p: conv_nhwc(x, wt, b, padding=p, dtype=x.dtype))
        row = {"h": h, "w": w, "cin": ci, "cout": co, "k": k, "count": n,
               "jax_ms": best_ms(lambda: fn(x, wt, b).block_until_ready(), iters)}
        flops = conv_flops({(h, w, ci, co, k): 1})
        row["jax_gflops"] = flops / row["jax_ms"] / 1e6
        total["jax_ms"] += n * row["jax_ms"]
        if with_torch:
            import torch
            tdt = torch.float32 if dtype == jnp.float32 else torch.bfloat16
            tx = torch.tensor(np.asarray(x, np.float32)).permute(0, 3, 1, 2).to(tdt).contiguous(
                memory_format=torch.channels_last)
            tw = torch.tensor(np.asarray(wt, np.float32)).permute(3, 2, 0, 1).to(tdt).contiguous(
                memory_format=torch.channels_last)
            tb = torch.tensor(np.asarray(b, np.float32)).to(tdt)
            with torch.no_grad():
                row["torch_ms"] = best_ms(lambda: torch.nn.functional.conv2d(tx, tw, tb, padding=k // 2), iters)
            row["torch_gflops"] = flops / row["torch_ms"] / 1e6
            total["torch_ms"] += n * row["torch_ms"]
        rows.append(row)
    return {**total, "shapes": rows}


def attention_floor(gemms: dict[Gemm, int], dtype, iters: int) -> float:
    rng = np.random.default_rng(1)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    total = 0.0
    for (m, k, n), c in gemms.items():
        a, b = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((m, k), (k, n)))
        total += c * best_ms(lambda: mm(a, b).block_until_ready(), iters)
    return total


def run_config(name: str, base_dim: int, size: int, dname: str, a) -> dict:
    dtype = DTYPES[dname]
    cfg = QwenImageVAEConfig(base_dim=base_dim, z_dim=16)
    vae = AutoencoderKLQwenImage(cfg, rngs=nnx.Rngs(2), param_dtype=dtype, dtype=dtype)
    convs = decode_convs(cfg, size)
    traced = traced_convs(vae, size)
    if traced != convs:
        raise AssertionError(f"decode_convs disagrees with the traced decode: {dict(convs)} vs {dict(traced)}")
    gemms = decode_attention_gemms(cfg, size)
    r = cfg.spatial_compression_ratio
    z = jax.random.normal(jax.random.key(0), (1, size // r, size // r, cfg.z_dim), jnp.float32).astype(dtype)

    def decode():
        jax.block_until_ready(vae.decode_nhwc(z, tiled=False))
    t0 = time.perf_counter()
    decode()
    compile_s = time.perf_counter() - t0
    # The decode is timed before and after the floor and the best kept: the floor is measured in between, so
    # both see the same moments of this shared host as far as possible.
    decode_ms = best_ms(decode, a.iters)
    floor = conv_floor(convs, dtype, a.iters, a.torch)
    attn_ms = attention_floor(gemms, dtype, a.iters)
    decode_ms = min(decode_ms, best_ms(decode, a.iters))
    fl_conv, fl_attn = conv_flops(convs), gemm_flops(gemms)
    res = {"config": name, "base_dim": base_dim, "size": size, "dtype": dname, "compile_s": compile_s,
           "decode_ms": decode_ms, "conv_floor_ms": floor["jax_ms"], "attention_floor_ms": attn_ms,
           "torch_conv_floor_ms": floor["torch_ms"], "conv_gflop": fl_conv / 1e9, "attention_gflop": fl_attn / 1e9,
           "shapes": floor["shapes"]}
    res["floor_ms"] = floor["jax_ms"] + attn_ms
    res["ratio"] = decode_ms / res["floor_ms"]
    res["decode_gflops"] = (fl_conv + fl_attn) / decode_ms / 1e6
    res["conv_floor_gflops"] = fl_conv / floor["jax_ms"] / 1e6
    if a.profile:
        from op_profile import print_profile, profile_ops
        graphdef, state = nnx.split((vae.post_quant_conv, vae.decoder))
        fn = jax.jit(lambda arg: _decode_fn(nnx.merge(graphdef, arg[0]), arg[1]))
        prof = profile_ops(fn, (state, z), top=a.profile_top)
        res["profile"] = prof
        report(res)
        if "top" in prof:
            print_profile(prof, f"the {name} {dname} decode")
    else:
        report(res)
    return res


def report(r: dict) -> None:
    print(f"\n{r['config']} VAE (base_dim {r['base_dim']}) decode {r['size']}^2, {r['dtype']}: "
          f"{r['conv_gflop']:.2f} GFLOP of convolutions + {r['attention_gflop']:.2f} GFLOP of attention products")
    torch_note = (f"; torch's convolutions {r['torch_conv_floor_ms']:.1f} ms"
                  if r["torch_conv_floor_ms"] is not None else "")
    print(f"  decode {r['decode_ms']:.1f} ms (best; compile {r['compile_s']:.1f} s) = {r['decode_gflops']:.0f} GFLOP/s; "
          f"floor {r['floor_ms']:.1f} ms (convolutions {r['conv_floor_ms']:.1f} ms at {r['conv_floor_gflops']:.0f} "
          f"GFLOP/s, attention {r['attention_floor_ms']:.1f} ms){torch_note}; decode / floor {r['ratio']:.2f}x")
    print("    H x W      Cin  Cout k  count   JAX ms  GFLOP/s  share" + ("  torch ms  GFLOP/s" if
                                                                          r["torch_conv_floor_ms"] is not None else ""))
    for s in sorted(r["shapes"], key=lambda s: -s["jax_ms"] * s["count"]):
        line = (f"    {s['h']:4d}x{s['w']:<4d} {s['cin']:4d} {s['cout']:5d} {s['k']}  {s['count']:5d} "
                f"{s['jax_ms']:8.2f} {s['jax_gflops']:8.0f} {100 * s['jax_ms'] * s['count'] / r['floor_ms']:5.1f}%")
        if "torch_ms" in s:
            line += f"  {s['torch_ms']:8.2f} {s['torch_gflops']:7.0f}"
        print(line)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="medium,real", help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--dtypes", default="fp32", help="comma-separated subset of fp32,bf16")
    p.add_argument("--iters", type=int, default=10, help="timed runs per measurement (best kept)")
    p.add_argument("--torch", type=int, choices=(0, 1), default=1, help="1: time the same convolutions in torch")
    p.add_argument("--profile", type=int, choices=(0, 1), default=0, help="1: per-op profile of the compiled decode")
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args(argv)
    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    dnames = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if any(c not in CONFIGS for c in names) or any(d not in DTYPES for d in dnames):
        p.error(f"--configs from {list(CONFIGS)}, --dtypes from {list(DTYPES)}")
    import forward  # the host line
    print(f"host: {forward.cpu_summary()}; jax {jax.__version__} ({jax.devices()[0].platform})")
    results = [run_config(c, *CONFIGS[c], d, a) for c in names for d in dnames]
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=2))
        print(f"wrote {a.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
