"""Prompt encoding for the text-to-image pipelines, mirroring diffusers (shared docs `architectures.md` §4).

    tok = load_tokenizer(pipeline / "tokenizer")
    llm = turbojax.models.from_diffusers(pipeline / "text_encoder", dtype=jnp.bfloat16)
    embeds, mask = encode_qwen_image_prompts(tok, llm, ["a cat", " "])      # Qwen-Image
    caps = encode_z_image_prompts(tok, llm, ["a cat"])                       # Z-Image: list of [L_i, 2560]

What the functions reproduce (diffusers 0.42 `QwenImagePipeline.encode_prompt` / `_get_qwen_prompt_embeds` and
`ZImagePipeline._encode_prompt`):
  * Qwen-Image: system template, tokenizer(max_length=1024 + 34, padding=True, truncation=True), the LLM's last
    hidden state *after* its final norm, valid tokens only, the first 34 (system prompt + user header) dropped,
    re-padded with zeros to the longest prompt, cut to `max_sequence_length`; an all-ones mask becomes None;
  * Z-Image: chat template (`enable_thinking=True`), tokenizer(padding="max_length", max_length=
    max_sequence_length, truncation=True), `hidden_states[-2]` (second-to-last layer, before any norm), valid
    tokens only, one array per prompt.

Two things are done differently on purpose, without changing any result:
  * the LLM runs on fewer, bucketed columns: with right padding (the Qwen tokenizers' default) and causal
    attention, output i depends only on tokens <= i, so columns past the longest prompt (or past what is kept)
    are cut, and the rest is padded right to a multiple of `bucket` so that one compiled shape serves many prompt
    lengths; positions are 0..S-1 either way, so extra right padding never moves a real token;
  * truncated prompts are reported with a `PromptTruncationWarning` naming how many tokens were dropped
    (diffusers truncates silently; for Qwen-Image it also cuts the closing `<|im_end|>` / assistant tokens).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n")
QWEN_IMAGE_DROP_IDX = 34            # template tokens before the prompt (system prompt + "user" header)
QWEN_IMAGE_TOKENIZER_MAX_LENGTH = 1024
SEQ_BUCKET = 64                     # LLM sequence lengths are padded to a multiple of this


class PromptTruncationWarning(UserWarning):
    """A prompt was longer than the text encoder keeps; the message says how many tokens were dropped."""


def load_tokenizer(folder):
    """A pipeline's tokenizer folder (e.g. `<pipeline>/tokenizer`), from local files only."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(Path(folder)), local_files_only=True)


