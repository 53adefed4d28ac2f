"""On-disk data caches (turbojax.cache) on a tiny Qwen-Image pipeline: prompt and image sources, keys that
invalidate, a build killed half-way that resumes to the same bytes, the grain-sampled batch order, train.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from turbojax.cache import build, loader, store
from turbojax.cache.records import TextRecords
from turbojax.data.images import BadImage, list_images, load_image
from turbojax.distill.config import dmd2_config

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "cat", "a small boat on a calm lake at sunrise",
           "dog", "an old map of a harbour city with ships"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(pipeline folder, the loaded pipeline): loaded once, handed to the builders instead of reloading it."""
    from test_pipeline_e2e import qwen_pipeline_torch
    from turbojax import pipelines
    folder = tmp_path_factory.mktemp("qwen") / "Qwen-Image-tiny"
    qwen_pipeline_torch().save_pretrained(folder)
    return folder, pipelines.from_diffusers(folder, progress=False)


def _cfg(folder, prompts, **data):
    c = dmd2_config()
    c.init_from = str(folder)
    c.data.prompts = str(prompts)
    c.data.width = c.data.height = 32
    c.data.max_sequence_length = 128  # the tiny BPE makes long token lists
    c.data.teacher_samples = 3
    c.data.teacher_steps = 2
    c.data.cache_shard_size = 2
    c.batch_size = 2
    c.gan.real_mix = 0.0
    for k, v in data.items():
        c.data[k] = v
    return c


def _prompt_file(tmp_path, lines=PROMPTS, name="p.txt"):
    f = tmp_path / name
    f.write_text("\n".join(lines) + "\n")
    return f


def _loader_of(pipe):
    calls = []

    def load(_):
        calls.append(1)
        return pipe
    return load, calls


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".safetensors"}


