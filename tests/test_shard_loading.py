"""Converted exports are read shard by shard onto a mesh: each device's block comes from its own read (safetensors
slices of a memory map, Orbax restores into sharded targets), the arrays carry the planned shardings, and the values
equal the plain single-device load exactly."""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from turbojax import models
from turbojax.convert import safetensors_io
from turbojax.convert.folders import to_jax
from turbojax.convert.keytable import Leaf
from turbojax.convert.params import flat_params, model_leaves, read_block
from turbojax.models.qwen_image import QwenImageConfig
from turbojax.models.registry import config_to_dict, get_family
from turbojax.sharding import make_mesh, param_shardings

MESHES = {"2x2x2": dict(data=2, fsdp=2, tensor=2), "1x8x1": dict(data=1, fsdp=8, tensor=1)}
# widths divisible by 8 so that fsdp=8 shards them; 3 layers so a stacked leaf is never a whole shard count
CFG = QwenImageConfig(num_layers=3, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                      in_channels=16, out_channels=4, axes_dims_rope=(4, 6, 6))


def _write_folder(folder, dtype=np.float32, seed=0):
    """A diffusers folder of random weights (one safetensors file, per-layer torch keys)."""
    fam = get_family("qwen_image")
    model = models.abstract_model(fam, CFG, scan_layers=False)
    params = flat_params(model)
    rng = np.random.default_rng(seed)
    tensors = {k: rng.standard_normal(leaf.torch_shape(params[leaf.jax_path].shape)).astype(dtype)
               for leaf in model_leaves(model, fam) for k in leaf.torch_keys}
    folder.mkdir()
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_dict(fam, CFG)))
    return folder


class _Spy:
    """Wraps what the safetensors reader returns and records every block asked of it."""

    def __init__(self, key, arr, log):
        self.key, self.arr, self.log, self.shape = key, arr, log, arr.shape

    def __getitem__(self, index):
        out = np.array(self.arr[index])
        self.log.append((self.key, out.size, self.arr.size))
        return out

    def __array__(self, dtype=None, copy=None):
        self.log.append((self.key, self.arr.size, self.arr.size))
        return np.asarray(self.arr, dtype)


@pytest.fixture
def read_log(monkeypatch):
    log = []
    real = safetensors_io._Reader.get

    def get(self, key, mmap=False):  # the mesh path maps tensors; a single-device load reads them whole
        return _Spy(key, real(self, key, mmap=True), log) if mmap else real(self, key)

    monkeypatch.setattr(safetensors_io._Reader, "get", get)
    return log


def _leaf_values(model):
    return {p: v[...] for p, v in flat_params(model).items()}


def _check_placed(model, plain, mesh):
    planned = param_shardings(model, mesh)
    got, want = _leaf_values(model), _leaf_values(plain)
    assert set(got) == set(want)
    sharded = 0
    for path, arr in got.items():
        assert arr.sharding.is_equivalent_to(planned[path], arr.ndim), (path, arr.sharding, planned[path])
        assert arr.dtype == want[path].dtype
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(want[path]), err_msg=".".join(path))
        sharded += not planned[path].is_fully_replicated
    assert sharded >= 20  # the rules shard most leaves of this config on either mesh
    return planned


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_safetensors_folder_loads_block_by_block(tmp_path, read_log, mesh_name):
    src = _write_folder(tmp_path / "src")
    plain = models.from_diffusers(src, progress=False)
    read_log.clear()
    mesh = make_mesh(**MESHES[mesh_name])
    model = models.from_diffusers(src, mesh=mesh, progress=False)
    planned = _check_placed(model, plain, mesh)

    fam = get_family("qwen_image")
    leaves = {leaf.jax_path: leaf for leaf in model_leaves(model, fam)}
    reads: dict[str, list[tuple[int, int]]] = {}
    for key, got, full in read_log:
        reads.setdefault(key, []).append((got, full))
    for path, sharding in planned.items():
        leaf = leaves[path]
        shape = tuple(flat_params(model)[path].shape)
        n_blocks = len({tuple((s.start, s.stop) for s in idx)
                        for idx in sharding.addressable_devices_indices_map(shape).values()})
        for key in leaf.torch_keys:
            if sharding.is_fully_replicated:
                assert len(reads[key]) == 1  # replicas share one read
                continue
            # never the whole tensor in one read, and each distinct block read once
            assert all(got < full for got, full in reads[key]), (key, reads[key])
            assert len(reads[key]) == n_blocks, (key, len(reads[key]), n_blocks)
            assert sum(got for got, _ in reads[key]) == n_blocks * reads[key][0][0]


def test_bf16_folder_to_fp32_params_on_a_mesh(tmp_path):
    """The dtype cast is applied per block exactly as on the whole leaf."""
    src = _write_folder(tmp_path / "src", dtype=ml_dtypes.bfloat16, seed=1)
    plain = models.from_diffusers(src, dtype=jnp.float32, progress=False)
    mesh = make_mesh(**MESHES["2x2x2"])
    _check_placed(models.from_diffusers(src, dtype=jnp.float32, mesh=mesh, progress=False), plain, mesh)


