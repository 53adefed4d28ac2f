"""The demo's class-conditional teacher: a tiny Qwen-Image (our `QwenImageTransformer`) whose text stream is our tiny
Qwen2.5-VL text encoder reading prompts "the digit 0" .. "the digit 9" (and the empty negative prompt).

    teacher = load_teacher()                                             # the shipped export
    images = generate(teacher, labels=np.arange(10), seed=0)             # uint8 [10, 32, 32, 1], 20 steps, CFG 2.5
    emb, mask = class_condition(np.array([3, 7]))                        # [2, L, 32], [2, L]

Assets (`turbojax/digits/assets/`, all written by `scripts/train_digits_teacher.py`, shipped so that every machine
uses the same bits):
  * `tokenizer/`     a byte-level BPE trained on the prompts (`turbojax.testing.tiny_qwen_tokenizer`);
  * `text_encoder/`  the randomly initialised (seed `TEXT_SEED`) tiny `QwenLLM`, as a turbojax export;
  * `text_table.npz` its Qwen-Image prompt embeddings for the 10 classes + "" (recomputed by `encode_prompts`;
                     a test checks they agree);
  * `teacher/`       the trained transformer, as a turbojax export (`turbojax.models.from_orbax` opens it).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from turbojax import sampling, schedules
from turbojax.digits import data
from turbojax.models.qwen_image import QwenImageConfig
from turbojax.models.qwen_llm import QWEN2_5_VL_TINY

ASSETS = Path(__file__).resolve().parent / "assets"
PROMPTS = tuple(f"the digit {c}" for c in range(data.NUM_CLASSES))
NEGATIVE_PROMPT = ""
EMPTY = data.NUM_CLASSES  # row of the empty prompt in the prompt table (= the CFG-dropout "label")
# The tiny Qwen2.5-VL text config with room for a 378-token BPE: with fewer merges the system prompt of Qwen-Image's
# template takes more than the 34 tokens the pipeline drops, and ~90 tokens of it would reach the transformer.
# Hidden size 32 = the teacher's joint_attention_dim.
TEXT_CONFIG = dataclasses.replace(QWEN2_5_VL_TINY, vocab_size=384)
TOKENIZER_VOCAB = 400  # BPE target; it stops at 378 tokens when every word of the corpus is whole
TEXT_SEED = 0

# 3 dual-stream blocks, 2 heads x 32 (width 64) over 64 image tokens of 16 features + 10 text tokens: 0.48 M
# parameters, a ~2 MB export; cheap enough that a 2-step distillation (several teacher, fake-score and student
# passes per turn) fits in minutes on two CPU cores. Width 128 costs ~4x per pass.
TEACHER_CONFIG = QwenImageConfig(num_layers=3, attention_head_dim=32, num_attention_heads=2,
                                 joint_attention_dim=TEXT_CONFIG.hidden_size, in_channels=data.TOKEN_DIM,
                                 out_channels=data.LATENT_CHANNELS, axes_dims_rope=(8, 12, 12))
# XLA's plain attention: at 64 + 10 tokens the CPU default ("chunked") loops over (batch, head) pairs one at a time
ATTENTION_IMPL = "xla"

# Sampling: the students' 2-step list [1, 0.75] is raw [1, 0.5] under shift 3, so the teacher uses shift 3 as well
SHIFT = 3.0
TEACHER_STEPS = 20  # measured (1,000 digits, CFG 3): FD 10 steps 72.5, 20: 80.8, 40: 86.6; recall 0.40, 0.46, 0.47
# measured (20 steps, 1,000 digits): CFG 2: FD 62.8, accuracy 94.9 %; 2.5: 65.7, 96.7 %; 3: 80.8, 97.4 %; 4: 118.7,
# 97.2 %. 2.5 keeps the accuracy within a point of the best and the FD within 5 % of it.
TEACHER_GUIDANCE = 2.5
STUDENT_SIGMAS = (1.0, 0.75)


# --------------------------------------------------------------------------------------------------------------
# Exports
# --------------------------------------------------------------------------------------------------------------

def save_export(model, dst, *, overwrite: bool = False, dtype: str = "keep") -> Path:
    """Write `model` as a turbojax export at `dst` (atomically) through the converter's own path: the model is
    first written as a diffusers/transformers component folder (config.json + safetensors, torch layout) and then
    converted by `turbojax.convert.folders.to_jax`, so `turbojax.models.from_orbax` / `from_diffusers` open it and
    `to-torch` gives diffusers files back."""
    from turbojax.convert.folders import to_jax
    from turbojax.convert.params import export_tensors
    from turbojax.convert.safetensors_io import write_safetensors
    from turbojax.models.registry import config_to_dict, get_family

    fam = get_family(model.family)
    with tempfile.TemporaryDirectory(prefix="turbojax-export-") as tmp:
        src = Path(tmp)
        (src / "config.json").write_text(json.dumps(config_to_dict(fam, model.config), indent=2) + "\n")
        write_safetensors(src / fam.weights_name, dict(export_tensors(model, fam)))
        return to_jax(src, dst, scan_layers=model.scan_layers, dtype=dtype, overwrite=overwrite, progress=False)


def load_teacher(folder=None, *, dtype=jnp.float32, scan_layers: bool | None = None):
    """The teacher transformer (default: the shipped `assets/teacher`)."""
    from turbojax.models import from_orbax
    folder = Path(folder) if folder is not None else ASSETS / "teacher"
    return from_orbax(folder, dtype=dtype, scan_layers=scan_layers, attention_impl=ATTENTION_IMPL, progress=False)


def new_teacher(seed: int = 0, *, scan_layers: bool = True):
    """A randomly initialised teacher (what `scripts/train_digits_teacher.py` starts from)."""
    from turbojax.models import create
    return create(TEACHER_CONFIG, seed=seed, scan_layers=scan_layers, attention_impl=ATTENTION_IMPL)


# --------------------------------------------------------------------------------------------------------------
# Text stream
# --------------------------------------------------------------------------------------------------------------

def make_text_assets(folder=ASSETS, *, overwrite: bool = False) -> None:
    """Create `tokenizer/`, `text_encoder/` and `text_table.npz` under `folder` (used once; the result is shipped)."""
    from turbojax.convert.atomic import commit_file
    from turbojax.models import create
    from turbojax.testing import tiny_qwen_tokenizer

    folder = Path(folder)
    tok_dir = folder / "tokenizer"
    if tok_dir.exists() and any(tok_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{tok_dir} already exists; pass overwrite=True to replace the text assets")
    tok = tiny_qwen_tokenizer(PROMPTS, vocab_size=TOKENIZER_VOCAB)
    if len(tok) > TEXT_CONFIG.vocab_size:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, the text encoder {TEXT_CONFIG.vocab_size}")
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(tok_dir))
    llm = create(TEXT_CONFIG, seed=TEXT_SEED)
    save_export(llm, folder / "text_encoder", overwrite=overwrite)
    _load_text.cache_clear()
    prompt_table.cache_clear()
    emb, mask = encode_prompts(list(PROMPTS) + [NEGATIVE_PROMPT], folder=folder, use_table=False)
    commit_file(folder / "text_table.npz",
                lambda f: np.savez(f, embeds=np.asarray(emb), mask=np.asarray(mask), prompts=np.array(
                    list(PROMPTS) + [NEGATIVE_PROMPT])))
    prompt_table.cache_clear()


@functools.lru_cache(maxsize=2)
def _load_text(folder: str):
    from turbojax.models import from_orbax
    from turbojax.text import load_tokenizer
    tok = load_tokenizer(Path(folder) / "tokenizer")
    llm = from_orbax(Path(folder) / "text_encoder", attention_impl=ATTENTION_IMPL, progress=False)
    return tok, llm


def encode_prompts(prompts: Sequence[str], *, folder=ASSETS, use_table: bool = True):
    """(embeddings `[N, L, 32]` float32, mask `[N, L]` int32) of `prompts` through Qwen-Image's prompt encoding
    (template, system prefix dropped) with the shipped tiny tokenizer and text encoder. L is the table length (the
    longest of the 10 class prompts and "") when every prompt fits in it, so that positive and negative batches
    share one shape; prompts from the table are looked up (`use_table=False` always runs the encoder)."""
    from turbojax.text import encode_qwen_image_prompts
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    table_prompts = list(PROMPTS) + [NEGATIVE_PROMPT]
    if use_table and all(p in table_prompts for p in prompts):
        emb, mask = prompt_table(folder)
        idx = np.array([table_prompts.index(p) for p in prompts])
        return emb[idx], mask[idx]
    tok, llm = _load_text(str(Path(folder)))
    emb, mask = encode_qwen_image_prompts(tok, llm, prompts)
    emb = np.asarray(emb, np.float32)
    mask = np.ones(emb.shape[:2], np.int32) if mask is None else np.asarray(mask, np.int32)
    width = _table_length(folder) if use_table else emb.shape[1]
    if emb.shape[1] < width:
        emb = np.pad(emb, ((0, 0), (0, width - emb.shape[1]), (0, 0)))
        mask = np.pad(mask, ((0, 0), (0, width - mask.shape[1])))
    return emb, mask


def _table_length(folder) -> int:
    return int(prompt_table(folder)[0].shape[1])


@functools.lru_cache(maxsize=2)
def prompt_table(folder=ASSETS) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings `[11, L, 32]`, mask `[11, L]`): rows 0..9 are "the digit c", row 10 (`EMPTY`) is ""."""
    path = Path(folder) / "text_table.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (make it with scripts/train_digits_teacher.py --text-assets)")
    with np.load(path) as z:
        return np.asarray(z["embeds"], np.float32), np.asarray(z["mask"], np.int32)


