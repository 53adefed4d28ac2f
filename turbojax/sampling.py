"""Flow-matching Euler sampling as one jitted loop (one compile per shape and step count)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0, 5))
def _euler(graphdef, state, noise, ctx, mask, img_shapes, sigmas):
    model = nnx.merge(graphdef, state)

    def step(i, x):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = model.forward(x.astype(model.dtype), ctx, mask, jnp.broadcast_to(s, (x.shape[0],)), img_shapes)
        return x + (s_next - s) * v.astype(jnp.float32)  # fp32 latents between steps

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, noise.astype(jnp.float32))


def euler_sample(model, noise, encoder_hidden_states, encoder_hidden_states_mask, sigmas, *, img_shapes):
    """Integrate `x <- x + (sigma_next - sigma) * v(x, sigma)` from `noise` over the sigma list (ending at 0)."""
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must list at least two values, got {sigmas}")
    graphdef, state = nnx.split(model)
    mask = None if encoder_hidden_states_mask is None else jnp.asarray(encoder_hidden_states_mask)
    return _euler(graphdef, state, jnp.asarray(noise), jnp.asarray(encoder_hidden_states, model.dtype), mask,
                  tuple(img_shapes), sigmas)
