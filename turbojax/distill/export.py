"""Outputs of a distillation run: the student LoRA in both layouts with its sampler settings, logs and grids.

    lora.safetensors         diffusers / PEFT layout (`pipe.load_lora_weights(...)`), alpha in the PEFT metadata
    lora_comfy.safetensors   ComfyUI / lightx2v layout (`diffusion_model.*.lora_down/up` + `.alpha`)
    sampler.json             what the student was distilled for: sigma list, shift, steps, CFG, base, method

Both LoRA files carry the same sampler settings in their safetensors metadata (`turbojax_sampler`), so a file
that travels alone still says how to sample it. Everything is written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from turbojax.convert.atomic import commit_file


def unshift(sigma: float, shift: float) -> float:
    """The raw time whose shift-`shift` warp is `sigma` (inverse of `s t / (1 + (s - 1) t)`)."""
    return sigma / (shift - (shift - 1.0) * sigma)


def sampler_settings(cfg, method_name: str, step: int, train_s_per_step: float | None = None) -> dict:
    """`sigmas`: what the model sees at each step (Euler, final 0). A scheduler that warps the sigmas it is given by
    the shift (diffusers' FlowMatchEulerDiscreteScheduler with shift 3, or Qwen-Image-Lightning's config with
    mu = ln 3; ComfyUI's ModelSamplingAuraFlow shift 3) takes `pipeline_sigmas` instead, or simply `steps`
    when the list is the equal-raw-step one."""
    sigmas = [float(s) for s in cfg.student.sigmas]
    shift = float(cfg.student.shift)
    return {"steps": len(sigmas), "sigmas": sigmas + [0.0], "shift": shift,
            "pipeline_sigmas": [round(unshift(s, shift), 7) for s in sigmas],
            "guidance": float(cfg.student.cfg), "sampler": "Euler (flow matching)",
            "method": method_name, "base": str(cfg.init_from or cfg.get("model", "") or cfg.data.kind),
            "train_steps": int(step),
            **({} if train_s_per_step is None else {"train_s_per_step": round(float(train_s_per_step), 4)})}


def _add_metadata(path: Path, extra: dict) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(extra)
    data = save(tensors, metadata=meta)
    commit_file(path, lambda fh: fh.write(data))


def export_student(workdir: Path, adapter: dict, base, method, cfg, *, step: int,
                   train_s_per_step: float | None = None) -> list[Path]:
    from turbojax import lora

    workdir = Path(workdir)
    settings = sampler_settings(cfg, method.name, step, train_s_per_step)
    extra = {"turbojax_sampler": json.dumps(settings)}
    out = []
    for name, layout in (("lora.safetensors", "diffusers"), ("lora_comfy.safetensors", "comfy")):
        path = workdir / name
        lora.save(path, adapter, base, layout=layout)
        _add_metadata(path, extra)
        out.append(path)
    side = workdir / "sampler.json"
    commit_file(side, lambda fh: fh.write((json.dumps(settings, indent=2) + "\n").encode()))
    return out + [side]


def add_json_fields(files, fields: dict) -> None:
    """Add `fields` to JSON object files (rewritten atomically)."""
    for f in files:
        data = json.loads(Path(f).read_text())
        if isinstance(data, dict):
            data.update(fields)
            commit_file(Path(f), lambda fh, d=data: fh.write((json.dumps(d, indent=2) + "\n").encode()))


def write_png(path: Path, image: np.ndarray) -> Path:
    import io

    from PIL import Image
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return commit_file(Path(path), lambda fh: fh.write(buf.getvalue()))


class _NoBoard:
    def scalars(self, step, metrics):
        pass

    def image(self, step, tag, image):
        pass

    def close(self):
        pass


class _Board:
    """TensorBoard event files (tensorboardX) under `workdir/tb`: every logged metric, and sample grids."""

    def __init__(self, logdir: Path):
        from tensorboardX import SummaryWriter
        self.w = SummaryWriter(str(logdir))

    def scalars(self, step, metrics):
        for k, v in metrics.items():
            self.w.add_scalar(k, float(v), int(step))

    def image(self, step, tag, image):
        img = np.asarray(image)
        self.w.add_image(tag, img if img.shape[-1] != 1 else np.repeat(img, 3, -1), int(step), dataformats="HWC")

    def close(self):
        self.w.flush()
        self.w.close()


def tensorboard(workdir: Path, enabled: bool = True):
    if not enabled:
        return _NoBoard()
    try:
        return _Board(Path(workdir) / "tb")
    except ImportError:  # tensorboardX is a requirement, but logging must never stop a run
        return _NoBoard()