def class_condition(labels, *, folder=ASSETS) -> tuple[np.ndarray, np.ndarray]:
    """Prompt embeddings and mask for class labels (0..9; 10 = the empty prompt)."""
    labels = np.asarray(labels, np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() > EMPTY):
        raise ValueError(f"labels must lie in 0..{EMPTY} (10 = empty prompt), got {labels.min()}..{labels.max()}")
    emb, mask = prompt_table(folder)
    return emb[labels], mask[labels]


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------

def teacher_sigmas(steps: int = TEACHER_STEPS) -> np.ndarray:
    """`steps + 1` flow-matching sigmas of the shift-3 schedule (diffusers' FlowMatchEulerDiscreteScheduler)."""
    return schedules.SchedulerConfig(shift=SHIFT).sigmas(steps)


def noise(labels_or_n, seed: int) -> jax.Array:
    """Initial packed noise `[N, 64, 16]`: image i gets `key(seed + i)`, so a sample does not depend on the batch
    it is drawn in (image i of a 1,000-image run equals image i of a 10-image run with the same seed)."""
    n = labels_or_n if isinstance(labels_or_n, int) else len(labels_or_n)
    keys = jnp.arange(seed, seed + n, dtype=jnp.uint32)
    return _noise(keys)


@jax.jit
def _noise(seeds):
    return jax.vmap(lambda s: jax.random.normal(jax.random.key(s), (data.NUM_TOKENS, data.TOKEN_DIM)))(seeds)


