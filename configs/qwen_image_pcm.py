"""PCM on Qwen-Image(-2512): a 2-phase consistency LoRA on one frozen bf16 base (shared docs `distillation.md` §2).

    python train.py --config configs/qwen_image_pcm.py --config.init_from Qwen-Image-2512 \\
        --config.data.prompts prompts.jsonl --workdir runs/qwen_pcm
    python sample.py --model Qwen-Image-2512 --config configs/sample_qwen_image_turbo_2step.py \\
        --lora runs/qwen_pcm/lora.safetensors --prompt "..."

The reference's SD3 recipe (`train_pcm_lora_sd3_adv.py`, run.sh): LoRA rank 32, LR 5e-6, wd 1e-3, N = 100 teacher
sub-steps, teacher CFG 4 (w = 3 in Imagen form), pseudo-Huber c = 0.001, adversarial weight 0.1 with hinge heads on
frozen-teacher features (here at 50/75/99 % depth; the reference puts one head on every block), D LR 1e-5, 2 phases
split at sigma 0.75 (raw 0.5 under shift 3, Qwen-Image-Lightning's 2-step list). PCM noises data: the prompt path
has no image latents yet, so the teacher samples generated at start-up (`data.teacher_samples`) are the data.
The LoRA also warm-starts DMD2 + GAN (`configs/qwen_image_wuli_2step.py`).
"""
from turbojax.distill.pcm import pcm_config


def get_config():
    c = pcm_config()
    c.workdir = "out/qwen_image_pcm"
    c.param_dtype = "bfloat16"
    c.dtype = "bfloat16"
    c.remat = "dots_no_batch"
    c.data.kind = "prompts"
    c.data.width = c.data.height = 1024
    c.data.teacher_samples = 512
    c.student.sigmas = (1.0, 0.75)
    c.student.shift = 3.0
    c.pcm.teacher_cfg = 4.0
    c.gan.weight = 0.1
    c.gan.depths = (0.5, 0.75, 0.99)
    c.batch_size = 1
    c.total_steps = 20000
    return c
