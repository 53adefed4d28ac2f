"""The seed's headline on one GPU: 4 images at 2048x2048 with the 2-step student (2 transformer evaluations, CFG 1).

Real-size models with random weights built directly on the device in bf16 (no downloads; the weights do not
change the time): Qwen-Image (20B transformer, Qwen2.5-VL-7B text encoder, Qwen-Image VAE) and Z-Image (6B
transformer, Qwen3-4B text encoder, Flux VAE). For each it prints, as soon as they are known:

  * the time of each stage at steady state (text encode, each Euler step, VAE decode) and end to end;
  * the compile time of each stage (first call minus a steady-state call, or the AOT compile);
  * the transformer forward's FLOPs (counted analytically, see `transformer_flops`), achieved TFLOP/s and MFU
    against the bf16 matmul peak measured in the same run (8192^3, best of 10);
  * the peak device memory;
  * with torch + diffusers installed and a CUDA device, the same transformer forward in diffusers (eager, SDPA,
    bf16, same shapes) for a same-run ratio.

Targets (issue 14): 4 x 2048^2 end to end <= 5 s on one H200, transformer forward >= 50 % MFU and faster than
diffusers. The whole run must fit in 8 minutes including compiles.

Attention: "cudnn" (flash) for the transformers and text encoders on GPU; the VAE's single 384/512-wide head is
beyond cuDNN's head size, so the VAE uses the blockwise "chunked" attention (its mid-block attends over all 65536
latent cells of a 2048^2 image, whose full logits would not fit). `--tiny` runs the same code with tiny configs on
any backend (CPU included): the test suite runs it that way.

Run:  python bench/gpu_headline.py [--models qwen_image,z_image] [--diffusers 1] [--json out.json]
      python bench/gpu_headline.py --tiny          # seconds on CPU: checks the script, not the figures
"""
from __future__ import annotations

import os

# JAX must not take the whole GPU up front: diffusers runs in the same process afterwards.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from turbojax import sampling  # noqa: E402
from turbojax.models import qwen_llm  # noqa: E402
from turbojax.models.qwen_image import QWEN_IMAGE_20B, QwenImageConfig, QwenImageTransformer  # noqa: E402
from turbojax.models.vae_flux import FLUX_VAE, FLUX_VAE_TINY, AutoencoderKL  # noqa: E402
from turbojax.models.vae_qwen_image import QWEN_IMAGE_VAE, QWEN_IMAGE_VAE_TINY, AutoencoderKLQwenImage  # noqa: E402
from turbojax.models.z_image import Z_IMAGE_TINY, Z_IMAGE_TURBO, ZImageTransformer  # noqa: E402

SIGMAS = (1.0, 0.75, 0.0)  # the 2-step student's schedule (two transformer evaluations)
QWEN_TEMPLATE_DROP = 34    # Qwen-Image drops the chat template's first 34 hidden states
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="qwen_image,z_image")
    p.add_argument("--size", type=int, default=2048, help="image height = width in pixels")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=160, help="prompt tokens fed to the text encoder")
    p.add_argument("--decode", choices=("untiled", "tiled"), default="untiled")
    p.add_argument("--attention", default=None, help="transformer/text attention impl (default: cudnn on GPU)")
    p.add_argument("--vae-attention", default="chunked")
    p.add_argument("--diffusers", type=int, choices=(0, 1), default=1, help="also time diffusers' forward")
    p.add_argument("--matmul", type=int, default=8192, help="side of the square bf16 matmul timed for the peak")
    p.add_argument("--tiny", action="store_true", help="tiny configs, 64x64 images, batch 1 (checks the script)")
    p.add_argument("--json", dest="json_out")
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in a.models if m not in ("qwen_image", "z_image")]
    if bad:
        p.error(f"--models takes qwen_image and/or z_image, got {bad}")
    if a.tiny:
        a.size, a.batch, a.text_tokens, a.matmul = 64, 1, 48, 256
    if a.size % 16 or a.size <= 0:
        p.error(f"--size must be a positive multiple of 16, got {a.size}")
    if a.batch < 1 or a.text_tokens <= QWEN_TEMPLATE_DROP:
        p.error(f"--batch must be >= 1 and --text-tokens > {QWEN_TEMPLATE_DROP}")
    gpu = jax.default_backend() == "gpu"
    a.attention = a.attention or ("cudnn" if gpu else "auto")
    return a


# ---------------------------------------------------------------------------------------------------------------

