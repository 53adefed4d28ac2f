"""sample.py as a user meets it: every bad flag, file or output path gets one `error:` line before anything heavy is
loaded, and writing images never deletes or replaces what was there. Validation tests run on a stub pipeline folder
(no weights: reaching the model loader would fail them); the few generating tests use a tiny saved diffusers
pipeline, 32x32, 2 steps, fp32."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import sample  # noqa: E402

from turbojax import image_out  # noqa: E402


def stub_pipeline(root: Path, family: str = "qwen_image") -> Path:
    """model_index.json, empty component folders and the JSON configs sample.py reads early; no weights."""
    folder = root / f"stub_{family}"
    for c in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / c).mkdir(parents=True, exist_ok=True)
    cls = "QwenImagePipeline" if family == "qwen_image" else "ZImagePipeline"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    if family == "qwen_image":
        (folder / "transformer" / "config.json").write_text(json.dumps({"in_channels": 16}))  # 4 latent channels
    else:
        (folder / "vae" / "config.json").write_text(json.dumps({"latent_channels": 4}))
    return folder


@pytest.fixture
def stub(tmp_path):
    return stub_pipeline(tmp_path)


def run_error(*argv) -> str:
    """sample.main must stop with exactly one `error:` line."""
    with pytest.raises(SystemExit) as e:
        sample.main([str(a) for a in argv])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def base(stub, tmp_path, *extra, out=None):
    return ("--model", stub, "--prompt", "a cat", "--width", 32, "--height", 32,
            "--out", out if out is not None else tmp_path / "o.png", *extra)


# ---- numeric flags ----

@pytest.mark.parametrize("flag,value,fragment", [
    ("--width", "0", "positive multiples of 16"), ("--width", "-32", "positive multiples of 16"),
    ("--height", "-16", "positive multiples of 16"), ("--height", "40", "positive multiples of 16"),
    ("--width", "abc", "expected an integer"),
    ("--steps", "0", "positive integer"), ("--steps", "-3", "positive integer"), ("--steps", "2.5", "integer"),
    ("--guidance", "nan", "finite"), ("--guidance", "inf", "finite"), ("--guidance", "-1", ">= 0"),
    ("--num-images", "0", "positive integer"), ("--num-images", "-2", "positive integer"),
    ("--batch-size", "0", "positive integer"), ("--batch-size", "-1", "positive integer"),
    ("--seed", "-1", "2**32"), ("--seed", str(2 ** 32), "2**32"), ("--seed", "1e3", "integer"),
])
def test_numeric_flags(stub, tmp_path, flag, value, fragment):
    msg = run_error(*base(stub, tmp_path), flag, value)
    assert flag in msg and fragment in msg, msg
    assert not (tmp_path / "o.png").exists()


def test_seed_must_fit_every_image(stub, tmp_path):
    msg = run_error(*base(stub, tmp_path, "--seed", 2 ** 32 - 2, "--num-images", 3))
    assert "--seed" in msg and "2**32" in msg and str(2 ** 32 - 3) in msg


def test_zero_never_means_default(stub, tmp_path):
    """`--width 0` used to fall back to the preset; and a preset's own values follow the same rules."""
    assert "--width" in run_error("--model", stub, "--prompt", "x", "--width", "0", "--out", tmp_path / "o.png")
    cfg = tmp_path / "bad_cfg.py"
    cfg.write_text("from configs.sample_qwen_image_base import get_config as base\n"
                   "def get_config():\n    c = base()\n    c.steps = 0\n    return c\n")
    msg = run_error(*base(stub, tmp_path, "--config", cfg))
    assert "steps" in msg and "bad_cfg.py" in msg and "positive" in msg


@pytest.mark.parametrize("sigmas,fragment", [
    ("1,a", "comma-separated numbers"), ("", "comma-separated numbers"), (",", "comma-separated numbers"),
    ("1,,0.5", "comma-separated numbers"), ("0.5,0.75", "strictly decrease"), ("1,0.75,0.75", "strictly decrease"),
    ("1.5,0.5", "within [0, 1]"), ("1,-0.5", "within [0, 1]"), ("0", "strictly decrease"), ("nan", "finite"),
    ("1,inf", "finite"),
])
def test_bad_sigmas(stub, tmp_path, sigmas, fragment):
    msg = run_error(*base(stub, tmp_path, "--sigmas", sigmas))
    assert msg.startswith("error: --sigmas") and fragment in msg, msg


