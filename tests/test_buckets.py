"""Aspect-ratio buckets (`data.buckets`): images go to the bucket nearest their aspect ratio, the latents and
teacher caches are per bucket, every batch has one bucket's shapes (drawn from seed, stream and step by the
buckets' share of the reals), and train.py distils across the buckets on a tiny Qwen-Image pipeline."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from test_cache import PROMPTS, _cfg, _loader_of, _png, _prompt_file, qwen  # noqa: F401 (the fixture)
from turbojax.cache import build, loader, store
from turbojax.cache.records import LatentRecords
from turbojax.data import buckets
from turbojax.data.images import load_image
from turbojax.distill.denoiser import PackedShape, denoiser_for, latent_shape_for

REPO = Path(__file__).resolve().parent.parent


def test_parse_nearest_and_pick():
    assert buckets.parse("") == [] and buckets.parse(None) == []
    assert buckets.parse("1024x1024, 1216x832,832X1216") == [(1024, 1024), (1216, 832), (832, 1216)]
    assert buckets.parse(("64x32",)) == [(64, 32)]
    for bad, msg in (("1024", "not WIDTHxHEIGHT"), ("1000x1000", "multiples of 16"), ("0x16", "multiples of 16"),
                     ("axb", "not WIDTHxHEIGHT"), ("32x32,32x32", "listed twice")):
        with pytest.raises(buckets.BucketError, match=msg):
            buckets.parse(bad)
    b = buckets.parse("1024x1024,1216x832,832x1216")
    assert buckets.nearest(4000, 3000, b) == 1 and buckets.nearest(3000, 4000, b) == 2
    assert buckets.nearest(500, 510, b) == 0
    assert buckets.nearest(2000, 1000, b) == 1 and buckets.nearest(1000, 2000, b) == 2  # log ratio: symmetric
    draws = [buckets.pick(3, "critic", s, [2, 0, 1]) for s in range(600)]
    assert draws == [buckets.pick(3, "critic", s, [2, 0, 1]) for s in range(600)]  # a function of (seed, stream, step)
    n = Counter(draws)
    assert n[1] == 0 and 340 < n[0] < 460 and 140 < n[2] < 260
    assert draws != [buckets.pick(3, "generator", s, [2, 0, 1]) for s in range(600)]


def test_non_square_qwen_latents_keep_their_grid():
    shape = latent_shape_for("qwen_image", 64, 32, 48)  # height 32, width 48 -> 2 x 3 patches
    assert shape == (6, 64) and shape.grid == (2, 3) and isinstance(shape, tuple)
    assert latent_shape_for("qwen_image", 64, 48, 32).grid == (3, 2)
    import pickle
    assert pickle.loads(pickle.dumps(shape)).grid == (2, 3)
    assert latent_shape_for("z_image", 16, 32, 48) == (16, 1, 4, 6)

    class Fake:
        family = "qwen_image"
    assert denoiser_for(Fake(), shape).img_shapes == ((1, 2, 3),)
    assert denoiser_for(Fake(), (4, 64)).grid == (2, 2)
    with pytest.raises(ValueError, match="not a square grid"):
        denoiser_for(Fake(), (6, 64))
    from turbojax.distill.dino_disc import image_hw
    assert image_hw("qwen_image", shape) == (32, 48) and image_hw("qwen_image", PackedShape((3, 2), 64)) == (48, 32)


def _image_folder(tmp_path):
    imgs = tmp_path / "imgs"
    _png(imgs / "wide1.png", (90, 60), 1)   # 3:2 -> 48x32
    _png(imgs / "wide2.jpg", (64, 40), 2)   # 1.6 -> 48x32
    _png(imgs / "tall.png", (40, 70), 3)    # -> 32x48
    _png(imgs / "square.webp", (50, 52), 4)  # -> 32x32
    (imgs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return imgs


def test_caches_and_batches_per_bucket(qwen, tmp_path):  # noqa: F811
    folder, pipe = qwen
    imgs = _image_folder(tmp_path)
    cfg = _cfg(folder, _prompt_file(tmp_path), images=str(imgs), buckets="32x32,48x32,32x48", teacher_samples=5)
    cfg.gan.real_mix = 0.5
    load, calls = _loader_of(pipe)
    msgs = []
    folders = build.ensure(cfg, tmp_path / "c", ("text", "latents", "teacher"), load_pipe=load, progress=msgs.append)
    assert sorted(folders) == ["latents@32x32", "latents@32x48", "latents@48x32", "teacher@32x32", "teacher@32x48",
                               "teacher@48x32", "text"]
    assert any("aspect-ratio buckets of the real images: 32x32 2, 48x32 2, 32x48 1" in m for m in msgs)  # corrupt: bucket 0
    grids = {"32x32": (2, 2), "48x32": (2, 3), "32x48": (3, 2)}
    ch = pipe.transformer.config.in_channels
    for b, (gh, gw) in grids.items():
        real = LatentRecords(folders[f"latents@{b}"], "latents", "real")
        teach = LatentRecords(folders[f"teacher@{b}"], "teacher", "teacher")
        assert real[0].shape == (gh * gw, ch) and teach[0].shape == (gh * gw, ch)
        assert len(teach) == 2  # ceil(5 / 3) per bucket
        man = json.loads((folders[f"teacher@{b}"] / "manifest.json").read_text())
        assert (man["fields"]["width"], man["fields"]["height"]) == tuple(int(v) for v in b.split("x"))
    assert len(LatentRecords(folders["latents@48x32"], "latents", "real")) == 2
    # the wide image is encoded from its own 48x32 crop (the VAE's mean, packed), not from a square one
    x = np.asarray(load_image(imgs / "wide1.png", 48, 32), np.float32)[None] / 127.5 - 1.0
    mom = np.asarray(pipe.vae.encode_nhwc(x))
    z = pipe.vae.normalize_latents(np.transpose(mom[..., :mom.shape[-1] // 2], (0, 3, 1, 2)), axis=1)
    np.testing.assert_allclose(LatentRecords(folders["latents@48x32"], "latents", "real")[0],
                               build.latent_layout(pipe, z)[0], atol=1e-5)
    # the teacher samples of different buckets come from different noise seeds
    t0 = LatentRecords(folders["teacher@32x32"], "teacher", "teacher")
    assert json.loads((folders["teacher@48x32"] / "manifest.json").read_text())["fields"]["seed_offset"] == 2
    assert "seed_offset" not in json.loads((folders["teacher@32x32"] / "manifest.json").read_text())["fields"]
    assert not np.allclose(t0[0], t0[1])
    # a rebuild finds them complete; one bucket more builds only that bucket's caches
    n_calls = len(calls)
    assert build.ensure(cfg, tmp_path / "c", ("text", "latents", "teacher"), load_pipe=load) == folders
    assert len(calls) == n_calls
    # batches: one bucket each, drawn by the buckets' reals (images + teacher samples: 1 + 2, 2 + 2, 1 + 2), and
    # reals of the batch's bucket
    b1 = loader.from_config(cfg, folders)
    assert b1.bucket_names == ["32x32", "48x32", "32x48"] and b1.bucket_weights == [3, 4, 3]
    seen = Counter()
    for step in range(60):
        batch = b1.batch("critic", step)
        gh, gw = grids[batch["bucket"]]
        assert batch["real"].shape == (2, gh * gw, ch)
        seen[batch["bucket"]] += 1
    assert set(seen) == set(grids)
    b2 = loader.from_config(cfg, folders)  # a resumed run (fresh process): the same buckets and rows
    for step in (0, 17, 59):
        x, y = b1.batch("critic", step), b2.batch("critic", step)
        assert x["bucket"] == y["bucket"] and np.array_equal(x["real"], y["real"])
    with pytest.raises(store.CacheError, match="data.buckets: '40x40'"):
        build.ensure(_cfg(folder, _prompt_file(tmp_path), buckets="40x40"), tmp_path / "c2", ("text",))


def test_train_py_distils_across_buckets(qwen, tmp_path):  # noqa: F811
    folder, _ = qwen
    imgs = _image_folder(tmp_path)
    prompts = _prompt_file(tmp_path, PROMPTS[:3])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [sys.executable, str(REPO / "train.py"), "--config", "configs/qwen_image_dmd2_gan.py",
            "--config.init_from", str(folder), "--config.data.prompts", str(prompts),
            "--config.data.kind", "cache", "--config.data.cache_dir", str(tmp_path / "caches"),
            "--config.data.images", str(imgs), "--config.gan.real_mix", "1.0",
            "--config.data.buckets", "48x32,32x48", "--config.param_dtype", "float32", "--config.dtype", "float32",
            "--config.remat", "none", "--config.data.teacher_samples", "2", "--config.data.teacher_steps", "2",
            "--config.data.max_sequence_length", "32", "--config.total_steps", "4", "--config.ttur_ratio", "1",
            "--config.batch_size", "2", "--config.lora.student.rank", "2", "--config.lora.fake.rank", "2",
            "--config.gan.hidden", "8", "--config.checkpoint_every", "2", "--config.log_every", "1",
            "--config.sample_every", "0", "--config.seed", "1"]
    r = subprocess.run(args + ["--workdir", str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "aspect-ratio buckets: 48x32, 32x48" in r.stdout
    # the nearly square image (50x52) is nearer the tall bucket; the corrupt one is skipped
    assert "aspect-ratio buckets of the real images: 48x32 3, 32x48 2" in r.stdout
    assert (tmp_path / "w" / "lora.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(v) for m in rows for k, v in m.items() if k != "step")
    b = loader.from_config(_bucket_cfg(), {k: Path(v) for k, v in _folders(r.stdout).items()})
    assert {b.image_bucket(s, i) for s in ("generator", "critic") for i in range(4)} == {"48x32", "32x48"}
    # the buckets need the cache data path
    bad = subprocess.run(args[:2] + ["--config", "configs/qwen_image_dmd2_gan.py", "--config.init_from", str(folder),
                                     "--config.data.prompts", str(prompts), "--config.data.buckets", "48x32",
                                     "--workdir", str(tmp_path / "w3")],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "error: --config.data.buckets: aspect-ratio buckets need --config.data.kind cache" \
        in bad.stderr and "Traceback" not in bad.stderr


def _bucket_cfg():
    from turbojax.distill.config import dmd2_config
    c = dmd2_config()
    c.data.buckets, c.gan.real_mix, c.batch_size, c.seed = "48x32,32x48", 1.0, 2, 1
    return c


def _folders(stdout: str) -> dict:
    out = {}
    for line in stdout.splitlines():
        if " cache ready in " in line:
            kind, path = line.split(" cache ready in ")
            out[kind.strip()] = path.strip()
    return out
