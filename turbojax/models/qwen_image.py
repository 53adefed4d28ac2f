"""Qwen-Image dual-stream MMDiT (diffusers `QwenImageTransformer2DModel`) as a functional Flax NNX module.

Spec: shared docs `architectures.md` §1. Pitfalls this file gets right on purpose:
  * block modulation chunks are (shift, scale, gate) x 2, but `norm_out` is (scale, shift);
  * MSRoPE rotates adjacent pairs in fp32, centres image h/w positions and puts text on the diagonal;
  * the joint sequence is [text, image]; the text mask masks text keys only;
  * the time input is sigma in [0, 1] (x1000 inside the sinusoid).

Blocks are stacked along a leading `layers` axis and run with `lax.scan` when `scan_layers=True`, so compile time
does not grow with depth; `remat` picks a `jax.checkpoint` policy for the scanned (or looped) block body.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.nn.attention import attention
from turbojax.nn.layers import Linear, RMSNorm, broadcast_rows, gelu_tanh, layer_norm, timestep_sinusoid
from turbojax.nn.blocks import make_blocks, run_blocks
from turbojax.sharding import constrain_per_sample, constrain_residual
from turbojax.nn.remat import remat_policy
from turbojax.nn.rope import apply_rope, rope_angles


@dataclasses.dataclass(frozen=True)
class QwenImageConfig:
    """Field names and defaults follow diffusers' `QwenImageTransformer2DModel` config (= the published 20B)."""
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    def validate(self) -> "QwenImageConfig":
        for flag in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
            if getattr(self, flag):
                raise NotImplementedError(
                    f"QwenImage config flag {flag}=true (Edit-2511 / Layered / guidance variants) is not supported; "
                    "turbojax implements the text-to-image Qwen-Image transformer")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be even")
        return self


QWEN_IMAGE_20B = QwenImageConfig()
QWEN_IMAGE_TINY = QwenImageConfig(num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=24, in_channels=16, out_channels=4, axes_dims_rope=(4, 6, 6))

ROPE_THETA = 10000.0
ROPE_TABLE_SIZE = 4096  # positions per axis in the reference's precomputed table


# --------------------------------------------------------------------------------------------------------------
# Positions (host-side, static per image shape)
# --------------------------------------------------------------------------------------------------------------

