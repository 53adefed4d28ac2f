"""Key tables of the two VAEs: our module paths <-> diffusers state-dict names.

Our module trees mirror diffusers' names, so most rows map a path to itself; the exceptions are written out
(`resample.1`, `to_out.0`). The rows depend on the config (number of levels and blocks), so the tables are
`BuiltKeyTable`s fed by `structure(config)` of each model module. Rows that exist only for some configs or
levels (shortcut convs, temporal convs, resamplers, mid attention, quant convs) are optional: they are skipped when
the model lacks them, and the strict checks still catch any tensor left over on either side.
"""
from __future__ import annotations

from turbojax.convert.keytable import BuiltKeyTable, KeyTable, Module


def _same(path: str, kind: str, optional: bool = False) -> Module:
    return Module(path, path, kind, optional)


# ---- AutoencoderKLQwenImage --------------------------------------------------------------------------------------

def _qwen_residual(p: str) -> list[Module]:
    return [_same(f"{p}.norm1.gamma", "param"), _same(f"{p}.conv1", "conv3d"),
            _same(f"{p}.norm2.gamma", "param"), _same(f"{p}.conv2", "conv3d"),
            _same(f"{p}.conv_shortcut", "conv3d", optional=True)]


def _qwen_resample(p: str) -> list[Module]:
    return [Module(f"{p}.resample", f"{p}.resample.1", "conv2d"), _same(f"{p}.time_conv", "conv3d", optional=True)]


def _qwen_mid(p: str) -> list[Module]:
    a = f"{p}.attentions.0"
    return (_qwen_residual(f"{p}.resnets.0") + _qwen_residual(f"{p}.resnets.1")
            + [_same(f"{a}.norm.gamma", "param"), _same(f"{a}.to_qkv", "conv2d"), _same(f"{a}.proj", "conv2d")])


def qwen_image_vae_table(sizes: dict) -> KeyTable:
    levels, n = sizes["levels"], sizes["num_res_blocks"]
    rows = [_same("encoder.conv_in", "conv3d")]
    idx = 0
    for level in range(levels):
        for _ in range(n):
            rows += _qwen_residual(f"encoder.down_blocks.{idx}")
            idx += 1
        if level != levels - 1:
            rows += _qwen_resample(f"encoder.down_blocks.{idx}")
            idx += 1
    rows += _qwen_mid("encoder.mid_block")
    rows += [_same("encoder.norm_out.gamma", "param"), _same("encoder.conv_out", "conv3d"),
             _same("quant_conv", "conv3d"), _same("post_quant_conv", "conv3d"),
             _same("decoder.conv_in", "conv3d")]
    rows += _qwen_mid("decoder.mid_block")
    for level in range(levels):
        for r in range(n + 1):
            rows += _qwen_residual(f"decoder.up_blocks.{level}.resnets.{r}")
        if level != levels - 1:
            rows += _qwen_resample(f"decoder.up_blocks.{level}.upsamplers.0")
    rows += [_same("decoder.norm_out.gamma", "param"), _same("decoder.conv_out", "conv3d")]
    return KeyTable(top=tuple(rows), stacks={})


QWEN_IMAGE_VAE_KEYS = BuiltKeyTable(qwen_image_vae_table)


# ---- AutoencoderKL (FLUX / Z-Image) ------------------------------------------------------------------------------

def _kl_resnet(p: str) -> list[Module]:
    return [_same(f"{p}.norm1", "groupnorm"), _same(f"{p}.conv1", "conv2d"),
            _same(f"{p}.norm2", "groupnorm"), _same(f"{p}.conv2", "conv2d"),
            _same(f"{p}.conv_shortcut", "conv2d", optional=True)]


def _kl_mid(p: str) -> list[Module]:
    a = f"{p}.attentions.0"
    attn = [_same(f"{a}.group_norm", "groupnorm", optional=True)]
    attn += [_same(f"{a}.{n}", "linear", optional=True) for n in ("to_q", "to_k", "to_v")]
    attn += [Module(f"{a}.to_out", f"{a}.to_out.0", "linear", optional=True)]
    return _kl_resnet(f"{p}.resnets.0") + _kl_resnet(f"{p}.resnets.1") + attn


def autoencoder_kl_table(sizes: dict) -> KeyTable:
    levels, n = sizes["levels"], sizes["layers_per_block"]
    rows = [_same("encoder.conv_in", "conv2d")]
    for level in range(levels):
        rows += [m for j in range(n) for m in _kl_resnet(f"encoder.down_blocks.{level}.resnets.{j}")]
        if level != levels - 1:
            rows.append(_same(f"encoder.down_blocks.{level}.downsamplers.0.conv", "conv2d"))
    rows += _kl_mid("encoder.mid_block")
    rows += [_same("encoder.conv_norm_out", "groupnorm"), _same("encoder.conv_out", "conv2d"),
             _same("quant_conv", "conv2d", optional=True), _same("post_quant_conv", "conv2d", optional=True),
             _same("decoder.conv_in", "conv2d")]
    rows += _kl_mid("decoder.mid_block")
    for level in range(levels):
        rows += [m for j in range(n + 1) for m in _kl_resnet(f"decoder.up_blocks.{level}.resnets.{j}")]
        if level != levels - 1:
            rows.append(_same(f"decoder.up_blocks.{level}.upsamplers.0.conv", "conv2d"))
    rows += [_same("decoder.conv_norm_out", "groupnorm"), _same("decoder.conv_out", "conv2d")]
    return KeyTable(top=tuple(rows), stacks={})


AUTOENCODER_KL_KEYS = BuiltKeyTable(autoencoder_kl_table)
