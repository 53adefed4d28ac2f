"""Z-Image-Turbo preset: 8 steps, static shift 3, CFG off (guidance 0)."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.family = "z_image"
    c.steps = 8
    c.guidance = 0.0  # guidance_scale
    c.negative_prompt = ""
    c.scheduler = "z_image_turbo"
    c.sigmas = ()
    c.width = 1024
    c.height = 1024
    c.max_sequence_length = 512
    c.cfg_normalization = 0.0
    c.cfg_truncation = 1.0
    return c
