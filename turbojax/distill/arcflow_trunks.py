"""Where ArcFlow's heads read from, per model family, and how their per-token outputs map onto the latents.

A trunk knows four things about its family (`turbojax.distill.arcflow_heads` does the rest):

  * `hidden(model, x, sigma, cond)`: what the teacher's output layer reads (the final AdaLN output), `[B, N, D]`;
  * `proj` / `full` / `torch_names`: the output layer the heads replace (its kernel initialises the means), the
    modules trained fully (the final AdaLN) and their diffusers names in the exported `heads.safetensors`;
  * `order` and `sign`: the layout of one token's output (`"cp"`: index `c * P + p`, Qwen-Image's packing;
    `"pc"`: `p * C + c`, Z-Image's channel-last patches) and the sign that turns the model's output into the
    engine's velocity `v = eps - x0` (Z-Image predicts `x0 - eps`: -1);
  * `arrange(policy, x_shape)`: the policy from token layout `[B, N, K, C, P]` into the latent layout `x` has, so
    that `turbojax.distill.arcflow` works on the model's own latents (identity for Qwen-Image's packed tokens).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class QwenTrunk:
    """Qwen-Image: packed latents `[B, N, C * 4]`, one token per 2 x 2 patch (P = 4 pixels of C channels)."""
    channels: int
    pixels: int = 4
    grid: tuple[int, int] | None = None  # patch grid (H/16, W/16); None: square, from N
    proj: str = "proj_out"
    full: tuple[str, ...] = ("norm_out",)  # modules trained fully, with their diffusers names below
    torch_names: tuple[tuple[str, str], ...] = (("norm_out", "norm_out.linear"),)
    order: str = "cp"
    sign: float = 1.0
    family: str = "qwen_image"

    def hidden(self, model, x, sigma, cond):
        grid = self.grid
        if grid is None:
            side = int(round(x.shape[1] ** 0.5))
            if side * side != x.shape[1]:
                raise ValueError(f"{x.shape[1]} Qwen-Image tokens are not a square grid; give QwenTrunk(grid=...)")
            grid = (side, side)
        h = model.forward(x, cond["ctx"], cond.get("mask"), jnp.asarray(sigma, F32), ((1, *grid),),
                          return_hidden=True)
        return h.astype(F32)

    def arrange(self, pol, x_shape):
        return pol


@dataclasses.dataclass(frozen=True)
class ZImageTrunk:
    """Z-Image: latents `[B, C, F, H, W]` (the engine's layout; the pipeline's `[B, C, H, W]` gets F = 1), tokens
    of 2 x 2 patches with channel-last features `(pf, ph, pw, c)`; the model takes `1 - sigma` and predicts
    `x0 - eps`, so the means start as the *negated* `final_linear`.

    Captions: `cond["caps"]` (per-sample `[L_i, D]` arrays, the pipeline's ragged list) or `cond["ctx"] [B, L, D]`
    cut to `cap_len` tokens per sample (the engine's bucketed batches, as `ZImageDenoiser`)."""
    channels: int
    pixels: int = 4
    patch: int = 2
    cap_len: int | None = None  # None: every ctx column is a caption token
    grid: None = None
    proj: str = "final_linear"
    full: tuple[str, ...] = ("final_mod",)
    torch_names: tuple[tuple[str, str], ...] = (("final_mod", "all_final_layer.2-1.adaLN_modulation.1"),)
    order: str = "pc"
    sign: float = -1.0
    family: str = "z_image"

    def captions(self, cond) -> list:
        if "caps" in cond:
            return list(cond["caps"])
        ctx = cond["ctx"]
        n = ctx.shape[1] if self.cap_len is None else self.cap_len
        return [ctx[i, :n] for i in range(ctx.shape[0])]

    def hidden(self, model, x, sigma, cond):
        t = 1.0 - jnp.broadcast_to(jnp.asarray(sigma, F32).reshape(-1), (x.shape[0],))
        h = model.forward([x[i] for i in range(x.shape[0])], t, self.captions(cond), return_hidden=True)
        return h.astype(F32)

    def arrange(self, pol, x_shape):
        """`[B, N, K, C, P]` (tokens f -> h -> w, pixels ph -> pw) -> `[B, C, F, H, K, W, 1]`: K sits third from
        the end and the last two axes merge to W, so the policy's velocity comes out as `[B, C, F, H, W]`; logits
        and log-rates keep a 1 on the channel axis (one mixture per pixel, shared by its channels)."""
        b, _, f, h, w = x_shape
        p = self.patch
        hp, wp = h // p, w // p

        def move(a):
            k, c = a.shape[-3], a.shape[-2]
            a = a.reshape(b, f, hp, wp, k, c, p, p).transpose(0, 5, 1, 2, 6, 4, 3, 7)
            return a.reshape(b, c, f, h, k, w, 1)

        return type(pol)(move(pol.means), move(pol.logits), move(pol.log_rates))


@dataclasses.dataclass(frozen=True)
class ToyTrunk:
    """`turbojax.distill.toy.ToyFlow`: the last residual block's output (what its `out` Linear reads)."""
    last_block: int
    channels: int = 2
    pixels: int = 1
    grid: None = None
    proj: str = "out"
    full: tuple[str, ...] = ()
    torch_names: tuple[tuple[str, str], ...] = ()
    order: str = "cp"
    sign: float = 1.0
    family: str = "toy"

    def hidden(self, model, x, sigma, cond):
        _, feats = model.forward(x, cond["ctx"], cond.get("mask"), sigma, taps=(self.last_block,))
        return feats[-1][:, 0, :].astype(F32)

    def arrange(self, pol, x_shape):
        return pol


def trunk_for(model, latent_shape=None, cap_len: int | None = None):
    """The trunk of `model`'s family; `latent_shape` (one sample, model layout) fixes Qwen-Image's patch grid,
    `cap_len` Z-Image's caption length in bucketed batches."""
    fam = getattr(model, "family", None)
    if fam == "qwen_image":
        c = model.config
        grid = None
        if latent_shape is not None:
            from turbojax.distill.denoiser import denoiser_for
            grid = denoiser_for(model, latent_shape).grid
        return QwenTrunk(channels=c.out_channels or c.in_channels, pixels=c.patch_size ** 2, grid=grid)
    if fam == "z_image":
        c = model.config
        if c.f_patch_size != 1:
            raise ValueError(f"ArcFlow heads need Z-Image's f_patch_size 1, got {c.f_patch_size}")
        return ZImageTrunk(channels=c.in_channels, pixels=c.patch_size ** 2, patch=c.patch_size,
                           cap_len=None if cap_len is None else int(cap_len))
    if fam == "toy":
        return ToyTrunk(last_block=model.config.num_layers - 1, channels=model.config.dim)
    raise ValueError(f"ArcFlow heads are implemented for Qwen-Image, Z-Image (and the toy flow), not for family "
                     f"{fam!r}")