def test_steps_and_sigmas_must_agree(stub, tmp_path):
    msg = run_error(*base(stub, tmp_path, "--sigmas", "1,0.75", "--steps", 3))
    assert "--steps 3" in msg and "2 steps" in msg


# ---- --out ----

def test_out_refuses_unknown_extensions_and_type_changes(stub, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    msg = run_error(*base(stub, tmp_path, out=notes))
    assert "notes.txt" in msg and "'.txt'" in msg and "folder of PNGs" in msg
    assert notes.read_text() == "keep me"
    msg = run_error(*base(stub, tmp_path, out=tmp_path / "anim.gif"))
    assert "'.gif'" in msg and not (tmp_path / "anim.gif").exists()
    # an existing file where a folder is asked for, an existing folder where a file is asked for
    plain = tmp_path / "images"
    plain.write_text("a file")
    for out in (plain, f"{plain}/"):
        assert "is not a folder" in run_error(*base(stub, tmp_path, out=out))
    assert plain.read_text() == "a file"
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "dir.png" / "x").write_text("x")
    assert "is a folder" in run_error(*base(stub, tmp_path, "--overwrite", out=tmp_path / "dir.png"))
    assert (tmp_path / "dir.png" / "x").read_text() == "x"
    # a parent that is a file
    assert "is not a folder" in run_error(*base(stub, tmp_path, out=notes / "x.png"))
    assert notes.read_text() == "keep me"


def test_out_refuses_existing_files_without_overwrite(stub, tmp_path):
    (tmp_path / "o.png").write_bytes(b"old")
    msg = run_error(*base(stub, tmp_path))
    assert "o.png" in msg and "already exists" in msg and "--overwrite" in msg
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "00001.png").write_bytes(b"mine")
    msg = run_error(*base(stub, tmp_path, "--num-images", 2, out=folder))
    assert "00001.png" in msg and "--overwrite" in msg
    assert (folder / "00001.png").read_bytes() == b"mine" and (tmp_path / "o.png").read_bytes() == b"old"


def test_plan_output_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    P = image_out.plan_output
    assert P("a.PNG", 3).kind == "PNG" and P("a.jpeg", 1).kind == "JPEG" and P("a.webp", 1).kind == "WEBP"
    assert P("a.npz", 2).files == (Path("a.npz"),)
    plan = P("new/sub", 2)
    assert plan.kind == image_out.FOLDER and plan.files == (Path("new/sub/00000.png"), Path("new/sub/00001.png"))
    assert P("v1.2/", 1).kind == image_out.FOLDER and P(".", 1).files == (Path("00000.png"),)
    (tmp_path / "run.v2").mkdir()
    assert P("run.v2", 1).kind == image_out.FOLDER  # an existing folder is a folder whatever its name
    with pytest.raises(image_out.OutputError, match="empty"):
        P("", 1)
    assert not (tmp_path / "new").exists()  # planning creates nothing


def _meta(n):
    return [dict(prompt=f"p{i}", seed=i, steps=2) for i in range(n)]


