"""Gradients of the "chunked" attention (custom flash-style backward) against `jax.grad` of the reference ("xla")."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from turbojax.nn import attention as attn_mod
from turbojax.nn.attention import attention


def make_inputs(seed, b=2, sq=37, sk=53, h=3, d=16, dv=None, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, sq, h, d)) * 1.5
    k = rng.standard_normal((b, sk, h, d)) * 1.5
    v = rng.standard_normal((b, sk, h, dv or d))
    mask = np.ones((b, sk), bool)
    mask[-1, sk // 3:] = False
    return [jnp.asarray(x, dtype) for x in (q, k, v)], jnp.asarray(mask)


def grads(fn, q, k, v, seed=0):
    """Gradients of a loss with a random, non-uniform output cotangent."""
    w = jnp.asarray(np.random.default_rng(seed + 100).standard_normal(fn(q, k, v).shape), jnp.float32)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2)))(q, k, v)


def assert_close(ours, ref, tol):
    for name, a, b in zip("qkv", ours, ref):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, name
        scale = np.abs(b).max()
        assert np.abs(a - b).max() <= tol * scale, (name, np.abs(a - b).max() / scale)


def ref_fn(mask, scale=None, causal=False):
    return lambda q, k, v: attention(q, k, v, mask, impl="xla", scale=scale, causal=causal)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("blocks", [None, (8, 16), (5, 7), (64, 13)])
def test_grad_matches_reference(masked, blocks):
    """One softmax step (default blocks) and the online softmax over key blocks with padded queries and keys."""
    (q, k, v), mask = make_inputs(0, dv=8)
    mask = mask if masked else None
    if blocks is None:
        ours = grads(lambda q, k, v: attention(q, k, v, mask, impl="chunked"), q, k, v)
    else:
        ours = grads(lambda q, k, v: attn_mod._chunked_attention(q, k, v, mask, 16 ** -0.5, q_block=blocks[0],
                                                                  kv_block=blocks[1]), q, k, v)
    assert_close(ours, grads(ref_fn(mask), q, k, v), 2e-5)


@pytest.mark.parametrize("blocks", [(None, None), (8, 16), (5, 7)])
def test_grad_causal(blocks):
    (q, k, v), mask = make_inputs(1, sq=29, sk=29)
    ours = grads(lambda q, k, v: attn_mod._chunked_attention(q, k, v, mask, 16 ** -0.5, q_block=blocks[0],
                                                              kv_block=blocks[1], causal=True), q, k, v)
    assert_close(ours, grads(ref_fn(mask, causal=True), q, k, v), 2e-5)


@pytest.mark.parametrize("kv_block", [None, 4])
def test_grad_fully_masked_row(kv_block):
    """A sample with no valid key: uniform probabilities (dV gets the mean cotangent) and zero dQ, dK, as in the
    reference where every masked logit is a constant."""
    (q, k, v), _ = make_inputs(2, sq=9, sk=11, h=2, d=8)
    mask = jnp.asarray(np.array([[True] * 11, [False] * 11]))
    ours = grads(lambda q, k, v: attn_mod._chunked_attention(q, k, v, mask, 8 ** -0.5, kv_block=kv_block), q, k, v)
    ref = grads(ref_fn(mask), q, k, v)
    assert_close(ours, ref, 2e-5)
    assert np.abs(np.asarray(ours[0][1])).max() == 0 and np.abs(np.asarray(ours[1][1])).max() == 0
    assert np.abs(np.asarray(ours[2][1])).max() > 0


@pytest.mark.parametrize("blocks", [(None, None), (16, 16)])
def test_grad_bf16(blocks):
    """bf16 inputs: gradients come back in bf16 and agree with the fp32 reference gradient to bf16 precision."""
    (q, k, v), mask = make_inputs(3)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    ours = grads(lambda q, k, v: attn_mod._chunked_attention(q, k, v, mask, 0.25, q_block=blocks[0],
                                                              kv_block=blocks[1]), q16, k16, v16)
    assert all(g.dtype == jnp.bfloat16 for g in ours)
    # reference on the same bf16-rounded inputs, in fp32
    ref = grads(ref_fn(mask, scale=0.25), *(x.astype(jnp.float32) for x in (q16, k16, v16)))
    assert_close(ours, ref, 3e-2)


def test_grad_under_remat_scan_and_vmap():
    """The custom VJP composes with jax.checkpoint, lax.scan over layers and vmap (what the models do)."""
    (q, k, v), mask = make_inputs(4, b=1, sq=12, sk=12, h=2, d=8)

    def stack(impl):
        def layer(x, _):
            return jax.checkpoint(lambda x: x + attention(x, x, x, mask[:1], impl=impl))(x), None
        return lambda q, k, v: jax.vmap(lambda x: jax.lax.scan(layer, x, None, length=3)[0])(
            jnp.stack([q, k]) * v.mean())
    ours = grads(stack("chunked"), q, k, v)
    assert_close(ours, grads(stack("xla"), q, k, v), 5e-5)


def test_backward_keeps_no_probability_tensor():
    """The backward recomputes probabilities block by block: the compiled fwd+bwd needs far less scratch memory
    than one fp32 [B, H, Sq, Sk] tensor, which the reference (and autodiff through the loop) keeps."""
    (q, k, v), mask = make_inputs(5, b=1, sq=512, sk=512, h=16, d=8)
    probs_bytes = 4 * 16 * 512 * 512  # 16 MiB; one head's blocks (logits, probabilities, dP, dS) are 1 MiB each

    def temp_bytes(impl):
        fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask, impl=impl)), argnums=(0, 1, 2)))
        mem = fn.lower(q, k, v).compile().memory_analysis()
        if mem is None:
            pytest.skip("no memory analysis on this backend")
        return mem.temp_size_in_bytes
    assert temp_bytes("xla") >= probs_bytes  # the test can see the tensor when it is there
    assert temp_bytes("chunked") < probs_bytes / 2
