"""ArcFlow folders in the text-to-image pipelines and sample.py: `from_diffusers(..., arcflow=DIR)` samples with the
student's policy over the folder's sigma list through the normal text encoding and VAE decode. A folder of freshly
initialised K = 1 heads (the teacher's output layer, no jitter) is the teacher's velocity with unit rate, so its
analytic step is an Euler step: the images equal the plain 2-step (and 4-step) Euler pipeline's. A K = 2 folder with
a LoRA samples what the loaded student samples, deterministically, and differs. sample.py's `--arcflow` checks give
one `error:` line each. Tiny Qwen-Image and Z-Image pipelines saved by diffusers, 32x32, fp32."""
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from test_pipeline_e2e import PROMPTS, qwen_pipeline_torch, z_image_pipeline_torch
from test_sample_cli import base, run_error, stub_pipeline
from turbojax import lora, pipelines
from turbojax.distill import arcflow_heads as H

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import sample  # noqa: E402

SIZE = 32
NO_CFG = {"qwen_image": 1.0, "z_image": 0.0}
MLPS = {"qwen_image": r"transformer_blocks\.(img|txt)_mlp\.fc[12]", "z_image": r"layers\.feed_forward\.(gate|up|down)"}


@pytest.fixture(scope="module", params=["qwen_image", "z_image"])
def tiny(request, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(family) / "pipe"
    (qwen_pipeline_torch() if family == "qwen_image" else z_image_pipeline_torch()).save_pretrained(folder)
    return family, folder, pipelines.from_diffusers(folder, progress=False)


def export(folder, transformer, k, *, jitter=0.0, with_lora=False, seed=0):
    """An ArcFlow folder of freshly initialised heads (and optionally a non-zero trunk LoRA) on `transformer`."""
    trunk = H.trunk_for(transformer)
    heads, gamma = H.init_heads(transformer, trunk, k, jax.random.key(seed), jitter=jitter)
    adapter = None
    if with_lora:
        adapter = lora.init_adapter(transformer, [MLPS[transformer.family]], 2, 2.0, rng=jax.random.key(seed))
        adapter = {p: {**e, "b": 0.3 * np.asarray(jax.random.normal(jax.random.key(seed + 1), np.shape(e["b"])))}
                   for p, e in adapter.items()}
    student = H.ArcFlowStudent(transformer, adapter, heads, gamma, trunk, sigmas=(1.0, 0.75, 0.0))
    H.export_folder(folder, student, transformer, shift=3.0)
    return folder


def images(pipe, **kw):
    return pipe(PROMPTS, width=SIZE, height=SIZE, seed=0, **kw)


def same_image(a, b):
    """Equal up to a rare one-level rounding flip (the two loops feed the model sigma vs its own time rounding)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert a.shape == b.shape == (len(PROMPTS), SIZE, SIZE, 3)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert a.std() > 5  # not flat: the comparison means something


@pytest.mark.slow
def test_k1_folder_samples_the_euler_pipelines_images(tiny, tmp_path):
    family, folder, plain = tiny
    arc = export(tmp_path / "k1", plain.transformer, 1)
    assert json.loads((arc / "arcflow.json").read_text())["alt_sigmas"] == {"4": H.equal_raw_sigmas(4, 3.0)}
    pipe = pipelines.from_diffusers(folder, progress=False, arcflow=arc)
    assert pipe.sampler is not None and plain.sampler is None
    timings = {}
    got = images(pipe, timings=timings)  # the folder's own list: [1, 0.75, 0], 2 NFE
    assert timings["steps"] == 2
    same_image(got, images(plain, sigmas=[1.0, 0.75], guidance=NO_CFG[family]))
    # the latents too, through the pipelines' denoise stage
    cond = plain.encode_prompts(PROMPTS)
    noise = plain.noise(0, len(PROMPTS), SIZE, SIZE)
    sig = np.asarray([1.0, 0.75, 0.0], np.float32)
    kw = dict(height=SIZE, width=SIZE, guidance=NO_CFG[family])
    np.testing.assert_allclose(np.asarray(pipe.denoise(noise, cond, None, sig, **kw), np.float32),
                               np.asarray(plain.denoise(noise, cond, None, sig, **kw), np.float32), atol=1e-5)
    # the folder's 4-step list, and explicit sigmas
    same_image(images(pipe, steps=4), images(plain, sigmas=H.equal_raw_sigmas(4, 3.0), guidance=NO_CFG[family]))
    same_image(images(pipe, sigmas=[1.0, 0.5]), images(plain, sigmas=[1.0, 0.5], guidance=NO_CFG[family]))
    with pytest.raises(pipelines.PipelineError, match=r"sigma lists for \[2, 4\] steps, not 3"):
        images(pipe, steps=3)
    with pytest.raises(pipelines.PipelineError, match="without CFG"):
        images(pipe, guidance=4.0)


@pytest.mark.slow
def test_k2_folder_with_lora_samples_its_student_deterministically(tiny, tmp_path):
    family, folder, plain = tiny
    arc = export(tmp_path / "k2", plain.transformer, 2, jitter=0.3, with_lora=True)
    assert (arc / "lora.safetensors").is_file()
    pipe = pipelines.from_diffusers(folder, progress=False, arcflow=arc)
    a, b = images(pipe), images(pipe)
    np.testing.assert_array_equal(a, b)
    euler = images(plain, sigmas=[1.0, 0.75], guidance=NO_CFG[family])
    assert np.abs(a.astype(int) - euler.astype(int)).max() > 5  # the heads' jitter and the LoRA change the image
    # the pipeline's loop is the loaded student's sampler on the pipeline's latents and captions
    student = H.load_student(arc, plain.transformer)
    noise = plain.noise(0, len(PROMPTS), SIZE, SIZE)
    cond = plain.encode_prompts(PROMPTS)
    if family == "qwen_image":
        import dataclasses
        ref = student.sample(noise, {"ctx": cond[0], "mask": cond[1]},
                             trunk=dataclasses.replace(student.trunk, grid=(SIZE // 16, SIZE // 16)))
    else:
        ref = student.sample(np.asarray(noise)[:, :, None], {"caps": list(cond)})[:, :, 0]
    out = pipe.denoise(noise, cond, None, np.asarray([1.0, 0.75, 0.0], np.float32), height=SIZE, width=SIZE,
                       guidance=NO_CFG[family])
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    # a folder for the other family is refused, naming the file
    other = "z_image" if family == "qwen_image" else "qwen_image"
    settings = json.loads((arc / "arcflow.json").read_text())
    (arc / "arcflow.json").write_text(json.dumps({**settings, "family": other}))
    with pytest.raises(H.ArcFlowFormatError, match=f"arcflow.json: heads for a {other} model"):
        pipelines.from_diffusers(folder, progress=False, arcflow=arc)


@pytest.mark.slow
def test_sample_py_arcflow_matches_the_euler_run(tmp_path):
    from test_sample_cli import generate
    folder = tmp_path / "Qwen-Image-tiny"
    qwen_pipeline_torch().save_pretrained(folder)
    transformer = pipelines.from_diffusers(folder, progress=False).transformer
    arc = export(tmp_path / "arc", transformer, 1)

    def run(name, *extra):
        assert generate(folder, tmp_path / f"{name}.npz", "--num-images", 2, "--batch-size", 2, *extra) == 0
        return np.load(tmp_path / f"{name}.npz")["images"]
    # the preset is the 2-step [1, 0.75] Euler recipe without CFG; --arcflow takes the folder's list instead
    plain = run("plain")
    same = run("arc", "--arcflow", arc)
    diff = np.abs(same.astype(int) - plain.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01 and plain.std() > 5
    assert run("arc4", "--arcflow", arc, "--steps", 4).shape == plain.shape
    msg = run_error("--model", folder, "--prompt", "x", "--width", 32, "--height", 32, "--out", tmp_path / "e.png",
                    "--arcflow", arc, "--steps", 3)
    assert "--steps 3" in msg and "[2, 4]" in msg


def fake_folder(root: Path, **settings) -> Path:
    """arcflow.json (+ an empty heads file): enough for sample.py's checks, which run before any loading."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "arcflow.json").write_text(json.dumps({
        "method": "arcflow", "family": "qwen_image", "channels": 4, "pixels": 4, "num_components": 2,
        "sigmas": [1.0, 0.75, 0.0], "alt_sigmas": {"4": [1.0, 0.9, 0.75, 0.5, 0.0]}, **settings}))
    (root / "heads.safetensors").write_bytes(b"")
    return root


