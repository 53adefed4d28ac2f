"""Key table for DINOv2 (`Dinov2Model` and `Dinov2WithRegistersModel`): our module paths <-> checkpoint names.

The canonical names are the on-disk layout: the published facebook/dinov2-* checkpoints, and what transformers
5.x `save_pretrained` still writes (it reverts its in-memory renames on save):
  `embeddings.{cls_token, mask_token, position_embeddings, register_tokens}`,
  `embeddings.patch_embeddings.projection`, `encoder.layer.N.{norm1, norm2, layer_scale1.lambda1, ...}`,
  `encoder.layer.N.attention.attention.{query, key, value}`, `encoder.layer.N.attention.output.dense`,
  `encoder.layer.N.mlp.{fc1, fc2}` or, SwiGLU (giant), the fused `mlp.weights_in` / `mlp.weights_out`,
  `layernorm`.
`dinov2_source_names` also reads transformers 5.x's in-memory names (`attention.q_proj`, ..., `mlp.down_proj`),
which some tools save as they are. Their SwiGLU split into `gate_proj` / `up_proj` cannot be fused back through a
key table and is refused with a message.
"""
from __future__ import annotations

from typing import Iterable

from turbojax.convert.keytable import KeyTable, Module
from turbojax.convert.params import Source

_T = "encoder.layer.{i}."

DINOV2_KEYS = KeyTable(
    top=(Module("embeddings.cls_token", "embeddings.cls_token", "param"),
         Module("embeddings.mask_token", "embeddings.mask_token", "param", optional=True),  # use_mask_token
         Module("embeddings.position_embeddings", "embeddings.position_embeddings", "param"),
         Module("embeddings.register_tokens", "embeddings.register_tokens", "param", optional=True),  # registers
         Module("embeddings.patch_embeddings", "embeddings.patch_embeddings.projection", "conv2d"),
         Module("layernorm", "layernorm", "groupnorm")),
    stacks={"layers": (
        Module("norm1", _T + "norm1", "groupnorm"),
        Module("attention.q_proj", _T + "attention.attention.query", "linear"),
        Module("attention.k_proj", _T + "attention.attention.key", "linear"),
        Module("attention.v_proj", _T + "attention.attention.value", "linear"),
        Module("attention.o_proj", _T + "attention.output.dense", "linear"),
        Module("layer_scale1.lambda1", _T + "layer_scale1.lambda1", "param"),
        Module("norm2", _T + "norm2", "groupnorm"),
        # one of the two MLP kinds exists (use_swiglu_ffn)
        Module("mlp.fc1", _T + "mlp.fc1", "linear", optional=True),
        Module("mlp.fc2", _T + "mlp.fc2", "linear", optional=True),
        Module("mlp.weights_in", _T + "mlp.weights_in", "linear", optional=True),
        Module("mlp.weights_out", _T + "mlp.weights_out", "linear", optional=True),
        Module("layer_scale2.lambda1", _T + "layer_scale2.lambda1", "param"),
    )},
)

# transformers 5.x in-memory names -> on-disk names (inside `encoder.layer.N.`)
_IN_MEMORY = {"attention.q_proj.": "attention.attention.query.", "attention.k_proj.": "attention.attention.key.",
              "attention.v_proj.": "attention.attention.value.", "attention.o_proj.": "attention.output.dense.",
              "mlp.down_proj.": "mlp.weights_out."}


def stack_sizes(cfg) -> dict[str, int]:
    return {"layers": cfg.num_hidden_layers}


def dinov2_source_names(keys: Iterable[str]) -> dict[str, Source]:
    """{canonical name: Source} for a DINOv2 checkpoint in the on-disk or the in-memory naming."""
    out: dict[str, Source] = {}
    for stored in keys:
        name = stored
        if stored.startswith("encoder.layer."):
            idx, _, rest = stored[len("encoder.layer."):].partition(".")
            if rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                raise ValueError(f"checkpoint key {stored!r}: a SwiGLU split into gate_proj / up_proj (transformers' "
                                 "in-memory names) is not supported; save the model with save_pretrained, which "
                                 "writes the fused mlp.weights_in")
            for new, old in _IN_MEMORY.items():
                if rest.startswith(new):
                    name = f"encoder.layer.{idx}.{old}{rest[len(new):]}"
                    break
        if name in out:
            raise ValueError(f"checkpoint keys {out[name].key!r} and {stored!r} both give {name!r}")
        out[name] = Source(stored)
    return out
