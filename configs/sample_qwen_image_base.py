"""Qwen-Image base sampling preset: 50 steps, true CFG 4 with the usual " " negative prompt, the scheduler
config shipped in the pipeline folder (exponential dynamic shift + shift_terminal)."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.family = "qwen_image"
    c.steps = 50
    c.guidance = 4.0  # true_cfg_scale
    c.negative_prompt = " "
    c.scheduler = ""  # "" = the pipeline folder's scheduler/scheduler_config.json; else a schedules.PRESETS name
    c.sigmas = ()  # explicit sigma list (overrides steps/scheduler) when non-empty
    c.width = 1328
    c.height = 1328
    c.max_sequence_length = 512
    c.cfg_normalization = 0.0
    c.cfg_truncation = 1.0
    return c
