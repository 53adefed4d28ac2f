"""Flow-matching Euler samplers of `QwenImagePipeline` and `ZImagePipeline`, each one jitted loop over the steps.

One compile per (shapes, step count, CFG mode): sigmas, model timesteps and guidance scales are array arguments, so
changing their values does not recompile. Sigma schedules come from `turbojax.schedules`.

    sigmas = schedules.QWEN_IMAGE.sigmas(50, height=1024, width=1024)
    noise = qwen_image_noise(jax.random.key(0), 1, 1024, 1024)
    x = sample_qwen_image(model, noise, ctx, sigmas, height=1024, width=1024, prompt_embeds_mask=mask,
                          negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask, true_cfg_scale=4.0)
    image_latents = unpack_latents(x, 1024, 1024)                 # [B, 16, 1, H/8, W/8] for the VAE

What is reproduced from diffusers 0.42 (spec: shared docs `architectures.md` §4.1, §4.2, §1.8):

Qwen-Image, `precision="diffusers"` (default):
  * the model time is `(sigma * 1000 cast to the latent dtype) / 1000` in that dtype (the pipeline's
    `t.expand(B).to(latents.dtype) / 1000`): within an ulp of sigma in fp32, quantised in bf16
    (0.75 -> 0.75390625);
  * latents live in the pipeline (= model) dtype between steps; the scheduler adds in fp32 and rounds back, and
    `dt * v` is formed in the model-output dtype with `dt` rounded to it first (torch casts the 0-d fp32 `dt` to
    bf16 when multiplying a bf16 tensor);
  * true CFG `comb = neg + s (cond - neg)`, `v = comb * ||cond|| / ||comb||` per token (norms over the last axis)
    in the model-output dtype, CFG only when `true_cfg_scale > 1` and negative embeddings are given.
  With an fp32 model all of this is fp32 and equals the pipeline to float rounding.
  `precision="fp32"` instead keeps fp32 latents and CFG arithmetic and feeds the model sigma itself (a bf16 model
  still rounds its time input to bf16, as diffusers' transformer does).
Z-Image (always as the pipeline: fp32 latents, the model input cast to the model dtype, the output to fp32):
  * model time `(1000 - sigma * 1000) / 1000` in fp32 and the output negated;
  * CFG `pred = pos + g (pos - neg)` with pos and neg as one batched (ragged) forward; `cfg_normalization c > 0`
    rescales `pred` to `c ||pos||` when `||pred||` (whole sample) exceeds it; with `cfg_truncation <= 1`, steps
    whose `t_norm = (1000 - t) / 1000` exceeds it run the positive prompt alone.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.models.qwen_image import normalize_img_shapes

F32 = np.float32
PRECISIONS = ("diffusers", "fp32")
VAE_SCALE = 8  # pixels per latent cell for both families; latents are packed / patchified 2x2 on top


# --------------------------------------------------------------------------------------------------------------
# Latent layout helpers
# --------------------------------------------------------------------------------------------------------------

def _latent_grid(height: int, width: int) -> tuple[int, int]:
    if height % (2 * VAE_SCALE) or width % (2 * VAE_SCALE) or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {2 * VAE_SCALE}, got {height}x{width}")
    return height // VAE_SCALE, width // VAE_SCALE


def pack_latents(latents):
    """`[B, C, H/8, W/8]` (or the VAE's `[B, C, 1, H/8, W/8]`) -> Qwen-Image packed `[B, (H/16)(W/16), 4C]` with
    feature order `c*4 + dy*2 + dx`, tokens row-major over the 2x2 patches."""
    x = jnp.asarray(latents)
    if x.ndim == 5:
        if x.shape[2] != 1:
            raise ValueError(f"5-D latents must be [B, C, 1, H, W] (one frame), got {x.shape}")
        x = x[:, :, 0]
    if x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"latents must be [B, C, H, W] with even H, W, got {x.shape}")
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed, height: int, width: int):
    """Inverse of `pack_latents` for an image of `height x width` pixels: `[B, C, 1, H/8, W/8]` (the VAE layout)."""
    x = jnp.asarray(packed)
    h, w = _latent_grid(height, width)
    if x.ndim != 3 or x.shape[1] != (h // 2) * (w // 2) or x.shape[2] % 4:
        raise ValueError(f"packed latents for {height}x{width} must be [B, {(h // 2) * (w // 2)}, 4C], got {x.shape}")
    b, _, c4 = x.shape
    x = x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, 1, h, w)


def qwen_image_noise(key, batch: int, height: int, width: int, channels: int = 16, dtype=jnp.float32):
    """Initial noise in `QwenImagePipeline`'s layout: i.i.d. normal latents `[B, 1, C, H/8, W/8]` packed to
    `[B, (H/16)(W/16), 4C]`; pass it as the pipeline's `latents=` to start both from the same point."""
    h, w = _latent_grid(height, width)
    # [B, 1, C, h, w] and [B, C, h, w] are the same memory; the pipeline packs its 5-D noise through that view
    return pack_latents(jax.random.normal(key, (batch, channels, h, w), jnp.float32)).astype(dtype)


def z_image_noise(key, batch: int, height: int, width: int, channels: int = 16, dtype=jnp.float32):
    """Initial noise in `ZImagePipeline`'s layout: `[B, C, H/8, W/8]` (fp32 in the pipeline)."""
    h, w = _latent_grid(height, width)
    return jax.random.normal(key, (batch, channels, h, w), jnp.float32).astype(dtype)


# --------------------------------------------------------------------------------------------------------------
# Host-side per-step inputs (numpy, so the float rounding is exactly the reference's and XLA cannot re-associate)
# --------------------------------------------------------------------------------------------------------------

def _host_sigmas(sigmas) -> np.ndarray:
    s = np.asarray(sigmas)  # Python floats arrive as float64 and are rounded to float32 once, like the scheduler's
    if s.ndim != 1 or s.shape[0] < 2:
        raise ValueError(f"sigmas must list at least two values (the last is usually 0), got {sigmas}")
    return s.astype(F32)


def qwen_model_timesteps(sigmas, dtype=jnp.float32) -> np.ndarray:
    """The time `QwenImagePipeline` feeds the transformer at each step, as fp32 values: the scheduler timestep
    `sigma * 1000` (fp32), cast to the latent `dtype`, divided by 1000 in that dtype (§1.8)."""
    t = _host_sigmas(sigmas)[:-1] * F32(1000)
    dt = np.dtype(jnp.dtype(dtype))
    if dt == np.float32:
        return t / F32(1000)
    # torch divides a low-precision tensor by a Python scalar in fp32 and rounds the quotient once
    return (t.astype(dt).astype(F32) / F32(1000)).astype(dt).astype(F32)


def z_image_model_timesteps(sigmas) -> np.ndarray:
    """The time `ZImagePipeline` feeds the transformer: `(1000 - sigma * 1000) / 1000` in fp32 (= 1 - sigma up to
    rounding); also the `t_norm` its `cfg_truncation` compares."""
    return (F32(1000) - _host_sigmas(sigmas)[:-1] * F32(1000)) / F32(1000)


# --------------------------------------------------------------------------------------------------------------
# Qwen-Image
# --------------------------------------------------------------------------------------------------------------

def _norm(x, axis):
    """Euclidean norm accumulated in fp32, returned in x's dtype (torch's reduction for bf16 inputs)."""
    xf = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(xf * xf, axis=axis, keepdims=True)).astype(x.dtype)


