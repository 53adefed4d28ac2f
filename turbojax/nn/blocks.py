"""Running a stack of identical blocks: scanned over a stacked `layers` axis, or looped, with optional remat."""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.nn.attention import current_platform
from turbojax.nn.remat import remat_policy
from turbojax.sharding import constrain_residual


_UNROLL = {"scans": False}


@contextlib.contextmanager
def unrolled_scans():
    """Within (while tracing): block scans are fully unrolled. Cost analysis counts a loop body once, so the AOT plan
    (`turbojax.plan`) traces small 1- and 2-layer copies unrolled to count the FLOPs of one layer."""
    saved = _UNROLL["scans"]
    _UNROLL["scans"] = True
    try:
        yield
    finally:
        _UNROLL["scans"] = saved


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
    the distillation discriminators). The scan keeps them in a `[n_taps, ...]` buffer written at the tap layers
    only: emitting `carry[0]` of every layer would stack all of them (1.5 GB per 1024 px sample at 20B, 60 layers,
    and as much again for its cotangent), for the 3 the discriminator reads.

    On a mesh (`jax.set_mesh`) the `[B, L, D]` streams of the carry are constrained to ("batch", "length", "embed")
    on entry and after every block, so each chip keeps its own samples through the stack; without one, a no-op."""
    policy = remat_policy(remat)
    collect = bool(taps)
    carry = constrain_residual(carry)

    def make_body(graphdef, convert=None):
        def body(c, layer_state):
            if convert is not None:
                layer_state = convert(layer_state)
            out = constrain_residual(nnx.merge(graphdef, layer_state)(*c, *consts))
            return out, (out[0] if collect else None)
        return body if policy is False else jax.checkpoint(body, policy=policy, prevent_cse=not scan)

    if scan:
        graphdef, state = nnx.split(blocks)
        n_layers = jax.tree.leaves(state)[0].shape[0]
        # an fp32 shadow of each bf16 stack rides along only to receive the gradient (see `_grad_shadow`)
        shadow = jax.tree.map(_grad_shadow, state)
        if current_platform() == "cpu":
            # bf16 stacks stay loop constants; each layer's slice is fetched in the body past an optimization
            # barrier (see `_fetch_layer`), so no copy of a whole stack is made per call.
            halves = jax.tree.map(lambda x: x if x.dtype == jnp.bfloat16 else None, state)
            per_layer = jnp.arange(n_layers, dtype=jnp.int32)
            body = make_body(graphdef, convert=lambda xs: jax.tree.map(
                lambda h, like: like if h is None else _fetch_layer(h, xs[1], like), halves, xs[0],
                is_leaf=lambda x: x is None))
        else:
            # bf16 weights are scanned as same-width integers and bitcast back inside the body (see
            # `_half_as_bits`). The bits -> bf16 view happens inside the checkpointed body: its residuals are then
            # the scanned slices themselves, which the scan forwards, instead of a bf16 copy of every layer's
            # frozen weights stacked for the backward pass (~2.5 GiB per chip and differentiated pass at 20B on 16
            # chips).
            per_layer = jax.tree.map(_half_as_bits, state)
            body = make_body(graphdef, convert=lambda xs: jax.tree.map(_from_bits_or_same, xs[1], xs[0],
                                                                       is_leaf=lambda x: x is None))

        def layer(c, xs):
            return body(c, xs[:2])
        if not collect:
            carry, _ = jax.lax.scan(layer, carry, (shadow, per_layer), unroll=_UNROLL["scans"])
            return carry
        uniq = sorted(set(int(i) for i in taps))
        slot = np.full((n_layers,), -1, np.int32)  # which buffer row layer i writes, -1: none
        slot[uniq] = np.arange(len(uniq))

        def scan_body(c_buf, xs):
            c, buf = c_buf
            out, y = layer(c, xs)
            i = jnp.maximum(xs[2], 0)
            # a tap layer writes its row; the others write the row back unchanged (linear: no residuals saved)
            row = jnp.where(xs[2] >= 0, y, jax.lax.dynamic_index_in_dim(buf, i, 0, keepdims=False))
            return (out, jax.lax.dynamic_update_index_in_dim(buf, row, i, 0)), None
        buf = jnp.zeros((len(uniq), *carry[0].shape), carry[0].dtype)
        (carry, buf), _ = jax.lax.scan(scan_body, (carry, buf), (shadow, per_layer, jnp.asarray(slot)),
                                       unroll=_UNROLL["scans"])
        return carry, [buf[uniq.index(int(i))] for i in taps]
    outs = []
    for block in blocks:
        graphdef, state = nnx.split(block)
        carry, y = make_body(graphdef)(carry, state)
        outs.append(y)
    return (carry, [outs[i] for i in taps]) if collect else carry


@jax.custom_vjp
def _fetch_layer(stack, i, like):
    """Layer `i` of a bf16 weight stack (XLA:CPU only). Scanning the stack itself makes XLA:CPU upcast the bf16
    dynamic slice and hoist a convert of the whole stack out of the loop; scanning its uint16 view instead
    (`_half_as_bits`) still copies every stack once per call, because XLA:CPU materialises the same-width
    bitcast (~10% of the medium Qwen-Image bf16 forward). Behind an optimization barrier that also takes the
    loop index, the stack is no longer loop-invariant to XLA, nothing is hoisted, and each layer reads only its
    slice. The gradient goes to `like`, the fp32 shadow of the same layer, as in `_straight_through`."""
    stack, i = jax.lax.optimization_barrier((stack, i))
    return jax.lax.dynamic_index_in_dim(stack, i, 0, keepdims=False)


def _fetch_fwd(stack, i, like):
    return _fetch_layer(stack, i, like), None


def _fetch_bwd(_, ct):
    return None, None, ct.astype(jnp.float32)  # None: a zero cotangent for the stack and the index


_fetch_layer.defvjp(_fetch_fwd, _fetch_bwd)


def _half_as_bits(x):
    """uint16 view of a bf16 leaf (None otherwise). XLA:CPU upcasts a half-precision dynamic slice (the
    per-layer weight slice of the scan) to fp32 and hoists that convert of the whole weight stack out of the loop:
    every bf16 forward converted all block weights to fp32 and each layer's back to bf16 (~40% of the medium
    Qwen-Image bf16 forward). Integer slices are taken as they are."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else None


