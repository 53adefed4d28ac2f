"""Z-Image Turbo++ style 2-step distillation on the digits demo: one LoRA per step, trained end to end.

    python train.py --config configs/digits_turbopp.py                          # workdir out/digits_turbopp
    python train.py --config configs/digits_turbopp.py --config.dmd.weight 0    # without the optional DMD term
    python train.py --config configs/digits_turbopp.py --config.turbopp.end_to_end False  # the ablation
    python sample.py --student out/digits_turbopp

Step 1 (sigma 1 -> 0.75) and step 2 (0.75 -> 0) have their own LoRA (`lora_step1.safetensors`,
`lora_step2.safetensors` and their ComfyUI twins; `sampler.json` says which serves which step). The generator turn
runs both steps from pure noise with gradient through the step-1 output; losses: the non-saturating GAN on
frozen-teacher features with teacher samples as the reals (`gan.real_mix` 0), and the step-1 regression to the
teacher's CFG Euler trajectory state at sigma 0.75 from the same noise (`turbopp.teacher_steps` 16 sub-steps on
[0, 1]; 8 of them reach 0.75), and the DMD term on the final image (`dmd.weight` 1). The paper's unknowns are config
switches (see `turbojax/distill/turbopp.py`). Measured on the quality bench (3 seeds x 1,000 digits): with the DMD
term FD 76.9, accuracy 96.5 %; without it (GAN + step-1 loss only) the student collapses, FD 258, recall 0.11.

Per-step full copies of selected blocks instead of (or beside) the LoRAs, e.g. block 0 copied per step, no LoRA:

    python train.py --config configs/digits_turbopp.py --config.lora.student.targets '' \
        --config.turbopp.full_blocks 'transformer_blocks\.0\..*' --config.opt.blocks.lr 1e-4

(exports `step1_blocks.safetensors`, `step2_blocks.safetensors`; `sample.py --student DIR` loads them). A module is
either copied or LoRA-targeted; the targets above cover every block of the scanned stack, hence `''`.
"""
from turbojax.digits.model import TEACHER_GUIDANCE
from turbojax.distill.turbopp import turbopp_config

TARGETS = [r"transformer_blocks\.attn\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
           r"transformer_blocks\.(img|txt)_mlp\.fc[12]", r"transformer_blocks\.(img|txt)_mod", "proj_out", "norm_out"]


def get_config():
    c = turbopp_config()
    c.workdir = "out/digits_turbopp"
    c.data.kind = "digits"
    c.data.teacher_samples_per_class = 64
    c.init_from = ""  # empty: the shipped teacher (turbojax/digits/assets/teacher)
    for role in ("student", "fake"):
        c.lora[role].targets = list(TARGETS)
        c.lora[role].rank, c.lora[role].alpha = 16, 16.0
    c.student.sigmas = (1.0, 0.75)
    c.turbopp.teacher_steps = 16
    c.turbopp.teacher_cfg = TEACHER_GUIDANCE
    c.turbopp.boundary_weight = 1.0
    c.dmd.real_cfg = TEACHER_GUIDANCE
    c.dmd.weight = 1.0
    c.gan.weight = 0.05
    c.gan.real_mix = 0.0
    c.gan.depths = (0.5, 0.75, 1.0)
    c.gan.hidden = 64
    c.ttur_ratio = 3
    c.ema_decay = 0.99
    c.opt.weight_decay = 0.0
    c.opt.warmup_steps = 20
    for g in ("student", "fake", "disc"):
        c.opt[g].lr = 3e-4
    c.batch_size = 32
    c.total_steps = 1500
    c.log_every = 50
    c.checkpoint_every = 250
    c.sample_every = 500
    return c
