"""LoRA: pure-functional adapters (`adapters.py`), every released file layout (`formats.py`), and the bridge
between the two through each model's key table (this file).

    adapter = turbojax.lora.load("lightning.safetensors", model)      # any supported layout
    fast = turbojax.lora.apply(model, [(adapter, 1.0)])                 # new model, merged weights
    turbojax.lora.save("mine.safetensors", adapter, model)             # diffusers layout + alpha metadata
"""
from __future__ import annotations

import numpy as np

from turbojax.lora.adapters import (Adapter, apply, delta, init_adapter, linear_kernels,  # noqa: F401
                                    merge_params, unapply)
from turbojax.lora.formats import LoraFormatError, LoraModule, read_lora, save_lora  # noqa: F401


def _index(model) -> dict[str, tuple[str, int | None]]:
    from turbojax.models.registry import get_family
    fam = get_family(model.family)
    return fam.keys.linear_index(fam.stack_sizes(model.config), model.scan_layers)


def module_shapes(model) -> dict[str, tuple[int, int]]:
    """diffusers Linear module name -> torch weight shape (out, in) for this model."""
    kernels = linear_kernels(model)
    return {name: tuple(reversed(kernels[path][-2:])) for name, (path, _) in _index(model).items()}


def from_lora_weights(weights: dict, model) -> Adapter:
    """Turn `{diffusers module: LoraModule}` into an adapter pytree for `model`.

    In a scanned stack, layers are packed along axis 0; modules with smaller ranks are zero-padded to the
    largest rank of their stack (the padding adds exactly nothing) and layers the file does not touch get scale 0.
    """
    index, kernels = _index(model), linear_kernels(model)
    grouped: dict[str, dict] = {}
    for name, mod in weights.items():
        if name not in index:
            raise LoraFormatError(f"LoRA module {name!r} is not a Linear of this {model.family} model")
        path, layer = index[name]
        grouped.setdefault(path, {})[layer] = mod
    adapter = {}
    for path, mods in grouped.items():
        shape = kernels[path]
        if None in mods:
            m = mods[None]
            adapter[path] = {"a": np.ascontiguousarray(m.down.T), "b": np.ascontiguousarray(m.up.T),
                             "scale": np.float32(m.scale)}
            continue
        n_layers, n_in, n_out = shape
        rank = max(m.rank for m in mods.values())
        a = np.zeros((n_layers, n_in, rank), np.float32)
        b = np.zeros((n_layers, rank, n_out), np.float32)
        scale = np.zeros((n_layers,), np.float32)
        for i, m in mods.items():
            a[i, :, :m.rank], b[i, :m.rank, :], scale[i] = m.down.T, m.up.T, m.scale
        adapter[path] = {"a": a, "b": b, "scale": scale}
    return adapter


def to_lora_weights(adapter: Adapter, model) -> dict:
    """Inverse of `from_lora_weights`: `{diffusers module: LoraModule}` (alpha = scale * rank)."""
    by_path = {(path, layer): name for name, (path, layer) in _index(model).items()}
    out = {}
    for path, entry in adapter.items():
        a, b, scale = (np.asarray(entry[k], np.float32) for k in ("a", "b", "scale"))
        layers = [None] if a.ndim == 2 else range(a.shape[0])
        for i in layers:
            ai, bi, si = (a, b, scale) if i is None else (a[i], b[i], scale[i])
            if i is not None and (float(si) == 0.0 or not bi.any()):
                continue  # a layer the adapter does not touch
            name = by_path.get((path, i))
            if name is None:
                raise LoraFormatError(f"adapter module {path!r} (layer {i}) has no diffusers name")
            rank = ai.shape[-1]
            out[name] = LoraModule(down=ai.T, up=bi.T, alpha=float(si) * rank)
    return out


def load(path, model) -> Adapter:
    """Read a LoRA file (any supported layout, strictly checked against `model`) as an adapter pytree."""
    return from_lora_weights(read_lora(path, family=model.family, module_shapes=module_shapes(model)), model)


def save(path, adapter: Adapter, model, layout: str = "diffusers", dtype=np.float32) -> None:
    """Write an adapter as a LoRA file: layout "diffusers" (with alpha metadata) or "comfy" (lightx2v)."""
    save_lora(path, to_lora_weights(adapter, model), layout=layout, family=model.family, dtype=dtype)