def _grad_shadow(x):
    """For a bf16 stack: an fp32 stand-in whose value is never read (XLA drops it) and whose gradient
    is rounded to x's dtype once, after the loop. The backward scan then accumulates the per-layer weight
    gradients in fp32: XLA:CPU has no bf16 dynamic-update-slice and would convert the whole bf16 gradient stack
    to fp32 and back at every layer. Other leaves pass through."""
    return _shadow(x) if x.dtype == jnp.bfloat16 else x


@jax.custom_vjp
def _shadow(x):
    return x.astype(jnp.float32)


def _shadow_fwd(x):
    return x.astype(jnp.float32), jnp.zeros((0,), x.dtype)  # the residual only carries x's dtype


def _shadow_bwd(res, ct):
    return (ct.astype(res.dtype),)


_shadow.defvjp(_shadow_fwd, _shadow_bwd)


def _from_bits_or_same(bits, like):
    return like if bits is None else _straight_through(bits, like)


@jax.custom_vjp
def _straight_through(bits, like):
    """bf16 value of `bits` (a uint16 view); its gradient goes, in fp32, to `like` (the fp32 shadow of the same
    layer's weight), whose value is never read, so the weights get exactly the gradients of a plain scan."""
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


def _st_fwd(bits, like):
    return _straight_through(bits, like), None


def _st_bwd(_, ct):
    return np.zeros(ct.shape, jax.dtypes.float0), ct.astype(jnp.float32)


_straight_through.defvjp(_st_fwd, _st_bwd)
