"""Model families: diffusers `_class_name` -> our config class, model class and key table."""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable

from turbojax.convert.keytable import KeyTable
from turbojax.convert.params import default_source_names
from turbojax.models.qwen_image import QWEN_IMAGE_20B, QWEN_IMAGE_TINY, QwenImageConfig, QwenImageTransformer
from turbojax.models.qwen_image_keys import QWEN_IMAGE_KEYS
from turbojax.models.qwen_llm import (QWEN2_5_VL_7B, QWEN2_5_VL_TINY, QWEN3_4B, QWEN3_TINY, LLMConfigError,
                                      Qwen2_5_VLTextConfig, Qwen3TextConfig, QwenLLM, _text_settings,
                                      config_from_transformers)
from turbojax.models.qwen_llm_keys import (QWEN2_5_VL_KEYS, QWEN3_KEYS, qwen2_5_vl_source_names,
                                           qwen3_source_names)
from turbojax.models.qwen_llm_keys import stack_sizes as qwen_llm_stack_sizes
from turbojax.models.z_image import Z_IMAGE_TINY, Z_IMAGE_TURBO, ZImageConfig, ZImageTransformer
from turbojax.models.z_image_keys import Z_IMAGE_KEYS, original_to_diffusers
from turbojax.models.z_image_keys import stack_sizes as z_image_stack_sizes
from turbojax.models import dinov2, vae_flux, vae_qwen_image
from turbojax.models.dinov2_keys import DINOV2_KEYS, dinov2_source_names
from turbojax.models.dinov2_keys import stack_sizes as dinov2_stack_sizes
from turbojax.models.vae_keys import AUTOENCODER_KL_KEYS, QWEN_IMAGE_VAE_KEYS


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    class_names: tuple[str, ...]
    config_cls: type
    model_cls: type
    keys: KeyTable
    stack_sizes: Callable[[Any], dict[str, int]]
    ignored_config_keys: frozenset = frozenset()
    presets: dict = dataclasses.field(default_factory=dict)
    # stored checkpoint keys -> {diffusers name: Source}: renames / splits of "original" (non-diffusers) layouts
    source_names: Callable = default_source_names
    weights_name: str = "diffusion_pytorch_model.safetensors"  # file name of a fresh export (transformers: model.)
    # (raw config dict, source) -> config, for configs in another library's format (transformers' config.json has
    # no `_class_name`); None: the dict holds the config dataclass's own field names (diffusers, our exports)
    parse_config: Callable | None = None


def _transformers_config(kind: str, config_cls: type) -> Callable:
    def parse(raw: dict, source: str):
        # transformers writes null for "the default" (e.g. head_dim), so None passes; the rest is typed like ours
        text = _text_settings(raw, kind)
        check_config_types(config_cls, {k: v for k, v in text.items() if v is not None}, source,
                           skip={"mrope_section"})  # ours is derived from rope_scaling, not a config key
        try:
            return config_from_transformers(raw, source, kind)
        except LLMConfigError as e:
            raise ConfigError(str(e)) from None
        except (TypeError, ValueError) as e:  # a value the checks above let through but the parser cannot use
            raise ConfigError(f"{source}: {e}") from None
    return parse


def _dinov2_config(config_cls: type) -> Callable:
    def parse(raw: dict, source: str):
        # image_size / patch_size may be [h, w] lists in transformers; dinov2 checks those itself
        check_config_types(config_cls, {k: v for k, v in raw.items() if v is not None}, source,
                           skip={"image_size", "patch_size"})
        try:
            return dinov2.config_from_transformers(raw, source, config_cls)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
    return parse


# ---- config value checks: a wrong type in a config.json must name the key, not fail deep inside the model ----

_NAMES = {int: ("a positive integer", "positive integers"), float: ("a finite number", "finite numbers"),
          bool: ("true/false", "true/false values"), str: ("a string", "strings"), type(None): ("null", "nulls")}


def _type_name(tp, plural: bool = False) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a, plural) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0], True)}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_type_name(args[0], True)}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    return _NAMES.get(tp, (getattr(tp, "__name__", str(tp)),) * 2)[plural]


