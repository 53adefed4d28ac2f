"""ArcFlow on Z-Image: a 2-NFE momentum-policy student (K = 16) on one frozen bf16 base.

    python train.py --config configs/z_image_arcflow.py --config.init_from Z-Image \\
        --config.data.prompts prompts.jsonl --workdir runs/arczimage

The recipe of `configs/qwen_image_arcflow.py` (pnotp/ArcFlow `configs/qwen/arcqwen_2nfe_k16.py`, shared docs
`distillation.md` §3) carried over to Z-Image's module names: LoRA r = 256 on the SwiGLU MLPs (`feed_forward`
gate / up / down of the main `layers` and of both refiner stacks) and the timestep embedder (`time_linear_1/2`),
attention frozen; the heads replace `final_linear` and read the final AdaLN output, whose modulation `final_mod`
(diffusers `all_final_layer.2-1.adaLN_modulation.1`) is trained fully. Teacher CFG 4 against the "" negative prompt
(Z-Image's pipeline default); shift 3 as the Z-Image configs (`z_image_dmd2_gan.py`, Z-Image-Turbo's scheduler), with
equal raw steps: sigmas [1, 0.75, 0].
Choices the reference does not make (it has no Z-Image recipe) [U]: the refiners' MLPs carry LoRA too (they are
Z-Image's only per-stream MLPs), shift 3 rather than 3.2, and the `turbo` variant: Z-Image-Turbo is
guidance-distilled and sampled without CFG, so its teacher velocity is taken without CFG (`arcflow.guidance` 1).
The exported folder (`lora.safetensors`, `heads.safetensors`, `arcflow.json`) is sampled by
`python sample.py --model Z-Image --arcflow runs/arczimage ...` or `turbojax.pipelines.from_diffusers(..., arcflow=)`.
"""
from turbojax.distill import arcflow
from turbojax.distill.arcflow_heads import arcflow_config

TARGETS = [r"(layers|noise_refiner|context_refiner)\.feed_forward\.(gate|up|down)", r"time_linear_[12]"]


def get_config(variant: str = "base"):
    if variant not in ("base", "turbo"):
        raise ValueError(f"variant must be base or turbo, got {variant!r}")
    c = arcflow_config()
    c.workdir = f"out/z_image_arcflow_{variant}"
    c.param_dtype = "bfloat16"  # the frozen base; trainables are fp32 masters
    c.dtype = "bfloat16"
    c.remat = "dots_no_batch"
    c.lora.student.targets = list(TARGETS)
    c.student.shift = 3.0
    c.student.sigmas = (1.0, round(float(arcflow.shift_sigma(0.5, 3.0)), 7))  # equal raw steps: [1, 0.75]
    c.arcflow.guidance = 4.0 if variant == "base" else 1.0
    c.data.kind = "prompts"
    c.data.negative_prompt = ""
    c.data.width = c.data.height = 1024
    c.batch_size = 1
    c.total_steps = 15000
    c.checkpoint_every = 500
    c.sample_every = 0
    return c
