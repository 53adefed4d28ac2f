"""ArcFlow on Qwen-Image(-2512): a 2-NFE momentum-policy student (K = 16) on one frozen bf16 base.

    python train.py --config configs/qwen_image_arcflow.py --config.init_from Qwen-Image-2512 \\
        --config.data.prompts prompts.jsonl --workdir runs/arcqwen

Values of pnotp/ArcFlow `configs/qwen/arcqwen_2nfe_k16.py` (shared docs `distillation.md` §3): data-free (prompts
only), LoRA r = 256 (alpha 256) on img_mlp / txt_mlp fc1 / fc2 and the timestep embedder (not attention), heads and
norm_out trained fully, AdamW LR 1e-4, betas (0.9, 0.95), wd 0, log-rate head LR x 0.1, 100-iteration warm-up, grad
clip 50, teacher CFG 4, 4 imitation states per step, window 3/128, teacher share decaying over 1,000 iterations,
component dropout 0.1, MSE x 30, fixed shift 3.2 with equal raw steps (sigmas [1, 0.762, 0]), 15k iterations.
Choices where the reference differs or is silent [U]: constant-decay EMA (the reference: Karras gamma 7 from
iteration 100), clip from iteration 0, no LoRA dropout, plain CFG (`arcflow.cfg_rescale` False) as the reference's
teacher is not read to rescale; batch 1 per step here (the reference: 4 images x 4 GPUs).
The exported folder (`lora.safetensors`, `heads.safetensors`, `arcflow.json`) is read by
`turbojax.distill.arcflow_heads.load_student(folder, transformer)`.
"""
from turbojax.distill.arcflow_heads import arcflow_config


def get_config():
    c = arcflow_config()
    c.workdir = "out/qwen_image_arcflow"
    c.param_dtype = "bfloat16"  # the frozen base; trainables are fp32 masters
    c.dtype = "bfloat16"
    c.remat = "dots_no_batch"
    c.data.kind = "prompts"
    c.data.width = c.data.height = 1024
    c.batch_size = 1
    c.total_steps = 15000
    c.checkpoint_every = 500
    c.sample_every = 0
    return c
