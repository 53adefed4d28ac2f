"""DMD2 + GAN on Z-Image: a 2-step LoRA student on one frozen bf16 base (teacher Z-Image base, or Z-Image-Turbo).

    python train.py --config configs/z_image_dmd2_gan.py --config.init_from Z-Image --config.data.prompts p.txt
    python train.py --config configs/z_image_dmd2_gan.py:turbo --config.init_from Z-Image-Turbo ...

Z-Image-Turbo is guidance-distilled and sampled at CFG 0 (Tongyi-MAI/Z-Image #110: re-distilling it with a CFG
real score is problematic), so the `turbo` variant uses the teacher without CFG (`dmd.real_cfg` 1). LoRA targets are
Z-Image's module names (attention qkv/out, SwiGLU, the AdaLN modulation) on the main `layers` stack.
"""
from turbojax.distill.config import dmd2_config

TARGETS = [r"layers\.attention\.(to_q|to_k|to_v|to_out)", r"layers\.feed_forward\.(gate|up|down)"]


def get_config(variant: str = "base"):
    if variant not in ("base", "turbo"):
        raise ValueError(f"variant must be base or turbo, got {variant!r}")
    c = dmd2_config()
    c.workdir = f"out/z_image_dmd2_gan_{variant}"
    c.param_dtype = "bfloat16"
    c.dtype = "bfloat16"
    c.remat = "dots_no_batch"
    for role in ("student", "fake"):
        c.lora[role].targets = list(TARGETS)
    c.data.kind = "prompts"
    c.data.negative_prompt = ""
    c.data.width = c.data.height = 1024
    c.data.teacher_samples = 512
    c.dmd.real_cfg = 4.0 if variant == "base" else 1.0
    c.gan.weight = 0.03
    c.gan.depths = (0.5, 0.75, 0.99)
    # The ADD / Wuli alternative: heads on a frozen DINOv2's tokens of VAE-decoded clean samples and reals (the
    # VAE decoder and DINO stay in memory, frozen; the generator's GAN gradient runs back through both):
    #   c.gan.features = "dino"
    #   c.gan.dino = "dinov2-small"        # a transformers Dinov2Model folder (or dinov2-with-registers-small)
    #   c.gan.dino_layers = (2, 5, 8, 11)  # block indices, or fractions of depth: () = (0.25, 0.5, 0.75, 1.0)
    #   c.gan.dino_size = 224              # a multiple of the patch size (14)
    #   c.gan.r1_weight = 0.0              # optional R1 on the heads' inputs
    c.ttur_ratio = 5
    c.ema_decay = 0.9999
    c.batch_size = 1
    c.total_steps = 5000
    return c