def _merged(transformer, adapters):
    if not adapters:
        return transformer
    from turbojax import lora
    items = [(adapters, 1.0)] if isinstance(adapters, dict) else list(adapters)
    return lora.apply(transformer, items)


def generate_tokens(transformer, labels, seed: int = 0, sigmas=None, guidance: float = TEACHER_GUIDANCE, *,
                    adapters=None, batch_size: int = 500, x=None) -> np.ndarray:
    """Packed latents `[N, 64, 16]` (float32) for class `labels` with `turbojax.sampling.sample_qwen_image`:
    Euler over `sigmas` (default: the teacher's shift-3 schedule), true CFG `guidance` against the empty prompt
    (off when `guidance <= 1`). `adapters`: a LoRA adapter or `[(adapter, scale), ...]` merged first. `x`: start
    from these latents instead of the seeded noise."""
    labels = np.asarray(labels, np.int64).reshape(-1)
    model = _merged(transformer, adapters)
    s = teacher_sigmas() if sigmas is None else schedules.explicit_sigmas(sigmas)
    x0 = noise(len(labels), seed) if x is None else jnp.asarray(x, jnp.float32)
    emb, mask = class_condition(labels)
    nemb, nmask = class_condition(np.full(len(labels), EMPTY))
    out = []
    for lo in range(0, len(labels), batch_size):
        hi = min(lo + batch_size, len(labels))
        kw = {}
        if guidance > 1:
            kw = dict(negative_prompt_embeds=nemb[lo:hi], negative_prompt_embeds_mask=nmask[lo:hi])
        out.append(np.asarray(sampling.sample_qwen_image(
            model, x0[lo:hi], emb[lo:hi], s, height=data.SAMPLER_SIZE, width=data.SAMPLER_SIZE,
            prompt_embeds_mask=mask[lo:hi], true_cfg_scale=float(guidance), precision="fp32", **kw)))
    return np.concatenate(out)


def generate(transformer, labels, seed: int = 0, sigmas=None, guidance: float = TEACHER_GUIDANCE, adapters=None, *,
             batch_size: int = 500) -> np.ndarray:
    """uint8 digits `[N, 32, 32, 1]` for class `labels` (see `generate_tokens`). The students' 2-step list is
    `sigmas=STUDENT_SIGMAS`; the teacher's default is `teacher_sigmas()` (20 steps, shift 3) with CFG 2.5."""
    tokens = generate_tokens(transformer, labels, seed, sigmas, guidance, adapters=adapters, batch_size=batch_size)
    return data.tokens_to_images(tokens)
