"""A known-answer problem for every distillation method: class-conditional 2-D Gaussian mixtures.

The data are 2-D points: class c is a mixture of `modes_per_class` small Gaussians on a ring (the classes
interleave around it). The teacher is a small flow-matching MLP (`ToyFlow`, built from our `Linear`, so LoRA roles,
feature taps and the engine work on it unchanged) trained with CFG dropout; its many-step sampler lands on the modes,
while a naive 2-step Euler sampler puts mass between them (the 2-D picture of blur). A distilled 2-step student
should beat the naive one on a distribution distance to the true mixture (`energy_distance`), per class.

    teacher = toy.train_teacher(seed=0)            # a few seconds
    x = toy.sample(teacher, labels, key, sigmas)    # any sigma list, true CFG
    toy.energy_distance(x, toy.data(labels, key))
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from turbojax.distill.losses import add_noise, shift_sigma, true_cfg, x0_from_velocity
from turbojax.nn.layers import Linear, timestep_sinusoid

NUM_CLASSES = 2
NULL = NUM_CLASSES  # the CFG-dropout "class" (an all-zero condition)


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    dim: int = 2
    hidden: int = 128
    num_layers: int = 3
    cond_dim: int = NUM_CLASSES + 1

    @property
    def inner_dim(self) -> int:
        return self.hidden


class ToyFlow(nnx.Module):
    """`v(x, sigma, class)`: an MLP with residual blocks; the condition is a one-hot "text" token `[B, 1, C]`."""
    family = "toy"

    def __init__(self, config: ToyConfig = ToyConfig(), *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.inp = Linear(c.dim + 32 + c.cond_dim, c.hidden, rngs=rngs)
        self.blocks = nnx.List([Linear(c.hidden, c.hidden, rngs=rngs) for _ in range(c.num_layers)])
        self.out = Linear(c.hidden, c.dim, rngs=rngs)

    def forward(self, x, ctx, mask, sigma, img_shapes=None, taps: Sequence[int] = ()):
        temb = timestep_sinusoid(jnp.asarray(sigma, jnp.float32), 32)
        h = jax.nn.silu(self.inp(jnp.concatenate([x.astype(jnp.float32), temb, ctx[:, 0]], axis=-1)))
        feats = []
        for i, blk in enumerate(self.blocks):
            h = h + jax.nn.silu(blk(h))
            if i in taps:
                feats.append(h[:, None, :])  # one "token" on a 1x1 grid for the discriminator heads
        out = self.out(h)
        return (out, feats) if taps else out


@dataclasses.dataclass(frozen=True)
class ToyDenoiser:
    grid: tuple[int, int] = (1, 1)

    def __call__(self, model, x, sigma, cond, taps=()):
        res = model.forward(x, cond["ctx"], cond.get("mask"), sigma, taps=tuple(taps))
        return (res[0].astype(jnp.float32), res[1]) if taps else res.astype(jnp.float32)


def condition(labels) -> jax.Array:
    """One-hot condition tokens `[B, 1, NUM_CLASSES + 1]` (label NULL = the empty prompt)."""
    return jax.nn.one_hot(jnp.asarray(labels), NUM_CLASSES + 1)[:, None, :]


def modes(modes_per_class: int = 4, radius: float = 2.0) -> np.ndarray:
    """Mode centres `[NUM_CLASSES, modes_per_class, 2]`: the classes interleave around one ring."""
    n = NUM_CLASSES * modes_per_class
    ang = 2 * np.pi * np.arange(n) / n
    pts = radius * np.stack([np.cos(ang), np.sin(ang)], -1)
    return np.stack([pts[c::NUM_CLASSES] for c in range(NUM_CLASSES)]).astype(np.float32)


def data(labels, key, std: float = 0.08) -> jax.Array:
    centres = jnp.asarray(modes())
    k1, k2 = jax.random.split(key)
    labels = jnp.asarray(labels)
    which = jax.random.randint(k1, labels.shape, 0, centres.shape[1])
    return centres[labels, which] + std * jax.random.normal(k2, labels.shape + (2,))


def train_teacher(seed: int = 0, steps: int = 3000, batch: int = 512, lr: float = 2e-3, drop: float = 0.1):
    model = ToyFlow(rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        labels = jax.random.randint(k1, (batch,), 0, NUM_CLASSES)
        labels = jnp.where(jax.random.uniform(k2, (batch,)) < drop, NULL, labels)
        x0 = data(jnp.minimum(labels, NUM_CLASSES - 1), k3)
        x0 = jnp.where((labels == NULL)[:, None], data(jax.random.randint(k5, (batch,), 0, NUM_CLASSES), k3), x0)
        eps = jax.random.normal(k4, x0.shape)
        sigma = shift_sigma(jax.random.uniform(k5, (batch,)), 3.0)

        def loss(p):
            v = nnx.merge(graphdef, p).forward(add_noise(x0, eps, sigma), condition(labels), None, sigma)
            return jnp.mean(jnp.square(v - (eps - x0)))
        l, g = jax.value_and_grad(loss)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, l

    key = jax.random.key(seed)
    for i in range(steps):
        params, opt, _ = step(params, opt, jax.random.fold_in(key, i))
    return nnx.merge(graphdef, params)


def teacher_sigmas(steps: int, shift: float = 3.0) -> np.ndarray:
    return np.asarray(shift_sigma(np.linspace(1.0, 0.0, steps + 1), shift), np.float32)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _sample(graphdef, state, labels, x, sigmas, guidance):
    model = nnx.merge(graphdef, state)
    cond, null = condition(labels), condition(jnp.full_like(labels, NULL))
    for i in range(len(sigmas) - 1):
        s = jnp.full(labels.shape, sigmas[i])
        v = model.forward(x, cond, None, s)
        if guidance > 1:
            v = true_cfg(v, model.forward(x, null, None, s), guidance, rescale=False)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def sample(model, labels, key, sigmas, guidance: float = 1.0) -> jax.Array:
    """Euler over `sigmas` (ending at 0) with true CFG `guidance` against the null class."""
    graphdef, state = nnx.split(model)
    labels = jnp.asarray(labels)
    x = jax.random.normal(key, labels.shape + (2,))
    return _sample(graphdef, state, labels, x, tuple(float(s) for s in sigmas), float(guidance))


def energy_distance(x, y) -> float:
    """Energy distance `2 E|x - y| - E|x - x'| - E|y - y'|` (0 iff the distributions agree)."""
    def mean_dist(a, b):
        return float(jnp.mean(jnp.linalg.norm(a[:, None] - b[None], axis=-1)))
    x, y = jnp.asarray(x), jnp.asarray(y)
    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def x0(model, x, sigma, labels):
    return x0_from_velocity(x, sigma, model.forward(x, condition(labels), None, sigma))
