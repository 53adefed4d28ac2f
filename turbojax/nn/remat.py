"""Named rematerialisation policies for block bodies (`remat=` in model configs)."""
from __future__ import annotations

import jax

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
