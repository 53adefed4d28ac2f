"""The Wuli Qwen-Image 2-step recipe: a PCM phase, then DMD2 + GAN warm-started from the PCM LoRA, in two commands.

    python train.py --config configs/qwen_image_wuli_2step.py:pcm --config.init_from Qwen-Image-2512 \\
        --config.data.prompts prompts.jsonl --workdir runs/wuli_pcm
    python train.py --config configs/qwen_image_wuli_2step.py:dmd2_gan --config.init_from Qwen-Image-2512 \\
        --config.data.prompts prompts.jsonl --config.init_student_lora runs/wuli_pcm/lora.safetensors \\
        --workdir runs/wuli_2step

Phase 1 is `configs/qwen_image_pcm.py` (2 phases split at sigma 0.75, the student's sigma list of phase 2). Phase 2
is `configs/qwen_image_dmd2_gan.py` with the student LoRA started from the PCM one (same targets and rank 32: the
PCM rank) and the discriminator's reals a mix of real-image latents and teacher samples, `gan.real_mix` the share
of real ones (Wuli's mix is not published: press article, shared docs §5). The prompt path has no real-image latents
yet (it generates teacher samples only), so `REAL_MIX` is 0 here; set `--config.gan.real_mix 0.5` with a real latent
pool (the digits version, `configs/digits_pcm_dmd2_gan.py`, mixes half and half). Unknowns of the recipe (Wuli's
DINO discriminator, ranks, schedule) follow our published-config defaults.
"""
import importlib.util
from pathlib import Path

REAL_MIX = 0.0  # 0.5 once real-image latents are a pool of the prompt path (Wuli mixes real and teacher reals)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def get_config(phase: str = "pcm"):
    if phase not in ("pcm", "dmd2_gan"):
        raise ValueError(f"phase must be pcm or dmd2_gan, got {phase!r}")
    if phase == "pcm":
        c = _load("qwen_image_pcm")
        c.workdir = "out/qwen_image_wuli_pcm"
        return c
    c = _load("qwen_image_dmd2_gan")
    c.workdir = "out/qwen_image_wuli_2step"
    c.init_student_lora = "out/qwen_image_wuli_pcm/lora.safetensors"
    c.lora.student.rank, c.lora.student.alpha = 32, 32.0  # the PCM LoRA's shape
    c.gan.real_mix = REAL_MIX
    return c