def test_write_output_formats_and_permissions(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("g.png", "g.jpg", "g.webp", "g.npz"):
        image_out.write_output(image_out.plan_output(str(tmp_path / name), 3), imgs, _meta(3))
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    with np.load(tmp_path / "g.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["images"], imgs)
        assert list(z["prompts"]) == ["p0", "p1", "p2"] and list(z["seeds"]) == [0, 1, 2]
    png = Image.open(tmp_path / "g.png")
    assert png.size == (32, 32) and png.text["prompt"] == "p0 | p1 | p2" and png.text["seed"] == "0,1,2"
    np.testing.assert_array_equal(np.asarray(png)[:16, 16:], imgs[1])  # a lossless 2x2 grid
    jpg = Image.open(tmp_path / "g.jpg")
    assert jpg.format == "JPEG" and json.loads(jpg.getexif()[0x010E])["prompt"] == "p0 | p1 | p2"
    assert Image.open(tmp_path / "g.webp").format == "WEBP"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_write_output_refuses_a_file_that_appeared_meanwhile(tmp_path):
    imgs = np.zeros((2, 16, 16, 3), np.uint8)
    plan = image_out.plan_output(str(tmp_path / "d"), 2)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "00001.png").write_bytes(b"someone else's")
    with pytest.raises(image_out.OutputError, match="00001.png"):
        image_out.write_output(plan, imgs, _meta(2))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["00001.png"]  # nothing half-written either
    assert (tmp_path / "d" / "00001.png").read_bytes() == b"someone else's"


# ---- --noise ----

def test_bad_noise_files(stub, tmp_path):
    def err(path, **kw):
        msg = run_error(*base(stub, tmp_path, "--noise", path, **kw))
        assert f"--noise {path}" in msg, msg
        return msg

    assert "not found" in err(tmp_path / "missing.npy")
    (tmp_path / "n.txt").write_text("1 2 3")
    assert ".npy or .npz" in err(tmp_path / "n.txt")
    (tmp_path / "junk.npy").write_text("not numpy")
    assert "not a readable" in err(tmp_path / "junk.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "not a readable" in err(tmp_path / "obj.npy")  # never unpickled
    np.save(tmp_path / "str.npy", np.array(["a", "b"]))
    assert "float array" in err(tmp_path / "str.npy")
    np.save(tmp_path / "nan.npy", np.full((1, 4, 16), np.nan, np.float32))
    assert "NaN" in err(tmp_path / "nan.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros(3), b=np.zeros(3))
    assert "'a'" in err(tmp_path / "two.npz")
    # 32x32 Qwen-Image, 4 latent channels: packed [1, 4, 16] or unpacked [1, 4, 4, 4]
    np.save(tmp_path / "count.npy", np.zeros((2, 4, 16), np.float32))
    msg = err(tmp_path / "count.npy")
    assert "(2, 4, 16)" in msg and "packed (1, 4, 16)" in msg and "(1, 4, 4, 4)" in msg and "(1, 4, 1, 4, 4)" in msg
    np.save(tmp_path / "chan.npy", np.zeros((1, 16, 4, 4), np.float32))  # real Qwen-Image channels, tiny model
    assert "(1, 4, 4, 4)" in err(tmp_path / "chan.npy")
    np.save(tmp_path / "size.npy", np.zeros((1, 4, 8, 8), np.float32))  # 64x64 latents for a 32x32 image
    assert "32x32" in err(tmp_path / "size.npy")
    np.save(tmp_path / "frames.npy", np.zeros((1, 4, 2, 4, 4), np.float32))
    assert "(1, 4, 1, 4, 4)" in err(tmp_path / "frames.npy")


def test_fit_noise_layouts():
    """Unpacked [B, C, h, w] / [B, C, 1, h, w] / [B, 1, C, h, w] pack exactly as diffusers' `_pack_latents`."""
    from diffusers import QwenImagePipeline
    import torch
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 4)).astype(np.float32)  # 48x32 image, 4 latent channels
    ref = QwenImagePipeline._pack_latents(torch.tensor(x)[:, None], 2, 4, 6, 4).numpy()
    for layout in (x, x[:, :, None], x[:, None], ref):
        np.testing.assert_array_equal(sample.fit_noise(layout, "n", "qwen_image", 2, 48, 32, 4), ref)
    for layout in (x, x[:, :, None], x[:, None]):
        np.testing.assert_array_equal(sample.fit_noise(layout, "n", "z_image", 2, 48, 32, None), x)
    with pytest.raises(SystemExit, match=r"\(2, 4, 6, 4\)"):
        sample.fit_noise(ref, "n", "z_image", 2, 48, 32, 4)  # packed is not a Z-Image layout


# ---- --lora ----

def test_bad_lora_files(stub, tmp_path):
    from safetensors.numpy import save_file

    def err(spec, fragment):
        msg = run_error(*base(stub, tmp_path, "--lora", spec))
        assert msg.startswith("error: --lora") and str(spec).split(":")[0] in msg and fragment in msg, msg

    (tmp_path / "text.safetensors").write_text("hello, not a tensor file")
    err(tmp_path / "text.safetensors", "not a readable safetensors file")
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04pickle")
    err(tmp_path / "old.ckpt", "only .safetensors")
    (tmp_path / "l.txt").write_text("x")
    err(tmp_path / "l.txt", "safetensors")
    err(tmp_path / "missing.safetensors", "not found")
    save_file({"diffusion_model.layers.0.attention.to_q.lora_down.weight": np.zeros((2, 64), np.float32),
               "diffusion_model.layers.0.attention.to_q.lora_up.weight": np.zeros((64, 2), np.float32)},
              str(tmp_path / "z.safetensors"))
    err(tmp_path / "z.safetensors", "qwen_image")  # a Z-Image LoRA on a Qwen-Image pipeline
    err(f"{tmp_path / 'z.safetensors'}:nan", "finite")
    err(f"{tmp_path / 'z.safetensors'}:x", "not a number")
    zstub = stub_pipeline(tmp_path, "z_image")
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((2, 8), np.float32),
               "transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((8, 2), np.float32)},
              str(tmp_path / "q.safetensors"))
    msg = run_error("--model", zstub, "--prompt", "x", "--lora", tmp_path / "q.safetensors", "--out",
                    tmp_path / "o.png")
    assert "q.safetensors" in msg and "z_image" in msg


