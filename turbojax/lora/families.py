"""Per-model tables of the Linear modules a LoRA may target, in diffusers module names.

A `LoraFamily` is pure data: the LoRA reader uses it to validate module names, to rebuild dotted names from kohya's
flattened ones (an exact reverse table, no underscore heuristics), and to map a trainer's "original" module names
onto diffusers names. Adding a model means adding one entry to `FAMILIES`.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class LoraFamily:
    """Valid LoRA targets of one model family.

    blocks:      block container (e.g. "transformer_blocks") -> module names local to one block; full names are
                 `f"{container}.{i}.{local}"` for any block index i (the layer count comes from the file or from
                 `module_shapes`, so one table serves every model size).
    top_level:   module names outside the blocks.
    block_aliases / top_aliases: alternative names some trainers use -> the diffusers name (one to one).
    block_fused: an alternative local name of a fused projection -> the diffusers modules it stands for; its
                 down is shared and its up splits into equal row chunks, in that order.
    """
    name: str
    blocks: Mapping[str, tuple[str, ...]]
    top_level: tuple[str, ...]
    block_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    top_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    block_fused: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        block_locals = {loc for locs in self.blocks.values() for loc in locs}
        # peft matches a `target_modules` entry t against module k by `k == t or k.endswith("." + t)`; if a
        # top-level name were a dotted suffix of a block module, the target list we write would over-match.
        for t in self.top_level:
            for loc in block_locals:
                if loc == t or loc.endswith("." + t):
                    raise ValueError(f"{self.name}: top-level module {t!r} is a suffix of block module {loc!r}")
        for c in self.blocks:
            for other in self.blocks:
                if other != c and other.startswith(c + "_"):
                    raise ValueError(f"{self.name}: block container {other!r} is ambiguous with {c!r} in kohya names")
        for alias, targets in {**self.block_aliases, **self.block_fused}.items():
            for t in (targets,) if isinstance(targets, str) else targets:
                if t not in block_locals:
                    raise ValueError(f"{self.name}: alias {alias!r} points at unknown block module {t!r}")
        for alias, t in self.top_aliases.items():
            if t not in self.top_level:
                raise ValueError(f"{self.name}: alias {alias!r} points at unknown top-level module {t!r}")

    # --- name resolution -------------------------------------------------------------------------------------
    def split_block(self, name: str) -> tuple[str, int, str] | None:
        """`"transformer_blocks.3.attn.to_q"` -> `("transformer_blocks", 3, "attn.to_q")`, else None."""
        m = re.fullmatch(r"(.+?)\.(\d+)\.(.+)", name)
        if m and m.group(1) in self.blocks:
            return m.group(1), int(m.group(2)), m.group(3)
        return None

    def is_module(self, name: str) -> bool:
        """True for a diffusers module name of this family (any block index)."""
        if name in self.top_level:
            return True
        parts = self.split_block(name)
        return parts is not None and parts[2] in self.blocks[parts[0]]

    def resolve(self, name: str) -> tuple[str, ...] | None:
        """Map a dotted module name as found in a file to the diffusers module(s) it stands for (None: unknown).

        One name for a plain or aliased module; several for a fused projection (up rows split in this order).
        """
        if name in self.top_level:
            return (name,)
        if name in self.top_aliases:
            return (self.top_aliases[name],)
        parts = self.split_block(name)
        if parts is None:
            return None
        container, i, local = parts
        prefix = f"{container}.{i}."
        valid = self.blocks[container]
        if local in valid:
            return (name,)
        target = self.block_aliases.get(local)
        if target is not None and target in valid:
            return (prefix + target,)
        fused = self.block_fused.get(local)
        if fused is not None and all(t in valid for t in fused):
            return tuple(prefix + t for t in fused)
        return None

    def unflatten_kohya(self, flat: str) -> str | None:
        """Rebuild the dotted name from kohya's `name.replace(".", "_")` by exact table lookup (None: unknown).

        The flattened forms of all known names (aliases included) are distinct, so the inverse is exact; a
        heuristic underscore splitter would have to guess which underscores belong to a name like `to_add_out`.
        """
        top = _flat_table(tuple(self.top_level), tuple(self.top_aliases.items()))
        if flat in top:
            return top[flat]
        for container, locals_ in self.blocks.items():
            m = re.fullmatch(re.escape(container) + r"_(\d+)_(.+)", flat)
            if m is None:
                continue
            extra = tuple(self.block_aliases.items()) + tuple((k, v[0]) for k, v in self.block_fused.items())
            local = _flat_table(tuple(locals_), extra).get(m.group(2))
            if local is not None:
                return f"{container}.{m.group(1)}.{local}"
        return None


@functools.lru_cache(maxsize=None)
def _flat_table(names: tuple[str, ...], aliases: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    """{flattened name: dotted name} for `names`, plus (alias, target) pairs whose flattening is new.

    An alias that flattens like its own target (e.g. "attention.to.q" -> "attention_to_q") adds nothing; one that
    flattens like a *different* module would make the inverse ambiguous and is rejected.
    """
    table: dict[str, str] = {}
    for n in names:
        flat = n.replace(".", "_")
        if flat in table:
            raise ValueError(f"module names {table[flat]!r} and {n!r} both flatten to {flat!r}")
        table[flat] = n
    for alias, target in aliases:
        flat = alias.replace(".", "_")
        if flat not in table:
            table[flat] = alias
        elif table[flat] not in (alias, target):
            raise ValueError(f"alias {alias!r} flattens like unrelated module {table[flat]!r}")
    return table


QWEN_IMAGE = LoraFamily(
    name="qwen_image",
    blocks={"transformer_blocks": (
        "img_mod.1", "txt_mod.1",
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    )},
    top_level=(
        "img_in", "txt_in", "proj_out", "norm_out.linear",
        "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    ),
)

_Z_BLOCK = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")

Z_IMAGE = LoraFamily(
    name="z_image",
    # context_refiner blocks are unmodulated: no adaLN_modulation
    blocks={"layers": _Z_BLOCK + ("adaLN_modulation.0",),
            "noise_refiner": _Z_BLOCK + ("adaLN_modulation.0",),
            "context_refiner": _Z_BLOCK},
    top_level=(
        "all_x_embedder.2-1", "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1",
        "t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1",
    ),
    # Original Z-Image checkpoint names (ComfyUI / kohya LoRAs trained on them), and the "to.q" spelling some
    # trainers emit after splitting every underscore.
    block_aliases={"attention.out": "attention.to_out.0",
                   "attention.to.q": "attention.to_q", "attention.to.k": "attention.to_k",
                   "attention.to.v": "attention.to_v"},
    top_aliases={"x_embedder": "all_x_embedder.2-1", "final_layer.linear": "all_final_layer.2-1.linear",
                 "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1"},
    block_fused={"attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v")},
)

FAMILIES: dict[str, LoraFamily] = {f.name: f for f in (QWEN_IMAGE, Z_IMAGE)}


def get_family(family: str | LoraFamily) -> LoraFamily:
    if isinstance(family, LoraFamily):
        return family
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown LoRA family {family!r}; known: {sorted(FAMILIES)}") from None
