"""The DINOv2 discriminator of `gan.features = "dino"` in the AOT plan: the frozen DINOv2 and the family's VAE built
abstractly at full size (no weights), then the same `dino_disc.assemble` as the real loader (`dino_disc.load`).

Which DINOv2: `--dino PRESET` (`dinov2-small|base|large|giant`, or `dinov2-with-registers-*`); else the config of
an existing `gan.dino` folder (read with the reader `dino_disc.check_config` uses); else `DEFAULT`. The default is
ViT-S/14: the shared docs leave Wuli's DINOv2 unstated (`distillation.md`: "DINO feature-extractor discriminator:
UNVERIFIED"), ADD's discriminator reads a DINOv2 ViT-S, and the shipped configs name `dinov2-small` as the example
`gan.dino`. The VAE is the family's (`VAE_PRESETS`): the one whose latent channels match the base's, so the full
presets go with the full bases and the tiny ones with the tiny test bases.

Dtypes and settings follow `dino_disc.load`: DINOv2 in the config dtype with `cfg.scan_layers`, no remat; the VAE in
fp32. Attention: the plan's `--attention` for both (in a run they take `cfg.attention_impl` / "auto", which on a
TPU mesh is splash, the plan's default).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from turbojax.plan.topology import PlanError

DEFAULT = "dinov2-small"
# per family: the VAE presets, the full one first (Z-Image decodes with the FLUX.1 AutoencoderKL)
VAE_PRESETS = {"qwen_image": ("qwen_image_vae", "qwen_image_vae_tiny"), "z_image": ("flux_vae", "flux_vae_tiny")}


@dataclasses.dataclass
class PlannedDino:
    loaded: object  # dino_disc.LoadedDino, for methods.build(..., dino=)
    info: dict      # what the plan reports


def wanted(cfg) -> bool:
    """Whether the config's method runs the DINO GAN (the condition `methods.build` uses)."""
    gan = cfg.get("gan")
    return gan is not None and gan.get("features") == "dino" and float(gan.get("weight", 0.0)) > 0


def _presets() -> dict:
    from turbojax.models import dinov2
    return {**dinov2.DINOV2_PRESETS, **dinov2.DINOV2_REG_PRESETS}


def preset_names() -> list[str]:
    """The `--dino` spellings (Hugging Face folder names: dinov2-small, dinov2-with-registers-large, ...)."""
    return [n.replace("_", "-") for n in _presets()]


def _from_preset(name: str):
    from turbojax import models
    key = name.strip().replace("-", "_")
    if key not in _presets():
        raise PlanError(f"--dino {name!r}: not a DINOv2 preset; choose one of {', '.join(preset_names())}")
    fam, dcfg = models.get_preset(key)
    return fam, dcfg, key.replace("_", "-")


def _from_folder(cfg):
    """(family, config, label) of the existing `gan.dino` folder: a transformers folder or our export."""
    from turbojax import models
    from turbojax.checkpoint import META_FILE, read_meta
    from turbojax.distill import dino_disc
    try:
        dino_disc.check_config(cfg)  # the loader's checks: method, folder, family, size, layers
    except ValueError as e:
        raise PlanError(f"--config.{e}") from None
    folder = Path(cfg.gan.dino).expanduser()
    try:
        if (folder / META_FILE).is_file():  # our export: the config is in its metadata
            meta = read_meta(folder)
            fam = models.get_family(meta["family"])
            dcfg = models.config_from_dict(fam, meta["config"], str(folder))
        else:
            fam, dcfg, _ = models.read_component_config(folder)
    except (ValueError, OSError, KeyError) as e:
        raise PlanError(f"--config.gan.dino {cfg.gan.dino}: {e}") from None
    return fam, dcfg, f"{folder.name} ({fam.name}, from gan.dino)"


def _vae(family: str, channels: int, attention: str):
    from turbojax import models
    for name in VAE_PRESETS[family]:
        fam, vcfg = models.get_preset(name)
        if int(getattr(vcfg, "z_dim", None) or vcfg.latent_channels) == channels:
            return name, models.abstract_model(fam, vcfg, param_dtype=jnp.float32, dtype=jnp.float32,
                                               attention_impl=attention)
    raise PlanError(f"--model: no {family} VAE preset has {channels} latent channels "
                    f"({', '.join(VAE_PRESETS[family])}); the DINO GAN decodes the student's samples with it")


def build(cfg, base, latent_shape, *, preset: str, attention: str) -> PlannedDino:
    """The abstract DINOv2 + VAE decoder as `dino_disc.load` would give them. `preset`: the `--dino` flag or ""."""
    from turbojax import models
    from turbojax.distill import dino_disc
    try:
        dino_disc.check_method(cfg)
        family = dino_disc.teacher_family(base)
    except ValueError as e:
        raise PlanError(f"--config.{e}") from None
    from_folder = not preset and bool(cfg.gan.get("dino"))
    if preset:
        fam, dcfg, label = _from_preset(preset)
    elif from_folder:
        if not Path(cfg.gan.dino).expanduser().is_dir():
            raise PlanError(f"--config.gan.dino {cfg.gan.dino}: no such folder here; give --dino PRESET (e.g. "
                            f"{DEFAULT}) to plan with a DINOv2 of that size")
        fam, dcfg, label = _from_folder(cfg)
    else:
        fam, dcfg, label = _from_preset(DEFAULT)
    dtype = jnp.dtype(cfg.dtype)
    dino = models.abstract_model(fam, dcfg, param_dtype=dtype, dtype=dtype, scan_layers=bool(cfg.scan_layers),
                                 attention_impl=attention)
    channels = int(latent_shape[-1]) // 4 if family == "qwen_image" else int(latent_shape[0])
    vae_name, vae = _vae(family, channels, attention)
    # errors name gan.dino_size / gan.dino_layers, or gan.dino for a folder that is no DINOv2 (an export: its
    # family is only known once read); a preset is always a DINOv2 and the VAE always the family's
    source = f"gan.dino {cfg.gan.dino}" if from_folder else f"--dino {label}"
    try:
        layers = dino_disc.dino_layers(cfg, dino, source)
        loaded = dino_disc.assemble(cfg, family, latent_shape, dino, vae, layers, vae_source=f"--model VAE {vae_name}")
    except ValueError as e:
        raise PlanError(f"--config.{e}" if str(e).startswith("gan.") else str(e)) from None

    def count(state):
        return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))
    g = loaded.gan
    info = {"dino": label, "dino_params": count(loaded.arrays["dino"]), "dino_dtype": str(dtype),
            "dino_layers": list(g.layers), "dino_size": list(g.size), "vae": vae_name,
            "vae_decoder_params": count(loaded.arrays["vae"]), "vae_dtype": str(jnp.dtype(g.vae_dtype)),
            "image_hw": list(g.image_hw)}
    return PlannedDino(loaded, info)
