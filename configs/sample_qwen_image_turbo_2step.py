"""The Wuli 2-step turbo recipe (Qwen-Image-2512-Turbo-LoRA-2-Steps): 2 steps, static shift 3, i.e.
sigma = [1, 0.75, 0], no CFG. Also the schedule of turbojax's own 2-step students."""
from configs.sample_qwen_image_base import get_config as base


def get_config():
    c = base()
    c.steps = 2
    c.guidance = 1.0
    c.negative_prompt = ""
    c.scheduler = "qwen_image_lightning"  # mu = ln 3 == static shift 3 -> [1, 0.75, 0]
    c.width = c.height = 1024
    return c
