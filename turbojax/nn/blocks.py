"""Running a stack of identical blocks: scanned over a stacked `layers` axis, or looped, with optional remat."""
from __future__ import annotations

from typing import Callable, Sequence

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


def run_blocks(blocks, carry, consts, *, scan: bool, remat: str, taps: Sequence[int] = ()):
    """Apply a stack of blocks to `carry`: scanned over the leading `layers` axis, or looped over a list.

    With `taps` (0-based block indices), also return `[carry[0] after block i for i in taps]` (the feature taps of
    the distillation discriminators); the scan then emits `carry[0]` of every layer and the taps are gathered."""
    policy = remat_policy(remat)
    collect = bool(taps)

    def make_body(graphdef):
        def body(c, layer_state):
            out = nnx.merge(graphdef, layer_state)(*c, *consts)
            return out, (out[0] if collect else None)
        return body if policy is False else jax.checkpoint(body, policy=policy, prevent_cse=not scan)

    if scan:
        graphdef, state = nnx.split(blocks)
        carry, ys = jax.lax.scan(make_body(graphdef), carry, state)
        return (carry, [ys[i] for i in taps]) if collect else carry
    outs = []
    for block in blocks:
        graphdef, state = nnx.split(block)
        carry, y = make_body(graphdef)(carry, state)
        outs.append(y)
    return (carry, [outs[i] for i in taps]) if collect else carry
