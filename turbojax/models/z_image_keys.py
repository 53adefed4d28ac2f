"""Z-Image key table: our module paths <-> diffusers `ZImageTransformer2DModel` state-dict names, plus the rename
/ split step that lets the loader read the *original* (non-diffusers) Z-Image checkpoint names.

Original names (Tongyi-MAI release, ComfyUI single files), as mapped by diffusers'
`convert_z_image_transformer_checkpoint_to_diffusers` (architectures.md §2.7):
  * prefix `model.diffusion_model.` (or `diffusion_model.`) stripped;
  * `x_embedder.` -> `all_x_embedder.2-1.`, `final_layer.` -> `all_final_layer.2-1.`;
  * in blocks: `attention.out.` -> `attention.to_out.0.`, `attention.q_norm.` / `k_norm.` -> `norm_q.` / `norm_k.`,
    fused `attention.qkv.*` split in 3 equal row blocks along dim 0 -> `to_q`, `to_k`, `to_v`;
  * `norm_final.weight` (an unused tensor) dropped.
`original_to_diffusers(keys)` turns that into data: {diffusers name: Source(stored key, row block)}; the loader
applies it before the strict key check with `source_reader`, so nothing is renamed silently or dropped unseen.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from turbojax.convert.keytable import KeyTable, Module, linear_modules
from turbojax.convert.params import ORIGINAL_PREFIXES, Source

STACKS = ("noise_refiner", "context_refiner", "layers")
_MODULATED = {"noise_refiner": True, "context_refiner": False, "layers": True}


def _block(stack: str) -> tuple[Module, ...]:
    t = f"{stack}.{{i}}."
    rows = linear_modules([
        ("attention.to_q", t + "attention.to_q"),
        ("attention.to_k", t + "attention.to_k"),
        ("attention.to_v", t + "attention.to_v"),
        ("attention.to_out", t + "attention.to_out.0"),
        ("feed_forward.gate", t + "feed_forward.w1"),
        ("feed_forward.down", t + "feed_forward.w2"),
        ("feed_forward.up", t + "feed_forward.w3"),
    ]) + tuple(Module(n, t + n, "norm") for n in (
        "attention.norm_q", "attention.norm_k", "attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"))
    if _MODULATED[stack]:  # context_refiner blocks have no adaLN_modulation
        rows += (Module("adaLN_modulation", t + "adaLN_modulation.0", "linear"),)
    return rows


Z_IMAGE_KEYS = KeyTable(
    top=linear_modules([
        ("x_embedder", "all_x_embedder.2-1"),
        ("cap_embedder", "cap_embedder.1"),
        ("time_linear_1", "t_embedder.mlp.0"),
        ("time_linear_2", "t_embedder.mlp.2"),
        ("final_mod", "all_final_layer.2-1.adaLN_modulation.1"),
        ("final_linear", "all_final_layer.2-1.linear"),
    ]) + (
        Module("cap_norm", "cap_embedder.0", "norm"),
        Module("x_pad_token", "x_pad_token", "param"),
        Module("cap_pad_token", "cap_pad_token", "param"),
    ),
    stacks={s: _block(s) for s in STACKS},
)


def stack_sizes(cfg) -> dict[str, int]:
    return {"noise_refiner": cfg.n_refiner_layers, "context_refiner": cfg.n_refiner_layers, "layers": cfg.n_layers}


# ----------------------------------------------------------------------------------------------------------------
# Original checkpoint names

ORIGINAL_TOP_RENAMES = {"x_embedder.": "all_x_embedder.2-1.", "final_layer.": "all_final_layer.2-1."}
ORIGINAL_BLOCK_RENAMES = {"attention.out.": "attention.to_out.0.", "attention.q_norm.": "attention.norm_q.",
                          "attention.k_norm.": "attention.norm_k."}
ORIGINAL_BLOCK_FUSED = {"attention.qkv.": ("attention.to_q.", "attention.to_k.", "attention.to_v.")}
ORIGINAL_DROPPED = frozenset({"norm_final.weight"})
_BLOCK_KEY = re.compile(r"(" + "|".join(STACKS) + r")\.(\d+)\.(.+)")


def _replace_prefix(name: str, table: Mapping[str, str]) -> str | None:
    for old, new in table.items():
        if name.startswith(old):
            return new + name[len(old):]
    return None


def original_to_diffusers(keys: Iterable[str]) -> dict[str, Source]:
    """{diffusers state-dict name: Source} for the tensors stored under `keys`.

    Accepts diffusers names, original names, or a mix, with or without a `model.diffusion_model.` /
    `diffusion_model.` prefix on every key. Diffusers names map to themselves; unknown names are passed through
    unchanged (the strict key check then reports them); `norm_final.weight` is dropped. Raises ValueError if two
    stored tensors would provide the same diffusers name (e.g. a fused qkv and a separate to_q).
    """
    keys = list(keys)
    prefix = next((p for p in ORIGINAL_PREFIXES if keys and all(k.startswith(p) for k in keys)), "")
    out: dict[str, Source] = {}

    def put(name: str, src: Source):
        if name in out:
            raise ValueError(f"checkpoint keys {out[name].key!r} and {src.key!r} both give {name!r}")
        out[name] = src

    for stored in keys:
        name = stored[len(prefix):]
        if name in ORIGINAL_DROPPED:
            continue
        m = _BLOCK_KEY.fullmatch(name)
        if m is None:
            put(_replace_prefix(name, ORIGINAL_TOP_RENAMES) or name, Source(stored))
            continue
        head, local = f"{m.group(1)}.{m.group(2)}.", m.group(3)
        fused = next(((old, new) for old, new in ORIGINAL_BLOCK_FUSED.items() if local.startswith(old)), None)
        if fused is not None:
            old, targets = fused
            for part, new in enumerate(targets):
                put(head + new + local[len(old):], Source(stored, part, len(targets)))
            continue
        put(head + (_replace_prefix(local, ORIGINAL_BLOCK_RENAMES) or local), Source(stored))
    return out
