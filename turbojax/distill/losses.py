"""Distillation losses as pure functions of arrays (no models, no optimisers, no devices).

Rectified-flow conventions (shared docs `distillation.md`): `x_s = (1 - s) x0 + s eps`, velocity `v = eps - x0`,
`x0 = x_s - s v`. Arrays are batch-first; "per sample" reductions run over every other axis. Everything is computed
in fp32 whatever the model's compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def per_sample_mean(x: jax.Array) -> jax.Array:
    """Mean over all axes but the first: `[B, ...] -> [B]`."""
    return jnp.mean(x.astype(F32).reshape(x.shape[0], -1), axis=1)


def bcast(s: jax.Array, x: jax.Array) -> jax.Array:
    """Per-sample scalars `[B]` shaped to broadcast against `x [B, ...]`."""
    return jnp.asarray(s, F32).reshape((-1,) + (1,) * (x.ndim - 1))


def add_noise(x0: jax.Array, eps: jax.Array, sigma: jax.Array) -> jax.Array:
    s = bcast(sigma, x0)
    return (1.0 - s) * x0.astype(F32) + s * eps.astype(F32)


def x0_from_velocity(x_t: jax.Array, sigma: jax.Array, v: jax.Array) -> jax.Array:
    return x_t.astype(F32) - bcast(sigma, x_t) * v.astype(F32)


def shift_sigma(tau: jax.Array, shift: float) -> jax.Array:
    """The fixed time shift of the Qwen-Image / Z-Image distillers: `s tau / (1 + (s - 1) tau)`."""
    return shift * tau / (1.0 + (shift - 1.0) * tau)


def sample_sigma(key: jax.Array, batch: int, lo: float, hi: float, shift: float = 1.0) -> jax.Array:
    """`tau ~ U[lo, hi]` per sample, warped by `shift` (1 = no warp)."""
    tau = jax.random.uniform(key, (batch,), F32, lo, hi)
    return shift_sigma(tau, shift)


def true_cfg(cond: jax.Array, uncond: jax.Array, scale: float, rescale: bool = True) -> jax.Array:
    """Qwen-Image's true CFG `uncond + s (cond - uncond)`, optionally rescaled per token to the norm of `cond`
    (the pipeline's rescale, the "norm-rescaled guidance" FastGen recommends for DMD2 on Qwen-Image)."""
    cond, uncond = cond.astype(F32), uncond.astype(F32)
    comb = uncond + scale * (cond - uncond)
    if not rescale:
        return comb
    n_cond = jnp.linalg.norm(cond, axis=-1, keepdims=True)
    n_comb = jnp.linalg.norm(comb, axis=-1, keepdims=True)
    return comb * (n_cond / jnp.maximum(n_comb, 1e-12))


def flow_matching_loss(v_pred: jax.Array, x0: jax.Array, eps: jax.Array) -> jax.Array:
    """Mean squared error of the velocity against `eps - x0` (the fake score's and the teachers' objective)."""
    target = eps.astype(F32) - x0.astype(F32)
    return jnp.mean(jnp.square(v_pred.astype(F32) - target))


def dmd_loss(x: jax.Array, x0_real: jax.Array, x0_fake: jax.Array) -> tuple[jax.Array, jax.Array]:
    """DMD2's distribution-matching loss on the generator's clean sample `x` (reverse-KL gradient).

    `g = (x0_fake - x0_real) / mean|x - x0_real|` per sample (the adaptive weight), and
    `L = 0.5 mean((x - sg(x - g))^2)`, whose gradient w.r.t. `x` is `g / numel`: it pulls `x` toward the teacher's
    denoised estimate and away from the fake score's. Targets are held constant (no gradient); a zero or non-finite
    normaliser contributes nothing instead of NaN. Returns (loss, mean |g|).
    """
    x = x.astype(F32)
    x0_real = jax.lax.stop_gradient(x0_real.astype(F32))
    x0_fake = jax.lax.stop_gradient(x0_fake.astype(F32))
    norm = bcast(per_sample_mean(jnp.abs(x - x0_real)), x)
    norm = jax.lax.stop_gradient(norm)
    g = (x0_fake - x0_real) / jnp.where(norm > 0, norm, 1.0)
    g = jnp.where(jnp.isfinite(g) & (norm > 0), g, 0.0)
    target = jax.lax.stop_gradient(x - g)
    return 0.5 * jnp.mean(jnp.square(x - target)), jnp.mean(jnp.abs(g))


def gan_generator_loss(logits_fake: jax.Array) -> jax.Array:
    """Non-saturating generator loss `softplus(-D(fake))`."""
    return jnp.mean(jax.nn.softplus(-logits_fake.astype(F32)))


def gan_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """`softplus(D(fake)) + softplus(-D(real))`."""
    return jnp.mean(jax.nn.softplus(logits_fake.astype(F32))) + jnp.mean(jax.nn.softplus(-logits_real.astype(F32)))


def gan_hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return jnp.mean(jax.nn.relu(1.0 - logits_real.astype(F32))) + jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(F32)))


def gan_hinge_generator_loss(logits_fake: jax.Array) -> jax.Array:
    return -jnp.mean(logits_fake.astype(F32))


def r1_penalty(grads_real: jax.Array | list) -> jax.Array:
    """Mean over samples of the squared gradient norm of D at the reals (summed over all inputs given)."""
    leaves = jax.tree.leaves(grads_real)
    return jnp.mean(sum(jnp.sum(jnp.square(g.astype(F32)).reshape(g.shape[0], -1), axis=1) for g in leaves))


def pseudo_huber(a: jax.Array, b: jax.Array, c: float) -> jax.Array:
    """`mean(sqrt(d^2 + c^2) - c)` with d the per-element difference (PCM's Huber loss)."""
    d = a.astype(F32) - b.astype(F32)
    return jnp.mean(jnp.sqrt(jnp.square(d) + c * c) - c)