def configs(kind: str, tiny: bool):
    """(transformer config, text encoder config, VAE config) of one family, real or tiny."""
    if kind == "qwen_image":
        if not tiny:
            return QWEN_IMAGE_20B, qwen_llm.QWEN2_5_VL_7B, QWEN_IMAGE_VAE
        llm = qwen_llm.QWEN2_5_VL_TINY
        return (QwenImageConfig(num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                joint_attention_dim=llm.hidden_size, in_channels=16, out_channels=4,
                                axes_dims_rope=(4, 6, 6)), llm, QWEN_IMAGE_VAE_TINY)
    if not tiny:
        return Z_IMAGE_TURBO, qwen_llm.QWEN3_4B, FLUX_VAE
    llm = qwen_llm.QWEN3_TINY
    return dataclasses.replace(Z_IMAGE_TINY, cap_feat_dim=llm.hidden_size), llm, FLUX_VAE_TINY


def transformer_flops(kind: str, cfg, batch: int, n_img: int, n_txt: int) -> float:
    """One forward, multiply-add = 2: every linear of every token plus QK^T and PV (4 S^2 D per layer);
    norms, RoPE and activations are not counted (same bookkeeping as bench/forward.py)."""
    if kind == "z_image":
        d, f, nl, nr = cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_refiner_layers
        ni, nt = -(-n_img // 32) * 32, -(-n_txt // 32) * 32

        def layers(s, n):
            return n * (2 * batch * s * (4 * d * d + 3 * d * f) + 4 * batch * s * s * d)
        stem = 2 * batch * (ni * cfg.patch_dim * d + nt * cfg.cap_feat_dim * d + ni * d * cfg.patch_dim)
        return float(layers(ni + nt, nl) + layers(ni, nr) + layers(nt, nr) + stem)
    d, s, nl = cfg.inner_dim, n_img + n_txt, cfg.num_layers
    total = nl * (24 * batch * s * d * d + 4 * batch * s * s * d)
    total += 2 * batch * (n_img * cfg.in_channels * d + n_txt * cfg.joint_attention_dim * d + n_img * d * cfg.out_dim)
    total += 2 * batch * (256 * d + d * d + nl * 12 * d * d + 2 * d * d)
    return float(total)


def on_device(make, jit: bool = True):
    """(graphdef, state, seconds): random weights created directly on the default device, by one jitted init
    (eagerly with `jit=False`: for tiny models XLA:CPU's compile of the init costs more than running it)."""
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    t0 = time.perf_counter()
    state = jax.block_until_ready(jax.jit(lambda: nnx.state(make()))() if jit else nnx.state(make()))
    return graphdef, state, time.perf_counter() - t0


def nbytes(state) -> float:
    return sum(x.nbytes for x in jax.tree.leaves(state))


def timed_call(fn, *args, runs: int = 2):
    """(first call incl. compile, best steady-state call) in seconds, and the last result."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return first, best, out


def matmul_peak(n: int) -> float:
    """bf16 TFLOP/s of an n^3 matmul (best of 10)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    _, best, _ = timed_call(mm, a, a, runs=10)
    return 2.0 * n ** 3 / best / 1e12


def peak_memory_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 30


# ---------------------------------------------------------------------------------------------------------------

def run_model(kind: str, a, peak_tflops: float) -> dict:
    bf16 = jnp.bfloat16
    tcfg, lcfg, vcfg = configs(kind, a.tiny)
    res: dict = {"size": a.size, "batch": a.batch}
    kw = dict(param_dtype=bf16, dtype=bf16)  # the Rngs are made inside each traced init

    # ---- weights, on the device ----
    jit = not a.tiny
    llm_g, llm_s, t_llm = on_device(lambda: qwen_llm.QwenLLM(lcfg, rngs=nnx.Rngs(0), attention_impl=a.attention, **kw),
                                    jit)
    model_cls = QwenImageTransformer if kind == "qwen_image" else ZImageTransformer
    dit_g, dit_s, t_dit = on_device(lambda: model_cls(tcfg, rngs=nnx.Rngs(1), attention_impl=a.attention, **kw), jit)
    vae_cls = AutoencoderKLQwenImage if kind == "qwen_image" else AutoencoderKL
    vae_g, vae_s, t_vae = on_device(lambda: vae_cls(vcfg, rngs=nnx.Rngs(2), attention_impl=a.vae_attention, **kw), jit)
    res["weights_gib"] = {"text": nbytes(llm_s) / 2 ** 30, "transformer": nbytes(dit_s) / 2 ** 30,
                          "vae": nbytes(vae_s) / 2 ** 30}
    res["init_s"] = t_llm + t_dit + t_vae
    log(f"{kind}: random bf16 weights on {jax.devices()[0].device_kind}: transformer "
        f"{res['weights_gib']['transformer']:.1f} GiB, text encoder {res['weights_gib']['text']:.1f} GiB, VAE "
        f"{res['weights_gib']['vae']:.2f} GiB ({res['init_s']:.1f} s)")

    # ---- text encoder ----
    ids = jax.random.randint(jax.random.key(1), (a.batch, a.text_tokens), 0, lcfg.vocab_size, jnp.int32)
    n = lcfg.num_hidden_layers
    sel = (n,) if kind == "qwen_image" else (n - 1,)  # Qwen-Image: last (normed) state; Z-Image: hidden_states[-2]

    @jax.jit
    def encode(state, ids):
        _, hs = nnx.merge(llm_g, state).forward(ids, None, sel)
        h = hs[sel[0]]
        return h[:, QWEN_TEMPLATE_DROP:] if kind == "qwen_image" else h
    first, best, ctx = timed_call(encode, llm_s, ids)
    res["text"] = {"compile_s": first - best, "s": best}
    log(f"{kind}: text encode {best * 1e3:.0f} ms (compile {first - best:.1f} s), context {tuple(ctx.shape)}")

    # ---- transformer: 2 Euler steps (CFG 1), one compiled step reused ----
    h = w = a.size // sampling.VAE_SCALE
    key = jax.random.key(2)
    if kind == "qwen_image":
        x = sampling.qwen_image_noise(key, a.batch, a.size, a.size, tcfg.out_channels or 16, bf16)
        t_model = sampling.qwen_model_timesteps(SIGMAS, bf16)
        shapes = ((1, h // 2, w // 2),)

        def velocity(model, x, ctx, t):
            return model.forward(x, ctx, None, jnp.full((x.shape[0],), t, jnp.float32), shapes)
    else:
        x = sampling.z_image_noise(key, a.batch, a.size, a.size, tcfg.in_channels, bf16)
        t_model = sampling.z_image_model_timesteps(SIGMAS)

        def velocity(model, x, ctx, t):  # ZImagePipeline negates the model output
            out = model.forward([xi[:, None] for xi in x], jnp.full((x.shape[0],), t, jnp.float32), list(ctx))
            return -jnp.stack(out)[:, :, 0]
    n_img = (h // 2) * (w // 2)
    flops = transformer_flops(kind, tcfg, a.batch, n_img, ctx.shape[1])

    def step(state, x, ctx, t, sigma, sigma_next):
        v = velocity(nnx.merge(dit_g, state), x, ctx, t)
        return sampling.euler_step(x, v, sigma, sigma_next)
    f32 = jnp.float32
    args = (dit_s, x, ctx, f32(t_model[0]), f32(SIGMAS[0]), f32(SIGMAS[1]))
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    log(f"{kind}: transformer step compiled in {compile_s:.1f} s ({n_img} image + {ctx.shape[1]} text tokens, "
        f"batch {a.batch}, {flops / 1e12:.1f} TFLOP per evaluation)")
    jax.block_until_ready(compiled(*args))  # warm-up (first execution allocates)
    steps, xi = [], x
    t_all = time.perf_counter()
    for i in range(len(SIGMAS) - 1):
        t0 = time.perf_counter()
        xi = jax.block_until_ready(compiled(dit_s, xi, ctx, f32(t_model[i]), f32(SIGMAS[i]), f32(SIGMAS[i + 1])))
        steps.append(time.perf_counter() - t0)
    denoise_s = time.perf_counter() - t_all
    tflops = flops / min(steps) / 1e12
    res["transformer"] = {"compile_s": compile_s, "steps_s": steps, "s": denoise_s, "flops": flops,
                          "tflops": tflops, "mfu": tflops / peak_tflops}
    log(f"{kind}: 2 steps {denoise_s:.3f} s ({', '.join(f'{s * 1e3:.0f}' for s in steps)} ms); transformer "
        f"{tflops:.1f} TFLOP/s = {100 * tflops / peak_tflops:.1f} % MFU (peak {peak_tflops:.1f} TFLOP/s)")

    # ---- VAE decode ----
    from turbojax.pipelines import _latents_nhwc, _quantise
    vae = nnx.merge(vae_g, vae_s)

    def decode(latents):  # de-normalise, decode (jitted inside decode_nhwc), quantise to uint8
        z = _latents_nhwc(vae, latents, kind, a.size, a.size)
        return _quantise(vae.decode_nhwc(z, tiled=a.decode == "tiled"))
    first, best, images = timed_call(decode, xi, runs=1)
    res["decode"] = {"mode": a.decode, "compile_s": first - best, "s": best}
    log(f"{kind}: VAE decode ({a.decode}) {best:.3f} s (compile {first - best:.1f} s), images "
        f"{tuple(images.shape)} {images.dtype}")

    res["end_to_end_s"] = res["text"]["s"] + denoise_s + best
    res["peak_memory_gib"] = peak_memory_gib()
    mem = "n/a" if res["peak_memory_gib"] is None else f"{res['peak_memory_gib']:.1f} GiB"
    log(f"{kind}: END TO END {a.batch} x {a.size}^2 in {res['end_to_end_s']:.3f} s (text {res['text']['s']:.3f} + "
        f"transformer {denoise_s:.3f} + decode {best:.3f}; target <= 5 s on one H200); peak device memory {mem}")
    for arr in jax.tree.leaves((llm_s, dit_s, vae_s)):
        arr.delete()  # free the device for the next model / diffusers
    res["_shapes"] = (x.shape, ctx.shape)
    return res


def diffusers_forward(kind: str, a, res: dict) -> dict | None:
    """Best-of-2 eager forward of the same-size diffusers transformer (bf16, CUDA, SDPA), or None without
    torch / diffusers / CUDA."""
    try:
        import torch
        if not torch.cuda.is_available():
            log(f"{kind}: diffusers comparison skipped (no CUDA device for torch)")
            return None
        from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel
    except ImportError as e:
        log(f"{kind}: diffusers comparison skipped ({e})")
        return None
    tcfg = configs(kind, a.tiny)[0]
    (xs, cs) = res["_shapes"]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    prev = torch.get_default_dtype()
    torch.set_default_dtype(bf16)  # random init directly in bf16 on the GPU
    try:
        with dev:
            if kind == "qwen_image":
                m = QwenImageTransformer2DModel(
                    num_layers=tcfg.num_layers, attention_head_dim=tcfg.attention_head_dim,
                    num_attention_heads=tcfg.num_attention_heads, joint_attention_dim=tcfg.joint_attention_dim,
                    in_channels=tcfg.in_channels, out_channels=tcfg.out_channels,
                    axes_dims_rope=tuple(tcfg.axes_dims_rope)).eval()
            else:
                m = ZImageTransformer2DModel(
                    dim=tcfg.dim, n_layers=tcfg.n_layers, n_refiner_layers=tcfg.n_refiner_layers,
                    n_heads=tcfg.n_heads, n_kv_heads=tcfg.n_kv_heads, cap_feat_dim=tcfg.cap_feat_dim,
                    in_channels=tcfg.in_channels, axes_dims=list(tcfg.axes_dims),
                    axes_lens=list(tcfg.axes_lens)).eval()
    finally:
        torch.set_default_dtype(prev)
    log(f"{kind}: diffusers model built in {time.perf_counter() - t0:.1f} s")
    with torch.no_grad():
        if kind == "qwen_image":
            side = a.size // 16
            hs = torch.randn(xs, device=dev, dtype=bf16)
            enc = torch.randn(cs, device=dev, dtype=bf16)
            mask = torch.ones(cs[:2], device=dev, dtype=torch.bool)
            t = torch.full((xs[0],), 0.5, device=dev)

            def fwd():
                return m(hidden_states=hs, encoder_hidden_states=enc, encoder_hidden_states_mask=mask, timestep=t,
                         img_shapes=[[(1, side, side)]] * xs[0], return_dict=False)[0]
        else:
            lat = [torch.randn((xs[1], 1, xs[2], xs[3]), device=dev, dtype=bf16) for _ in range(xs[0])]
            caps = [torch.randn(cs[1:], device=dev, dtype=bf16) for _ in range(xs[0])]
            t = torch.full((xs[0],), 0.5, device=dev)

            def fwd():
                return m(lat, t, caps, return_dict=False)[0]
        fwd()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            fwd()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    del m
    torch.cuda.empty_cache()
    ours = min(res["transformer"]["steps_s"])
    out = {"forward_s": best, "tflops": res["transformer"]["flops"] / best / 1e12, "speedup": best / ours}
    log(f"{kind}: diffusers eager forward {best:.3f} s ({out['tflops']:.1f} TFLOP/s); turbojax step "
        f"{ours:.3f} s: {out['speedup']:.2f}x (target > 1)")
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    dev = jax.devices()[0]
    log(f"jax {jax.__version__} on {jax.default_backend()} ({dev.device_kind}); attention {a.attention}, VAE "
        f"attention {a.vae_attention}; {a.batch} x {a.size}^2, sigmas {SIGMAS}{' (TINY configs)' if a.tiny else ''}")
    peak = matmul_peak(a.matmul)
    log(f"bf16 matmul peak {peak:.1f} TFLOP/s ({a.matmul}^3)")
    report = {"backend": jax.default_backend(), "device": dev.device_kind, "jax": jax.__version__,
              "matmul_peak_tflops": peak, "tiny": a.tiny, "models": {}}
    for kind in a.models:
        res = run_model(kind, a, peak)
        if a.diffusers:
            res["diffusers"] = diffusers_forward(kind, a, res)
        res.pop("_shapes")
        report["models"][kind] = res
    report["total_s"] = time.perf_counter() - T0
    log(f"total {report['total_s']:.0f} s (limit: 8 minutes on one H200)")
    if a.json_out:
        tmp = Path(a.json_out).with_name(Path(a.json_out).name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, a.json_out)
        log(f"wrote {a.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
