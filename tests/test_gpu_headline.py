"""bench/gpu_headline.py runs end to end (weights, text encode, 2 steps, decode, report) at tiny size on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_run_writes_report(tmp_path):
    out = tmp_path / "headline.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_headline.py"), "--tiny", "--diffusers", "0",
                           "--json", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["tiny"] and set(report["models"]) == {"qwen_image", "z_image"}
    for kind, r in report["models"].items():
        assert len(r["transformer"]["steps_s"]) == 2, kind
        assert r["transformer"]["flops"] > 0 and r["end_to_end_s"] > 0
        assert "END TO END" in proc.stdout


def test_bad_flag_is_one_error_line():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_headline.py"), "--models", "flux"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--models takes" in proc.stderr
