"""Key tables for the Qwen text encoders: our module paths <-> transformers state-dict names.

The canonical names are `Qwen3Model`'s (no prefix): `embed_tokens.weight`, `layers.{i}.self_attn.q_proj.weight`,
..., `norm.weight`. Stored checkpoints use other prefixes, and some hold tensors a text encoder does not need;
`qwen2_5_vl_source_names` / `qwen3_source_names` map stored keys to canonical names before the strict key check:

  Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, Qwen-Image `text_encoder/`):
    * `model.layers.N...`, `model.embed_tokens...`, `model.norm...`: the on-disk layout (the published
      checkpoints, and what transformers 5.x `save_pretrained` still writes: it reverts its renames on save);
    * `model.language_model.layers.N...` etc.: the in-memory module layout of transformers >= 4.52
      (`model.state_dict()`), which some tools save as is;
    * ignored (read never, reported never): the vision tower `visual.*` / `model.visual.*` and `lm_head.*`.
  Qwen3 (Z-Image `text_encoder/`):
    * `Qwen3Model`: no prefix; `Qwen3ForCausalLM`: `model.` prefix;
    * ignored: `lm_head.*` (absent anyway when `tie_word_embeddings` is true).

Every other key passes through unchanged, so an unknown tensor still fails the strict check by name.
"""
from __future__ import annotations

from typing import Iterable

from turbojax.convert.keytable import KeyTable, Module, linear_modules
from turbojax.convert.params import Source


def _layer(qk_norm: bool) -> tuple[Module, ...]:
    t = "layers.{i}."
    rows = linear_modules([
        ("self_attn.q_proj", t + "self_attn.q_proj"),
        ("self_attn.k_proj", t + "self_attn.k_proj"),
        ("self_attn.v_proj", t + "self_attn.v_proj"),
        ("self_attn.o_proj", t + "self_attn.o_proj"),
        ("mlp.gate", t + "mlp.gate_proj"),
        ("mlp.up", t + "mlp.up_proj"),
        ("mlp.down", t + "mlp.down_proj"),
    ]) + (Module("input_layernorm", t + "input_layernorm", "norm"),
          Module("post_attention_layernorm", t + "post_attention_layernorm", "norm"))
    if qk_norm:
        rows += (Module("self_attn.q_norm", t + "self_attn.q_norm", "norm"),
                 Module("self_attn.k_norm", t + "self_attn.k_norm", "norm"))
    return rows


def _table(qk_norm: bool) -> KeyTable:
    return KeyTable(top=(Module("embed_tokens.embedding", "embed_tokens.weight", "param"),
                         Module("norm", "norm", "norm")),
                    stacks={"layers": _layer(qk_norm)})


QWEN2_5_VL_KEYS = _table(qk_norm=False)
QWEN3_KEYS = _table(qk_norm=True)

# stored-key prefixes of the language model, longest first; and prefixes of tensors a text encoder never loads
QWEN2_5_VL_PREFIXES = ("model.language_model.", "model.")
QWEN2_5_VL_IGNORED = ("visual.", "model.visual.", "lm_head.")
QWEN3_PREFIXES = ("model.",)
QWEN3_IGNORED = ("lm_head.",)


def stack_sizes(cfg) -> dict[str, int]:
    return {"layers": cfg.num_hidden_layers}


def _source_names(keys: Iterable[str], prefixes: tuple[str, ...], ignored: tuple[str, ...]) -> dict[str, Source]:
    out: dict[str, Source] = {}
    for stored in keys:
        if stored.startswith(ignored):
            continue
        name = next((stored[len(p):] for p in prefixes if stored.startswith(p)), stored)
        if name in out:  # e.g. `model.layers.0.x` and `model.language_model.layers.0.x` in one checkpoint
            raise ValueError(f"checkpoint keys {out[name].key!r} and {stored!r} both give {name!r}")
        out[name] = Source(stored)
    return out


def qwen2_5_vl_source_names(keys: Iterable[str]) -> dict[str, Source]:
    """{canonical name: Source} for a Qwen2.5-VL checkpoint (either naming variant); vision tower and lm_head
    tensors are left out on purpose."""
    return _source_names(keys, QWEN2_5_VL_PREFIXES, QWEN2_5_VL_IGNORED)


def qwen3_source_names(keys: Iterable[str]) -> dict[str, Source]:
    """{canonical name: Source} for a `Qwen3Model` / `Qwen3ForCausalLM` checkpoint; lm_head is left out."""
    return _source_names(keys, QWEN3_PREFIXES, QWEN3_IGNORED)
