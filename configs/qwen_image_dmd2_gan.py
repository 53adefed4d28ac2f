"""DMD2 + GAN on Qwen-Image(-2512): a 2-step LoRA student and a LoRA fake score on one frozen bf16 base.

    python train.py --config configs/qwen_image_dmd2_gan.py --config.init_from Qwen-Image-2512 \\
        --config.data.prompts prompts.jsonl --workdir runs/qwen2step
    python sample.py --model Qwen-Image-2512 --config configs/sample_qwen_image_turbo_2step.py \\
        --lora runs/qwen2step/lora.safetensors --prompt "..." --out out.png

Values follow the published DMD2 configs for Qwen-Image (shared docs `distillation.md` §9: FastGen / NVIDIA
Model-Optimizer): LR 1e-5 for the three groups, AdamW (0.9, 0.999), wd 0.01, 4 critic turns per student turn
(`ttur_ratio` 5), real-score CFG 4 with norm rescale, GAN weight 0.03 on frozen-teacher features at 50/75/99 % of
depth, grad clip 10, EMA 0.9999 (Model-Optimizer), 1024 px. 2 steps at [1, 0.75] (shift 3, the Wuli / Lightning
schedule); 4 steps: `--config.student.sigmas 1.0,0.9,0.75,0.5` (raw [1, 0.75, 0.5, 0.25] under shift 3).
"""
from turbojax.distill.config import dmd2_config


def get_config():
    c = dmd2_config()
    c.workdir = "out/qwen_image_dmd2_gan"
    c.param_dtype = "bfloat16"  # the frozen base; trainables are fp32 masters
    c.dtype = "bfloat16"
    c.remat = "full"  # dots_no_batch needs 94.8 GiB per v5e chip at 1024 px; full fits in 12.7 (bench/plans)
    c.data.kind = "prompts"
    c.data.width = c.data.height = 1024
    c.data.teacher_samples = 512
    c.dmd.real_cfg = 4.0
    c.gan.weight = 0.03
    c.gan.features = "teacher"
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
