"""Flow-matching sigma schedules, equal to diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` as the Qwen-Image
and Z-Image pipelines call it (spec: shared docs `architectures.md` §4.3).

Every function returns a numpy float32 array of `num_steps + 1` sigmas ending with the terminal 0, the array the
Euler loop walks (`x <- x + (sigma[i+1] - sigma[i]) * v`). The arithmetic follows the reference operation by
operation, because the values are compared bit for bit:

  * the pipelines build the unshifted sigmas differently: Qwen-Image with `np.linspace(1, 1/n, n)` in float64,
    Z-Image with `torch.linspace(1, 1/n, n)` in float32 (emulated here, see `_torch_linspace_f32`);
  * the scheduler casts them to float32 and shifts them in float32 numpy arithmetic; Python scalars (`exp(mu)`,
    `shift`, the terminal value) are rounded to float32 where they meet the array (numpy 2 weak-scalar rules);
  * `mu` is computed in float64 from the image sequence length (`calculate_shift`).

    cfg = SchedulerConfig.from_pretrained("Qwen-Image")          # reads scheduler/scheduler_config.json
    sigmas = pipeline_sigmas(cfg, 50, "qwen_image", height=1328, width=1328)
    sigmas = QWEN_IMAGE_LIGHTNING.sigmas(8)                        # resolution independent (mu = ln 3)
    sigmas = explicit_sigmas([1.0, 0.75])                          # a 2-step student: [1, 0.75, 0]
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

F32 = np.float32
PIPELINES = ("qwen_image", "z_image")
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
CONFIG_FILE = "scheduler_config.json"

_BOOKKEEPING = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})
# options whose non-default value changes the math in a way we do not implement: key -> the only accepted value
_UNSUPPORTED = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "stochastic_sampling": False, "invert_sigmas": False}


class SchedulerConfigError(ValueError):
    pass


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """`mu` for dynamic shifting: linear in the image token count, float64 in the same operation order as the
    pipelines (defaults are the pipelines' fall-backs, not Qwen-Image's published 8192 / 0.9)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def image_seq_len(height: int, width: int, vae_scale_factor: int = 8, patch_size: int = 2) -> int:
    """Image tokens of a `height x width` image: `(H/16)(W/16)` for both families (as the pipelines count it)."""
    s = vae_scale_factor * patch_size
    return (int(height) // s) * (int(width) // s)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The `FlowMatchEulerDiscreteScheduler` options that shape the sigmas; defaults are the diffusers class defaults,
    so a config file that omits a key means what it means in diffusers."""
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"

    def validate(self, source: str = "scheduler config") -> "SchedulerConfig":
        if self.time_shift_type not in ("exponential", "linear"):
            raise SchedulerConfigError(f"{source}: time_shift_type={self.time_shift_type!r} is not supported "
                                       "(diffusers knows 'exponential' and 'linear')")
        if self.num_train_timesteps != 1000:
            # the pipelines divide the scheduler timesteps by a hard-coded 1000, so anything else changes the model
            # input in a way no released checkpoint uses
            raise SchedulerConfigError(f"{source}: num_train_timesteps={self.num_train_timesteps} is not supported "
                                       "(the Qwen-Image / Z-Image pipelines assume 1000)")
        if self.use_dynamic_shifting and (self.base_shift is None or self.max_shift is None):
            raise SchedulerConfigError(f"{source}: use_dynamic_shifting needs base_shift and max_shift")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise SchedulerConfigError(f"{source}: shift_terminal={self.shift_terminal} must be in [0, 1)")
        return self

    # ---- files ----
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "scheduler config") -> "SchedulerConfig":
        """Strict: unknown keys and options that change the math in ways we do not implement raise, naming them."""
        name = d.get("_class_name", SCHEDULER_CLASS)
        if name != SCHEDULER_CLASS:
            raise SchedulerConfigError(f"{source}: _class_name {name!r} is not supported (only {SCHEDULER_CLASS})")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for key, value in d.items():
            if key in _BOOKKEEPING:
                continue
            if key in _UNSUPPORTED:
                if bool(value) != _UNSUPPORTED[key]:
                    raise SchedulerConfigError(f"{source}: {key}={value!r} is not supported (turbojax implements the "
                                               "deterministic Euler flow-matching schedule only)")
                continue
            if key not in fields:
                raise SchedulerConfigError(f"{source}: unknown scheduler option {key!r} (newer diffusers?); refusing "
                                           "to guess whether it changes the sigmas")
            kw[key] = value
        try:
            cfg = cls(**kw)
        except TypeError as e:
            raise SchedulerConfigError(f"{source}: {e}") from None
        return cfg.validate(source)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SchedulerConfig":
        """From a pipeline folder (`<path>/scheduler/scheduler_config.json`), a scheduler folder, or the json file."""
        path = Path(path)
        for candidate in (path / "scheduler" / CONFIG_FILE, path / CONFIG_FILE, path):
            if candidate.is_file():
                with open(candidate) as f:
                    return cls.from_dict(json.load(f), str(candidate))
        raise FileNotFoundError(f"no {CONFIG_FILE} under {path} (looked in scheduler/ and the folder itself)")

    def to_dict(self) -> dict[str, Any]:
        """The diffusers config (e.g. for `FlowMatchEulerDiscreteScheduler.from_config`)."""
        return {"_class_name": SCHEDULER_CLASS, **dataclasses.asdict(self), **_UNSUPPORTED}

    # ---- schedules ----
    def mu(self, seq_len: int) -> float:
        """`mu` the pipelines compute for `seq_len` image tokens (used only with `use_dynamic_shifting`)."""
        return calculate_shift(seq_len, self.base_image_seq_len, self.max_image_seq_len,
                               0.5 if self.base_shift is None else self.base_shift,
                               1.15 if self.max_shift is None else self.max_shift)

    def shift_sigmas(self, sigmas: Sequence[float], mu: float | None = None) -> np.ndarray:
        """`set_timesteps(sigmas=sigmas, mu=mu)`: cast to float32, shift, stretch to `shift_terminal`, append 0."""
        self.validate()
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("mu is required with use_dynamic_shifting (see SchedulerConfig.mu / calculate_shift)")
        s = np.asarray(sigmas, dtype=np.float64).astype(F32)
        if s.ndim != 1 or s.size == 0:
            raise ValueError(f"sigmas must be a non-empty 1-D list, got shape {s.shape}")
        with np.errstate(divide="ignore"):  # a sigma of 0 maps to 0 through 1/0 = inf, as in the reference
            if self.use_dynamic_shifting:
                num = F32(math.exp(mu)) if self.time_shift_type == "exponential" else F32(mu)
                s = num / (num + (F32(1) / s - F32(1)))
            else:
                # `shift - 1` is Python float arithmetic in diffusers, rounded to float32 afterwards
                s = F32(self.shift) * s / (F32(1) + F32(self.shift - 1) * s)
        if self.shift_terminal:
            one_minus = F32(1) - s
            if one_minus[-1] == 0:
                # diffusers divides 0 by 0 here and returns NaN sigmas (e.g. a single step with shift_terminal)
                raise ValueError(f"cannot stretch sigmas {s.tolist()} to shift_terminal={self.shift_terminal}: the "
                                 "last one is 1 (use at least 2 steps or explicit_sigmas)")
            scale = one_minus[-1] / F32(1 - self.shift_terminal)  # (1 - tau) is a Python float in diffusers
            s = F32(1) - one_minus / scale
        return np.concatenate([s.astype(F32), np.zeros(1, F32)])

    def sigmas(self, num_steps: int, pipeline: str = "qwen_image", *, height: int | None = None,
               width: int | None = None, seq_len: int | None = None) -> np.ndarray:
        """Shorthand for `pipeline_sigmas(self, num_steps, pipeline, ...)`."""
        return pipeline_sigmas(self, num_steps, pipeline, height=height, width=width, seq_len=seq_len)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps)` in float32 on CPU: a float32 step, the first half counted up from
    `start` and the second half down from `end`, each with a fused multiply-add (one rounding). Checked equal to
    torch 2.13 on x86 for every steps < 1000; a CPU without FMA may differ by one ulp."""
    a, b = F32(start), F32(end)
    if steps == 1:
        return np.array([a], F32)
    step = (b - a) / F32(steps - 1)
    i = np.arange(steps)
    # float64 holds the exact product of two float32 numbers, so this rounds once, like an FMA
    up = (np.float64(a) + np.float64(step) * i).astype(F32)
    down = (np.float64(b) - np.float64(step) * (steps - 1 - i)).astype(F32)
    return np.where(i < steps // 2, up, down).astype(F32)


def base_sigmas(num_steps: int, pipeline: str) -> np.ndarray:
    """The unshifted `linspace(1, 1/n, n)` each pipeline passes to the scheduler (float64 for Qwen-Image, float32
    torch for Z-Image; they differ in the last bit for some n)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if pipeline == "qwen_image":
        return np.linspace(1.0, 1 / num_steps, num_steps)
    if pipeline == "z_image":
        return _torch_linspace_f32(1.0, 1 / num_steps, num_steps)
    raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")


def pipeline_sigmas(config: SchedulerConfig, num_steps: int, pipeline: str = "qwen_image", *,
                    height: int | None = None, width: int | None = None, seq_len: int | None = None,
                    sigmas: Sequence[float] | None = None) -> np.ndarray:
    """The sigmas `QwenImagePipeline` / `ZImagePipeline` run for `num_steps` (float32, `num_steps + 1` values).

    With dynamic shifting `mu` comes from the image token count: give `height`/`width` (pixels) or `seq_len`.
    `sigmas` mirrors the pipelines' own `sigmas=` argument: custom unshifted values that still go through the shift.
    """
    if seq_len is None and height is not None and width is not None:
        seq_len = image_seq_len(height, width)
    mu = None
    if config.use_dynamic_shifting:
        if seq_len is None and config.base_shift == config.max_shift:
            seq_len = 0  # mu does not depend on the resolution (e.g. the Lightning config)
        if seq_len is None:
            raise ValueError("this scheduler config shifts by resolution: pass height and width (or seq_len)")
        mu = config.mu(seq_len)
    if sigmas is None:
        sigmas = base_sigmas(num_steps, pipeline)
    elif len(sigmas) != num_steps:
        raise ValueError(f"{len(sigmas)} custom sigmas for {num_steps} steps")
    return config.shift_sigmas(sigmas, mu)


def explicit_sigmas(values: Sequence[float]) -> np.ndarray:
    """A hand-written schedule used as is (e.g. a 2-step student's `[1, 0.75]`); the terminal 0 is appended when
    missing. Values must lie in [0, 1] and strictly decrease."""
    s = np.asarray(values, dtype=np.float64).reshape(-1)
    if s.size and s[-1] != 0:
        s = np.append(s, 0.0)
    if s.size < 2 or (s < 0).any() or (s > 1).any() or (np.diff(s) >= 0).any():
        raise ValueError(f"sigmas must strictly decrease within [0, 1] (a terminal 0 is appended), got {list(values)}")
    return s.astype(F32)


QWEN_IMAGE = SchedulerConfig(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                             max_image_seq_len=8192, shift_terminal=0.02)
"""Qwen-Image / Qwen-Image-2512 as published (`scheduler/scheduler_config.json`)."""
QWEN_IMAGE_LIGHTNING = dataclasses.replace(QWEN_IMAGE, base_shift=math.log(3), max_shift=math.log(3),
                                           shift_terminal=None)
"""The config the Qwen-Image-Lightning LoRAs recommend: mu = ln 3 at every resolution, i.e. static shift 3."""
Z_IMAGE_TURBO = SchedulerConfig(shift=3.0)
"""Z-Image-Turbo as published: static shift 3 (the pipeline's mu is computed and ignored)."""

PRESETS = {"qwen_image": QWEN_IMAGE, "qwen_image_lightning": QWEN_IMAGE_LIGHTNING, "z_image_turbo": Z_IMAGE_TURBO}