def qwen_true_cfg(cond, neg, scale):
    """`comb = neg + scale (cond - neg)` rescaled per token to `||cond||` (last axis), in the inputs' dtype."""
    comb = neg + (jnp.asarray(scale, jnp.float32) * (cond - neg).astype(jnp.float32)).astype(cond.dtype)
    return comb * (_norm(cond, -1) / _norm(comb, -1))


def euler_step(x, v, sigma, sigma_next, precision: str = "diffusers"):
    """`x + (sigma_next - sigma) v`, added in fp32 and stored in x's dtype.

    With `precision="diffusers"` and a low-precision `v` this is `FlowMatchEulerDiscreteScheduler.step` on bf16
    tensors: torch casts the 0-d fp32 `dt` to bf16, forms `dt * v` in bf16, adds it to the fp32-upcast sample and
    rounds the sum back to bf16.
    """
    dt = jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32)
    if precision == "diffusers" and v.dtype != jnp.float32:
        return (x.astype(jnp.float32) + (dt.astype(v.dtype) * v).astype(jnp.float32)).astype(x.dtype)
    return (x.astype(jnp.float32) + dt * v.astype(jnp.float32)).astype(x.dtype)


def batch_layout(x):
    """The latents laid out one sample per data-parallel device when the loops run under a mesh (`jax.set_mesh`,
    as `Text2ImagePipeline` on a mesh does): the loop's input and result are pinned to the batch layout rather than
    left to propagation (a batch the mesh cannot split stays replicated); a no-op without a mesh."""
    from turbojax.sharding import constrain
    return constrain(x, ("batch",) + (None,) * (x.ndim - 1))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _qwen_loop(graphdef, img_shapes, cfg_mode, precision, state, x, ctx, mask, neg_ctx, neg_mask, sigmas, t_model,
               scale):
    model = nnx.merge(graphdef, state)
    b = x.shape[0]

    def forward(xin, c, m, t):
        out = model.forward(xin, c, m, jnp.broadcast_to(t, (xin.shape[0],)), img_shapes)
        return out.astype(jnp.float32) if precision == "fp32" else out

    def velocity(x, t):
        xin = x.astype(model.dtype)
        if cfg_mode == "none":
            return forward(xin, ctx, mask, t)
        if cfg_mode == "batched":
            masks = None if mask is None else jnp.concatenate([mask, neg_mask])
            out = forward(jnp.concatenate([xin, xin]), jnp.concatenate([ctx, neg_ctx]), masks, t)
            cond, neg = out[:b], out[b:]
        else:  # text lengths differ: two forwards, as the pipeline always does
            cond, neg = forward(xin, ctx, mask, t), forward(xin, neg_ctx, neg_mask, t)
        return qwen_true_cfg(cond, neg, scale)

    def step(i, x):
        return euler_step(x, velocity(x, t_model[i]), sigmas[i], sigmas[i + 1], precision)

    return batch_layout(jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, batch_layout(x)))


