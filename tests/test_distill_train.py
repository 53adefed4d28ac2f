"""Distillation end to end: the exported student LoRA samples identically in diffusers' QwenImagePipeline with our
sigma list, and `train.py` resumes a run killed with SIGKILL to bit-identical trainables."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from refs import max_rel_err, tiny_qwen, tiny_qwen_pipeline, to_jax_model
from turbojax import lora
from turbojax import sampling as SM
from turbojax import schedules as S
from turbojax.distill import methods
from turbojax.distill.config import dmd2_config
from turbojax.distill.engine import Engine
from turbojax.distill.export import export_student

REPO = Path(__file__).resolve().parent.parent
H = W = 64  # 4 x 4 Qwen tokens


def _tiny_cfg():
    cfg = dmd2_config()
    for role in ("student", "fake"):
        cfg.lora[role].rank, cfg.lora[role].alpha = 2, 3.0
    cfg.gan.weight = 0.0
    cfg.ttur_ratio = 1
    for g in ("student", "fake", "disc"):
        cfg.opt[g].lr = 3e-2  # big steps: the LoRA must move away from zero in 3 iterations
    return cfg


def test_exported_student_samples_the_same_in_diffusers(tmp_path):
    tm = tiny_qwen()
    model = to_jax_model(tm, "qwen_image")
    cfg = _tiny_cfg()
    m = methods.build(cfg, model, (16, 16), jax.random.key(0))
    eng = Engine(m.turns, m.txs, 0.0)
    state = eng.init_state(m.params)
    _, frozen = nnx.split(model)
    rng = np.random.default_rng(0)
    ctx = rng.standard_normal((2, 5, 24)).astype(np.float32)
    mask = np.ones((2, 5), np.float32)
    batch = {"ctx": jnp.asarray(ctx), "mask": jnp.asarray(mask), "neg_ctx": jnp.zeros((2, 5, 24)),
             "neg_mask": jnp.ones((2, 5))}
    for it in range(3):
        state, metrics = eng.iteration(state, frozen, lambda n: batch, it)
        assert all(np.isfinite(float(v)) for v in metrics.values())
    adapter = methods.export_adapter(m, state, use_ema=False)
    assert max(float(np.abs(e["b"]).max()) for e in adapter.values()) > 0  # it trained
    files = export_student(tmp_path, adapter, model, m, cfg, step=3)
    assert [f.name for f in files] == ["lora.safetensors", "lora_comfy.safetensors", "sampler.json"]
    settings = json.loads((tmp_path / "sampler.json").read_text())
    assert settings["sigmas"] == [1.0, 0.75, 0.0] and settings["steps"] == 2 and settings["method"] == "dmd2"
    from safetensors import safe_open
    for f in files[:2]:
        with safe_open(str(f), framework="numpy") as fh:
            assert json.loads(fh.metadata()["turbojax_sampler"]) == settings

    latents = np.asarray(SM.qwen_image_noise(jax.random.key(5), 2, H, W, channels=4))
    # the Lightning / Wuli scheduler (shift ln 3, exponential) warps the sigmas it is given: pass the raw ones
    assert settings["pipeline_sigmas"] == [1.0, 0.5]
    pipe = tiny_qwen_pipeline(tm, S.PRESETS["qwen_image_lightning"].to_dict())
    pipe.load_lora_weights(str(files[0]), adapter_name="student")
    ref = pipe(prompt_embeds=torch.tensor(ctx), prompt_embeds_mask=torch.tensor(mask), true_cfg_scale=1.0,
               height=H, width=W, sigmas=settings["pipeline_sigmas"], num_inference_steps=2,
               latents=torch.tensor(latents), output_type="latent").images.numpy()
    ours = SM.sample_qwen_image(lora.apply(model, [(adapter, 1.0)]), latents, ctx,
                                S.explicit_sigmas(settings["sigmas"][:-1]), height=H, width=W,
                                prompt_embeds_mask=mask)
    base = SM.sample_qwen_image(model, latents, ctx, S.explicit_sigmas(settings["sigmas"][:-1]), height=H, width=W,
                                prompt_embeds_mask=mask)
    assert max_rel_err(np.asarray(ours), ref) < 1e-4
    assert max_rel_err(np.asarray(base), ref) > 1e-3  # the LoRA matters: the check above can fail


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["TURBOJAX_PROGRESS"] = "0"
    return env


def _teacher(tmp_path) -> Path:
    from turbojax.digits import model as digits_model
    folder = tmp_path / "teacher"
    digits_model.save_export(digits_model.new_teacher(3), folder)
    return folder


def _args(teacher, workdir, total):
    return [sys.executable, str(REPO / "train.py"), "--workdir", str(workdir), "--config.init_from", str(teacher),
            "--config.total_steps", str(total), "--config.checkpoint_every", "2", "--config.log_every", "2",
            "--config.sample_every", "0", "--config.batch_size", "4", "--config.ttur_ratio", "2",
            "--config.data.teacher_samples_per_class", "2", "--config.gan.hidden", "8"]


@pytest.mark.slow
def test_train_py_distill_resumes_exactly_after_sigkill(tmp_path):
    teacher = _teacher(tmp_path)
    total = 8
    a = subprocess.run(_args(teacher, tmp_path / "a", total), cwd=tmp_path, capture_output=True, text=True,
                       env=_env(), timeout=900)
    assert a.returncode == 0, a.stdout[-2000:] + a.stderr[-3000:]
    assert (tmp_path / "a" / "samples.png").is_file() and (tmp_path / "a" / "lora_comfy.safetensors").is_file()

    # the same run, killed hard once its step-4 checkpoint is committed, then resumed
    wb = tmp_path / "b"
    proc = subprocess.Popen(_args(teacher, wb, 10_000), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 900
    while not (wb / "checkpoints" / "4").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (wb / "checkpoints" / "4").is_dir()
    b = subprocess.run(_args(teacher, wb, total), cwd=tmp_path, capture_output=True, text=True, env=_env(),
                       timeout=900)
    assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-3000:]
    assert "resumed from step" in b.stdout
    from safetensors.numpy import load_file
    for name in ("lora.safetensors", "lora_comfy.safetensors"):
        ta, tb = load_file(tmp_path / "a" / name), load_file(wb / name)
        assert ta.keys() == tb.keys() and len(ta) > 0
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
    steps = [json.loads(line)["step"] for line in (wb / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == total


@pytest.mark.slow
def test_train_py_distill_stops_on_nan_and_keeps_the_last_good_checkpoint(tmp_path):
    teacher = _teacher(tmp_path)
    w = tmp_path / "w"
    ok = subprocess.run(_args(teacher, w, 2), cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=900)
    assert ok.returncode == 0, ok.stderr[-3000:]
    bad = subprocess.run(_args(teacher, w, 8) + ["--config.opt.student.lr", "1e30", "--config.opt.fake.lr", "1e30",
                                                 "--config.opt.disc.lr", "1e30", "--config.opt.grad_clip", "1e30"],
                         cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=900)
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith("error: step ") and "not finite" in line, line
    assert sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())[-1] == 2
