"""PCM on Z-Image: a 2-phase consistency LoRA on one frozen bf16 base (teacher Z-Image, or Z-Image-Turbo).

    python train.py --config configs/z_image_pcm.py --config.init_from Z-Image --config.data.prompts p.txt
    python train.py --config configs/z_image_pcm.py:turbo --config.init_from Z-Image-Turbo ...

Same recipe as `configs/qwen_image_pcm.py` on Z-Image's module names. Z-Image-Turbo is guidance-distilled and
sampled without CFG (Tongyi-MAI/Z-Image #110), so the `turbo` variant's teacher step has no CFG (`pcm.teacher_cfg`
1) and its sub-step grid is coarse (8 steps: the Turbo schedule; the phase edge is added to it).
"""
from turbojax.distill.pcm import pcm_config

TARGETS = [r"layers\.attention\.(to_q|to_k|to_v|to_out)", r"layers\.feed_forward\.(gate|up|down)"]


def get_config(variant: str = "base"):
    if variant not in ("base", "turbo"):
        raise ValueError(f"variant must be base or turbo, got {variant!r}")
    c = pcm_config()
    c.workdir = f"out/z_image_pcm_{variant}"
    c.param_dtype = "bfloat16"
    c.dtype = "bfloat16"
    c.remat = "dots_no_batch"
    c.lora.student.targets = list(TARGETS)
    c.data.kind = "prompts"
    c.data.negative_prompt = ""
    c.data.width = c.data.height = 1024
    c.data.teacher_samples = 512
    c.student.sigmas = (1.0, 0.75)
    c.pcm.teacher_cfg = 4.0 if variant == "base" else 1.0
    c.pcm.grid_steps = 100 if variant == "base" else 8
    c.dmd.real_cfg = c.pcm.teacher_cfg  # the CFG of the teacher samples generated at start-up
    c.gan.weight = 0.1
    c.gan.depths = (0.5, 0.75, 0.99)
    c.batch_size = 1
    c.total_steps = 20000
    return c
