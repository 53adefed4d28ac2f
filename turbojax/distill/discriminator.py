"""Discriminator heads on transformer features (the DMD2 / FastGen design): one small conv head per feature tap.

Each head reads the image tokens `[B, N, D]` of one tapped block laid back onto their patch grid `[B, h, w, D]`,
then conv 4x4 stride 2 -> GroupNorm -> LeakyReLU(0.2) -> conv 1x1 -> mean over positions, one logit per sample;
the logits of the taps are averaged. The backbone (frozen teacher or fake score) is not part of this module: the
distillation step hands the features in, so one teacher pass serves both the DMD target and the discriminator.
A DINO-feature discriminator (data issue) implements the same `__call__(features, grid)` interface.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class ConvHead(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, groups: int = 32):
        self.conv = nnx.Conv(dim, hidden, (4, 4), strides=(2, 2), padding="SAME", rngs=rngs)
        # at least 8 channels per group: on a tiny map (1x1 after the stride) a group of one value would normalise
        # to zero and cut the discriminator off from its input
        self.norm = nnx.GroupNorm(hidden, num_groups=_groups(hidden, min(groups, max(1, hidden // 8))), rngs=rngs)
        self.out = nnx.Conv(hidden, 1, (1, 1), rngs=rngs)

    def __call__(self, grid_feats: jax.Array) -> jax.Array:
        h = jax.nn.leaky_relu(self.norm(self.conv(grid_feats)), 0.2)
        return jnp.mean(self.out(h), axis=(1, 2, 3))


def _groups(channels: int, wanted: int) -> int:
    g = min(wanted, channels)
    while channels % g:
        g -= 1
    return g


class FeatureDiscriminator(nnx.Module):
    """Heads for `n_taps` feature maps of width `dim`. Parameters are fp32 (trainables are fp32 masters)."""

    def __init__(self, dim: int, n_taps: int, *, hidden: int = 256, rngs: nnx.Rngs):
        if n_taps < 1:
            raise ValueError("the discriminator needs at least one feature tap")
        self.heads = nnx.List([ConvHead(dim, hidden, rngs=rngs) for _ in range(n_taps)])

    def __call__(self, features: Sequence[jax.Array], grid: tuple[int, int]) -> jax.Array:
        """`features[j]` `[B, h*w, dim]` (row-major patch tokens) -> logits `[B]`."""
        if len(features) != len(self.heads):
            raise ValueError(f"discriminator has {len(self.heads)} heads, got {len(features)} feature maps")
        h, w = grid
        logits = []
        for head, f in zip(self.heads, features):
            b, n, d = f.shape
            if n != h * w:
                raise ValueError(f"feature map has {n} tokens, grid {h}x{w} needs {h * w}")
            logits.append(head(f.astype(jnp.float32).reshape(b, h, w, d)))
        return jnp.mean(jnp.stack(logits), axis=0)
