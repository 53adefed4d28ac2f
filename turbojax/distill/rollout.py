"""Running an N-step student: the full sampler, and DMD2's backward simulation of the first k steps.

The student's sigma list (e.g. [1, 0.75] for 2 steps: raw [1, 0.5] under shift 3) is data, not a static argument,
so one compile serves every step index. Between steps the default update is the Euler step users' samplers take
(diffusers' FlowMatchEulerDiscreteScheduler, ComfyUI), so training sees the inputs inference will see; `renoise`
re-noises the predicted x0 with fresh noise as the DMD2 code does for its multi-step students.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from turbojax.distill.losses import add_noise, bcast, x0_from_velocity

F32 = jnp.float32
ROLLOUTS = ("euler", "renoise")


def step_to(x, v, sigma, sigma_next, mode: str, key):
    """One sampler step from `sigma` to `sigma_next` ([B] each) given the velocity `v` at `x`."""
    if mode == "euler":
        return x.astype(F32) + bcast(sigma_next - sigma, x) * v.astype(F32)
    if mode == "renoise":
        x0 = x0_from_velocity(x, sigma, v)
        return add_noise(x0, jax.random.normal(key, x.shape, F32), sigma_next)
    raise ValueError(f"unknown rollout {mode!r}; choose one of {ROLLOUTS}")


def simulate(velocity: Callable, x_T, sigmas, k, key, mode: str = "euler"):
    """The state at step `k` (0-based, traced int) of the student started from `x_T` at `sigmas[0]`: the first `k`
    steps run the given velocity function without gradient (backward simulation). Returns (x_k, sigma_k [B])."""
    b = x_T.shape[0]
    sigmas = jnp.asarray(sigmas, F32)

    def body(i, x):
        s, s_next = jnp.full((b,), sigmas[i]), jnp.full((b,), sigmas[i + 1])
        v = jax.lax.stop_gradient(velocity(x, s))
        return jax.lax.stop_gradient(step_to(x, v, s, s_next, mode, jax.random.fold_in(key, i)))

    x_k = jax.lax.fori_loop(0, k, body, x_T.astype(F32))
    return x_k, jnp.full((b,), sigmas[k])


def sample(velocity: Callable, x_T, sigmas, key=None, mode: str = "euler"):
    """Run every step of the sigma list (`sigmas` ends with 0, or the last step predicts x0 directly)."""
    sigmas = [float(s) for s in sigmas]
    if sigmas[-1] != 0.0:
        sigmas = sigmas + [0.0]
    b = x_T.shape[0]
    key = jax.random.key(0) if key is None else key
    x = x_T.astype(F32)
    for i in range(len(sigmas) - 1):
        s, s_next = jnp.full((b,), sigmas[i], F32), jnp.full((b,), sigmas[i + 1], F32)
        v = velocity(x, s)
        x = x0_from_velocity(x, s, v) if sigmas[i + 1] == 0.0 else step_to(x, v, s, s_next, mode,
                                                                               jax.random.fold_in(key, i))
    return x
