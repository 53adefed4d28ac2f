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


def test_make_mesh_layout_auto_axes_and_slices():
    """One mesh builder for train.py, sample.py and the plan: Auto axes; on CPU the devices in `jax.devices()` order;
    on a multi-slice TPU system (compile-only devices from libtpu) the data axis spans the slices over DCN, fsdp and
    tensor stay inside one slice, and a data size the slices do not divide is refused."""
    from jax.sharding import AxisType
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert tuple(mesh.axis_types) == (AxisType.Auto,) * 3
    assert [d.id for d in mesh.devices.reshape(-1)] == [d.id for d in jax.devices()]

    from turbojax.plan.topology import topology_devices
    devices = topology_devices("v5e:2x2", 2)  # 2 slices of 4 chips
    assert len({d.slice_index for d in devices}) == 2
    mesh = make_mesh(data=2, fsdp=-1, tensor=1, devices=devices)
    assert mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
    for row in mesh.devices:  # one data index = one slice
        assert len({d.slice_index for d in row.reshape(-1)}) == 1
    assert {mesh.devices[i, 0, 0].slice_index for i in range(2)} == {0, 1}
    with pytest.raises(ValueError, match="multiple of the 2 slices"):
        make_mesh(data=1, fsdp=-1, tensor=1, devices=devices)
