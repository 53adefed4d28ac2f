"""LoRA: pure-functional adapters (`adapters.py`), every released file layout (`formats.py`), and the bridge
between the two through each model's key table (this file).

    adapter = turbojax.lora.load("lightning.safetensors", model)      # any supported layout
    fast = turbojax.lora.apply(model, [(adapter, 1.0)])                 # new model, merged weights
    turbojax.lora.save("mine.safetensors", adapter, model)             # diffusers layout + alpha metadata
"""
from __future__ import annotations

import numpy as np

from turbojax.lora import adapters as _adapters
from turbojax.lora.adapters import Adapter, delta, init_adapter, linear_kernels, merge_params  # noqa: F401
from turbojax.lora.adapters import join_trainable, split_trainable  # noqa: F401
from turbojax.lora.formats import LoraFormatError, LoraModule, read_lora, save_lora  # noqa: F401
from turbojax.lora.lycoris import MergeModule  # noqa: F401


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
    from turbojax.lora import lycoris
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
        if any(isinstance(m, MergeModule) for m in mods.values()):
            # merge-only (LoKr / LoHa / DoRA / .diff): compact per-layer patches, merged by lycoris.merge_params
            adapter[path] = {"merge": {layer: lycoris.as_merge(m) for layer, m in sorted(
                mods.items(), key=lambda kv: -1 if kv[0] is None else kv[0])}}
            continue
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


def _alpha(scale, rank: int) -> float:
    """alpha = scale * r; scale is held in fp32, so give back the 7-digit alpha it came from when that rounds to the
    same scale (config alpha 4 at rank 3 saves 4.0, not 4.0000001)."""
    exact = float(scale) * rank
    short = float(f"{exact:.7g}")
    return short if np.float32(short / rank) == np.float32(scale) else exact


def to_lora_weights(adapter: Adapter, model) -> dict:
    """Inverse of `from_lora_weights`: `{diffusers module: LoraModule}` (alpha = scale * rank)."""
    by_path = {(path, layer): name for name, (path, layer) in _index(model).items()}
    out = {}
    for path, entry in adapter.items():
        if "merge" in entry:
            raise LoraFormatError(f"adapter module {path!r} holds a merge-only patch (LoKr / LoHa / DoRA / .diff); "
                                  "those can be merged (`apply`) but not saved as a LoRA")
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
            out[name] = LoraModule(down=ai.T, up=bi.T, alpha=_alpha(si, rank))
    return out


def _biased_modules(model) -> set[str]:
    from turbojax.convert.params import flat_params
    biased = {".".join(p[:-1]) for p in flat_params(model) if p[-1] == "bias"}
    return {name for name, (path, _) in _index(model).items() if path in biased}


def load(path, model) -> Adapter:
    """Read a LoRA file (any supported layout, strictly checked against `model`) as an adapter pytree.

    Merge-only files (LoKr, LoHa, DoRA, .diff / .diff_b) give `{"merge": ...}` entries: `apply` merges them with
    ComfyUI's semantics; they cannot be trained or saved.
    """
    return from_lora_weights(read_lora(path, family=model.family, module_shapes=module_shapes(model),
                                       biased_modules=_biased_modules(model)), model)


def _items(adapters, strength: float) -> list:
    """`[(adapter, s * strength), ...]` for one adapter or a list (`adapters.merge_params` ignores `strength` for a
    list, which made `unapply(merged, [(adapter, s)])` add the delta a second time)."""
    if isinstance(adapters, dict):
        return [(adapters, strength)]
    return [(a, float(s) * strength) for a, s in adapters]


def apply(model, adapters, strength: float = 1.0):
    """A new model with the adapters merged in (`model` is left as it was): one adapter or `[(adapter, s), ...]`,
    every strength times `strength`.

    Plain low-rank adapters go through `adapters.apply`; any merge-only entry (LoKr / LoHa / DoRA / .diff) routes
    the whole list through `lycoris.merge_params` (in list order: DoRA sees the weight the earlier ones left).
    """
    from flax import nnx

    from turbojax.lora import lycoris
    items = _items(adapters, strength)
    if not lycoris.has_merge_entries(items):
        return _adapters.apply(model, items)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, lycoris.merge_params(params, items), rest)


def unapply(model, adapters, strength: float = 1.0):
    """Inverse of `apply` for additive adapters (exact in fp32 up to rounding); a DoRA merge rescales the base
    weight and cannot be undone: refused."""
    from turbojax.lora import lycoris
    items = _items(adapters, strength)
    if lycoris.has_dora(items):
        raise ValueError("a DoRA merge cannot be undone (it rescales the base weight); keep the base model instead")
    return apply(model, [(a, -s) for a, s in reversed(items)])


def save(path, adapter: Adapter, model, layout: str = "diffusers", dtype=np.float32) -> None:
    """Write an adapter as a LoRA file: layout "diffusers" (with alpha metadata) or "comfy" (lightx2v)."""
    save_lora(path, to_lora_weights(adapter, model), layout=layout, family=model.family, dtype=dtype)
from turbojax.lora import unmerged  # noqa: E402,F401  (training: LoRA applied unmerged inside the blocks)
