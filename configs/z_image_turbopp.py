"""Z-Image Turbo++ style: a 2-step student of the 8-step Z-Image-Turbo with one LoRA per step, trained end to end.

    python train.py --config configs/z_image_turbopp.py --config.init_from Z-Image-Turbo \\
        --config.data.prompts prompts.txt --workdir runs/zturbopp
    python sample.py --model Z-Image-Turbo --sigmas 1.0,0.75 --guidance 0 \\
        --lora-step 1:runs/zturbopp/lora_step1.safetensors --lora-step 2:runs/zturbopp/lora_step2.safetensors

What the paper states (arXiv 2606.12575, abstract): the teacher is the 8-step Z-Image-Turbo, the GAN's reals are its
samples (`data.teacher_samples` generated at start-up with `data.teacher_steps` 8, CFG off), step 1 and step 2 have
independent parameters, and training is end to end with an explicit step-1 loss. What is ours where the paper is
silent (each a config switch): per-step LoRAs on the frozen base rather than full copies (full per-step copies of
selected blocks are the `turbopp.full_blocks` option, below); heads on frozen-teacher
features at 50/75/99 % depth; the step-1 loss = squared error to the teacher's 8-step trajectory state at sigma 0.75
from the same noise (`turbopp.boundary_weight`); no DMD term by default (`dmd.weight`; Turbo is distilled at CFG 0,
so a CFG real score would be wrong: Tongyi-MAI/Z-Image #110); rematerialised steps (`turbopp.remat`).

Per-step full copies (`turbopp.full_blocks`, off by default): regexes over parameter paths, the layer index after the
stack name for single blocks (`layers\.(0|1)\..*`) or none for every layer (`layers\.attention\..*`). Each step
trains its own fp32 copy of the selected weights (initialised from the base, LR `opt.blocks.lr`), overlaid on the one
frozen base for that step only; with scan_layers only the selected layers are copied. A module is either copied or
LoRA-targeted (an error names the clash), and a LoRA target covers every layer of its stack, so e.g. full attention
of blocks 0-1 per step with LoRA on the feed-forwards:

    python train.py --config configs/z_image_turbopp.py ... \
        --config.turbopp.full_blocks 'layers\.(0|1)\.attention\..*' \
        --config.lora.student.targets 'layers\.feed_forward\.(gate|up|down)'
    python sample.py --model Z-Image-Turbo --sigmas 1.0,0.75 --guidance 0 \
        --lora-step 1:runs/zturbopp/lora_step1.safetensors --lora-step 2:runs/zturbopp/lora_step2.safetensors \
        --blocks-step 1:runs/zturbopp/step1_blocks.safetensors --blocks-step 2:runs/zturbopp/step2_blocks.safetensors

(`step{k}_blocks.safetensors`: diffusers transformer state-dict names, torch layout, fp32; `sampler.json` lists each
step's files. Memory: one block's attention is ~59M weights, ~0.95 GB per step as fp32 copy + Adam moments + EMA.)
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
    c.turbopp.full_blocks = []  # LoRA only; see the module doc for per-step full copies of selected blocks
    c.opt.blocks.lr = 1e-5      # the full copies' LR when selected
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
