"""`python sample.py` without --model: the digits demo (shipped students, the teacher, workdirs, npz with labels)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sample
from turbojax.digits import cli

REPO = Path(__file__).resolve().parent.parent


def error_of(*argv) -> str:
    with pytest.raises(SystemExit) as e:
        sample.main([str(a) for a in argv])
    assert str(e.value).startswith("error: "), e.value
    return str(e.value)


def test_digits_mode_rejects_pipeline_flags_and_unknown_students(tmp_path):
    assert "--prompt" in error_of("--prompt", "a cat", "--out", tmp_path / "x.png")
    assert "--num-images" in error_of("--num-images", "3")
    assert "shipped students" in error_of("--method", "no_such_method", "--out", tmp_path / "x.png")
    assert "--student" in error_of("--student", tmp_path, "--out", tmp_path / "x.png")
    assert "--teacher" in error_of("--teacher", "--method", "dmd2")
    assert "--num" in error_of("--num", "0")
    assert "--num" in error_of("--model", tmp_path, "--num", "4", "--out", tmp_path / "y.png")


def test_teacher_npz_has_images_and_cycling_labels(tmp_path):
    out = tmp_path / "t.npz"
    assert sample.main(["--teacher", "--steps", "2", "--num", "12", "--seed", "3", "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (12, 32, 32, 1)
        np.testing.assert_array_equal(f["labels"], np.arange(12) % 10)
        np.testing.assert_array_equal(f["seeds"], 3 + np.arange(12))
    assert "already exists" in error_of("--teacher", "--steps", "2", "--num", "12", "--out", out)


@pytest.mark.skipif(not cli.shipped(), reason="no shipped student")
def test_sample_py_without_arguments_writes_a_grid_from_the_best_shipped_student(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "sample.py")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from PIL import Image
    im = Image.open(tmp_path / "digits.png")
    assert im.size == (10 * 32, 4 * 32)  # columns: the ten digits, rows: four seeds
    assert cli.shipped()[0] in r.stdout
    for name in cli.shipped():  # every shipped student samples
        out = tmp_path / f"{name}.npz"
        assert sample.main(["--method", name, "--num", "10", "--out", str(out)]) == 0
        with np.load(out) as f:
            assert f["images"].shape == (10, 32, 32, 1) and f["images"].max() > 0