def _centred(n: int) -> np.ndarray:
    return np.arange(n) - (n - n // 2)


def qwen_rope_positions(img_shapes: Sequence[tuple[int, int, int]], text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(image positions [N, 3], text positions [L, 3]) for one sample's list of (frames, h, w) latent grids.

    Image i of the list gets frame positions starting at i (edit pipelines stack a reference image after the target);
    text sits on the diagonal after the largest half-extent of any image.
    """
    img_pos, max_half = [], 0
    for idx, (f, h, w) in enumerate(img_shapes):
        ff, hh, ww = np.meshgrid(np.arange(idx, idx + f), _centred(h), _centred(w), indexing="ij")
        img_pos.append(np.stack([ff, hh, ww], axis=-1).reshape(-1, 3))
        max_half = max(max_half, h // 2, w // 2)
    if max_half + text_len > ROPE_TABLE_SIZE:
        raise ValueError(f"text length {text_len} + image half-extent {max_half} exceeds the RoPE table size "
                         f"{ROPE_TABLE_SIZE} of Qwen-Image")
    txt = np.repeat((max_half + np.arange(text_len))[:, None], 3, axis=1)
    return np.concatenate(img_pos, axis=0), txt


def normalize_img_shapes(img_shapes: Any, batch: int) -> tuple[tuple[int, int, int], ...]:
    """Accept diffusers' forms ((f,h,w), [(f,h,w)], or per-sample lists) and return the first sample's list.

    diffusers computes RoPE from the first sample only; we require all samples to agree instead of silently
    using sample 0's grid for everyone.
    """
    if img_shapes is None:
        raise ValueError("img_shapes is required, e.g. [[(1, H // 16, W // 16)]] * batch")

    def as_list(s):
        if isinstance(s, (tuple, list)) and len(s) == 3 and all(isinstance(v, (int, np.integer)) for v in s):
            return ((int(s[0]), int(s[1]), int(s[2])),)
        return tuple((int(a), int(b), int(c)) for a, b, c in s)

    if isinstance(img_shapes, (list, tuple)) and img_shapes and not (
            len(img_shapes) == 3 and all(isinstance(v, (int, np.integer)) for v in img_shapes)):
        per_sample = [as_list(s) for s in img_shapes]
    else:
        per_sample = [as_list(img_shapes)]
    if any(s != per_sample[0] for s in per_sample):
        raise ValueError(f"all samples must share img_shapes, got {per_sample}")
    return per_sample[0]


def check_taps(taps: Sequence[int], num_layers: int) -> tuple[int, ...]:
    taps = tuple(int(i) for i in taps)
    bad = [i for i in taps if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"feature taps {bad} out of range: the model has blocks 0..{num_layers - 1}")
    return taps


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------

class FeedForward(nnx.Module):
    """`net.2(GELU_tanh(net.0.proj(x)))` with hidden width 4 x dim."""

    def __init__(self, dim: int, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.fc1 = Linear(dim, 4 * dim, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(4 * dim, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))  # = jax.nn.gelu(approximate=True), leaner backward


class JointAttention(nnx.Module):
    def __init__(self, cfg: QwenImageConfig, *, rngs, param_dtype, dtype, impl: str):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        qkv = dict(axes=("embed", "heads"), **kw)
        self.to_q, self.to_k, self.to_v = Linear(d, d, **qkv), Linear(d, d, **qkv), Linear(d, d, **qkv)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = Linear(d, d, **qkv), Linear(d, d, **qkv), Linear(d, d, **qkv)
        self.to_out = Linear(d, d, axes=("heads", "embed"), **kw)
        self.to_add_out = Linear(d, d, axes=("heads", "embed"), **kw)
        norm = dict(eps=1e-6, axes=("head_dim",), **kw)
        self.norm_q, self.norm_k = RMSNorm(hd, **norm), RMSNorm(hd, **norm)
        self.norm_added_q, self.norm_added_k = RMSNorm(hd, **norm), RMSNorm(hd, **norm)
        self.head_dim, self.impl = hd, impl

    def __call__(self, img, txt, key_mask, rope):
        (img_cos, img_sin), (txt_cos, txt_sin) = rope

        def heads(x):
            return x.reshape(*x.shape[:-1], -1, self.head_dim)

        qi = apply_rope(self.norm_q(heads(self.to_q(img))), img_cos, img_sin)
        ki = apply_rope(self.norm_k(heads(self.to_k(img))), img_cos, img_sin)
        qt = apply_rope(self.norm_added_q(heads(self.add_q_proj(txt))), txt_cos, txt_sin)
        kt = apply_rope(self.norm_added_k(heads(self.add_k_proj(txt))), txt_cos, txt_sin)
        vi, vt = heads(self.to_v(img)), heads(self.add_v_proj(txt))
        q = jnp.concatenate([qt, qi], axis=1)
        k = jnp.concatenate([kt, ki], axis=1)
        v = jnp.concatenate([vt, vi], axis=1)
        o = attention(q, k, v, key_mask, impl=self.impl)
        o = o.reshape(*o.shape[:2], -1)
        n_txt = txt.shape[1]
        return self.to_out(o[:, n_txt:]), self.to_add_out(o[:, :n_txt])


class DualStreamBlock(nnx.Module):
    def __init__(self, cfg: QwenImageConfig, *, rngs, param_dtype, dtype, impl: str):
        d = cfg.inner_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.img_mod = Linear(d, 6 * d, axes=("embed", "mod"), **kw)
        self.txt_mod = Linear(d, 6 * d, axes=("embed", "mod"), **kw)
        self.attn = JointAttention(cfg, impl=impl, **kw)
        self.img_mlp = FeedForward(d, **kw)
        self.txt_mlp = FeedForward(d, **kw)

    def __call__(self, img, txt, temb_silu, key_mask, rope):
        # chunk(2) then chunk(3): (shift1, scale1, gate1, shift2, scale2, gate2)
        # broadcast_rows: the same values, with a gradient that sums over tokens quickly (see its docstring)
        # per-sample modulations laid out like the batch (see `constrain_per_sample`: an XLA:CPU SPMD miscompile)
        mod_i = constrain_per_sample(self.img_mod(temb_silu))[:, None, :]
        mod_t = constrain_per_sample(self.txt_mod(temb_silu))[:, None, :]
        mi = [broadcast_rows(m, img.shape) for m in jnp.split(mod_i, 6, axis=-1)]
        mt = [broadcast_rows(m, txt.shape) for m in jnp.split(mod_t, 6, axis=-1)]

        def modulate(x, shift, scale):
            return layer_norm(x, 1e-6) * (1 + scale) + shift

        attn_img, attn_txt = self.attn(modulate(img, mi[0], mi[1]), modulate(txt, mt[0], mt[1]), key_mask, rope)
        img = img + mi[2] * attn_img
        txt = txt + mt[2] * attn_txt
        img = img + mi[5] * self.img_mlp(modulate(img, mi[3], mi[4]))
        txt = txt + mt[5] * self.txt_mlp(modulate(txt, mt[3], mt[4]))
        return img, txt


class QwenImageTransformer(nnx.Module):
    """Qwen-Image MMDiT. Call it like diffusers' `QwenImageTransformer2DModel.forward` (arrays for tensors)."""

    family = "qwen_image"

    def __init__(self, config: QwenImageConfig = QWEN_IMAGE_20B, *, rngs: nnx.Rngs | None = None,
                 param_dtype=jnp.float32, dtype=jnp.float32, scan_layers: bool = True, remat: str = "none",
                 attention_impl: str = "auto"):
        cfg = config.validate()
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        d = cfg.inner_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.config, self.dtype, self.scan_layers, self.remat = cfg, dtype, scan_layers, remat
        remat_policy(remat)  # validate the name early
        self.img_in = Linear(cfg.in_channels, d, axes=("patch", "embed"), **kw)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim, eps=1e-6, axes=("text_embed",), **kw)
        self.txt_in = Linear(cfg.joint_attention_dim, d, axes=("text_embed", "embed"), **kw)
        self.time_linear_1 = Linear(256, d, axes=("freq", "embed"), **kw)
        self.time_linear_2 = Linear(d, d, axes=("embed", "embed_out"), **kw)
        block_kw = dict(param_dtype=param_dtype, dtype=dtype, impl=attention_impl)
        self.transformer_blocks = make_blocks(lambda r: DualStreamBlock(cfg, rngs=r, **block_kw), cfg.num_layers,
                                              rngs, scan=scan_layers)
        self.norm_out = Linear(d, 2 * d, axes=("embed", "mod"), **kw)
        self.proj_out = Linear(d, cfg.out_dim, axes=("embed", "patch"), **kw)

    # ---- pure forward on arrays (traced under jit) ----
    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
                img_shapes: tuple[tuple[int, int, int], ...], taps: Sequence[int] = (), return_hidden: bool = False):
        """Output `[B, N, out_dim]`; with `taps` (0-based block indices) returns `(output, features)` where
        features[j] is the image stream `[B, N, inner_dim]` after `transformer_blocks[taps[j]]` (diffusers' block
        output `[1]`), for discriminators that read the transformer's features. `return_hidden=True` returns the
        final AdaLN output `[B, N, inner_dim]` (`norm_out`'s modulated hidden) in place of `proj_out`'s output, for
        heads that replace the output layer (ArcFlow)."""
        cfg, dt = self.config, self.dtype
        taps = check_taps(taps, cfg.num_layers)
        img = self.img_in(hidden_states)
        txt = self.txt_in(self.txt_norm(encoder_hidden_states))
        temb = self.time_linear_2(jax.nn.silu(self.time_linear_1(
            timestep_sinusoid(timestep, 256, scale=1000.0, dtype=dt).astype(dt))))
        temb_silu = jax.nn.silu(temb)
        # the streams entering the stack: one sample per data-parallel chip on a mesh (no-op without one)
        img, txt = constrain_residual((img, txt))

        img_pos, txt_pos = qwen_rope_positions(img_shapes, txt.shape[1])
        if img_pos.shape[0] != img.shape[1]:
            raise ValueError(f"img_shapes {img_shapes} describe {img_pos.shape[0]} image tokens but hidden_states "
                             f"has {img.shape[1]}")
        ia = rope_angles(img_pos, cfg.axes_dims_rope, ROPE_THETA)
        ta = rope_angles(txt_pos, cfg.axes_dims_rope, ROPE_THETA)
        rope = ((jnp.cos(ia), jnp.sin(ia)), (jnp.cos(ta), jnp.sin(ta)))

        key_mask = None
        if encoder_hidden_states_mask is not None:
            key_mask = jnp.concatenate(
                [encoder_hidden_states_mask.astype(bool), jnp.ones(img.shape[:2], dtype=bool)], axis=1)

        res = run_blocks(self.transformer_blocks, (img, txt), (temb_silu, key_mask, rope), scan=self.scan_layers,
                         remat=self.remat, taps=taps)
        (img, txt), feats = res if taps else (res, None)
        img = constrain_residual(img)  # leaving the stack

        scale, shift = jnp.split(constrain_per_sample(self.norm_out(temb_silu))[:, None, :], 2, axis=-1)
        hidden = layer_norm(img, 1e-6) * (1 + scale) + shift
        out = hidden if return_hidden else self.proj_out(hidden)
        return (out, feats) if taps else out

    def __call__(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, timestep=None,
                 img_shapes=None, guidance=None, attention_kwargs=None, controlnet_block_samples=None,
                 additional_t_cond=None, return_dict: bool = True):
        """Same arguments as diffusers' forward; returns the output array (a 1-tuple if `return_dict=False`)."""
        if guidance is not None or controlnet_block_samples is not None or additional_t_cond is not None:
            raise NotImplementedError("guidance / controlnet_block_samples / additional_t_cond are not supported")
        if attention_kwargs and any(k != "scale" for k in attention_kwargs):
            raise NotImplementedError(f"attention_kwargs {sorted(attention_kwargs)} are not supported "
                                      "(LoRA scales are applied when merging adapters)")
        hidden_states = jnp.asarray(hidden_states)
        encoder_hidden_states = jnp.asarray(encoder_hidden_states)
        b, l = encoder_hidden_states.shape[:2]
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.config.in_channels:
            raise ValueError(f"hidden_states must be [B, N, {self.config.in_channels}], got {hidden_states.shape}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != self.config.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states must be [B, L, {self.config.joint_attention_dim}], got "
                             f"{encoder_hidden_states.shape}")
        mask = None if encoder_hidden_states_mask is None else jnp.asarray(encoder_hidden_states_mask)
        if mask is not None and mask.shape != (b, l):
            raise ValueError(f"encoder_hidden_states_mask shape {mask.shape} must be (batch, text_len)=({b}, {l})")
        timestep = jnp.broadcast_to(jnp.asarray(timestep, dtype=jnp.float32).reshape(-1), (b,))
        shapes = normalize_img_shapes(img_shapes, b)
        graphdef, state = nnx.split(self)
        out = _jitted_forward(graphdef, state, hidden_states, encoder_hidden_states, mask, timestep, shapes)
        return out if return_dict else (out,)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _jitted_forward(graphdef, state, hidden_states, encoder_hidden_states, mask, timestep, img_shapes):
    return nnx.merge(graphdef, state).forward(hidden_states, encoder_hidden_states, mask, timestep, img_shapes)
