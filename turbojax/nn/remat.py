"""Named rematerialisation policies for block bodies (`remat=` in model configs)."""
from __future__ import annotations

import jax
from flax import nnx

_POLICIES = {
    "full": None,  # save nothing, recompute the whole block on the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


def remat_policy(name: str):
    """Return a `jax.checkpoint` policy, or False for `name == "none"` (no remat)."""
    if name == "none":
        return False
    if name not in _POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {['none', *_POLICIES]}")
    return _POLICIES[name]


def checkpointed_chain(modules, x):
    """`x` through `modules` in turn, each call under `jax.checkpoint`: the backward pass keeps only the input of each
    module and recomputes its inside (the VAE decode that the DINO discriminator differentiates through at full
    resolution would otherwise keep every norm / activation / convolution output of every resnet)."""
    for module in modules:
        graphdef, state = nnx.split(module)
        x = jax.checkpoint(lambda s, v, g=graphdef: nnx.merge(g, s)(v))(state, x)
    return x
