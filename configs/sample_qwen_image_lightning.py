"""Qwen-Image-Lightning LoRA preset: 8 steps (":4" for the 4-step LoRA), shift mu = ln 3, no CFG."""
from configs.sample_qwen_image_base import get_config as base


def get_config(steps: str = "8"):
    c = base()
    c.steps = int(steps)
    c.guidance = 1.0
    c.negative_prompt = ""
    c.scheduler = "qwen_image_lightning"
    c.width = c.height = 1024
    return c
