"""How each family is called as a flow-matching denoiser: `velocity(model, x, sigma, cond, taps) -> v` in fp32.

The distillation code never touches model-specific layouts: latents stay in the model's own layout (Qwen-Image
packed `[B, N, 64]`, Z-Image `[B, C, 1, H, W]`), every loss is elementwise or per-sample, and these small adapters
know the call convention (Qwen-Image takes sigma and predicts `v = eps - x0`; Z-Image takes `1 - sigma` and predicts
`x0 - eps`, which the pipeline negates), where the feature taps are, and the patch grid the discriminator needs.
`cond` is a dict of arrays: `ctx [B, L, D]`, `mask [B, L]` (1 = valid).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class QwenImageDenoiser:
    """Packed latents `[B, (H/16)(W/16), 64]` (the pipeline's layout); `grid` = (H/16, W/16)."""
    grid: tuple[int, int]

    @property
    def img_shapes(self):
        return ((1, *self.grid),)

    def __call__(self, model, x, sigma, cond, taps: Sequence[int] = ()):
        mask = cond.get("mask")
        res = model.forward(x, cond["ctx"], mask, jnp.asarray(sigma, F32), self.img_shapes, taps=tuple(taps))
        if taps:
            out, feats = res
            return out.astype(F32), feats
        return res.astype(F32)


@dataclasses.dataclass(frozen=True)
class ZImageDenoiser:
    """Latents `[B, C, 1, H/8, W/8]`; `cap_len` caption tokens per sample (batches are bucketed to one caption
    length: Z-Image has no caption mask, its pads are learned tokens, so padding would change the output)."""
    grid: tuple[int, int]  # patch grid (H/16, W/16)
    cap_len: int

    def __call__(self, model, x, sigma, cond, taps: Sequence[int] = ()):
        ctx = cond["ctx"]
        caps = [ctx[i, :self.cap_len] for i in range(ctx.shape[0])]
        res = model.forward([x[i] for i in range(x.shape[0])], 1.0 - jnp.asarray(sigma, F32), caps,
                            taps=tuple(taps))
        outs, feats = res if taps else (res, None)
        v = -jnp.stack(outs).astype(F32)  # the model predicts x0 - eps
        return (v, feats) if taps else v


def taps_at_depths(depths: Sequence[float], num_layers: int) -> tuple[int, ...]:
    """Block indices at fractions of the depth (FastGen's advice: 0.5, 0.75, 0.99): the last block whose output
    lies at or before that fraction, e.g. 0.5 of 60 blocks -> block 29 (the 30th)."""
    out = []
    for d in depths:
        if not 0.0 < float(d) <= 1.0:
            raise ValueError(f"feature depth {d} must lie in (0, 1]")
        out.append(min(num_layers - 1, max(0, int(round(float(d) * num_layers)) - 1)))
    return tuple(sorted(set(out)))


class PackedShape(tuple):
    """Qwen-Image's packed latent shape `(N, 64)` that also knows its patch grid `(H/16, W/16)`: N alone cannot tell
    768x1024 from 1024x768 (or from a square). Behaves as the plain tuple everywhere else."""
    grid: tuple[int, int]

    def __new__(cls, grid: Sequence[int], channels: int):
        self = super().__new__(cls, (int(grid[0]) * int(grid[1]), int(channels)))
        self.grid = (int(grid[0]), int(grid[1]))
        return self

    def __reduce__(self):
        return PackedShape, (self.grid, self[1])


def latent_shape_for(family: str, in_channels: int, height: int, width: int) -> tuple:
    """One sample's latent shape in the model layout at `height` x `width` pixels (multiples of 16)."""
    if family == "qwen_image":
        return PackedShape((height // 16, width // 16), in_channels)
    return (int(in_channels), 1, height // 8, width // 8)


def qwen_grid(latent_shape: Sequence[int]) -> tuple[int, int]:
    """The patch grid of a packed Qwen-Image latent shape: its own (a `PackedShape`), else square."""
    grid = getattr(latent_shape, "grid", None)
    if grid is not None:
        return grid
    n = int(latent_shape[0])
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"Qwen-Image latents of {n} tokens: not a square grid; pass "
                         "latent_shape_for('qwen_image', channels, height, width)")
    return side, side


def denoiser_for(model, latent_shape: Sequence[int], cap_len: int | None = None):
    """The adapter for `model` given one sample's latent shape in the model layout."""
    fam = getattr(model, "family", None)
    if fam == "qwen_image":
        return QwenImageDenoiser(qwen_grid(latent_shape))
    if fam == "toy":
        from turbojax.distill.toy import ToyDenoiser
        return ToyDenoiser()
    if fam == "z_image":
        _, _, h, w = latent_shape
        p = model.config.patch_size
        return ZImageDenoiser((h // p, w // p), int(cap_len))
    raise ValueError(f"no denoiser adapter for model family {fam!r}")


def num_layers(model) -> int:
    cfg = model.config
    return cfg.num_layers if hasattr(cfg, "num_layers") else cfg.n_layers


def feature_dim(model) -> int:
    cfg = model.config
    return cfg.inner_dim if hasattr(cfg, "inner_dim") else cfg.dim


def as_f32(tree):
    return jax.tree.map(lambda x: x.astype(F32), tree)
