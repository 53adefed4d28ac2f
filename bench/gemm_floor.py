"""GEMM floor of a transformer forward: the time its matrix products alone take, measured one shape at a time.

A forward pass can never be faster than its GEMMs. Timing every (M, K, N) product of one forward in isolation, in
JAX (the form turbojax's `Linear` uses: fp32 accumulation, rounded once to the compute dtype) and in torch, and summing
them with their multiplicities, gives for each framework the time its matrix library needs for the model's
arithmetic. `diffusers forward ms / JAX GEMM floor ms` is then the largest speed-up over diffusers that *any* JAX
implementation could reach on this host, with every norm, softmax, RoPE and elementwise op for free. When a target is
above that ceiling it cannot be met by changing turbojax; only a faster GEMM would.

Shapes are listed analytically from the config (the same bookkeeping as `forward.model_flops`); attention is counted
as per-head `[S, hd] x [hd, S]` and `[S, S] x [S, hd]` products, which is what the CPU "chunked" attention runs
when the sequence fits one key block. Per-sample products (timestep MLP, modulation) are included though tiny.
"""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import torch

from timing import best_ms

Gemm = tuple[int, int, int]  # (M, K, N): [M, K] x [K, N]


def _ceil32(n: int) -> int:
    return -(-n // 32) * 32


def qwen_image_gemms(cfg, batch: int, n_img: int, n_txt: int) -> dict[Gemm, int]:
    """(M, K, N) -> count for one `QwenImageTransformer` forward (batch folded into M)."""
    d, hd, nh, nl = cfg.inner_dim, cfg.attention_head_dim, cfg.num_attention_heads, cfg.num_layers
    s = n_img + n_txt
    g: dict[Gemm, int] = collections.Counter()
    g[(batch * n_img, cfg.in_channels, d)] += 1                     # img_in
    g[(batch * n_txt, cfg.joint_attention_dim, d)] += 1             # txt_in
    g[(batch, 256, d)] += 1                                         # timestep MLP
    g[(batch, d, d)] += 1
    g[(batch, d, 6 * d)] += 2 * nl                                  # img_mod / txt_mod
    for m in (batch * n_img, batch * n_txt):
        g[(m, d, d)] += 4 * nl                                      # q, k, v, out
        g[(m, d, 4 * d)] += nl                                      # MLP up
        g[(m, 4 * d, d)] += nl                                      # MLP down
    g[(s, hd, s)] += batch * nh * nl                                # Q K^T per head
    g[(s, s, hd)] += batch * nh * nl                                # P V per head
    g[(batch, d, 2 * d)] += 1                                       # norm_out modulation
    g[(batch * n_img, d, cfg.out_dim)] += 1                         # proj_out
    return g


def z_image_gemms(cfg, batch: int, n_img: int, n_txt: int) -> dict[Gemm, int]:
    """(M, K, N) -> count for one `ZImageTransformer` forward; token counts padded to multiples of 32 as the
    model does."""
    d, nh, nl, nr = cfg.dim, cfg.n_heads, cfg.n_layers, cfg.n_refiner_layers
    hd, f, adaln = d // nh, cfg.ffn_dim, cfg.adaln_dim
    ni, nt = _ceil32(n_img), _ceil32(n_txt)
    g: dict[Gemm, int] = collections.Counter()

    def layers(tokens: int, count: int, modulated: bool):
        m = batch * tokens
        g[(m, d, d)] += 4 * count                                   # q, k, v, out
        g[(m, d, f)] += 2 * count                                   # SwiGLU gate, up
        g[(m, f, d)] += count                                       # SwiGLU down
        g[(tokens, hd, tokens)] += batch * nh * count
        g[(tokens, tokens, hd)] += batch * nh * count
        if modulated:
            g[(batch, adaln, 4 * d)] += count

    layers(ni + nt, nl, True)
    layers(ni, nr, True)
    layers(nt, nr, False)
    g[(batch * ni, cfg.patch_dim, d)] += 1                          # patch embedder
    g[(batch * nt, cfg.cap_feat_dim, d)] += 1                       # caption embedder
    g[(batch, 256, 1024)] += 1                                      # timestep MLP (fixed widths in diffusers)
    g[(batch, 1024, adaln)] += 1
    g[(batch, adaln, d)] += 1                                       # final layer modulation
    g[(batch * ni, d, cfg.patch_dim)] += 1                          # final projection
    return g


def gemm_floor(gemms: dict[Gemm, int], jdt, tdt, iters: int = 10) -> dict:
    """Sum over shapes of count x best time of one product, for JAX (jitted) and torch, in ms."""
    rng = np.random.default_rng(0)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(x.dtype))
    rows, total = [], {"jax_ms": 0.0, "torch_ms": 0.0}
    for (m, k, n), count in sorted(gemms.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2] * kv[1]):
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        ja, jb = jnp.asarray(a, jdt), jnp.asarray(b, jdt)
        ta, tb = torch.tensor(a).to(tdt), torch.tensor(b).to(tdt)
        t_jax = best_ms(lambda: mm(ja, jb).block_until_ready(), iters)
        t_torch = best_ms(lambda: torch.matmul(ta, tb), iters)
        rows.append({"m": m, "k": k, "n": n, "count": count, "jax_ms": t_jax, "torch_ms": t_torch,
                     "jax_gflops": 2e-6 * m * k * n / t_jax, "torch_gflops": 2e-6 * m * k * n / t_torch})
        total["jax_ms"] += count * t_jax
        total["torch_ms"] += count * t_torch
    return {**total, "shapes": rows}
