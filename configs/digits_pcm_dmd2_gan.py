"""The Wuli 2-step recipe on the digits demo: DMD2 + GAN warm-started from a PCM LoRA.

    python train.py --config configs/digits_pcm.py                       # 1. the PCM LoRA -> out/digits_pcm
    python train.py --config configs/digits_pcm_dmd2_gan.py              # 2. DMD2 + GAN from it
    python train.py --config configs/digits_pcm_dmd2_gan.py --config.init_student_lora runs/pcm/lora.safetensors

The student LoRA starts from the PCM one (`init_student_lora`, same targets and rank); the fake score starts at
zero as usual. The discriminator's reals mix real digits and teacher samples half and half (`gan.real_mix` 0.5,
Wuli's real/teacher mix); the rest is `configs/digits_dmd2_gan.py`. The PCM start is claimed to mitigate DMD's mode
collapse / over-sharpening (shared docs `distillation.md` §2, press article).
"""
import importlib.util
from pathlib import Path


def _digits_dmd2_gan():
    spec = importlib.util.spec_from_file_location("digits_dmd2_gan", Path(__file__).with_name("digits_dmd2_gan.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def get_config():
    c = _digits_dmd2_gan()
    c.workdir = "out/digits_pcm_dmd2_gan"
    c.init_student_lora = "out/digits_pcm/lora.safetensors"
    c.gan.real_mix = 0.5
    return c
