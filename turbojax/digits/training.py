"""The digits demo as distillation data: prompt batches, the discriminator's reals, and sample grids.

Prompts are the ten class prompts "the digit c" (embedded by the shipped tiny text encoder); the negative prompt of
the teacher's CFG is the empty prompt. The discriminator's reals mix, per sample and for the asked class, real
digits (the 4,000-digit train split through the space-to-depth stand-in VAE) with teacher samples generated at start
by our sampler (the teacher's many-step CFG schedule), in the proportion `gan.real_mix` (the Wuli recipe).
"""
from __future__ import annotations

import math

import numpy as np

from turbojax.data.batches import PromptBatches
from turbojax.digits import data, model


def teacher_pool(teacher, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` teacher samples of each class: (packed latents [10 * per_class, 64, 16], labels)."""
    labels = np.repeat(np.arange(data.NUM_CLASSES), per_class)
    return model.generate_tokens(teacher, labels, seed=seed), labels


def batches(cfg, teacher, *, progress=print) -> PromptBatches:
    table, mask = model.prompt_table()
    cls = np.arange(data.NUM_CLASSES)
    reals = {}
    if cfg.gan.weight > 0 or cfg.get("method") == "pcm":  # PCM noises data even without its GAN term
        if cfg.gan.real_mix > 0:
            images, labels = data.load_digits("train")
            reals["real"] = (np.asarray(data.images_to_tokens(images)), labels)
        if cfg.gan.real_mix < 1:
            progress(f"generating {cfg.data.teacher_samples_per_class} teacher samples per class for the "
                     f"discriminator's reals ({model.TEACHER_STEPS} steps, CFG {model.TEACHER_GUIDANCE})")
            reals["teacher"] = teacher_pool(teacher, int(cfg.data.teacher_samples_per_class), cfg.seed + 12345)
    return PromptBatches(table[cls], mask[cls], batch_size=int(cfg.batch_size), seed=int(cfg.seed),
                         neg_ctx=table[model.EMPTY:model.EMPTY + 1], neg_mask=mask[model.EMPTY:model.EMPTY + 1],
                         reals=reals, real_mix=float(cfg.gan.real_mix))


def sample_grid(teacher, adapter, sigmas, *, per_class: int = 4, seed: int = 0, guidance: float = 1.0
                ) -> np.ndarray:
    """A uint8 grid `[rows * 32, cols * 32, 1]`: one row per seed, one column per class (fixed noise)."""
    labels = np.tile(np.arange(data.NUM_CLASSES), per_class)
    imgs = model.generate(teacher, labels, seed=seed, sigmas=list(sigmas) + [0.0], guidance=guidance,
                          adapters=adapter)
    return tile(imgs, data.NUM_CLASSES)


def tile(images: np.ndarray, cols: int) -> np.ndarray:
    n, h, w, c = images.shape
    rows = math.ceil(n / cols)
    out = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, im in enumerate(images):
        out[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    return out
