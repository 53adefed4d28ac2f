"""Sigma schedules equal diffusers' FlowMatchEulerDiscreteScheduler as the Qwen-Image / Z-Image pipelines drive it."""
import json
import math

import numpy as np
import pytest
import torch

from turbojax import schedules as S
from turbojax.schedules import (QWEN_IMAGE, QWEN_IMAGE_LIGHTNING, Z_IMAGE_TURBO, SchedulerConfig,
                                SchedulerConfigError, explicit_sigmas, pipeline_sigmas)

RESOLUTIONS = [(512, 512), (1024, 1024), (1328, 1328), (928, 1664)]
ATOL = 1e-7  # observed: bit-identical

PUBLISHED = {
    "qwen_image": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.34.0.dev0",
                   "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
                   "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
                   "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
                   "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False},
    "z_image_turbo": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.36.0.dev0",
                      "num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0},
}
LIGHTNING = {**PUBLISHED["qwen_image"], "base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None}


def diffusers_pipeline_sigmas(config: dict, n: int, pipeline: str, height: int, width: int, sigmas=None):
    """What the pipeline's own code computes: its calculate_shift, its base sigmas and its retrieve_timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    if pipeline == "qwen_image":
        from diffusers.pipelines.qwenimage import pipeline_qwenimage as mod
        base = np.linspace(1.0, 1 / n, n)
    else:
        from diffusers.pipelines.z_image import pipeline_z_image as mod
        base = mod.get_default_z_image_sigmas(n)
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    c = sched.config
    mu = mod.calculate_shift((height // 16) * (width // 16), c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    mod.retrieve_timesteps(sched, n, "cpu", sigmas=base if sigmas is None else sigmas, mu=mu)
    return sched.sigmas.numpy()


@pytest.mark.parametrize("n", [2, 4, 8, 50])
@pytest.mark.parametrize("res", RESOLUTIONS, ids=lambda r: f"{r[0]}x{r[1]}")
@pytest.mark.parametrize("name,pipeline", [("qwen_image", "qwen_image"), ("qwen_image_lightning", "qwen_image"),
                                           ("z_image_turbo", "z_image")])
def test_pipeline_sigmas_match_diffusers(name, pipeline, res, n):
    cfg = S.PRESETS[name]
    ref = diffusers_pipeline_sigmas(cfg.to_dict(), n, pipeline, *res)
    ours = pipeline_sigmas(cfg, n, pipeline, height=res[0], width=res[1])
    assert ours.dtype == np.float32 and ours.shape == (n + 1,) and ours[-1] == 0
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


def test_published_configs_read_from_pipeline_folders(tmp_path):
    for name, expected in (("qwen_image", QWEN_IMAGE), ("z_image_turbo", Z_IMAGE_TURBO)):
        folder = tmp_path / name / "scheduler"
        folder.mkdir(parents=True)
        (folder / "scheduler_config.json").write_text(json.dumps(PUBLISHED[name]))
        assert SchedulerConfig.from_pretrained(tmp_path / name) == expected
        assert SchedulerConfig.from_pretrained(folder) == expected
        assert SchedulerConfig.from_pretrained(folder / "scheduler_config.json") == expected
    assert SchedulerConfig.from_dict(LIGHTNING) == QWEN_IMAGE_LIGHTNING
    # our dict is a valid diffusers config that means the same thing
    from diffusers import FlowMatchEulerDiscreteScheduler
    for cfg in S.PRESETS.values():
        c = FlowMatchEulerDiscreteScheduler.from_config(cfg.to_dict()).config
        assert SchedulerConfig.from_dict({k: v for k, v in c.items()}) == cfg


@pytest.mark.parametrize("key,value,match", [
    ("use_karras_sigmas", True, "use_karras_sigmas"), ("use_exponential_sigmas", True, "use_exponential_sigmas"),
    ("use_beta_sigmas", True, "use_beta_sigmas"), ("stochastic_sampling", True, "stochastic_sampling"),
    ("invert_sigmas", True, "invert_sigmas"), ("time_shift_type", "cosine", "time_shift_type"),
    ("num_train_timesteps", 500, "num_train_timesteps"), ("some_new_option", 1, "some_new_option"),
    ("_class_name", "EulerDiscreteScheduler", "_class_name")])
def test_unsupported_options_name_file_and_key(tmp_path, key, value, match):
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**PUBLISHED["qwen_image"], key: value}))
    with pytest.raises(SchedulerConfigError, match=match) as e:
        SchedulerConfig.from_pretrained(tmp_path)
    assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        SchedulerConfig.from_pretrained(tmp_path / "missing")


def test_linear_time_shift_and_custom_sigmas_match_diffusers():
    linear = {**PUBLISHED["qwen_image"], "time_shift_type": "linear"}
    cfg = SchedulerConfig.from_dict(linear)
    np.testing.assert_allclose(pipeline_sigmas(cfg, 8, height=1024, width=1024),
                               diffusers_pipeline_sigmas(linear, 8, "qwen_image", 1024, 1024), rtol=0, atol=ATOL)
    # the pipelines' own `sigmas=` argument: still shifted (Lightning turns [1, 0.5] into [1, 0.75])
    custom = [1.0, 0.5]
    ours = pipeline_sigmas(QWEN_IMAGE_LIGHTNING, 2, sigmas=custom)
    np.testing.assert_allclose(ours, diffusers_pipeline_sigmas(LIGHTNING, 2, "qwen_image", 512, 512, custom),
                               rtol=0, atol=ATOL)
    np.testing.assert_allclose(ours, [1.0, 0.75, 0.0], atol=1e-7)


def test_spec_table_values():
    """architectures.md §4.3."""
    assert QWEN_IMAGE.mu(83 * 83) == pytest.approx(0.8343, abs=1e-4)
    assert QWEN_IMAGE.mu(64 * 64) == pytest.approx(0.6935, abs=1e-4)
    table = {
        (QWEN_IMAGE, 1328, 2): [1.0, 0.0200, 0],
        (QWEN_IMAGE, 1328, 8): [1.0, .9239, .8353, .7308, .6057, .4532, .2632, .0200, 0],
        (QWEN_IMAGE, 1024, 2): [1.0, 0.0200, 0],
        (QWEN_IMAGE, 1024, 8): [1.0, .9160, .8200, .7093, .5801, .4273, .2441, .0200, 0],
    }
    for (cfg, res, n), expected in table.items():
        np.testing.assert_allclose(cfg.sigmas(n, height=res, width=res), expected, atol=5e-5)
    shift3 = {2: [1.0, 0.75, 0], 8: [1.0, .9545, .9000, .8333, .7500, .6429, .5000, .3000, 0]}
    for n, expected in shift3.items():
        np.testing.assert_allclose(QWEN_IMAGE_LIGHTNING.sigmas(n), expected, atol=5e-5)
        np.testing.assert_allclose(Z_IMAGE_TURBO.sigmas(n, "z_image"), expected, atol=5e-5)
    q50 = QWEN_IMAGE.sigmas(50, height=1328, width=1328)
    np.testing.assert_allclose(q50[:3], [1.0, .9910, .9818], atol=5e-5)
    np.testing.assert_allclose(q50[-4:], [.1054, .0638, .0200, 0], atol=5e-5)
    np.testing.assert_allclose(Z_IMAGE_TURBO.sigmas(50, "z_image")[-4:], [.1607, .1111, .0577, 0], atol=5e-5)
    # mu = ln 3 is the static shift 3 at every resolution
    for res in RESOLUTIONS:
        np.testing.assert_allclose(QWEN_IMAGE_LIGHTNING.sigmas(8, height=res[0], width=res[1]),
                                   Z_IMAGE_TURBO.sigmas(8), atol=2e-7)


def test_z_image_base_sigmas_reproduce_torch_linspace():
    for n in range(1, 120):
        ref = torch.linspace(1.0, 1 / n, n).numpy()
        np.testing.assert_array_max_ulp(S.base_sigmas(n, "z_image"), ref, maxulp=1)


def test_explicit_sigmas_and_errors():
    np.testing.assert_array_equal(explicit_sigmas([1.0, 0.75]), np.array([1.0, 0.75, 0.0], np.float32))
    np.testing.assert_array_equal(explicit_sigmas([1.0, 0.75, 0.0]), np.array([1.0, 0.75, 0.0], np.float32))
    assert explicit_sigmas([1.0, 0.75]).dtype == np.float32
    for bad in ([0.5, 0.75], [1.5, 0.5], [1.0, 1.0], []):
        with pytest.raises(ValueError, match="strictly decrease"):
            explicit_sigmas(bad)
    with pytest.raises(ValueError, match="height and width"):
        QWEN_IMAGE.sigmas(8)
    with pytest.raises(ValueError, match="shift_terminal"):  # diffusers would return NaN here
        QWEN_IMAGE.sigmas(1, height=1024, width=1024)
    with pytest.raises(ValueError, match="pipeline"):
        Z_IMAGE_TURBO.sigmas(4, "flux")
    with pytest.raises(ValueError, match="custom sigmas"):
        pipeline_sigmas(Z_IMAGE_TURBO, 3, sigmas=[1.0, 0.5])