def test_sample_py_arcflow_errors(tmp_path):
    stub = stub_pipeline(tmp_path)
    good = fake_folder(tmp_path / "good")
    (tmp_path / "file").write_text("x")
    no_heads = fake_folder(tmp_path / "noheads")
    (no_heads / "heads.safetensors").unlink()
    (tmp_path / "empty").mkdir()
    broken = fake_folder(tmp_path / "broken")
    (broken / "arcflow.json").write_text("{not json")
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"")
    cases = [
        (["--arcflow", tmp_path / "missing"], "--arcflow", "folder not found"),
        (["--arcflow", tmp_path / "file"], "--arcflow", "not a folder"),
        (["--arcflow", tmp_path / "empty"], "--arcflow", "not an ArcFlow folder (no arcflow.json"),
        (["--arcflow", broken], "--arcflow", "not a readable JSON file"),
        (["--arcflow", fake_folder(tmp_path / "tpp", method="turbopp")], "--arcflow", "not an ArcFlow config"),
        (["--arcflow", no_heads], "--arcflow", "heads.safetensors missing"),
        (["--arcflow", fake_folder(tmp_path / "z", family="z_image")], "--arcflow",
         "made for a z_image model, but --model is a qwen_image pipeline"),
        (["--arcflow", fake_folder(tmp_path / "c16", channels=16)], "--arcflow",
         "heads for 16 latent channels, --model has 4"),
        (["--arcflow", good, "--lora-step", f"1:{a}", "--lora-step", f"2:{a}"], "--arcflow",
         "do not combine"),
        (["--arcflow", good, "--steps", 3], "--steps 3", "sigma lists for [2, 4] steps; give --sigmas"),
        (["--arcflow", good, "--guidance", 4], "--guidance 4.0", "without CFG"),
        (["--arcflow", good, "--sigmas", "1,0.5", "--steps", 3], "--steps 3", "does not match --sigmas"),
    ]
    for extra, flag, fragment in cases:
        msg = run_error(*base(stub, tmp_path, *extra))
        assert msg.startswith(f"error: {flag}") and fragment in msg, (extra, msg)
    assert "--arcflow needs --model" in run_error("--arcflow", good)
    zstub = stub_pipeline(tmp_path, "z_image")
    msg = run_error(*base(zstub, tmp_path, "--arcflow", good))
    assert "made for a qwen_image model, but --model is a z_image pipeline" in msg
    msg = run_error(*base(zstub, tmp_path, "--arcflow", fake_folder(tmp_path / "zg", family="z_image"),
                          "--guidance", 1))
    assert msg.startswith("error: --guidance 1.0") and "without CFG" in msg  # Z-Image: CFG whenever > 0
    # the checks pass for a fitting folder: what fails then is loading the stub's (absent) weights
    with pytest.raises(SystemExit) as e:
        sample.main([str(v) for v in base(stub, tmp_path, "--arcflow", good, "--steps", 4)])
    assert "--arcflow" not in str(e.value.code) and "--steps" not in str(e.value.code)