def test_empty_prompt_file_is_one_error_line(qwen, tmp_path, capsys):
    from turbojax.cache.__main__ import main
    from turbojax.training import run_cli
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    rc = run_cli(main, ["text", "--config.init_from", str(qwen[0]), "--config.data.prompts", str(empty),
                        "--config.data.cache_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: --config.data.prompts") and "holds no prompts" in err[-1]
    assert not (tmp_path / "c").exists()  # nothing built, no pipeline loaded
    rc = run_cli(main, ["pictures"])
    assert rc == 1 and "one of text, latents, teacher, all" in capsys.readouterr().err


def test_text_cache_is_pad_free_and_counts_skipped_lines(qwen, tmp_path):
    folder, pipe = qwen
    f = _prompt_file(tmp_path, [PROMPTS[0], "", PROMPTS[2], PROMPTS[0], PROMPTS[3]])
    load, calls = _loader_of(pipe)
    out = build.ensure(_cfg(folder, f), tmp_path / "c", ("text",), load_pipe=load, progress=lambda m: None)
    man = json.loads((out["text"] / "manifest.json").read_text())
    assert man["complete"] and man["summary"]["prompt"] == {"records": 3, "skipped_blank": 1, "skipped_duplicate": 1}
    recs = TextRecords(out["text"])
    assert recs.num_prompts == 3
    for i, p in enumerate([PROMPTS[0], PROMPTS[2], PROMPTS[3]]):
        e, m = pipe.encode_prompts([p], 128)  # alone: no padding at all
        e = np.asarray(e)[0]
        assert m is None and recs.prompt(i).shape == e.shape
        np.testing.assert_allclose(recs.prompt(i), e, atol=1e-5)  # fp32 here; batched with longer prompts
    np.testing.assert_allclose(recs.negative_of(0), np.asarray(pipe.encode_prompts([" "], 128)[0])[0], atol=1e-5)
    # a second call finds the complete cache: nothing loaded, nothing written
    before = _files(out["text"])
    assert build.ensure(_cfg(folder, f), tmp_path / "c", ("text",), load_pipe=load)["text"] == out["text"]
    assert len(calls) == 1 and _files(out["text"]) == before


def test_changed_template_or_max_length_builds_a_new_cache(qwen, tmp_path, monkeypatch):
    from turbojax import text
    folder, pipe = qwen
    f = _prompt_file(tmp_path, PROMPTS[:3])
    load, calls = _loader_of(pipe)
    msgs = []
    old = build.ensure(_cfg(folder, f), tmp_path / "c", ("text",), load_pipe=load, progress=msgs.append)["text"]
    old_files = _files(old)
    new = build.ensure(_cfg(folder, f, max_sequence_length=96), tmp_path / "c", ("text",), load_pipe=load,
                       progress=msgs.append)["text"]
    assert new != old and any(str(old) in m and "max_sequence_length 128 -> 96" in m for m in msgs)
    assert _files(old) == old_files  # the stale cache is named, never deleted
    monkeypatch.setattr(text, "QWEN_IMAGE_TEMPLATE", text.QWEN_IMAGE_TEMPLATE.replace("Describe", "Paint"))
    third = build.ensure(_cfg(folder, f), tmp_path / "c", ("text",), load_pipe=load, progress=msgs.append)["text"]
    assert third not in (old, new) and any("template" in m for m in msgs)
    a, b = TextRecords(third).prompt(0), TextRecords(old).prompt(0)  # the new template was really used
    assert a.shape != b.shape or not np.allclose(a, b)
    # an edited prompt file is another cache too
    f.write_text("\n".join(PROMPTS[:2]) + "\n")
    assert build.ensure(_cfg(folder, f), tmp_path / "c", ("text",), load_pipe=load)["text"] not in (old, third)
    assert len(calls) == 4


def test_a_build_killed_half_way_resumes_to_the_same_bytes(qwen, tmp_path, monkeypatch):
    folder, pipe = qwen
    f = _prompt_file(tmp_path)
    load, _ = _loader_of(pipe)
    cfg = _cfg(folder, f)
    straight = build.ensure(cfg, tmp_path / "a", ("text", "teacher"), load_pipe=load, progress=lambda m: None)

    real_commit, count = store.atomic.commit_file, {"n": 0}

    def dying_commit(path, write):  # the "kill": the third shard never lands
        if Path(path).suffix == ".safetensors":
            count["n"] += 1
            if count["n"] == 3:
                raise KeyboardInterrupt("killed")
        return real_commit(path, write)

    monkeypatch.setattr(store.atomic, "commit_file", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        build.ensure(cfg, tmp_path / "b", ("text", "teacher"), load_pipe=load, progress=lambda m: None)
    monkeypatch.setattr(store.atomic, "commit_file", real_commit)
    text_b = tmp_path / "b" / straight["text"].name
    assert len(_files(text_b)) == 2 and not store.is_complete(text_b)
    with pytest.raises(store.CacheError, match="incomplete"):
        TextRecords(text_b)
    msgs = []
    resumed = build.ensure(cfg, tmp_path / "b", ("text", "teacher"), load_pipe=load, progress=msgs.append)
    assert any("2 of 4 shards already written" in m for m in msgs)
    for kind in ("text", "teacher"):
        assert resumed[kind].name == straight[kind].name
        assert _files(resumed[kind]) == _files(straight[kind]), kind
    assert not list(resumed["text"].glob(".*.tmp"))


def test_other_hosts_wait_for_the_builder(qwen, tmp_path):
    import threading
    folder, pipe = qwen
    cfg = _cfg(folder, _prompt_file(tmp_path, PROMPTS[:2]))
    load, calls = _loader_of(pipe)
    got = {}

    def wait():
        try:
            got.update(build.ensure(cfg, tmp_path / "c", ("text",), load_pipe=load, build_missing=False, poll_s=0.05,
                                    progress=lambda m: None))
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            got["error"] = e
    waiter = threading.Thread(target=wait)
    waiter.start()
    built = build.ensure(cfg, tmp_path / "c", ("text",), load_pipe=load, progress=lambda m: None)
    waiter.join(timeout=30)
    assert not waiter.is_alive() and got == built and len(calls) == 1  # only the builder loaded the pipeline


def _png(path, size, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)


def test_image_folder_skips_corrupt_and_unreadable_files(qwen, tmp_path):
    folder, pipe = qwen
    imgs = tmp_path / "imgs"
    _png(imgs / "a.png", (48, 32))
    _png(imgs / "sub" / "b.jpg", (30, 60), 1)
    _png(imgs / "sub" / "c.webp", (40, 40), 2)
    (imgs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    good = (imgs / "a.png").read_bytes()
    (imgs / "truncated.png").write_bytes(good[:len(good) // 2])
    (imgs / "empty.jpg").write_bytes(b"")
    (imgs / "notes.txt").write_text("not an image")
    files = list_images(imgs)
    assert [p.name for p in files] == ["a.png", "corrupt.png", "empty.jpg", "b.jpg", "c.webp", "truncated.png"]
    assert load_image(files[0], 32, 32).shape == (32, 32, 3) and load_image(files[3], 16, 24).shape == (24, 16, 3)
    with pytest.raises(BadImage, match="corrupt.png"):
        load_image(files[1], 32, 32)
    cfg = _cfg(folder, _prompt_file(tmp_path), images=str(imgs), cache_shard_size=4)
    load, _ = _loader_of(pipe)
    msgs = []
    out = build.ensure(cfg, tmp_path / "c", ("latents",), load_pipe=load, progress=msgs.append)
    s = json.loads((out["latents"] / "manifest.json").read_text())["summary"]["real"]
    assert s["records"] == 3 and len(s["skipped"]) == 3
    assert any("skipped 3 unreadable image(s) of 6" in m for m in msgs)
    # mean latents equal the VAE's own encode of the cropped image, in the transformer's packed layout
    from turbojax.cache.records import LatentRecords
    recs = LatentRecords(out["latents"], "latents", "real")
    x = np.asarray(load_image(files[0], 32, 32), np.float32)[None] / 127.5 - 1.0
    mom = np.asarray(pipe.vae.encode_nhwc(x))
    z = pipe.vae.normalize_latents(np.transpose(mom[..., :mom.shape[-1] // 2], (0, 3, 1, 2)), axis=1)
    np.testing.assert_allclose(recs[0], build.latent_layout(pipe, z)[0], atol=1e-5)
    assert list(recs.prompt) == [-1, -1, -1]


def test_data_order_is_exact_after_resume_and_hosts_read_their_slice(qwen, tmp_path):
    folder, pipe = qwen
    load, _ = _loader_of(pipe)
    cfg = _cfg(folder, _prompt_file(tmp_path), cache_bucket=8)
    text_folder = build.ensure(cfg, tmp_path / "c", ("text",), load_pipe=load)["text"]
    kw = dict(batch_size=2, seed=3, bucket=8)
    a = loader.CacheBatches(text_folder, **kw)
    steps = range(3 * a.batches_per_epoch)
    straight = [a.batch("critic", s) for s in steps]
    resumed = loader.CacheBatches(text_folder, **kw)  # a fresh process: state is the step alone
    for s in steps[5:]:
        for k, v in resumed.batch("critic", s).items():
            np.testing.assert_array_equal(v, straight[s][k])
    # every prompt once per epoch (the sampler shuffles whole batches; epochs differ in order)
    n = a.batches_per_epoch
    epochs = [[tuple(straight[s]["prompt"]) for s in range(e * n, (e + 1) * n)] for e in range(3)]
    for ep in epochs:
        assert set(np.concatenate(ep)) == set(range(len(PROMPTS)))
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    assert a.batch("generator", 0)["prompt"].tolist() != a.batch("critic", 0)["prompt"].tolist() or \
        a.batch("generator", 1)["prompt"].tolist() != a.batch("critic", 1)["prompt"].tolist()
    # one caption bucket per batch, masks mark the real tokens
    lens = TextRecords(text_folder).prompts.lengths
    for b in straight:
        assert b["ctx"].shape[1] % 8 == 0 or b["ctx"].shape[1] == a.longest
        np.testing.assert_array_equal(b["mask"].sum(1), lens[b["prompt"]])
    # two hosts: each reads its half of the same global batch, padded to the global batch's length (every host
    # must build the same shapes), so the halves put together are the one-process batch
    h = [loader.CacheBatches(text_folder, **kw, process_index=i, process_count=2) for i in range(2)]
    for s in range(len(straight)):
        halves = [x.batch("critic", s) for x in h]
        for k, v in straight[s].items():
            np.testing.assert_array_equal(np.concatenate([half[k] for half in halves]), v)


@pytest.mark.slow
def test_z_image_captions_are_never_padded(tmp_path):
    """Z-Image has no caption mask (its pads are learned tokens): every batch holds prompts of one exact length."""
    from test_pipeline_e2e import z_image_pipeline_torch
    from turbojax import pipelines
    folder = tmp_path / "Z-Image-tiny"
    z_image_pipeline_torch().save_pretrained(folder)
    pipe = pipelines.from_diffusers(folder, progress=False)
    prompts = PROMPTS + ["dog at night", "cat at noon"]  # two pairs of equal token counts, likely
    load, _ = _loader_of(pipe)
    cfg = _cfg(folder, _prompt_file(tmp_path, prompts), negative_prompt="")
    text_folder = build.ensure(cfg, tmp_path / "c", ("text",), load_pipe=load)["text"]
    recs = TextRecords(text_folder)
    alone = [np.asarray(pipe.encode_prompts([p], 128)[0]) for p in prompts]
    assert [len(a) for a in alone] == recs.prompts.lengths.tolist()
    b = loader.CacheBatches(text_folder, batch_size=2, seed=0, bucket=64)  # bucket is a Qwen-Image setting
    assert b.cap_len == max(len(a) for a in alone)
    for s in range(2 * b.batches_per_epoch):
        x = b.batch("generator", s)
        for row, p in zip(x["ctx"], x["prompt"]):
            assert row.shape == alone[p].shape  # the negative ("") is shorter than every prompt here
            np.testing.assert_allclose(row, alone[p], atol=1e-5)
        assert x["mask"].all() and x["neg_ctx"].shape == x["ctx"].shape


def test_hosts_build_the_global_batch_shapes_when_negatives_differ(qwen, tmp_path):
    """A batch is padded to the longest prompt or negative of the whole global batch, not of one host's rows: with
    per-record negatives of very different lengths, host halves put together equal the one-process batch."""
    folder, pipe = qwen
    load, _ = _loader_of(pipe)
    records = [{"prompt": p, "negative_prompt": "blurry, low quality, " * (3 * (i % 3))} for i, p in enumerate(PROMPTS)]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = _cfg(folder, f, cache_bucket=8)
    text_folder = build.ensure(cfg, tmp_path / "c", ("text",), load_pipe=load)["text"]
    kw = dict(batch_size=2, seed=1, bucket=8)
    one = loader.CacheBatches(text_folder, **kw)
    hosts = [loader.CacheBatches(text_folder, **kw, process_index=i, process_count=2) for i in range(2)]
    neg_lens = TextRecords(text_folder).negatives.lengths
    assert len(set(neg_lens.tolist())) > 1, "negatives of different lengths are the point of the test"
    for step in range(2 * one.batches_per_epoch):
        want = one.batch("generator", step)
        halves = [h.batch("generator", step) for h in hosts]
        for k, v in want.items():
            np.testing.assert_array_equal(np.concatenate([half[k] for half in halves]), v)


@pytest.mark.slow
def test_cli_build_killed_with_sigkill_resumes(qwen, tmp_path):
    import signal
    import time
    folder, _ = qwen
    prompts = _prompt_file(tmp_path, PROMPTS)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    def cmd(root):
        return [sys.executable, "-m", "turbojax.cache", "teacher", "--config", "configs/qwen_image_dmd2_gan.py",
                "--config.init_from", str(folder), "--config.data.prompts", str(prompts),
                "--config.data.cache_dir", str(root), "--config.dtype", "float32", "--config.data.width", "32",
                "--config.data.height", "32", "--config.data.teacher_samples", "8", "--config.data.teacher_steps", "4",
                "--config.data.cache_shard_size", "1", "--config.data.encode_batch", "1",
                "--config.data.max_sequence_length", "128"]

    proc = subprocess.Popen(cmd(tmp_path / "b"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "b").glob("teacher-*/teacher-00001.safetensors")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    teacher_b = next((tmp_path / "b").glob("teacher-*"))
    assert not store.is_complete(teacher_b), "the build finished before the kill: nothing was tested"
    r = subprocess.run(cmd(tmp_path / "b"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming the teacher cache" in r.stdout and "resuming the text cache" not in r.stdout
    r = subprocess.run(cmd(tmp_path / "a"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    teacher_a = next((tmp_path / "a").glob("teacher-*"))
    assert teacher_a.name == teacher_b.name and _files(teacher_a) == _files(teacher_b)
    assert not list(teacher_b.glob(".*"))  # no temp left behind


@pytest.mark.slow
def test_train_py_distils_from_caches(qwen, tmp_path):
    folder, _ = qwen
    prompts = _prompt_file(tmp_path, PROMPTS[:3])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [sys.executable, str(REPO / "train.py"), "--config", "configs/qwen_image_dmd2_gan.py",
            "--config.init_from", str(folder), "--config.data.prompts", str(prompts),
            "--config.data.kind", "cache", "--config.data.cache_dir", str(tmp_path / "caches"),
            "--config.param_dtype", "float32", "--config.dtype", "float32", "--config.remat", "none",
            "--config.data.width", "32", "--config.data.height", "32", "--config.data.teacher_samples", "2",
            "--config.data.teacher_steps", "2", "--config.data.max_sequence_length", "32",
            "--config.total_steps", "2", "--config.ttur_ratio", "1", "--config.batch_size", "2",
            "--config.lora.student.rank", "2", "--config.lora.fake.rank", "2", "--config.gan.hidden", "8",
            "--config.checkpoint_every", "2", "--config.log_every", "1", "--config.sample_every", "0"]
    r = subprocess.run(args + ["--workdir", str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "text cache ready" in r.stdout and "teacher cache ready" in r.stdout
    assert (tmp_path / "w" / "lora.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # a second run finds the caches complete: nothing encoded again
    r = subprocess.run(args + ["--workdir", str(tmp_path / "w2")], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cache ready" not in r.stdout and "3 prompts from the text cache" in r.stdout
