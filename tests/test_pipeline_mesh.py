"""Sampling on a mesh equals sampling without one (issue 13): the tiny diffusers pipelines of test_pipeline_e2e,
loaded by `pipelines.from_diffusers(..., mesh=...)` on the 8 simulated devices, with the batch over data x fsdp and
the weights sharded by their logical axes."""
import jax
import numpy as np
import pytest

from test_pipeline_e2e import qwen_pipeline_torch, z_image_pipeline_torch
from turbojax import pipelines
from turbojax.sharding import make_mesh

PROMPTS = ["a red cat sitting on a blue chair", "mountain lake at dawn", "a red cat", "lake at dawn"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh_pipes")
    qwen_pipeline_torch().save_pretrained(root / "qwen")
    z_image_pipeline_torch().save_pretrained(root / "zimage")
    return {"qwen": root / "qwen", "zimage": root / "zimage"}


def _sharded_over_batch(x, mesh) -> bool:
    return x.sharding.spec and x.sharding.spec[0] is not None and len(x.sharding.device_set) == mesh.size


@pytest.mark.parametrize("name,kw,shape", [("qwen", dict(guidance=3.0, negative_prompt=" "), (2, 2, 2)),
                                           ("zimage", dict(guidance=2.0), (1, 8, 1))],
                         ids=["qwen_true_cfg_d2f2t2", "z_image_cfg_f8"])
def test_sampling_on_a_mesh_equals_unsharded(folders, name, kw, shape):
    mesh = make_mesh(*shape)
    plain = pipelines.from_diffusers(folders[name], progress=False)
    sharded = pipelines.from_diffusers(folders[name], mesh=mesh, progress=False)
    assert sharded.mesh is mesh and plain.mesh is None
    # the weights live on the mesh, laid out by their logical axes (some of them split across devices)
    leaves = jax.tree.leaves(sharded.transformer)
    assert all(len(x.sharding.device_set) == mesh.size for x in leaves if hasattr(x, "sharding"))
    assert any(not x.sharding.is_fully_replicated for x in leaves if hasattr(x, "sharding"))
    prompts = PROMPTS  # 4 images: data x fsdp divides them on both meshes
    n = len(prompts)
    noise = plain.noise(3, n, 64, 64)
    a = plain(prompts, steps=2, width=64, height=64, noise=noise, **kw)
    seen = []  # the sampling loop's result, as the decode stage receives it
    decode = sharded.decode
    sharded.decode = lambda latents, **k: (seen.append(latents), decode(latents, **k))[1]
    b = sharded(prompts, steps=2, width=64, height=64, noise=noise, **kw)
    # the loop's result keeps the batch layout: one sample per device when data x fsdp divides the batch
    # (the Qwen case: 4 over 2 x 2), else replicated (Z-Image: 4 images, fsdp 8)
    splits = n % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
    assert (_sharded_over_batch(seen[0], mesh) if splits else seen[0].sharding.is_fully_replicated), seen[0].sharding
    assert a.shape == b.shape == (n, 64, 64, 3)
    assert a.std() > 5, "images must not be flat for the comparison to mean anything"
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_batch_placement(folders):
    """Batch-leading arrays go over data x fsdp when the batch divides it, otherwise (and Z-Image's per-prompt
    caption lists) replicated."""
    mesh = make_mesh(2, 2, 2)
    pipe = pipelines.from_diffusers(folders["qwen"], mesh=mesh, progress=False)
    x = pipe._place_batch(np.zeros((4, 16, 8), np.float32))
    assert _sharded_over_batch(x, mesh) and x.sharding.spec[0] == ("data", "fsdp")
    y = pipe._place_batch(np.zeros((3, 16, 8), np.float32))
    assert y.sharding.is_fully_replicated
    caps = pipe._place_batch([np.zeros((4, 8), np.float32), np.zeros((8, 8), np.float32)])
    assert all(c.sharding.is_fully_replicated for c in caps)


def test_sample_py_mesh_flag(folders, tmp_path):
    """`sample.py --mesh` samples on this process's devices and writes the same images as without it; a bad mesh
    or a batch it cannot split is one error line."""
    import sample
    common = ["--model", str(folders["qwen"]), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "2",
              "--width", "64", "--height", "64", "--batch-size", "2", "--dtype", "float32"]
    assert sample.main(common + ["--out", str(tmp_path / "plain.npz")]) == 0
    assert sample.main(common + ["--mesh", "data=2,fsdp=1,tensor=4", "--out", str(tmp_path / "mesh.npz")]) == 0
    a, b = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "mesh.npz")
    key = sorted(a.files)[0]
    assert np.abs(a[key].astype(int) - b[key].astype(int)).max() <= 1
    for flags, needle in ((["--mesh", "data=2,model=4"], "--mesh"), (["--mesh", "data=3"], "--mesh"),
                          (["--mesh", "fsdp=8", "--batch-size", "2"], "--batch-size 2")):
        with pytest.raises(SystemExit) as e:
            sample.main(common[:-2] + flags + ["--out", str(tmp_path / "x.png")])
        msg = str(e.value.code)
        assert msg.startswith("error: ") and "\n" not in msg and needle in msg, msg
