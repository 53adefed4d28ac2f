"""impl="splash": the Pallas TPU splash kernel, checked in Pallas interpret mode on CPU against the "xla" reference
(padded keys, causal, GQA, gradients, an 8-device mesh, a tiny model) and compiled ahead of time for a TPU topology."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from turbojax.nn import splash
from turbojax.nn.attention import IMPLEMENTATIONS, attention
from turbojax.sharding import make_mesh


# Jitted once per test module: one compilation per shape and variant (interpret-mode kernels take seconds to
# compile, eager calls would also compile every small op around them separately).
attn = jax.jit(attention, static_argnames=("impl", "scale", "causal"))
splash_attn = jax.jit(splash.splash_attention, static_argnames=("scale", "causal", "block", "interpret"))


def make_qkv(seed, b=2, sq=200, sk=None, h=4, hkv=None, d=32, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    sk = sq if sk is None else sk
    hkv = h if hkv is None else hkv
    q = rng.standard_normal((b, sq, h, d))
    k, v = rng.standard_normal((b, sk, hkv, d)), rng.standard_normal((b, sk, hkv, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def padded_mask(b, sk, pads):
    """[B, Sk] key mask: row i drops its last pads[i] keys; row 1 also has a gap in the middle, like Qwen-Image's
    joint sequence (padded text first, then image tokens)."""
    m = np.ones((b, sk), bool)
    for i, p in enumerate(pads):
        if p:
            m[i, sk - p:] = False
    if b > 1:
        m[1, 3:9] = False
    return m


def repeat_kv(q, k, v):
    g = q.shape[2] // k.shape[2]
    return q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)


def max_err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def close_to_xla(out, q, k, v, mask, **kw):
    """fp32: splash equals the reference to round-off. bf16: both round differently (splash scales q before the
    product), so splash must be about as close to the fp32 truth as the bf16 reference is."""
    ref = attn(q, k, v, mask, impl="xla", **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if q.dtype == jnp.float32:
        return max_err(out, ref) < 1e-5
    truth = attn(*(x.astype(jnp.float32) for x in (q, k, v)), mask, impl="xla", **kw)
    return max_err(out, truth) <= 2 * max_err(ref, truth) + 1e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_padded_keys_match_xla(dtype):
    # 200 tokens: not a block multiple (blocks of 256, 56 padded rows/keys); 300 keys with block=128: 3 key blocks
    for sq, sk, block in ((200, 200, None), (70, 300, 128)):
        q, k, v = make_qkv(0, sq=sq, sk=sk, dtype=dtype)
        mask = padded_mask(2, sk, (37, 0))
        assert close_to_xla(splash_attn(q, k, v, mask, block=block), q, k, v, mask), (sq, sk)
    # through the public entry point, a caller-given scale and no mask at all
    q, k, v = make_qkv(1, sq=130, dtype=dtype)
    assert close_to_xla(attn(q, k, v, None, impl="splash", scale=0.3), q, k, v, None, scale=0.3)


def test_causal_gqa_and_blind_rows_match_xla():
    # GQA (4 query heads read 2 kv heads) against the reference on repeated kv heads; causal with a padded tail.
    q, k, v = make_qkv(2, sq=150, hkv=2)
    mask = padded_mask(2, 150, (20, 0))
    for causal in (False, True):
        ref = attn(*repeat_kv(q, k, v), mask, impl="xla", causal=causal)
        assert max_err(attn(q, k, v, mask, impl="splash", causal=causal), ref) < 1e-5, causal
    # Rows that see no valid key: a batch row masked entirely, and (causal) queries before the first valid key.
    # The reference averages all values there; splash must too, not return the kernel's arbitrary values.
    blind = np.ones((2, 150), bool)
    blind[0] = False
    blind[1, :40] = False
    for causal in (False, True):
        ref = attn(*repeat_kv(q, k, v), blind, impl="xla", causal=causal)
        assert max_err(attn(q, k, v, blind, impl="splash", causal=causal), ref) < 1e-5, causal


def test_gradients_match_xla():
    q, k, v = make_qkv(3, sq=140, hkv=2)
    mask = padded_mask(2, 140, (30, 0))
    mask[0] = False  # a blind row: its gradient w.r.t. q and k is zero in the reference, v gets a uniform share
    w = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)

    def loss(impl):
        def f(q, k, v):
            if impl == "xla":
                q, k, v = repeat_kv(q, k, v)
            return jnp.sum(w * jnp.sin(attention(q, k, v, mask, impl=impl)))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    # Non-causal only: that is the trained path (DiT joint attention); causal attention serves the frozen text
    # encoders, and each extra kernel variant costs seconds of interpret-mode compilation here.
    ref, got = loss("xla")(q, k, v), loss("splash")(q, k, v)
    for name, a, b in zip("qkv", got, ref):
        scale = float(jnp.max(jnp.abs(b)))
        assert max_err(a, b) < 1e-5 * max(scale, 1.0), (name, max_err(a, b), scale)


def test_mesh_shard_map_matches_unsharded():
    assert jax.device_count() == 8, "conftest must force 8 host devices"
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    q, k, v = make_qkv(5, b=4, sq=140, hkv=2)
    mask = padded_mask(4, 140, (0, 11, 60, 0))
    # kv heads 1: tensor=2 does not split them, so splash repeats them to one per query head before sharding
    k1, v1 = k[:, :, :1], v[:, :, :1]
    step = jax.jit(lambda q, k, v, m: attention(q, k, v, m, impl="splash"))
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(step)(q, k, v, mask))
        spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
        args = [jax.device_put(x, spec) for x in (q, k, v)] + [jax.device_put(mask, NamedSharding(mesh, P()))]
        out = step(*args)
        out1 = step(q, k1, v1, mask)
    assert "shard_map" in jaxpr
    assert "('data', 'fsdp')" in jaxpr and "tensor" in jaxpr  # batch over data x fsdp, heads over tensor
    np.testing.assert_allclose(np.asarray(out), np.asarray(step(q, k, v, mask)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), np.asarray(attn(*repeat_kv(q, k, v), mask, impl="xla")),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(out1), np.asarray(attn(*repeat_kv(q, k1, v1), mask, impl="xla")),
                               atol=1e-5)


# The persistent compilation cache stores the compile-only TPU executable but cannot load it back (that needs a TPU
# client), so it warns and compiles again; switching the cache off here would switch it off for the whole session.
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")
def test_tpu_aot_compile_value_and_grad():
    """Lowers and compiles forward + backward for a v5e:2x2 topology: the real Mosaic kernels, inside shard_map."""
    pytest.importorskip("libtpu", reason="libtpu is not installed: no TPU compiler to lower for")
    from jax.experimental import topologies
    # A concurrently running JAX process that probed the TPU plugin holds libtpu's lockfile; compile-only use of
    # the topology does not need that exclusivity.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=devices)
    b, s, h, d = 2, 300, 4, 64
    act = NamedSharding(mesh, P("fsdp", None, "tensor", None))
    arg = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=act)

    def loss(q, k, v, m):
        return jnp.sum(attention(q, k, v, m, impl="splash").astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
        assert splash.platform() == "tpu"
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(
            arg((b, s, h, d)), arg((b, s, 2, d)), arg((b, s, 2, d)),
            jax.ShapeDtypeStruct((b, s), jnp.bool_, sharding=NamedSharding(mesh, P("fsdp", None)))).compile()
    kernels = [line for line in compiled.as_text().splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    names = " ".join(line.split("=", 1)[0] for line in kernels)
    assert all(n in names for n in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv")), names
    # Each kernel sees one shard: 2 of 4 query heads and 1 of 2 kv heads (tensor=2), 300 tokens padded to 384.
    fwd = next(line for line in kernels if "splash_mha_fwd" in line)
    dkv = next(line for line in kernels if "splash_mha_dkv" in line)
    assert "bf16[2,384,64]" in fwd and "bf16[1,384,64]" in dkv and "bf16[4,384" not in fwd


@pytest.mark.slow
def test_qwen_image_model_splash_matches_xla():
    """Joint text+image attention of the DiT (padded text keys first, then image tokens), layers under scan."""
    from flax import nnx

    from turbojax.models.qwen_image import QWEN_IMAGE_TINY, QwenImageTransformer

    from refs import qwen_inputs
    inputs = qwen_inputs(np.random.default_rng(7))  # text padded from token 4 in sample 1
    img_shapes = inputs.pop("img_shapes")

    def run(impl):  # jitted: one compilation instead of one per eager op
        graphdef, state = nnx.split(QwenImageTransformer(QWEN_IMAGE_TINY, rngs=nnx.Rngs(0), attention_impl=impl))
        fwd = jax.jit(lambda st, kw: nnx.merge(graphdef, st)(**kw, img_shapes=img_shapes))
        return np.asarray(fwd(state, inputs))

    outs = {impl: run(impl) for impl in ("xla", "splash")}
    assert np.abs(outs["splash"] - outs["xla"]).max() <= 1e-5 * np.abs(outs["xla"]).max()


def test_errors_and_names():
    assert "splash" in IMPLEMENTATIONS
    q, k, v = make_qkv(6, sq=8, h=3, hkv=2)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        attention(q, k, v, None, impl="splash")
    q, k, v = make_qkv(6, sq=8)
    with pytest.raises(ValueError, match="block size must be a positive multiple of 128"):
        splash.splash_attention(q, k, v, block=200)
    with pytest.raises(ValueError, match="key_mask must be"):
        attention(q, k, v, np.ones((2, 9), bool), impl="splash")
    assert splash.block_size(40) == 128 and splash.block_size(300) == 384 and splash.block_size(5000) == 512
    assert splash.block_size(300, 128) == 128


@pytest.mark.slow
def test_qwen_text_encoder_splash_matches_xla():
    """The causal decoder path (Qwen2.5-VL text encoder: GQA heads, right-padded prompts) through models.create."""
    from flax import nnx

    from turbojax import models
    from turbojax.models.qwen_llm import QWEN2_5_VL_TINY

    ids = np.random.default_rng(8).integers(0, 320, (2, 19)).astype(np.int32)
    mask = np.ones((2, 19), np.int32)
    mask[1, 11:] = 0

    def run(impl):  # jitted: one compilation instead of one per eager op
        graphdef, state = nnx.split(models.create(QWEN2_5_VL_TINY, attention_impl=impl))
        fwd = jax.jit(lambda st: nnx.merge(graphdef, st).forward(ids, mask, (QWEN2_5_VL_TINY.num_hidden_layers,))[0])
        return np.asarray(fwd(state))

    outs = {impl: run(impl) for impl in ("xla", "splash")}
    assert np.abs(outs["splash"] - outs["xla"]).max() <= 1e-5 * np.abs(outs["xla"]).max()