def test_subprocess_prints_one_error_line(stub, tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--model", str(stub), "--prompt", "x", "--height", "0",
                        "--out", str(tmp_path / "o.png")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "error: argument --height: width and height must be positive multiples of 16, got 0"]


# ---- generating (tiny real pipelines) ----

@pytest.fixture(scope="module")
def tiny_qwen_folder(tmp_path_factory):
    from test_pipeline_e2e import qwen_pipeline_torch
    folder = tmp_path_factory.mktemp("sample_cli") / "Qwen-Image-tiny"
    qwen_pipeline_torch().save_pretrained(folder)
    return folder


def generate(folder, out, *extra):
    return sample.main(["--model", str(folder), "--config", "configs/sample_qwen_image_turbo_2step.py",
                        "--prompt", "a red cat sitting on a blue chair", "--width", "32", "--height", "32",
                        "--dtype", "float32", "--out", str(out), *map(str, extra)])


@pytest.mark.slow
def test_out_folder_keeps_other_files(tiny_qwen_folder, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    (folder / "sub").mkdir()
    assert generate(tiny_qwen_folder, f"{folder}/", "--num-images", 2) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "notes.txt", "sub"]
    first = (folder / "00000.png").read_bytes()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((folder / "00000.png").stat().st_mode) == 0o666 & ~umask
    # a rerun refuses before loading anything; --overwrite replaces exactly our names
    with pytest.raises(SystemExit, match="error: --out .*00000.png.*--overwrite"):
        generate(tiny_qwen_folder, folder, "--num-images", 2)
    assert generate(tiny_qwen_folder, folder, "--num-images", 2, "--seed", 5, "--overwrite") == 0
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "notes.txt", "sub"]
    assert (folder / "notes.txt").read_text() == "keep me" and (folder / "00000.png").read_bytes() != first
    # --out . writes into the current folder and deletes nothing
    monkeypatch.chdir(folder / "sub")
    (folder / "sub" / "mine.txt").write_text("mine")
    assert generate(tiny_qwen_folder, ".") == 0
    assert sorted(p.name for p in (folder / "sub").iterdir()) == ["00000.png", "mine.txt"]


@pytest.mark.slow
def test_noise_layouts_give_the_same_images(tiny_qwen_folder, tmp_path):
    """The pipeline's packed noise and the unpacked `torch.randn` layout produce identical images; .npz output."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)  # 2 images, 4 latent channels, 32x32
    np.save(tmp_path / "unpacked.npy", x[:, None])  # [B, 1, C, h, w] as QwenImagePipeline draws it
    from turbojax.sampling import pack_latents
    np.savez(tmp_path / "packed.npz", noise=np.asarray(pack_latents(x)))
    for name in ("unpacked.npy", "packed.npz"):
        assert generate(tiny_qwen_folder, tmp_path / f"{name}.npz", "--num-images", 2, "--batch-size", 2,
                        "--noise", tmp_path / name) == 0
    a, b = (np.load(tmp_path / f"{n}.npz", allow_pickle=False) for n in ("unpacked.npy", "packed.npz"))
    assert a["images"].shape == (2, 32, 32, 3) and a["images"].dtype == np.uint8 and a["images"].std() > 0
    np.testing.assert_array_equal(a["images"], b["images"])
    assert list(a["prompts"]) == ["a red cat sitting on a blue chair"] * 2