def _conforms(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # every integer of these configs is a size, count or channel number: zero makes no model
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if tp is float:  # JSON writes 1.0 as 1 at times
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return True  # an annotation without a check: the model's own validation decides


def check_config_types(config_cls: type, raw: dict, source: str, skip=frozenset()) -> None:
    """Raise ConfigError naming the file, key, value and expected type of the first field of `raw` that does not
    fit the config dataclass's annotation (ints: >= 1; floats: finite)."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in raw and f.name not in skip and not _conforms(raw[f.name], hints[f.name]):
            v = raw[f.name]
            raise ConfigError(f"{source}: key {f.name!r} is {json.dumps(v)} ({type(v).__name__}); expected "
                              f"{_type_name(hints[f.name])}")


_DIFFUSERS_BOOKKEEPING = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})

FAMILIES: dict[str, Family] = {
    "qwen_image": Family(
        name="qwen_image",
        class_names=("QwenImageTransformer2DModel",),
        config_cls=QwenImageConfig,
        model_cls=QwenImageTransformer,
        keys=QWEN_IMAGE_KEYS,
        stack_sizes=lambda c: {"transformer_blocks": c.num_layers},
        # written by diffusers 0.34 into the original Qwen-Image config; no longer a constructor argument
        ignored_config_keys=frozenset({"pooled_projection_dim"}),
        presets={"qwen_image": QWEN_IMAGE_20B, "qwen_image_tiny": QWEN_IMAGE_TINY},
    ),
    "z_image": Family(
        name="z_image",
        class_names=("ZImageTransformer2DModel",),
        config_cls=ZImageConfig,
        model_cls=ZImageTransformer,
        keys=Z_IMAGE_KEYS,
        stack_sizes=z_image_stack_sizes,
        presets={"z_image_turbo": Z_IMAGE_TURBO, "z_image_tiny": Z_IMAGE_TINY},
        source_names=original_to_diffusers,
    ),
    # text encoders (transformers checkpoints: the family comes from `architectures[0]`)
    "qwen2_5_vl_text": Family(
        name="qwen2_5_vl_text",
        class_names=("Qwen2_5_VLForConditionalGeneration",),
        config_cls=Qwen2_5_VLTextConfig,
        model_cls=QwenLLM,
        keys=QWEN2_5_VL_KEYS,
        stack_sizes=qwen_llm_stack_sizes,
        presets={"qwen2_5_vl_7b_text": QWEN2_5_VL_7B, "qwen2_5_vl_text_tiny": QWEN2_5_VL_TINY},
        weights_name="model.safetensors",
        source_names=qwen2_5_vl_source_names,
        parse_config=_transformers_config("qwen2_5_vl", Qwen2_5_VLTextConfig),
    ),
    "qwen3_text": Family(
        name="qwen3_text",
        class_names=("Qwen3Model", "Qwen3ForCausalLM"),
        config_cls=Qwen3TextConfig,
        model_cls=QwenLLM,
        keys=QWEN3_KEYS,
        stack_sizes=qwen_llm_stack_sizes,
        presets={"qwen3_4b_text": QWEN3_4B, "qwen3_text_tiny": QWEN3_TINY},
        weights_name="model.safetensors",
        source_names=qwen3_source_names,
        parse_config=_transformers_config("qwen3", Qwen3TextConfig),
    ),
    # VAEs: key tables are built from the config's structure (levels, blocks per level)
    "qwen_image_vae": Family(
        name="qwen_image_vae",
        class_names=("AutoencoderKLQwenImage",),
        config_cls=vae_qwen_image.QwenImageVAEConfig,
        model_cls=vae_qwen_image.AutoencoderKLQwenImage,
        keys=QWEN_IMAGE_VAE_KEYS,
        stack_sizes=vae_qwen_image.structure,
        presets={"qwen_image_vae": vae_qwen_image.QWEN_IMAGE_VAE,
                 "qwen_image_vae_tiny": vae_qwen_image.QWEN_IMAGE_VAE_TINY},
    ),
    "autoencoder_kl": Family(
        name="autoencoder_kl",
        class_names=("AutoencoderKL",),
        config_cls=vae_flux.AutoencoderKLConfig,
        model_cls=vae_flux.AutoencoderKL,
        keys=AUTOENCODER_KL_KEYS,
        stack_sizes=vae_flux.structure,
        presets={"flux_vae": vae_flux.FLUX_VAE, "flux_vae_tiny": vae_flux.FLUX_VAE_TINY},
    ),
    # DINOv2 feature extractors of the GAN discriminators (transformers checkpoints)
    "dinov2": Family(
        name="dinov2",
        class_names=("Dinov2Model",),
        config_cls=dinov2.Dinov2Config,
        model_cls=dinov2.Dinov2Model,
        keys=DINOV2_KEYS,
        stack_sizes=dinov2_stack_sizes,
        presets=dinov2.DINOV2_PRESETS,
        weights_name="model.safetensors",
        source_names=dinov2_source_names,
        parse_config=_dinov2_config(dinov2.Dinov2Config),
    ),
    "dinov2_with_registers": Family(
        name="dinov2_with_registers",
        class_names=("Dinov2WithRegistersModel",),
        config_cls=dinov2.Dinov2WithRegistersConfig,
        model_cls=dinov2.Dinov2Model,
        keys=DINOV2_KEYS,
        stack_sizes=dinov2_stack_sizes,
        presets=dinov2.DINOV2_REG_PRESETS,
        weights_name="model.safetensors",
        source_names=dinov2_source_names,
        parse_config=_dinov2_config(dinov2.Dinov2WithRegistersConfig),
    ),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_for_class(class_name: str | None, source: str) -> Family:
    for fam in FAMILIES.values():
        if class_name in fam.class_names:
            return fam
    known = sorted(c for f in FAMILIES.values() for c in f.class_names)
    raise ConfigError(f"{source}: unknown _class_name {class_name!r}; turbojax can load {known}")


def get_preset(name: str):
    """A named model config, e.g. "qwen_image" (real 20B) or "qwen_image_tiny"."""
    for fam in FAMILIES.values():
        if name in fam.presets:
            return fam, fam.presets[name]
    raise ConfigError(f"unknown model preset {name!r}; known: "
                      f"{sorted(p for f in FAMILIES.values() for p in f.presets)}")


def config_from_dict(fam: Family, raw: dict, source: str):
    """Build a family config from a diffusers config dict. Unknown keys raise (they may change the architecture)."""
    if fam.parse_config is not None and "_class_name" not in raw:
        return fam.parse_config(raw, source)
    fields = {f.name for f in dataclasses.fields(fam.config_cls)}
    unknown = sorted(set(raw) - fields - _DIFFUSERS_BOOKKEEPING - fam.ignored_config_keys)
    if unknown:
        raise ConfigError(f"{source}: config keys {unknown} are not understood by turbojax's {fam.name} model")
    check_config_types(fam.config_cls, raw, source)
    kwargs = {}
    for k in fields & set(raw):
        v = raw[k]
        kwargs[k] = tuple(v) if isinstance(v, list) else v
    cfg = fam.config_cls(**kwargs)
    try:  # the same checks the model runs, here so that the message names the file
        return cfg.validate() if hasattr(cfg, "validate") else cfg
    except NotImplementedError as e:
        raise NotImplementedError(f"{source}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def config_to_dict(fam: Family, cfg) -> dict:
    out = {"_class_name": fam.class_names[0]}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def read_component_config(folder: Path) -> tuple[Family, Any, str]:
    """(family, config, raw text) of a diffusers component folder's `config.json`."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a diffusers component folder such as "
                                "<pipeline>/transformer)")
    try:
        text = path.read_bytes().decode("utf-8")  # exact text (no newline translation) for round trips
        raw = json.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    # diffusers writes `_class_name`; transformers (text encoders) writes `architectures: [class name]`
    archs = raw.get("architectures")
    class_name = raw.get("_class_name") or (archs[0] if isinstance(archs, list) and archs else None)
    fam = family_for_class(class_name, str(path))
    return fam, config_from_dict(fam, raw, str(path)), text
