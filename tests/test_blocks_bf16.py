"""Scanned bf16 block stacks: weights sliced as uint16 (no fp32 copy of the stack), gradients unchanged."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import turbojax.nn.blocks as blocks
from turbojax.models.qwen_image import QWEN_IMAGE_TINY, QwenImageTransformer

H, W, L = 4, 4, 5


def setup(dtype):
    rng = np.random.default_rng(0)
    inputs = (jnp.asarray(rng.standard_normal((1, H * W, 16)), dtype), jnp.asarray(rng.standard_normal((1, L, 24)), dtype),
              jnp.ones((1, L), dtype), jnp.asarray([0.4], jnp.float32))
    graphdef, state = nnx.split(QwenImageTransformer(QWEN_IMAGE_TINY, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype))

    def loss(st):
        out = nnx.merge(graphdef, st).forward(*inputs, ((1, H, W),))
        return jnp.mean(jnp.square(out.astype(jnp.float32)))
    return state, loss


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_gradients_match_plain_scan(dtype, monkeypatch):
    state, loss = setup(dtype)
    v1, g1 = jax.jit(jax.value_and_grad(loss))(state)
    monkeypatch.setattr(blocks, "_half_as_bits", lambda x: None)
    monkeypatch.setattr(blocks, "_grad_shadow", lambda x: x)
    v2, g2 = jax.jit(jax.value_and_grad(loss))(state)
    assert float(v1) == float(v2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_bf16_forward_makes_no_fp32_copy_of_the_weight_stack():
    state, loss = setup(jnp.bfloat16)
    stacked = {tuple(x.shape) for x in jax.tree.leaves(state) if x.ndim >= 3 and x.shape[0] == 2}
    hlo = jax.jit(loss).lower(state).compile().as_text()
    f32 = {tuple(int(n) for n in m.split(",")) for m in re.findall(r"f32\[([\d,]+)\]", hlo)}
    assert stacked and not stacked & f32, stacked & f32
