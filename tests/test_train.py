"""The main job (train.py on the embedded tiny default) end to end: it runs from any folder, checkpoints only
trainables, resumes exactly, never saves or resumes a NaN state, saves on SIGTERM, and reports mistakes in one line.

Each train.py run costs a compile, so each test chains several behaviours on one workdir."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from orbax.checkpoint import StandardCheckpointer
from safetensors.numpy import load_file

from turbojax.lora import read_lora

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "train.py")


def _env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"TURBOJAX_PROGRESS": "0"}


LORA_CONFIG = ["--config", "configs/qwen_image_lora.py"]  # relative: found next to train.py from any folder


def run_train(cwd, workdir, *overrides, expect_rc=0):
    """`python /abs/path/train.py` from `cwd` (not the repository): relative config paths resolve next to the script."""
    r = subprocess.run([sys.executable, TRAIN, *LORA_CONFIG, "--workdir", str(workdir),
                        "--config.checkpoint_every", "3", "--config.log_every", "3", *overrides],
                       cwd=cwd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == expect_rc, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def error_line(r):
    """The stderr of a user mistake: exactly one `error:` line and no traceback."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "Traceback" not in r.stderr and lines and lines[-1].startswith("error: "), r.stderr[-3000:]
    assert sum(x.startswith("error:") for x in lines) == 1
    return lines[-1]


def logged_steps(workdir):
    return [json.loads(x)["step"] for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def ckpt_steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def saved_alphas(path):
    return {m.alpha for m in read_lora(path, family="qwen_image").values()}


@pytest.mark.slow
def test_train_resume_is_exact(tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    alpha = ["--config.lora.alpha", "3.0"]  # rank 4: scale 0.75, which training must not touch
    straight = run_train(cwd, "a", "--config.total_steps", "6", *alpha).stdout
    assert '"step": 6' in straight and (cwd / "a" / "lora.safetensors").is_file()
    assert saved_alphas(cwd / "a" / "lora.safetensors") == {3.0}

    # 4 steps with checkpoint_every 3: the last step is checkpointed too
    run_train(cwd, "b", "--config.total_steps", "4", *alpha)
    assert ckpt_steps(cwd / "b") == [3, 4]
    resumed = run_train(cwd, "b", "--config.total_steps", "6", *alpha).stdout
    assert "resumed from step 4" in resumed
    a = load_file(cwd / "a" / "lora.safetensors")
    b = load_file(cwd / "b" / "lora.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # only the trainables are checkpointed: the step folders hold the LoRA a/b + optimizer state, not the base
    assert ckpt_steps(cwd / "b") == [4, 6]

    # a finished run is not redone: nothing trained, no new metrics lines, the same LoRA
    before = (cwd / "b" / "lora.safetensors").read_bytes()
    again = run_train(cwd, "b", "--config.total_steps", "6", *alpha).stdout
    assert "nothing to train" in again and '"step"' not in again
    assert logged_steps(cwd / "b") == [3, 4, 6]
    assert (cwd / "b" / "lora.safetensors").read_bytes() == before


@pytest.mark.slow
def test_train_nan_stops_sigterm_saves_and_changed_rank_is_refused(tmp_path):
    w = tmp_path / "run"
    # list override of lora.targets (bracket form) and a non-default alpha; kept for every run on this workdir
    common = ["--config.lora.targets", r'["transformer_blocks\\.attn\\.to_q", "transformer_blocks\\.img_mlp\\.fc1"]',
              "--config.lora.alpha", "2.0", "--config.checkpoint_every", "2", "--config.log_every", "1"]

    # 1. a learning rate that diverges within a few steps: stop at the first bad step, nothing of it saved
    r = run_train(tmp_path, w, *common, "--config.lr", "1e18", "--config.total_steps", "12", expect_rc=1)
    m = re.match(r"error: step (\d+): (loss|grad_norm|param_norm) is (nan|inf|-inf)", error_line(r))
    assert m, error_line(r)
    bad = int(m.group(1))
    steps = logged_steps(w)
    assert steps == list(range(1, bad)) and 2 <= bad < 12  # every good step logged, the bad one not
    last_good = ckpt_steps(w)[-1]
    assert last_good == (bad - 1) // 2 * 2  # the last checkpoint before the bad step is intact ...
    stored = StandardCheckpointer().restore(w / "checkpoints" / str(last_good) / "default")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(stored))  # ... and finite

    # 2. rerun with a sane lr: resumes from it; SIGTERM mid-run saves the current step and exits 0
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, TRAIN, *LORA_CONFIG, "--workdir", str(w), *common, "--config.total_steps", "100000",
                             "--config.checkpoint_every", "100000"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=err, text=True, env=_env())
    out, deadline = [], time.time() + 600
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("{") and json.loads(line)["step"] >= last_good + 2:
                proc.send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(out) + rest
    assert proc.returncode == 0, out + (tmp_path / "stderr.txt").read_text()[-3000:]
    assert f"resumed from step {last_good}" in out
    m = re.search(r"SIGTERM: saved the checkpoint of step (\d+) to (\S+);", out)
    assert m, out
    stopped = int(m.group(1))
    assert stopped >= last_good + 2 and Path(m.group(2)) == w / "checkpoints" / str(stopped)
    assert ckpt_steps(w)[-1] == stopped

    # 3. resuming with another LoRA rank: one line naming the leaf and both shapes
    r = run_train(tmp_path, w, *common, "--config.lora.rank", "8", "--config.total_steps", str(stopped + 2),
                  expect_rc=1)
    line = error_line(r)
    assert re.search(r"trainable/transformer_blocks\.attn\.to_q/a has shape \(2, \d+, 4\) but this config "
                     r"expects \(2, \d+, 8\)", line), line
    assert "strict" not in line and "--workdir" in line

    # 4. the original config resumes from the SIGTERM checkpoint and finishes; one metrics line per step
    out = run_train(tmp_path, w, *common, "--config.total_steps", str(stopped + 1)).stdout
    assert f"resumed from step {stopped}" in out
    assert logged_steps(w) == list(range(1, stopped + 2))
    lora_file = w / "lora.safetensors"
    modules = read_lora(lora_file, family="qwen_image")
    assert modules and all(re.search(r"attn\.to_q|img_mlp\.net\.0", k) for k in modules), sorted(modules)
    assert saved_alphas(lora_file) == {2.0}


def test_train_cli_mistake_is_one_line_from_any_folder(tmp_path):
    """Unknown --config key (absl used to print three chained tracebacks): one line, nothing created; and the
    default config is found from another folder."""
    r = subprocess.run([sys.executable, TRAIN, *LORA_CONFIG, "--workdir", "w", "--config.lora.rnak", "3"],
                       cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 1
    assert error_line(r) == "error: unknown config key --config.lora.rnak; did you mean --config.lora.rank?"
    assert r.stderr.count("\n") == 1 and not (tmp_path / "w").exists()
    r = subprocess.run([sys.executable, TRAIN, "--help"], cwd=tmp_path, capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert r.returncode == 0 and "--config.total_steps" in r.stdout, r.stderr[-2000:]
