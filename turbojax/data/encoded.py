"""Prompts encoded at start-up by the pipeline's own text encoder, and teacher samples for the discriminator.

Until the cache issue lands (text embeddings / latents / teacher samples on disk, read with grain), a run with
`data.kind = "prompts"` reads its prompt file, encodes every prompt once with the pipeline's text encoder (in
batches, with a progress bar), keeps the embeddings in host memory, and generates `data.teacher_samples` teacher
samples (the teacher's many-step CFG sampler) as the discriminator's reals. The text encoder and the VAE are then
dropped: training holds the transformer only.

Z-Image has no caption mask (its caption pads are learned tokens), so the engine runs every caption at one length:
prompts are zero-padded to the longest one. This differs from inference for the shorter prompts; the on-disk cache
of the data issue buckets prompts by length instead.
"""
from __future__ import annotations

import numpy as np

from turbojax.data.batches import PromptBatches, _pad_len
from turbojax.data.prompts import read_config_prompts


def _encode_all(pipe, texts, max_len: int, chunk: int, progress):
    from turbojax.utils import progress_bar
    embs, masks = [], []
    for lo in progress_bar(range(0, len(texts), chunk), desc="encoding prompts", unit="batch",
                           enabled=len(texts) > chunk):
        out = pipe.encode_prompts(texts[lo:lo + chunk], max_len)
        if pipe.family == "qwen_image":
            e, m = out
            e = np.asarray(e, np.float32)
            m = np.ones(e.shape[:2], np.float32) if m is None else np.asarray(m, np.float32)
            embs += list(e)
            masks += list(m)
        else:
            for e in out:
                e = np.asarray(e, np.float32)
                embs.append(e)
                masks.append(np.ones(len(e), np.float32))
    n = max(len(e) for e in embs)
    ctx = np.stack([_pad_len(e[None], n)[0] for e in embs])
    mask = np.stack([_pad_len(m[None], n)[0] for m in masks])
    return ctx, mask


def prompt_batches(cfg, pipe, *, progress=print):
    """(PromptBatches, latent shape of one sample in the model layout, caption length for Z-Image)."""
    src = read_config_prompts(cfg.data)
    progress(f"{len(src.prompts)} prompts from {cfg.data.prompts} ({src.skipped_blank} blank and "
             f"{src.skipped_duplicate} repeated lines skipped)")
    max_len = int(cfg.data.max_sequence_length)
    ctx, mask = _encode_all(pipe, src.prompts, max_len, 16, progress)
    negs = [n if n is not None else cfg.data.negative_prompt for n in src.negatives]
    per_prompt = any(n is not None for n in src.negatives)
    neg_ctx, neg_mask = _encode_all(pipe, negs if per_prompt else negs[:1], max_len, 16, progress)
    if pipe.family == "z_image":  # one caption length for prompts and negatives (see the module docstring)
        n = max(ctx.shape[1], neg_ctx.shape[1])
        ctx, mask, neg_ctx, neg_mask = (_pad_len(a, n) for a in (ctx, mask, neg_ctx, neg_mask))
        mask, neg_mask = np.ones_like(mask), np.ones_like(neg_mask)
    h, w = int(cfg.data.height), int(cfg.data.width)
    from turbojax.distill.denoiser import latent_shape_for
    shape = pipe.noise_shape(1, h, w)[1:]
    latent_shape = latent_shape_for(pipe.family, shape[-1] if pipe.family == "qwen_image" else shape[0], h, w)
    reals = {}
    n_teacher = int(cfg.data.teacher_samples)
    if (cfg.gan.weight > 0 or cfg.get("method") == "pcm") and n_teacher > 0:  # PCM noises data
        ids = np.arange(n_teacher) % len(src.prompts)
        progress(f"generating {n_teacher} teacher samples ({cfg.data.teacher_steps} steps, CFG {cfg.dmd.real_cfg}) "
                 "for the discriminator's reals")
        lat = []
        for i, p in enumerate(ids):
            sig = pipe.sigmas(int(cfg.data.teacher_steps), h, w)
            cond = (ctx[p:p + 1], mask[p:p + 1]) if pipe.family == "qwen_image" else [ctx[p]]
            j = p if per_prompt else 0
            neg = (neg_ctx[j:j + 1], neg_mask[j:j + 1]) if pipe.family == "qwen_image" else [neg_ctx[j]]
            x = pipe.denoise(pipe.noise(int(cfg.seed) + 7919 + i, 1, h, w), cond, neg, sig, height=h, width=w,
                             guidance=float(cfg.dmd.real_cfg))
            x = np.asarray(x, np.float32)
            lat.append(x[0] if pipe.family == "qwen_image" else x[0][:, None])
        reals["teacher"] = (np.stack(lat), ids)
    batches = PromptBatches(ctx, mask, batch_size=int(cfg.batch_size), seed=int(cfg.seed), neg_ctx=neg_ctx,
                            neg_mask=neg_mask, reals=reals, real_mix=0.0 if not reals else float(cfg.gan.real_mix))
    return batches, latent_shape, ctx.shape[1]