def _run_qwen(model, latents, ctx, mask, neg_ctx, neg_mask, sigmas, img_shapes, scale, precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    s = _host_sigmas(sigmas)
    store = model.dtype if precision == "diffusers" else jnp.float32
    t_model = qwen_model_timesteps(s, store) if precision == "diffusers" else s[:-1]
    ctx = jnp.asarray(ctx, model.dtype)
    mask = None if mask is None else jnp.asarray(mask).astype(bool)
    cfg_mode = "none"
    if neg_ctx is not None:
        neg_ctx = jnp.asarray(neg_ctx, model.dtype)
        neg_mask = None if neg_mask is None else jnp.asarray(neg_mask).astype(bool)
        if neg_ctx.shape[1] == ctx.shape[1]:
            cfg_mode = "batched"
            if (mask is None) != (neg_mask is None):  # one mask for the batched call: None means all valid
                mask = jnp.ones(ctx.shape[:2], bool) if mask is None else mask
                neg_mask = jnp.ones(neg_ctx.shape[:2], bool) if neg_mask is None else neg_mask
        else:
            cfg_mode = "separate"
    graphdef, state = nnx.split(model)
    return _qwen_loop(graphdef, img_shapes, cfg_mode, precision, state, jnp.asarray(latents).astype(store), ctx,
                      mask, neg_ctx, neg_mask, jnp.asarray(s), jnp.asarray(t_model), jnp.float32(scale))


def sample_qwen_image(model, latents, prompt_embeds, sigmas, *, height: int, width: int, prompt_embeds_mask=None,
                      negative_prompt_embeds=None, negative_prompt_embeds_mask=None, true_cfg_scale: float = 4.0,
                      precision: str = "diffusers"):
    """`QwenImagePipeline(..., output_type="latent")` from packed `latents [B, (H/16)(W/16), in_channels]`.

    `prompt_embeds [B, L, D]` with `prompt_embeds_mask [B, L]` (1 = valid, or None); CFG runs when
    `true_cfg_scale > 1` and `negative_prompt_embeds [B, L', D]` are given (one batched forward when L' == L).
    `sigmas`: `num_steps + 1` values (see `turbojax.schedules`). Returns packed latents in the storage dtype (the
    model dtype with `precision="diffusers"`, else fp32); `unpack_latents` gives the VAE layout.
    """
    b = _check_qwen_inputs(model, latents, prompt_embeds, prompt_embeds_mask, height, width)
    use_cfg = true_cfg_scale > 1 and negative_prompt_embeds is not None
    if use_cfg:
        if _check_qwen_inputs(model, latents, negative_prompt_embeds, negative_prompt_embeds_mask, height, width,
                              "negative_prompt_embeds") != b:
            raise ValueError("negative_prompt_embeds must have the batch size of prompt_embeds")
    else:
        negative_prompt_embeds = negative_prompt_embeds_mask = None
    h, w = _latent_grid(height, width)
    return _run_qwen(model, latents, prompt_embeds, prompt_embeds_mask, negative_prompt_embeds,
                     negative_prompt_embeds_mask, sigmas, ((1, h // 2, w // 2),), float(true_cfg_scale), precision)


def _check_qwen_inputs(model, latents, ctx, mask, height, width, name="prompt_embeds") -> int:
    cfg = model.config
    h, w = _latent_grid(height, width)
    lat, ctx = np.shape(latents), np.shape(ctx)
    if len(lat) != 3 or lat[1:] != ((h // 2) * (w // 2), cfg.in_channels):
        raise ValueError(f"latents for {height}x{width} must be packed [B, {(h // 2) * (w // 2)}, {cfg.in_channels}], "
                         f"got {lat}")
    if len(ctx) != 3 or ctx[0] != lat[0] or ctx[2] != cfg.joint_attention_dim:
        raise ValueError(f"{name} must be [{lat[0]}, L, {cfg.joint_attention_dim}], got {ctx}")
    if mask is not None and np.shape(mask) != ctx[:2]:
        raise ValueError(f"{name}_mask must be {ctx[:2]}, got {np.shape(mask)}")
    return lat[0]


def euler_sample(model, noise, encoder_hidden_states, encoder_hidden_states_mask, sigmas, *, img_shapes):
    """Qwen-Image Euler loop without CFG in fp32 latents, `img_shapes` as in diffusers' forward (kept for
    `sample.py`; `sample_qwen_image` is the pipeline-equivalent entry point)."""
    noise = jnp.asarray(noise)
    shapes = normalize_img_shapes(img_shapes, noise.shape[0])
    return _run_qwen(model, noise, encoder_hidden_states, encoder_hidden_states_mask, None, None, sigmas, shapes,
                     1.0, "fp32")


# --------------------------------------------------------------------------------------------------------------
# Z-Image
# --------------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 1))
def _z_loop(graphdef, cfg_mode, state, x, caps, neg_caps, sigmas, t_model, cfg_on, scale, norm_cap):
    model = nnx.merge(graphdef, state)
    b = x.shape[0]

    def forward(xin, cap_list, t):
        outs = model.forward([xi[:, None] for xi in xin], jnp.broadcast_to(t, (len(xin),)), list(cap_list))
        return jnp.stack([o[:, 0] for o in outs]).astype(jnp.float32)

    def plain(x, t):
        return forward(list(x.astype(model.dtype)), caps, t)

    def guided(x, t):
        xin = list(x.astype(model.dtype))
        out = forward(xin + xin, tuple(caps) + tuple(neg_caps), t)
        pos, neg = out[:b], out[b:]
        pred = pos + scale * (pos - neg)
        # cfg_normalization: cap the whole-sample norm at norm_cap * ||pos|| (0 = off)
        axes = tuple(range(1, pred.ndim))
        max_norm = _norm(pos, axes) * norm_cap
        new_norm = _norm(pred, axes)
        return jnp.where((norm_cap > 0) & (new_norm > max_norm), pred * (max_norm / new_norm), pred)

    def step(i, x):
        t = t_model[i]
        if cfg_mode == "none":
            pred = plain(x, t)
        elif cfg_mode == "all":
            pred = guided(x, t)
        else:  # cfg_truncation switches CFG off for some steps: only the taken branch runs
            pred = jax.lax.cond(cfg_on[i], guided, plain, x, t)
        return x + (sigmas[i + 1] - sigmas[i]) * -pred  # the model predicts x0 - noise; v = -pred

    return batch_layout(jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, batch_layout(x)))


def sample_z_image(model, latents, prompt_embeds, sigmas, *, negative_prompt_embeds=None,
                   guidance_scale: float = 5.0, cfg_normalization: float = 0.0, cfg_truncation: float | None = 1.0):
    """`ZImagePipeline(..., output_type="latent")` from `latents [B, C, H/8, W/8]` (fp32).

    `prompt_embeds`: per-sample `[L_i, D]` valid tokens (a list, or an array `[B, L, D]` with all tokens valid).
    CFG runs when `guidance_scale > 0` (then `negative_prompt_embeds` are required, as in the pipeline);
    `cfg_normalization` (float, 0/False = off) and `cfg_truncation` (None or > 1 = off) as the pipeline.
    Returns fp32 latents `[B, C, H/8, W/8]`.
    """
    cfg = model.config
    x = jnp.asarray(latents, jnp.float32)
    if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"latents must be [B, {cfg.in_channels}, H/8, W/8] with even H/8, W/8, got {x.shape}")
    caps = _caption_list(prompt_embeds, x.shape[0], cfg.cap_feat_dim, "prompt_embeds")
    s = _host_sigmas(sigmas)
    t_model = z_image_model_timesteps(s)
    cfg_on = np.full(t_model.shape, guidance_scale > 0)
    neg = ()
    if guidance_scale > 0:
        if negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 0 needs negative_prompt_embeds (the pipeline encodes '' by default); "
                             "pass guidance_scale=0 to sample without CFG")
        neg = _caption_list(negative_prompt_embeds, x.shape[0], cfg.cap_feat_dim, "negative_prompt_embeds")
        if cfg_truncation is not None and float(cfg_truncation) <= 1:
            cfg_on &= ~(t_model.astype(np.float64) > float(cfg_truncation))
    mode = "none" if not cfg_on.any() else "all" if cfg_on.all() else "mixed"
    graphdef, state = nnx.split(model)
    norm_cap = float(cfg_normalization) if cfg_normalization else 0.0
    return _z_loop(graphdef, mode, state, x, tuple(caps), tuple(neg) if mode != "none" else (), jnp.asarray(s),
                   jnp.asarray(t_model), jnp.asarray(cfg_on), jnp.float32(guidance_scale), jnp.float32(norm_cap))


def _caption_list(embeds, batch: int, dim: int, name: str) -> list[jax.Array]:
    items = list(embeds) if isinstance(embeds, (list, tuple)) else list(jnp.asarray(embeds))
    if len(items) != batch:
        raise ValueError(f"{name} must hold one entry per latent ({batch}), got {len(items)}")
    out = []
    for i, e in enumerate(items):
        e = jnp.asarray(e)
        if e.ndim != 2 or e.shape[0] == 0 or e.shape[1] != dim:
            raise ValueError(f"{name}[{i}] must be [L >= 1, {dim}], got {e.shape}")
        out.append(e)
    return out


def sample(model, latents, prompt_embeds, sigmas, **kw):
    """Dispatch on the model family to `sample_qwen_image` or `sample_z_image` (pass that sampler's keywords)."""
    fn = {"qwen_image": sample_qwen_image, "z_image": sample_z_image}.get(getattr(model, "family", None))
    if fn is None:
        raise ValueError(f"no sampler for model family {getattr(model, 'family', None)!r}")
    return fn(model, latents, prompt_embeds, sigmas, **kw)


__all__ = ["pack_latents", "unpack_latents", "qwen_image_noise", "z_image_noise", "qwen_model_timesteps",
           "z_image_model_timesteps", "qwen_true_cfg", "euler_step", "sample_qwen_image", "sample_z_image",
           "euler_sample", "sample"]
