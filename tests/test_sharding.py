"""Sharded execution on an 8-device simulated CPU mesh equals the single-device result."""
import jax
import numpy as np
import pytest

from refs import qwen_inputs, tiny_qwen
from test_qwen_image_parity import to_jax
from turbojax.sharding import batch_sharding, logical_to_spec, make_mesh, param_shardings


def test_resolver_semantics():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert tuple(logical_to_spec(("embed", "heads"), (8, 8), mesh)) == ("fsdp", "tensor")
    # a mesh axis is never used twice; a non-dividing dim is replicated; leading stacked dim = layers
    assert tuple(logical_to_spec(("embed", "embed_out"), (8, 8), mesh)) == ("fsdp", "tensor")
    assert tuple(logical_to_spec(("embed", "mlp"), (8, 3), mesh)) == ("fsdp", None)
    assert tuple(logical_to_spec(("embed", "mlp"), (4, 8, 8), mesh)) == (None, "fsdp", "tensor")
    with pytest.raises(ValueError, match="devices"):
        make_mesh(data=3, fsdp=1, tensor=1)


def test_sharded_forward_matches_unsharded():
    assert jax.device_count() == 8, "conftest must force 8 host devices"
    tm = tiny_qwen(seed=5)
    model = to_jax(tm)
    inputs = qwen_inputs(np.random.default_rng(0), batch=4, pad_from=(None, 3, 5, None))
    ref = np.asarray(model(**inputs))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = param_shardings(model, mesh)
    from flax import nnx
    graphdef, state = nnx.split(model)
    flat = [(p, v.replace(jax.device_put(v[...], shardings[tuple(str(x) for x in p)])))
            for p, v in nnx.to_flat_state(state)]
    sharded = nnx.merge(graphdef, nnx.from_flat_state(flat))
    specs = {str(s.spec) for s in shardings.values()}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)
    bs = batch_sharding(mesh)
    arrays = {k: (jax.device_put(v, bs) if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}
    out = sharded(**arrays)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)
