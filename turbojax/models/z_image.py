"""Z-Image single-stream S3-DiT (diffusers `ZImageTransformer2DModel`) as a functional Flax NNX module.

Spec: shared docs `architectures.md` §2. Pitfalls this file gets right on purpose (§6):
  * block modulation chunks are (scale_msa, gate_msa, scale_mlp, gate_mlp) with tanh gates and no shift; the final
    layer has a scale only, and only the final layer applies SiLU to the time embedding;
  * every block is "sandwich" normed (RMSNorm before and after attention and FFN);
  * image and caption are each padded to a multiple of 32 with *learned*, attended pad tokens; only padding
    between samples of a ragged batch is masked;
  * RoPE has theta 256, frequencies in float64, image positions offset on axis 0 by the padded caption length + 1,
    caption padding positions keep counting and image padding positions are (0, 0, 0);
  * the joint sequence is [image, caption] (Qwen-Image is [text, image]); patches are (pf, ph, pw, c) channel-last;
  * the time input is 1 - sigma (x t_scale inside) and the output predicts x0 - noise, exactly as diffusers does:
    the pipeline negates it, not the model.

The three block stacks (noise_refiner, context_refiner, layers) are stacked along a leading `layers` axis and run
with `lax.scan` when `scan_layers=True`. Everything that depends on sequence lengths (padding, positions, masks,
the RoPE table) is computed on the host from static shapes, so the jitted core compiles once per set of shapes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.nn.blocks import make_blocks, run_blocks
from turbojax.sharding import constrain_per_sample, constrain_residual
from turbojax.nn.attention import attention
from turbojax.nn.layers import Linear, RMSNorm, SwiGLU, broadcast_rows, layer_norm
from turbojax.nn.remat import remat_policy
from turbojax.nn.rope import apply_rope, rope_angles_f64

ADALN_EMBED_DIM = 256  # conditioning width is min(dim, 256)
SEQ_MULTI_OF = 32      # image and caption token counts are padded to a multiple of this
T_FREQ_DIM = 256       # sinusoid width of the time embedder
T_MID_DIM = 1024       # hidden width of the time embedder MLP (fixed in diffusers, independent of dim)
QK_NORM_EPS = 1e-5     # diffusers' Attention is built with eps=1e-5 whatever norm_eps says


@dataclasses.dataclass(frozen=True)
class ZImageConfig:
    """Field names and defaults follow diffusers' `ZImageTransformer2DModel` constructor.

    The defaults are diffusers' class defaults (so a config.json that omits a key means what it means there);
    note `axes_lens` differs from the published Z-Image-Turbo config, see `Z_IMAGE_TURBO`.
    `n_kv_heads` is accepted and ignored, as in diffusers (plain multi-head attention).
    """
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)  # same float expression as diffusers (floors, e.g. 64 -> 170)

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def patch_size(self) -> int:
        return self.all_patch_size[0]

    @property
    def f_patch_size(self) -> int:
        return self.all_f_patch_size[0]

    @property
    def patch_dim(self) -> int:
        return self.f_patch_size * self.patch_size * self.patch_size * self.in_channels

    def validate(self) -> "ZImageConfig":
        if self.siglip_feat_dim is not None:
            raise NotImplementedError("Z-Image Omni (siglip_feat_dim set) is not supported; turbojax implements the "
                                      "text-to-image Z-Image transformer")
        if tuple(self.all_patch_size) != (2,) or tuple(self.all_f_patch_size) != (1,):
            raise NotImplementedError(f"all_patch_size={self.all_patch_size}, all_f_patch_size="
                                      f"{self.all_f_patch_size}: only the released (2,) / (1,) embedder "
                                      "('all_x_embedder.2-1') is supported")
        if not self.qk_norm:
            raise NotImplementedError("qk_norm=false is not supported (every released Z-Image uses QK-RMSNorm)")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise ValueError(f"axes_dims {self.axes_dims} and axes_lens {self.axes_lens} must have 3 entries "
                             "(positions are (frame/caption, h, w))")
        if sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            raise ValueError(f"axes_dims {self.axes_dims} must be even and sum to the head dim {self.head_dim}")
        if self.n_layers < 1 or self.n_refiner_layers < 1:
            raise ValueError(f"n_layers ({self.n_layers}) and n_refiner_layers ({self.n_refiner_layers}) must be "
                             ">= 1 (blocks are stacked)")
        return self


Z_IMAGE_TURBO = ZImageConfig(axes_lens=(1536, 512, 512))  # as published in Z-Image-Turbo's transformer/config.json
Z_IMAGE_TINY = ZImageConfig(in_channels=4, dim=64, n_layers=2, n_refiner_layers=2, n_heads=2, n_kv_heads=2,
                            cap_feat_dim=24, axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))


# --------------------------------------------------------------------------------------------------------------
# Token plan (host side, from static shapes)
# --------------------------------------------------------------------------------------------------------------

def pad32(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


def caption_positions(cap_len: int) -> np.ndarray:
    """`[pad32(cap_len), 3]`: (1 + k, 0, 0); the pad-to-32 tokens keep counting."""
    pos = np.zeros((pad32(cap_len), 3), np.int64)
    pos[:, 0] = 1 + np.arange(pos.shape[0])
    return pos


def image_positions(grid: tuple[int, int, int], cap_padded: int) -> np.ndarray:
    """`[pad32(F*H*W), 3]`: (cap_padded + 1 + f, h, w) in f->h->w order; pad-to-32 tokens are (0, 0, 0)."""
    f, h, w = grid
    ff, hh, ww = np.meshgrid(cap_padded + 1 + np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    pos = np.stack([ff, hh, ww], axis=-1).reshape(-1, 3)
    return np.concatenate([pos, np.zeros((pad32(len(pos)) - len(pos), 3), np.int64)])


@dataclasses.dataclass(frozen=True)
class TokenPlan:
    """Static layout of a (possibly ragged) batch. Token kinds: 0 real, 1 pad-to-32 (pad token), 2 batch padding."""
    sizes: tuple[tuple[int, int, int], ...]   # per-sample latent (F, H, W)
    n_img: tuple[int, ...]                    # real image tokens per sample
    img_kind: np.ndarray                      # [B, Ni]
    cap_kind: np.ndarray                      # [B, Lc]
    img_rope: tuple[np.ndarray, np.ndarray]   # cos, sin [B, Ni, head_dim/2]; zero on (masked) batch padding
    cap_rope: tuple[np.ndarray, np.ndarray]
    uni_rope: tuple[np.ndarray, np.ndarray]   # [B, U, head_dim/2]
    uni_index: np.ndarray | None              # [B, U] rows of concat([img, cap], 1); None when it is the identity
    uni_valid: np.ndarray                     # [B, U] bool

    @staticmethod
    def key_mask(kind: np.ndarray) -> np.ndarray | None:
        valid = kind != 2
        return None if valid.all() else valid


def _rope_table(pos: list[np.ndarray], total: int, cfg: ZImageConfig) -> tuple[np.ndarray, np.ndarray]:
    half = cfg.head_dim // 2
    cos = np.zeros((len(pos), total, half), np.float32)
    sin = np.zeros((len(pos), total, half), np.float32)
    for i, p in enumerate(pos):
        ang = rope_angles_f64(p, cfg.axes_dims, cfg.rope_theta)
        cos[i, :len(p)], sin[i, :len(p)] = np.cos(ang), np.sin(ang)
    return cos, sin


def _kinds(real: Sequence[int], padded: Sequence[int], total: int) -> np.ndarray:
    kind = np.full((len(real), total), 2, np.int8)
    for i, (n, m) in enumerate(zip(real, padded)):
        kind[i, :n], kind[i, n:m] = 0, 1
    return kind


def plan_tokens(cfg: ZImageConfig, x_shapes: Sequence[tuple[int, ...]], cap_lens: Sequence[int]) -> TokenPlan:
    """Padding, positions, masks and the RoPE table for latents of shapes `[C, F, H, W]` and caption lengths."""
    p, pf = cfg.patch_size, cfg.f_patch_size
    sizes, grids = [], []
    for s in x_shapes:
        f, h, w = (int(v) for v in s[1:])
        sizes.append((f, h, w))
        grids.append((f // pf, h // p, w // p))
    n_img = [a * b * c for a, b, c in grids]
    n_imgp, n_capp = [pad32(n) for n in n_img], [pad32(int(n)) for n in cap_lens]
    img_pos = [image_positions(g, lc) for g, lc in zip(grids, n_capp)]
    cap_pos = [caption_positions(int(n)) for n in cap_lens]
    for i, (ip, cp) in enumerate(zip(img_pos, cap_pos)):
        top = np.maximum(ip.max(axis=0), cp.max(axis=0))
        if (top >= np.asarray(cfg.axes_lens)).any():
            raise ValueError(f"sample {i}: caption length {cap_lens[i]} with latent grid {grids[i]} needs RoPE "
                             f"positions up to {tuple(int(v) for v in top)} but axes_lens is {cfg.axes_lens}")
    ni, lc = max(n_imgp), max(n_capp)
    uni_len = [a + b for a, b in zip(n_imgp, n_capp)]
    u = max(uni_len)
    uni_pos = [np.concatenate([ip, cp]) for ip, cp in zip(img_pos, cap_pos)]
    if all(n == ni for n in n_imgp) and all(n == lc for n in n_capp):
        index = None  # [image | caption] is already the unified sequence of every sample
    else:
        index = np.zeros((len(sizes), u), np.int32)
        for i, (a, b) in enumerate(zip(n_imgp, n_capp)):
            index[i, :a + b] = np.concatenate([np.arange(a), ni + np.arange(b)])
    return TokenPlan(
        sizes=tuple(sizes), n_img=tuple(n_img),
        img_kind=_kinds(n_img, n_imgp, ni), cap_kind=_kinds(cap_lens, n_capp, lc),
        img_rope=_rope_table(img_pos, ni, cfg), cap_rope=_rope_table(cap_pos, lc, cfg),
        uni_rope=_rope_table(uni_pos, u, cfg), uni_index=index,
        uni_valid=_kinds(uni_len, uni_len, u) == 0)


def time_sinusoid(t: jax.Array, dim: int = T_FREQ_DIM, max_period: float = 10000.0) -> jax.Array:
    """`[cos | sin](t * f_k)`, `f_k = exp(-ln(max_period) k / (dim/2))` in fp32, as diffusers'
    `TimestepEmbedder.timestep_embedding` (t is already multiplied by t_scale; no flip, no shift).

    The frequency table is built on the host as the correctly rounded exp of torch's float32 exponent: XLA's fp32
    exp is off by one ulp in ~10% of the entries, which at t * 1000 ~ 1000 moves the angles by ~3e-5.
    """
    half = dim // 2
    exponent = np.float32(-np.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return emb if dim % 2 == 0 else jnp.pad(emb, ((0, 0), (0, 1)))


def patchify(image: jax.Array, p: int, pf: int) -> jax.Array:
    """`[C, F, H, W] -> [F'*H'*W', pf*p*p*C]`, tokens in f->h->w order, features (pf, ph, pw, c)."""
    c, f, h, w = image.shape
    x = image.reshape(c, f // pf, pf, h // p, p, w // p, p).transpose(1, 3, 5, 2, 4, 6, 0)
    return x.reshape((f // pf) * (h // p) * (w // p), pf * p * p * c)


def unpatchify(tokens: jax.Array, size: tuple[int, int, int], channels: int, p: int, pf: int) -> jax.Array:
    f, h, w = size
    x = tokens.reshape(f // pf, h // p, w // p, pf, p, p, channels).transpose(6, 0, 3, 1, 4, 2, 5)
    return x.reshape(channels, f, h, w)


def _pad_rows(rows: jax.Array, total: int) -> jax.Array:
    return jnp.pad(rows, ((0, total - rows.shape[0]), (0, 0)))


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------

class SelfAttention(nnx.Module):
    """Bias-free q/k/v/out projections, QK-RMSNorm over the head dim, RoPE on q and k."""

    def __init__(self, cfg: ZImageConfig, *, rngs, param_dtype, dtype, impl: str):
        d, hd = cfg.dim, cfg.head_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        qkv = dict(axes=("embed", "heads"), use_bias=False, **kw)
        self.to_q, self.to_k, self.to_v = Linear(d, d, **qkv), Linear(d, d, **qkv), Linear(d, d, **qkv)
        self.to_out = Linear(d, d, axes=("heads", "embed"), use_bias=False, **kw)
        norm = dict(eps=QK_NORM_EPS, axes=("head_dim",), **kw)
        self.norm_q, self.norm_k = RMSNorm(hd, **norm), RMSNorm(hd, **norm)
        self.head_dim, self.impl = hd, impl

    def __call__(self, x, key_mask, cos, sin):
        def heads(y):
            return y.reshape(*y.shape[:-1], -1, self.head_dim)

        q = apply_rope(self.norm_q(heads(self.to_q(x))), cos, sin)
        k = apply_rope(self.norm_k(heads(self.to_k(x))), cos, sin)
        o = attention(q, k, heads(self.to_v(x)), key_mask, impl=self.impl)
        return self.to_out(o.reshape(*o.shape[:2], -1))


class ZImageBlock(nnx.Module):
    """`ZImageTransformerBlock`: modulated (noise_refiner, layers) or not (context_refiner).

    Returns a 1-tuple so that it can be the body of `run_blocks` (the carry is a tuple of streams).
    """

    def __init__(self, cfg: ZImageConfig, *, modulated: bool, rngs, param_dtype, dtype, impl: str):
        d = cfg.dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.attention = SelfAttention(cfg, impl=impl, **kw)
        self.feed_forward = SwiGLU(d, cfg.ffn_dim, **kw)
        norm = dict(eps=cfg.norm_eps, axes=("embed",), **kw)
        self.attention_norm1, self.attention_norm2 = RMSNorm(d, **norm), RMSNorm(d, **norm)
        self.ffn_norm1, self.ffn_norm2 = RMSNorm(d, **norm), RMSNorm(d, **norm)
        self.adaLN_modulation = (Linear(cfg.adaln_dim, 4 * d, axes=("adaln", "mod"), **kw) if modulated else None)

    def __call__(self, x, adaln, key_mask, cos, sin):
        if self.adaLN_modulation is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), key_mask, cos, sin))
            x = x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
            return (x,)
        # no shift terms; scales are 1 + s and gates tanh(g); the time embedding enters without SiLU
        mod = constrain_per_sample(self.adaLN_modulation(adaln))[:, None, :]  # see sharding.constrain_per_sample
        scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
        # broadcast_rows: the same values, with a gradient that sums over tokens quickly (see its docstring)
        scale_msa, gate_msa, scale_mlp, gate_mlp = (broadcast_rows(m, x.shape) for m in (
            1.0 + scale_msa, jnp.tanh(gate_msa), 1.0 + scale_mlp, jnp.tanh(gate_mlp)))
        attn = self.attention(self.attention_norm1(x) * scale_msa, key_mask, cos, sin)
        x = x + gate_msa * self.attention_norm2(attn)
        x = x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))
        return (x,)


class ZImageTransformer(nnx.Module):
    """Z-Image S3-DiT. Call it like diffusers' `ZImageTransformer2DModel.forward` (arrays for tensors)."""

    family = "z_image"

    def __init__(self, config: ZImageConfig = Z_IMAGE_TURBO, *, rngs: nnx.Rngs | None = None,
                 param_dtype=jnp.float32, dtype=jnp.float32, scan_layers: bool = True, remat: str = "none",
                 attention_impl: str = "auto"):
        cfg = config.validate()
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        d = cfg.dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.config, self.dtype, self.scan_layers, self.remat = cfg, dtype, scan_layers, remat
        remat_policy(remat)  # validate the name early
        self.x_embedder = Linear(cfg.patch_dim, d, axes=("patch", "embed"), **kw)
        self.cap_norm = RMSNorm(cfg.cap_feat_dim, eps=cfg.norm_eps, axes=("text_embed",), **kw)
        self.cap_embedder = Linear(cfg.cap_feat_dim, d, axes=("text_embed", "embed"), **kw)
        self.time_linear_1 = Linear(T_FREQ_DIM, T_MID_DIM, axes=("freq", "time_mlp"), **kw)
        self.time_linear_2 = Linear(T_MID_DIM, cfg.adaln_dim, axes=("time_mlp", "adaln"), **kw)
        # diffusers initialises the pad tokens to zeros; they are learned, attended tokens
        self.x_pad_token = nnx.Param(jnp.zeros((1, d), param_dtype), axes=(None, "embed"))
        self.cap_pad_token = nnx.Param(jnp.zeros((1, d), param_dtype), axes=(None, "embed"))
        block_kw = dict(param_dtype=param_dtype, dtype=dtype, impl=attention_impl)
        self.noise_refiner = _block_stack(cfg, cfg.n_refiner_layers, True, scan_layers, rngs, block_kw)
        self.context_refiner = _block_stack(cfg, cfg.n_refiner_layers, False, scan_layers, rngs, block_kw)
        self.layers = _block_stack(cfg, cfg.n_layers, True, scan_layers, rngs, block_kw)
        self.final_mod = Linear(cfg.adaln_dim, d, axes=("adaln", "embed"), **kw)
        self.final_linear = Linear(d, cfg.patch_dim, axes=("embed", "patch"), **kw)

    # ---- pure forward on arrays (traced under jit) ----
    def forward(self, x: Sequence[jax.Array], t: jax.Array, cap_feats: Sequence[jax.Array], taps: Sequence[int] = (),
                return_hidden: bool = False):
        """Per-sample latents `[C, F, H, W]`, `t [B]` (= 1 - sigma), per-sample captions `[L_i, cap_feat_dim]`.

        With `taps` (0-based indices into the main `layers` stack) returns `(outputs, features)`: features[j] holds
        the image tokens `[B, N_img, dim]` of the unified stream after `layers[taps[j]]` (all samples must then
        share one latent size). `return_hidden=True` returns, in place of the outputs, what `final_linear` reads:
        the image tokens after the final AdaLN `[B, N_img, dim]` in patchify order (one latent size across the
        batch), for heads that replace the output layer (ArcFlow)."""
        from turbojax.models.qwen_image import check_taps
        cfg, dt = self.config, self.dtype
        taps = check_taps(taps, cfg.n_layers)
        p, pf, c = cfg.patch_size, cfg.f_patch_size, cfg.in_channels
        plan = plan_tokens(cfg, [xi.shape for xi in x], [ci.shape[0] for ci in cap_feats])

        # diffusers: t * t_scale in t's own dtype, sinusoid in fp32, cast to the MLP's weight dtype
        t_freq = time_sinusoid(t * cfg.t_scale).astype(self.time_linear_1.kernel.dtype)
        adaln = self.time_linear_2(jax.nn.silu(self.time_linear_1(t_freq))).astype(dt)

        def refine(stack, tokens, kind, pad_token, rope, adaln_in):
            mask = _mask(plan.key_mask(kind))
            kind = jnp.asarray(kind)[..., None]
            # pad-to-32 rows become the learned pad token (attended); batch padding rows are zero (masked keys)
            tokens = jnp.where(kind == 1, pad_token[...].astype(dt), jnp.where(kind == 2, 0, tokens).astype(dt))
            cos, sin = (jnp.asarray(a) for a in rope)
            (tokens,) = run_blocks(stack, (tokens,), (adaln_in, mask, cos, sin), scan=self.scan_layers,
                                   remat=self.remat)
            return tokens

        ni, lc = plan.img_kind.shape[1], plan.cap_kind.shape[1]
        img = jnp.stack([_pad_rows(patchify(xi.astype(dt), p, pf), ni) for xi in x])
        img = refine(self.noise_refiner, self.x_embedder(img), plan.img_kind, self.x_pad_token, plan.img_rope, adaln)
        cap = jnp.stack([_pad_rows(ci.astype(dt), lc) for ci in cap_feats])
        cap = refine(self.context_refiner, self.cap_embedder(self.cap_norm(cap)), plan.cap_kind, self.cap_pad_token,
                     plan.cap_rope, None)

        # unified sequence per sample: [image incl. pad-to-32 | caption incl. pad-to-32], then batch padding
        uni = constrain_residual(jnp.concatenate([img, cap], axis=1))  # entering the main stack (no-op off a mesh)
        if plan.uni_index is not None:
            uni = jnp.take_along_axis(uni, jnp.asarray(plan.uni_index)[..., None], axis=1)
            uni = jnp.where(jnp.asarray(plan.uni_valid)[..., None], uni, 0)
        cos, sin = (jnp.asarray(a) for a in plan.uni_rope)
        uni_mask = None if plan.uni_valid.all() else jnp.asarray(plan.uni_valid)
        res = run_blocks(self.layers, (uni,), (adaln, uni_mask, cos, sin), scan=self.scan_layers,
                         remat=self.remat, taps=taps)
        (uni,), feats = res if taps else (res, None)
        uni = constrain_residual(uni)  # leaving the stack: still one sample per data-parallel chip on a mesh

        scale = 1.0 + constrain_per_sample(self.final_mod(jax.nn.silu(adaln)))[:, None, :]
        hidden = layer_norm(uni, 1e-6) * scale
        if (taps or return_hidden) and len(set(plan.n_img)) != 1:
            raise ValueError(f"feature taps and return_hidden need one latent size across the batch, got "
                             f"{sorted(set(plan.sizes))}")
        if return_hidden:
            outs = hidden[:, :plan.n_img[0]]  # the image rows come first in each sample's unified sequence
        else:
            out = self.final_linear(hidden)
            outs = [unpatchify(out[i, :n], size, c, p, pf) for i, (n, size) in enumerate(zip(plan.n_img, plan.sizes))]
        if not taps:
            return outs
        return outs, [f[:, :plan.n_img[0]] for f in feats]

    def __call__(self, x, t, cap_feats, return_dict: bool = True, controlnet_block_samples=None, siglip_feats=None,
                 image_noise_mask=None, patch_size: int = 2, f_patch_size: int = 1,
                 joint_attention_kwargs: dict[str, Any] | None = None):
        """Same arguments as diffusers' forward; returns the list of per-sample outputs `[C, F, H, W]` (a 1-tuple
        holding that list if `return_dict=False`). Samples may differ in caption length and latent size."""
        cfg = self.config
        if controlnet_block_samples is not None:
            raise NotImplementedError("controlnet_block_samples (Z-Image ControlNet) is not supported")
        if siglip_feats is not None or image_noise_mask is not None or (
                isinstance(x, (list, tuple)) and any(isinstance(xi, (list, tuple)) for xi in x)):
            raise NotImplementedError("Z-Image Omni mode (nested image lists, siglip_feats, image_noise_mask) is not "
                                      "supported")
        if joint_attention_kwargs and any(k != "scale" for k in joint_attention_kwargs):
            raise NotImplementedError(f"joint_attention_kwargs {sorted(joint_attention_kwargs)} are not supported "
                                      "(LoRA scales are applied when merging adapters)")
        if patch_size not in cfg.all_patch_size or f_patch_size not in cfg.all_f_patch_size:
            raise ValueError(f"patch_size={patch_size}, f_patch_size={f_patch_size} not in the model's "
                             f"all_patch_size {cfg.all_patch_size} / all_f_patch_size {cfg.all_f_patch_size}")
        xs, caps = _as_list(x, 4, "x"), _as_list(cap_feats, 2, "cap_feats")
        if not xs or len(xs) != len(caps):
            raise ValueError(f"x and cap_feats must be non-empty lists of the same length (one entry per sample), "
                             f"got {len(xs)} and {len(caps)}")
        p, pf = cfg.patch_size, cfg.f_patch_size
        for i, xi in enumerate(xs):
            ch, f, h, w = xi.shape
            if ch != cfg.in_channels or f % pf or h % p or w % p or min(f, h, w) == 0:
                raise ValueError(f"x[{i}] must be [C={cfg.in_channels}, F, H, W] with F a multiple of {pf} and H, W "
                                 f"positive multiples of {p}, got {xi.shape}")
        for i, ci in enumerate(caps):
            if ci.shape[0] == 0 or ci.shape[1] != cfg.cap_feat_dim:
                raise ValueError(f"cap_feats[{i}] must be [L >= 1, {cfg.cap_feat_dim}], got {ci.shape}")
        t = jnp.asarray(t)
        if not jnp.issubdtype(t.dtype, jnp.floating):
            t = t.astype(jnp.float32)
        t = t.reshape(-1)
        if t.shape[0] not in (1, len(xs)):
            raise ValueError(f"t must be a scalar or have one value per sample ({len(xs)}), got shape {t.shape}")
        t = jnp.broadcast_to(t, (len(xs),))
        graphdef, state = nnx.split(self)
        out = list(_jitted_forward(graphdef, state, tuple(xs), t, tuple(caps)))
        return out if return_dict else (out,)


def _mask(m):
    return None if m is None else jnp.asarray(m)


def _as_list(v, ndim: int, name: str) -> list[jax.Array]:
    """A list of per-sample arrays; a batched array with one more dimension is split along axis 0."""
    if isinstance(v, (list, tuple)):
        items = [jnp.asarray(a) for a in v]
    else:
        arr = jnp.asarray(v)
        if arr.ndim != ndim + 1:
            raise ValueError(f"{name} must be a list of per-sample {ndim}-D arrays, got an array of shape {arr.shape}")
        items = list(arr)
    for i, a in enumerate(items):
        if a.ndim != ndim:
            raise ValueError(f"{name}[{i}] must be {ndim}-D, got shape {a.shape}")
    return items


def _block_stack(cfg: ZImageConfig, n: int, modulated: bool, scan: bool, rngs, block_kw):
    return make_blocks(lambda r: ZImageBlock(cfg, modulated=modulated, rngs=r, **block_kw), n, rngs, scan=scan)


@functools.partial(jax.jit, static_argnums=(0,))
def _jitted_forward(graphdef, state, xs, t, caps):
    return tuple(nnx.merge(graphdef, state).forward(xs, t, caps))
