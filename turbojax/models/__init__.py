"""Model entry points: build, load from diffusers folders or turbojax Orbax exports, apply LoRAs.

    model = turbojax.models.from_diffusers("Qwen-Image/transformer", dtype=jnp.bfloat16,
                                           loras=[("lightning.safetensors", 1.0)])
    out = model(hidden_states=x, encoder_hidden_states=ctx, encoder_hidden_states_mask=mask,
                timestep=sigma, img_shapes=[[(1, h, w)]] * batch)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from turbojax.models.dinov2 import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,  # noqa: F401
                                    dino_preprocess)
from turbojax.models.qwen_image import QwenImageConfig, QwenImageTransformer  # noqa: F401
from turbojax.models.registry import (FAMILIES, ConfigError, config_from_dict, get_family,  # noqa: F401
                                      get_preset, read_component_config)

LoraSpec = Sequence[tuple[str | Path, float] | str | Path]


def create(name_or_config, *, seed: int = 0, param_dtype=jnp.float32, dtype=None, scan_layers: bool = True,
           remat: str = "none", attention_impl: str = "auto"):
    """A randomly initialised model from a preset name ("qwen_image", "qwen_image_tiny") or a config object."""
    if isinstance(name_or_config, str):
        fam, cfg = get_preset(name_or_config)
    else:
        cfg = name_or_config
        fam = next(f for f in FAMILIES.values() if isinstance(cfg, f.config_cls))
    return fam.model_cls(cfg, rngs=nnx.Rngs(seed), param_dtype=param_dtype, dtype=dtype or param_dtype,
                         scan_layers=scan_layers, remat=remat, attention_impl=attention_impl)


def abstract_model(fam, cfg, *, param_dtype=jnp.float32, dtype=None, scan_layers=True, remat="none",
                   attention_impl="auto"):
    """The model with `jax.ShapeDtypeStruct` leaves: no memory is allocated for the weights."""
    return nnx.eval_shape(lambda: fam.model_cls(
        cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype or param_dtype, scan_layers=scan_layers,
        remat=remat, attention_impl=attention_impl))


def from_diffusers(folder, *, dtype=jnp.float32, param_dtype=None, scan_layers: bool = True, remat: str = "none",
                   attention_impl: str = "auto", loras: LoraSpec = (), mesh=None, shardings=None,
                   progress: bool = True):
    """Load a diffusers component folder (`config.json` + safetensors, single or sharded) or a turbojax export.

    The family comes from `_class_name`. `dtype` is the compute dtype and, unless `param_dtype` is given, the
    storage dtype. `loras` is a list of `(file, scale)` (or bare files, scale 1) merged into the weights at load.
    """
    from turbojax.checkpoint import META_FILE
    from turbojax.convert.params import load_into, source_reader
    from turbojax.convert.safetensors_io import open_safetensors

    folder = Path(folder)
    if (folder / META_FILE).is_file():
        model = from_orbax(folder, dtype=dtype, param_dtype=param_dtype, remat=remat,
                           attention_impl=attention_impl, scan_layers=scan_layers, mesh=mesh,
                           shardings=shardings, progress=progress)
    else:
        fam, cfg, _ = read_component_config(folder)
        model = abstract_model(fam, cfg, param_dtype=param_dtype or dtype, dtype=dtype, scan_layers=scan_layers,
                               remat=remat, attention_impl=attention_impl)
        shardings = _resolve_shardings(model, mesh, shardings)
        reader = open_safetensors(folder, weights_name=fam.weights_name)
        # On a mesh each device's block is sliced out of a memory map, so a host reads only its own shards
        # (`load_into`); a single-device load reads each tensor whole with one positioned read.
        read = (lambda key: reader.get(key, mmap=True)) if shardings else reader.get
        get, available = source_reader(fam.source_names(reader.keys()), read, reader.shape)
        model = load_into(model, fam, get, available, str(folder), shardings=shardings, progress=progress)
    return apply_loras(model, loras)


def from_orbax(directory, *, dtype=jnp.float32, param_dtype=None, scan_layers: bool | None = None,
               remat: str = "none", attention_impl: str = "auto", mesh=None, shardings=None,
               progress: bool = True):
    """Load a model exported by `python -m turbojax.convert to-jax`, restored part by part into `shardings` (or
    those of `mesh`): each process reads and decodes only the storage chunks its own devices' shards overlap."""
    from turbojax.checkpoint import host_target, iter_parts, read_meta
    from turbojax.convert.params import flat_params
    from turbojax.utils import progress_bar

    directory = Path(directory)
    meta = read_meta(directory)
    fam = get_family(meta["family"])
    cfg = config_from_dict(fam, meta["config"], str(directory))
    stored_scan = meta["scan_layers"]
    if scan_layers is not None and scan_layers != stored_scan and _has_stacks(fam, cfg):
        raise ConfigError(f"{directory} was exported with scan_layers={stored_scan}; convert again with "
                          f"{'--no-scan' if not scan_layers else 'scan on'} to load it with scan_layers={scan_layers}")
    model = abstract_model(fam, cfg, param_dtype=param_dtype or dtype, dtype=dtype, scan_layers=stored_scan,
                           remat=remat, attention_impl=attention_impl)
    shardings = _resolve_shardings(model, mesh, shardings)
    graphdef, state = nnx.split(model)
    params = flat_params(state)
    stored = {tuple(k.split(".")) for k in meta["leaves"]}
    if stored != set(params):
        missing = sorted(".".join(p) for p in set(params) - stored)
        extra = sorted(".".join(p) for p in stored - set(params))
        raise ConfigError(f"{directory}: checkpoint leaves do not match the model (missing {missing[:10]}, "
                          f"unexpected {extra[:10]})")
    for key, info in meta["leaves"].items():
        path = tuple(key.split("."))
        if tuple(info["shape"]) != tuple(params[path].shape):
            raise ConfigError(f"{directory}: leaf {key} has shape {info['shape']}, model expects "
                              f"{tuple(params[path].shape)}")
    targets = {p: (jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[p]) if shardings and p in shardings
                   else host_target(v.shape, v.dtype)) for p, v in params.items()}
    values = {}
    for part in progress_bar(iter_parts(directory, meta, targets), desc="restoring", enabled=progress,
                             total=len(meta["parts"]), unit="part"):
        values.update(part)
    flat = [(p, v.replace(values[tuple(str(x) for x in p)])) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _has_stacks(fam, cfg) -> bool:
    """Whether scan_layers changes the parameter layout of this family (it does not for the VAEs)."""
    from turbojax.convert.params import flat_params
    return set(flat_params(abstract_model(fam, cfg, scan_layers=True))) != set(
        flat_params(abstract_model(fam, cfg, scan_layers=False)))


def _resolve_shardings(model, mesh, shardings):
    if shardings is None and mesh is not None:
        from turbojax.sharding import param_shardings
        return param_shardings(model, mesh)
    return shardings


def apply_loras(model, loras: LoraSpec):
    """Merge LoRA files into a model: `[(file, scale), ...]`; returns a new model."""
    if not loras:
        return model
    from turbojax import lora as lora_lib

    adapters = []
    for spec in loras:
        file, scale = (spec, 1.0) if isinstance(spec, (str, Path)) else spec
        adapters.append((lora_lib.load(file, model), float(scale)))
    return lora_lib.apply(model, adapters)
