"""Running a stack of identical blocks: scanned over a stacked `layers` axis, or looped, with optional remat."""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from turbojax.nn.remat import remat_policy


def make_blocks(make_one: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs, *, scan: bool):
    """`n` blocks from `make_one(rngs)`: stacked along a leading `layers` axis (one vmapped init with split rngs) for
    `run_blocks(scan=True)`, or an `nnx.List` of separate blocks for the looped path."""
    if scan:
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked(r):
            return make_one(r)
        return stacked(rngs)
    return nnx.List([make_one(rngs) for _ in range(n)])


def run_blocks(blocks, carry, consts, *, scan: bool, remat: str):
    """Apply a stack of blocks to `carry`: scanned over the leading `layers` axis, or looped over a list."""
    policy = remat_policy(remat)

    def make_body(graphdef):
        def body(c, layer_state):
            return nnx.merge(graphdef, layer_state)(*c, *consts), None
        return body if policy is False else jax.checkpoint(body, policy=policy, prevent_cse=not scan)

    if scan:
        graphdef, state = nnx.split(blocks)
        carry, _ = jax.lax.scan(make_body(graphdef), carry, state)
        return carry
    for block in blocks:
        graphdef, state = nnx.split(block)
        carry, _ = make_body(graphdef)(carry, state)
    return carry
