"""Qwen-Image key table: our module paths <-> diffusers `QwenImageTransformer2DModel` state-dict names.

ComfyUI / DiffSynth "original" checkpoints use the same names, optionally prefixed `model.diffusion_model.`.
"""
from turbojax.convert.keytable import KeyTable, Module, linear_modules

_BLOCK = linear_modules([
    ("img_mod", "transformer_blocks.{i}.img_mod.1"),
    ("txt_mod", "transformer_blocks.{i}.txt_mod.1"),
    ("attn.to_q", "transformer_blocks.{i}.attn.to_q"),
    ("attn.to_k", "transformer_blocks.{i}.attn.to_k"),
    ("attn.to_v", "transformer_blocks.{i}.attn.to_v"),
    ("attn.add_q_proj", "transformer_blocks.{i}.attn.add_q_proj"),
    ("attn.add_k_proj", "transformer_blocks.{i}.attn.add_k_proj"),
    ("attn.add_v_proj", "transformer_blocks.{i}.attn.add_v_proj"),
    ("attn.to_out", "transformer_blocks.{i}.attn.to_out.0"),
    ("attn.to_add_out", "transformer_blocks.{i}.attn.to_add_out"),
    ("img_mlp.fc1", "transformer_blocks.{i}.img_mlp.net.0.proj"),
    ("img_mlp.fc2", "transformer_blocks.{i}.img_mlp.net.2"),
    ("txt_mlp.fc1", "transformer_blocks.{i}.txt_mlp.net.0.proj"),
    ("txt_mlp.fc2", "transformer_blocks.{i}.txt_mlp.net.2"),
]) + tuple(Module(f"attn.{n}", f"transformer_blocks.{{i}}.attn.{n}", "norm")
           for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))

QWEN_IMAGE_KEYS = KeyTable(
    top=linear_modules([
        ("img_in", "img_in"),
        ("txt_in", "txt_in"),
        ("time_linear_1", "time_text_embed.timestep_embedder.linear_1"),
        ("time_linear_2", "time_text_embed.timestep_embedder.linear_2"),
        ("norm_out", "norm_out.linear"),
        ("proj_out", "proj_out"),
    ]) + (Module("txt_norm", "txt_norm", "norm"),),
    stacks={"transformer_blocks": _BLOCK},
)