def _chunk_bytes(export):
    """{leaf: bytes of one storage chunk} over the parts of an export (Orbax's own metadata)."""
    import orbax.checkpoint as ocp
    out = {}
    with ocp.StandardCheckpointer() as ckpt:
        for part in sorted((export / "params").iterdir()):
            for arr in jax.tree.leaves(ckpt.metadata(part).item_metadata.tree):
                out[arr.name] = int(np.prod(arr.storage.chunk_shape)) * np.dtype(arr.dtype).itemsize
    return out


@pytest.mark.parametrize("mesh_name,chunk", [("2x2x2", 2048), ("1x8x1", 2048), ("1x8x1", None)],
                         ids=["2x2x2", "1x8x1", "1x8x1-one-chunk-a-leaf"])
def test_orbax_export_restores_into_planned_shardings(tmp_path, monkeypatch, mesh_name, chunk):
    """Exports store bounded chunks (a device's restore decodes only the chunks its shard overlaps); exports in
    Orbax's default layout (one chunk a leaf, written before chunking) load the same."""
    from turbojax.checkpoint import write_params
    from turbojax.convert import folders
    monkeypatch.setattr(folders, "write_params", lambda *a, **k: write_params(*a, **k, chunk_bytes=chunk))
    src = _write_folder(tmp_path / "src", seed=2)
    to_jax(src, tmp_path / "jax", progress=False, max_part_bytes=64 << 10)
    chunks = _chunk_bytes(tmp_path / "jax")
    if chunk is None:
        assert max(chunks.values()) > 16 * 2048
    else:
        assert len(chunks) == 45 and max(chunks.values()) <= chunk  # the 3-layer fc kernels are 48 KiB
    plain = models.from_diffusers(src, progress=False)
    mesh = make_mesh(**MESHES[mesh_name])
    _check_placed(models.from_orbax(tmp_path / "jax", mesh=mesh, progress=False), plain, mesh)


@pytest.mark.parametrize("leaf,torch_shape,bounds", [
    (Leaf(("k",), ("w",), transpose=True, stacked=False), (6, 4), ((1, 3), (2, 6))),
    (Leaf(("k",), ("w.0", "w.1", "w.2"), transpose=True, stacked=True), (6, 4), ((1, 3), (0, 2), (3, 6))),
    (Leaf(("c",), ("c.0", "c.1"), transpose=False, stacked=True, perm=(2, 3, 1, 0)), (5, 4, 3, 2),
     ((0, 1), (1, 3), (0, 2), (2, 4), (1, 5))),
    (Leaf(("b",), ("b",), transpose=False, stacked=False), (8,), ((4, 8),)),
])
def test_read_block_is_the_slice_of_the_whole_leaf(leaf, torch_shape, bounds):
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(torch_shape).astype(np.float32) for k in leaf.torch_keys}
    whole = leaf.to_jax([tensors[k] for k in leaf.torch_keys])
    block = read_block(leaf, tensors.__getitem__, bounds)
    np.testing.assert_array_equal(block, whole[tuple(slice(a, b) for a, b in bounds)])


TWO_HOSTS = r"""
import os, sys
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, src, export, mesh_name = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from turbojax import models
from turbojax.convert.params import flat_params
from turbojax.sharding import make_mesh, param_shardings
sizes = {"2x2x2": dict(data=2, fsdp=2, tensor=2), "1x8x1": dict(data=1, fsdp=8, tensor=1)}[mesh_name]
mesh = make_mesh(**sizes)
plain = {p: np.asarray(v[...]) for p, v in flat_params(models.from_diffusers(src, progress=False)).items()}
checked = 0
for path in (src, export):
    model = models.from_diffusers(path, mesh=mesh, progress=False)
    planned = param_shardings(model, mesh)
    for p, v in flat_params(model).items():
        a = v[...]
        assert a.sharding.is_equivalent_to(planned[p], a.ndim), p
        assert not planned[p].is_fully_addressable
        for shard in a.addressable_shards:  # this host's blocks only, equal to the same block of the plain load
            np.testing.assert_array_equal(np.asarray(shard.data), plain[p][shard.index], err_msg=".".join(p))
            checked += 1
print("checked", checked, len(jax.local_devices()))
jax.distributed.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_two_hosts_each_load_their_own_shards(tmp_path, mesh_name):
    """Two loopback processes (4 CPU devices each) load the folder and its export onto one 8-device mesh: every
    array spans both hosts and each host's blocks equal the plain load's."""
    import os
    import socket
    import subprocess
    import sys
    src = _write_folder(tmp_path / "src", seed=3)
    to_jax(src, tmp_path / "jax", progress=False, max_part_bytes=64 << 10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_HOSTS, str(i), str(port), str(src), str(tmp_path / "jax"),
                               mesh_name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        checked, devices = map(int, out.split()[-2:])
        assert devices == 4 and checked == 2 * 45 * 4  # both formats, every leaf, 4 local devices
