"""The main job (train.py on the embedded tiny default) runs, checkpoints only trainables, and resumes exactly."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parent.parent


def run_train(workdir, *overrides):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/qwen_image_lora.py", "--workdir", str(workdir),
                        "--config.checkpoint_every", "3", "--config.log_every", "3", *overrides],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_train_resume_is_exact(tmp_path):
    straight = run_train(tmp_path / "a", "--config.total_steps", "6")
    assert '"step": 6' in straight
    run_train(tmp_path / "b", "--config.total_steps", "3")
    resumed = run_train(tmp_path / "b", "--config.total_steps", "6")
    assert "resumed from step 3" in resumed
    a = load_file(tmp_path / "a" / "lora.safetensors")
    b = load_file(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # only the trainables are checkpointed: the step folders hold the adapter + optimizer state, not the base
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["3", "6"]