def _prompt_list(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    return prompts


def _token_counts(tokenizer, texts: Sequence[str]) -> list[int]:
    """Untruncated token counts (what the pipeline's tokenizer call would produce without truncation)."""
    ids = tokenizer(list(texts), truncation=False, padding=False, verbose=False)["input_ids"]
    return [len(x) for x in ids]


def _is_right_padded(mask: np.ndarray) -> bool:
    """Every row is ones followed by zeros."""
    return bool(np.all(np.diff(mask.astype(np.int8), axis=1) <= 0))


def _run_llm(llm, tokenizer, ids: np.ndarray, mask: np.ndarray, *, keep_cols: int, hidden_index: int | None,
             bucket: int):
    """The LLM's hidden state `[B, S', D]` for tokenized `ids`/`mask` (`hidden_index` None: after the final
    norm, else transformers' `hidden_states[hidden_index]`). Only the first `keep_cols` columns of the result
    are meaningful to the caller; S' may differ from S (see the module docstring)."""
    ids, mask = ids.astype(np.int32), mask.astype(np.int32)
    if _is_right_padded(mask):
        cols = min(int(mask.sum(axis=1).max()), keep_cols)
        ids, mask = ids[:, :cols], mask[:, :cols]
    # Left-padded batches keep all columns: cutting would drop real tokens. Extra right padding is harmless either
    # way (positions are 0..S-1 and no real token attends to later columns).
    target = max(bucket, -(-ids.shape[1] // bucket) * bucket) if bucket > 0 else ids.shape[1]
    pad = target - ids.shape[1]
    if pad:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (0, pad)))
    if hidden_index is None:
        return llm(ids, mask).last_hidden_state
    return llm(ids, mask, output_hidden_states=[hidden_index]).hidden_states[hidden_index]


def encode_qwen_image_prompts(tokenizer, llm, prompts, max_sequence_length: int = 512, *,
                              bucket: int = SEQ_BUCKET):
    """Qwen-Image prompt embeddings: `(prompt_embeds [B, L, hidden], mask [B, L] int32 or None)`.

    Same values as diffusers' `QwenImagePipeline.encode_prompt(prompt, max_sequence_length=...)` with one image
    per prompt (L = min(longest prompt, max_sequence_length); mask None when no prompt is padded).
    """
    prompts = _prompt_list(prompts)
    drop, limit = QWEN_IMAGE_DROP_IDX, QWEN_IMAGE_TOKENIZER_MAX_LENGTH + QWEN_IMAGE_DROP_IDX
    texts = [QWEN_IMAGE_TEMPLATE.format(p) for p in prompts]
    for i, n in enumerate(_token_counts(tokenizer, texts)):
        available = max(n - drop, 0)
        kept = min(max(min(n, limit) - drop, 0), max_sequence_length)
        if kept < available:
            warnings.warn(
                f"Qwen-Image prompt {i} is {available} tokens long (template included, system prompt excluded) but "
                f"the text encoder keeps {kept} (tokenizer limit {limit - drop}, max_sequence_length "
                f"{max_sequence_length}): the last {available - kept} tokens were dropped, including the closing "
                "<|im_end|>/assistant tokens", PromptTruncationWarning, stacklevel=2)
    enc = tokenizer(texts, max_length=limit, padding=True, truncation=True, return_tensors="np")
    ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
    hidden = _run_llm(llm, tokenizer, ids, mask, keep_cols=drop + max_sequence_length, hidden_index=None,
                      bucket=bucket)

    # diffusers: each prompt's valid rows (in order), minus the first `drop`, zero-padded to the longest, then cut
    valid = [np.flatnonzero(row)[drop:] for row in mask]
    length = min(max(len(v) for v in valid), max_sequence_length)
    index = np.zeros((len(prompts), length), np.int32)
    keep = np.zeros((len(prompts), length), bool)
    for b, v in enumerate(valid):
        n = min(len(v), length)
        index[b, :n], keep[b, :n] = v[:n], True
    embeds = jnp.take_along_axis(hidden, jnp.asarray(index)[..., None], axis=1)
    embeds = jnp.where(jnp.asarray(keep)[..., None], embeds, jnp.zeros((), embeds.dtype))
    return embeds, (None if keep.all() else jnp.asarray(keep, jnp.int32))


def encode_z_image_prompts(tokenizer, llm, prompts, max_sequence_length: int = 512, *,
                           bucket: int = SEQ_BUCKET) -> list:
    """Z-Image caption features: one `[L_i, hidden]` array per prompt (its valid tokens only).

    Same values as diffusers' `ZImagePipeline._encode_prompt(prompt, max_sequence_length=...)`.
    """
    prompts = _prompt_list(prompts)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=True) for p in prompts]
    for i, n in enumerate(_token_counts(tokenizer, texts)):
        if n > max_sequence_length:
            warnings.warn(
                f"Z-Image prompt {i} is {n} tokens long (chat template included) but max_sequence_length is "
                f"{max_sequence_length}: the last {n - max_sequence_length} tokens were dropped, including the "
                "closing chat-template tokens", PromptTruncationWarning, stacklevel=2)
    enc = tokenizer(texts, padding="max_length", max_length=max_sequence_length, truncation=True,
                    return_tensors="np")
    ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
    hidden = _run_llm(llm, tokenizer, ids, mask, keep_cols=max_sequence_length, hidden_index=-2, bucket=bucket)
    return [hidden[b, jnp.asarray(np.flatnonzero(row))] for b, row in enumerate(mask)]
