"""Rotary position embeddings on adjacent channel pairs (both Qwen-Image and Z-Image rotate (x[2j], x[2j+1]))."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def axis_inv_freqs(dim: int, theta: float) -> np.ndarray:
    """`1 / theta^(2j/dim)` for j < dim/2, in float32 like the torch reference."""
    exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exps, dtype=np.float32)).astype(np.float32)


def rope_angles(positions: np.ndarray, axes_dims, theta: float) -> np.ndarray:
    """Angles `[S, sum(axes_dims)/2]` for integer positions `[S, n_axes]` (one column per axis)."""
    parts = [positions[:, a].astype(np.float32)[:, None] * axis_inv_freqs(d, theta)[None, :]
             for a, d in enumerate(axes_dims)]
    return np.concatenate(parts, axis=-1).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x [B, S, H, D]` by angles given as `cos, sin [S, D/2]` (or `[B, S, D/2]`), in fp32."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    re, im = x32[..., 0], x32[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def rope_angles_f64(positions: np.ndarray, axes_dims, theta: float) -> np.ndarray:
    """Like `rope_angles`, but frequencies and products are taken in float64 and only the angles are rounded to
    float32 (Z-Image's `RopeEmbedder.precompute_freqs_cis`). At axis-0 positions near 1500 the float32 product of
    `rope_angles` is off by up to ~1e-4 rad, which would show up in parity checks."""
    parts = []
    for a, d in enumerate(axes_dims):
        inv = 1.0 / (np.float64(theta) ** (np.arange(0, d, 2, dtype=np.float64) / np.float64(d)))
        parts.append(np.outer(positions[:, a].astype(np.float64), inv))
    return np.concatenate(parts, axis=-1).astype(np.float32)
