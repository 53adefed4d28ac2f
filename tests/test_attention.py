"""Every attention implementation against a float64 numpy reference (masks, odd lengths, blocking, bf16, grads)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from turbojax.nn import attention as attn_mod
from turbojax.nn.attention import IMPLEMENTATIONS, attention, resolve_impl

CPU_IMPLS = ("xla", "chunked", "auto")  # "cudnn" needs a GPU; "splash" (interpret mode) in test_splash.py


def reference(q, k, v, key_mask=None, scale=None, causal=False):
    """Softmax attention in float64; a fully masked row averages all its values, like the fp32 implementations."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if key_mask is not None:
        logits = np.where(np.asarray(key_mask)[:, None, None, :], logits, -1e300)
    if causal:
        logits = np.where(np.tri(q.shape[1], k.shape[1], dtype=bool), logits, -1e300)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def make_inputs(seed, b=2, sq=37, sk=53, h=3, d=16, dv=None, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, sq, h, d)) * 1.5
    k = rng.standard_normal((b, sk, h, d)) * 1.5
    v = rng.standard_normal((b, sk, h, dv or d))
    mask = np.ones((b, sk), bool)
    mask[-1, sk // 3:] = False  # batch row 0 fully valid, the last one partially masked
    return [jnp.asarray(x, dtype) for x in (q, k, v)], jnp.asarray(mask)


def err(out, ref):
    return float(np.abs(np.asarray(out, np.float64) - ref).max())


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("masked", [True, False])
def test_matches_float64_reference(impl, masked):
    (q, k, v), mask = make_inputs(0)
    mask = mask if masked else None
    out = jax.jit(lambda q, k, v, m: attention(q, k, v, m, impl=impl))(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert err(out, reference(q, k, v, mask)) < 1e-5


@pytest.mark.parametrize("q_block,kv_block", [(8, 16), (5, 7), (64, 13), (1, 53)])
def test_chunked_blocks_and_padding(q_block, kv_block):
    """Block sizes that do not divide 37 queries / 53 keys: padded queries, padded keys, online softmax."""
    (q, k, v), mask = make_inputs(1, dv=8)
    out = attn_mod._chunked_attention(q, k, v, mask, 0.3, q_block=q_block, kv_block=kv_block)
    assert out.shape == (2, 37, 3, 8)
    assert err(out, reference(q, k, v, mask, scale=0.3)) < 1e-5


@pytest.mark.parametrize("impl,blocks", [("xla", None), ("chunked", None), ("chunked", (8, 16)), ("chunked", (5, 7))])
def test_causal(impl, blocks):
    (q, k, v), mask = make_inputs(8, sq=37, sk=37)
    ref = reference(q, k, v, mask, causal=True)
    if blocks is None:
        out = attention(q, k, v, mask, impl=impl, causal=True)
    else:
        out = attn_mod._chunked_attention(q, k, v, mask, 16 ** -0.5, q_block=blocks[0], kv_block=blocks[1],
                                          causal=True)
    assert err(out, ref) < 1e-5


@pytest.mark.parametrize("kv_block", [None, 4])
def test_fully_masked_row_matches_xla(kv_block):
    """A row with no valid key: the reference averages every value uniformly; padding must not join the average."""
    (q, k, v), _ = make_inputs(2, sq=9, sk=11, h=2, d=8)
    mask = jnp.asarray(np.array([[True] * 11, [False] * 11]))
    ours = attn_mod._chunked_attention(q, k, v, mask, 8 ** -0.5, kv_block=kv_block)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(attention(q, k, v, mask, impl="xla")), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours[1]), np.broadcast_to(np.asarray(v[1]).mean(0), (9, 2, 8)), atol=1e-6)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_bf16_inputs(impl):
    (q, k, v), mask = make_inputs(3, dtype=jnp.bfloat16)
    out = attention(q, k, v, mask, impl=impl)
    assert out.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits: inputs, probabilities and output are each rounded once.
    assert err(out, reference(q, k, v, mask)) < 3e-2


def test_chunked_bf16_online_softmax():
    (q, k, v), mask = make_inputs(4, dtype=jnp.bfloat16)
    out = attn_mod._chunked_attention(q, k, v, mask, 0.25, q_block=16, kv_block=16)
    assert out.dtype == jnp.bfloat16
    assert err(out, reference(q, k, v, mask, scale=0.25)) < 3e-2


def test_chunked_gradients_match_xla():
    (q, k, v), mask = make_inputs(5, sq=13, sk=17, h=2, d=8)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, impl=impl)))

    ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    ours = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_impl_names():
    assert {"xla", "chunked", "auto"} <= set(IMPLEMENTATIONS)
    assert resolve_impl("auto") == {"cpu": "chunked", "tpu": "splash"}.get(jax.default_backend(), "xla")
    (q, k, v), mask = make_inputs(6, sq=3, sk=3, h=1, d=4)
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention(q, k, v, mask, impl="flash")


def test_auto_follows_the_mesh_platform():
    """"auto" picks by the platform of the mesh being traced for (AOT lowering for a TPU topology from a CPU host
    gets the splash kernel), not by the host's default backend."""
    import numpy as np
    from jax.sharding import Mesh
    topologies = pytest.importorskip("jax.experimental.topologies")
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    except Exception as e:  # no libtpu: nothing to lower for
        pytest.skip(f"no TPU compiler here ({type(e).__name__})")
    with jax.set_mesh(Mesh(np.array(devices).reshape(1, 4, 1), ("data", "fsdp", "tensor"))):
        assert resolve_impl("auto") == "splash"
    cpu = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    with jax.set_mesh(cpu):
        assert resolve_impl("auto") == "chunked"


@pytest.mark.parametrize("scan_layers", [True, False])
def test_qwen_image_model_accepts_chunked(scan_layers):
    """The model runs with attention_impl="chunked"/"auto" and matches the "xla" reference to fp32 round-off."""
    from flax import nnx

    from turbojax.models.qwen_image import QWEN_IMAGE_TINY, QwenImageTransformer

    rng = np.random.default_rng(7)
    b, h, w, l = 2, 4, 6, 7
    mask = np.ones((b, l), np.float32)
    mask[1, 4:] = 0
    inputs = dict(hidden_states=rng.standard_normal((b, h * w, 16)).astype(np.float32),
                  encoder_hidden_states=rng.standard_normal((b, l, 24)).astype(np.float32),
                  encoder_hidden_states_mask=mask, timestep=np.array([0.3, 0.9], np.float32),
                  img_shapes=[[(1, h, w)]] * b)
    outs = {impl: np.asarray(QwenImageTransformer(QWEN_IMAGE_TINY, rngs=nnx.Rngs(0), scan_layers=scan_layers,
                                                  attention_impl=impl)(**inputs))
            for impl in ("xla", "chunked", "auto")}
    scale = np.abs(outs["xla"]).max()
    for impl in ("chunked", "auto"):
        assert np.abs(outs[impl] - outs["xla"]).max() <= 1e-5 * scale
