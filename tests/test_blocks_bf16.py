"""Scanned bf16 block stacks: each layer's slice fetched without any copy of a whole stack (no fp32 upcast, no
uint16 view), gradients unchanged."""
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
    # the plain scan: no per-layer fetch (the non-CPU path), no uint16 view, no fp32 shadow
    monkeypatch.setattr(blocks, "current_platform", lambda: "plain")
    monkeypatch.setattr(blocks, "_half_as_bits", lambda x: None)
    monkeypatch.setattr(blocks, "_grad_shadow", lambda x: x)
    v2, g2 = jax.jit(jax.value_and_grad(loss))(state)
    assert float(v1) == float(v2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_bf16_forward_makes_no_copy_of_the_weight_stack():
    state, loss = setup(jnp.bfloat16)
    stacked = {tuple(x.shape) for x in jax.tree.leaves(state) if x.ndim >= 3 and x.shape[0] == 2}
    hlo = jax.jit(loss).lower(state).compile().as_text()
    # Buffers the program materialises: instruction results outside fused computations (inside a fusion, a
    # convert of the stack feeding a slice only computes the slice).
    unfused = "\n\n".join(c for c in hlo.split("\n\n") if not re.match(r"\s*%(fused|wrapped)", c))
    for dt in ("f32", "u16"):  # an upcast copy of a stack, or its uint16 view (a copy on XLA:CPU)
        copies = {tuple(int(n) for n in m.split(",")) for m in re.findall(r"= " + dt + r"\[([\d,]+)\]", unfused)}
        assert stacked and not stacked & copies, (dt, stacked & copies)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_activation_backward_matches_autodiff(dtype):
    """gelu_tanh / silu keep only their input for the backward; values are jax.nn's evaluated in fp32 and rounded
    once (torch's half-precision kernels do the same), gradients jax.nn's."""
    from turbojax.nn.layers import gelu_tanh, silu
    x = jnp.asarray(np.linspace(-6, 6, 1001), dtype)
    w = jnp.asarray(np.random.default_rng(0).standard_normal(1001), dtype)
    for ours, ref in ((gelu_tanh, lambda x: jax.nn.gelu(x, approximate=True)), (silu, jax.nn.silu)):
        np.testing.assert_array_equal(np.asarray(ours(x), np.float32),
                                      np.asarray(ref(x.astype(jnp.float32)).astype(dtype), np.float32))
        g1 = jax.grad(lambda x: jnp.sum((ours(x) * w).astype(jnp.float32)))(x)
        g2 = jax.grad(lambda x: jnp.sum((ref(x.astype(jnp.float32)) * w.astype(jnp.float32))))(x)
        tol = 1e-5 if dtype == jnp.float32 else 2e-2  # round-off of a different formula
        np.testing.assert_allclose(np.asarray(g1, np.float32), np.asarray(g2, np.float32), atol=tol, rtol=tol)


def test_half_precision_linear_backward_runs_half_precision_products():
    """`layers.dot_acc32` (every `Linear`): the bf16 backward gives autodiff's gradients of the fp32-accumulated
    dot (to one bf16 rounding: the GEMM kernels may sum in another order), with both backward products on bf16
    operands (autodiff's own transpose feeds them the fp32 cotangent, so XLA:CPU upcasts the weight and runs fp32
    GEMMs), over batch and token axes; fp32 gradients (the CPU path's transposed copy) equal autodiff's."""
    from turbojax.nn.layers import dot_acc32
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 24, 40)).astype(jnp.bfloat16)
    w = (jax.random.normal(k[1], (40, 16)) * 0.2).astype(jnp.bfloat16)
    c = jax.random.normal(k[2], (2, 24, 16))

    def loss(dot):
        return lambda x, w: jnp.sum(dot(x, w).astype(jnp.bfloat16).astype(jnp.float32) * c)
    autodiff = jax.grad(loss(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)), (0, 1))(x, w)
    ours = jax.grad(loss(dot_acc32), (0, 1))(x, w)
    for a, b in zip(autodiff, ours):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=8e-3, atol=1e-2)

    def operand_types(dot):
        hlo = jax.jit(jax.grad(loss(dot), (0, 1))).lower(x, w).as_text()
        return re.findall(r"stablehlo\.dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", hlo)
    sigs = operand_types(dot_acc32)
    assert len(sigs) == 2 and all(a.endswith("xbf16>") and b.endswith("xbf16>") for a, b in sigs), sigs
    # what it replaces: autodiff feeds the fp32 cotangent to the backward products
    plain = operand_types(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    assert any("xf32>" in a + b for a, b in plain)
    # fp32: the same forward, and autodiff's gradients
    x32, w32, c32 = x.astype(jnp.float32), w.astype(jnp.float32), c
    np.testing.assert_array_equal(np.asarray(dot_acc32(x32, w32)), np.asarray(jnp.dot(x32, w32)))
    g_ours = jax.grad(lambda x, w: jnp.sum(dot_acc32(x, w) * c32), (0, 1))(x32, w32)
    g_ref = jax.grad(lambda x, w: jnp.sum(jnp.dot(x, w) * c32), (0, 1))(x32, w32)
    for a, b in zip(g_ref, g_ours):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
