"""Z-Image Turbo++ style: a 2-step student of the 8-step Z-Image-Turbo with one LoRA per step, trained end to end.

    python train.py --config configs/z_image_turbopp.py --config.init_from Z-Image-Turbo \\
        --config.data.prompts prompts.txt --workdir runs/zturbopp
    python sample.py --model Z-Image-Turbo --sigmas 1.0,0.75 --guidance 0 \\
        --lora-step 1:runs/zturbopp/lora_step1.safetensors --lora-step 2:runs/zturbopp/lora_step2.safetensors

What the paper states (arXiv 2606.12575, abstract): the teacher is the 8-step Z-Image-Turbo, the GAN's reals are its
samples (`data.teacher_samples` generated at start-up with `data.teacher_steps` 8, CFG off), step 1 and step 2 have
independent parameters, and training is end to end with an explicit step-1 loss. What is ours where the paper is
silent (each a config switch): per-step LoRAs on the frozen base rather than full copies; heads on frozen-teacher
features at 50/75/99 % depth; the step-1 loss = squared error to the teacher's 8-step trajectory state at sigma 0.75
from the same noise (`turbopp.boundary_weight`); no DMD term by default (`dmd.weight`; Turbo is distilled at CFG 0,
so a CFG real score would be wrong: Tongyi-MAI/Z-Image #110); rematerialised steps (`turbopp.remat`).
"""
from turbojax.distill.turbopp import turbopp_config

TARGETS = [r"layers\.attention\.(to_q|to_k|to_v|to_out)", r"layers\.feed_forward\.(gate|up|down)"]


def get_config():
    c = turbopp_config()
    c.workdir = "out/z_image_turbopp"
    c.param_dtype = "bfloat16"
    c.dtype = "bfloat16"
    c.remat = "dots_no_batch"
    for role in ("student", "fake"):
        c.lora[role].targets = list(TARGETS)
    c.data.kind = "prompts"
    c.data.negative_prompt = ""
    c.data.width = c.data.height = 1024
    c.data.teacher_samples = 512
    c.data.teacher_steps = 8
    c.student.sigmas = (1.0, 0.75)
    c.student.shift = 3.0
    c.student.cfg = 1.0
    c.turbopp.teacher_steps = 8
    c.turbopp.teacher_cfg = 1.0
    c.turbopp.boundary_weight = 1.0
    c.turbopp.end_to_end = True
    c.turbopp.remat = True
    c.dmd.real_cfg = 1.0  # also the CFG of the teacher samples generated at start-up (Turbo: none)
    c.dmd.weight = 0.0
    c.gan.weight = 0.03
    c.gan.real_mix = 0.0
    c.gan.depths = (0.5, 0.75, 0.99)
    c.ttur_ratio = 5
    c.ema_decay = 0.9999
    c.batch_size = 1
    c.total_steps = 5000
    return c
