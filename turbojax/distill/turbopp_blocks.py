"""Turbo++ per-step full copies of selected transformer weights (`turbopp.full_blocks`), the option beside the
per-step LoRAs: which parameters are copied, how a step's model sees its copies, and their files.

Selection. Each regex is fully matched against a parameter's dotted path and against its module's path (the path
without the leaf name), spelled per layer with the index after the stack name (`transformer_blocks.1.attn.to_q`,
`transformer_blocks.1.attn.to_q.kernel`) and also without it (`transformer_blocks.attn.to_q`, how LoRA targets are
written for scanned stacks). So `transformer_blocks\\.(0|1)\\..*` selects every weight of blocks 0 and 1,
`transformer_blocks\\.attn\\..*` the attention of every block, and the same regex selects the same weights with
and without `scan_layers`.

Layout. With scanned stacks a block's weight is one layer of a stacked leaf: the copy holds only the selected layers
(`[k, ...]` for k selected of the stack), and a step's model writes them into its layers of the frozen leaf
(`leaf.at[layers].set(copy)`), so neither memory nor the optimiser pays for unselected layers and no gradient mask
is needed. The frozen base stays one copy; each step overlays its own copies (fp32 masters, cast to the base dtype)
when its model is assembled.

Files. `step{k}_blocks.safetensors` holds step k's copies under the diffusers transformer's state-dict names (the
model's key table: torch layout, `transformer_blocks.1.attn.to_q.weight [out, in]`), fp32; a diffusers user loads
them over the transformer's state dict for that step.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

F32 = jnp.float32

# ((dotted parameter path, selected layers of a stacked leaf or None for an unstacked one), ...): static, hashable
Layout = tuple


class BlocksFileError(ValueError):
    """A per-step blocks file that does not fit the model (a tensor it does not have or of another shape, or none)."""


def _family(model):
    from turbojax.models.registry import FAMILIES
    fam = FAMILIES.get(getattr(model, "family", None))
    if fam is None:
        raise ValueError(f"turbopp.full_blocks needs a transformer with a diffusers key table (Qwen-Image, Z-Image); "
                         f"this model is {getattr(model, 'family', type(model).__name__)!r}")
    return fam


def _leaves(model):
    from turbojax.convert.params import model_leaves
    return model_leaves(model, _family(model))


def _names(path: tuple[str, ...], layer: int | None, stacks) -> list[str]:
    """The spellings a regex may match for `path` (at `layer` of a scanned stack): per layer and stack-wide, each as
    the parameter path and as its module's path."""
    if layer is not None:  # scanned: (stack, *rest) holds every layer
        forms = [(path[0], str(layer), *path[1:]), path]
    elif len(path) > 2 and path[0] in stacks and path[1].isdigit():  # unscanned: (stack, i, *rest)
        forms = [path, (path[0], *path[2:])]
    else:
        forms = [path]
    return [".".join(f) for form in forms for f in (form, form[:-1]) if f]


def select(model, patterns: str | Sequence[str]) -> Layout:
    """The layout of the parameters `patterns` select in `model` (see the module doc); every regex must select
    something (a typo would otherwise train nothing)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except (re.error, TypeError) as e:
            raise ValueError(f"turbopp.full_blocks: {p!r} is not a valid regex: {e}") from None
    stacks = set(getattr(_family(model).keys, "stacks", {}))
    used, out, examples = set(), [], {}
    for leaf in _leaves(model):
        path = leaf.jax_path
        layers = range(len(leaf.torch_keys)) if leaf.stacked else [None]
        picked = []
        for i in layers:
            names = _names(path, i, stacks)
            examples.setdefault(i is not None or path[0] in stacks, []).append(names[0])
            hits = {j for j, r in enumerate(compiled) if any(r.fullmatch(n) for n in names)}
            if hits:
                used |= hits
                picked.append(i)
        if picked:
            out.append((".".join(path), tuple(picked) if leaf.stacked else None))
    unused = [patterns[j] for j in range(len(patterns)) if j not in used]
    if unused:
        shown = examples.get(False, [])[:2] + examples.get(True, [])[:2]
        raise ValueError(f"turbopp.full_blocks {unused!r} select no parameter; parameter paths look like "
                         f"{shown} (in a stack: the layer index after the stack name, or none for every layer)")
    return tuple(sorted(out))


def check_no_lora(layout: Layout, lora_modules, what: str = "lora.student.targets") -> None:
    """A module is either a per-step full copy or LoRA-adapted, never both (the LoRA delta would ride on a weight
    that is itself trained). With scanned stacks a LoRA on a stacked module covers every layer."""
    lora_modules = set(lora_modules)
    for key, layers in layout:
        module = key.rsplit(".", 1)[0]
        if module in lora_modules:
            where = f" (layers {list(layers)})" if layers is not None else ""
            raise ValueError(f"module {module}{where} is selected by turbopp.full_blocks and LoRA-targeted by "
                             f"{what}; a module is either a full per-step copy or a LoRA: narrow one of them "
                             "(with scan_layers a LoRA target covers every layer of its stack)")


def _flat(state: nnx.State) -> dict:
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def init_copies(frozen: nnx.State, layout: Layout) -> dict:
    """Fresh fp32 copies `{dotted path: [k, ...] or [...]}` of the selected weights of the frozen base (always new
    buffers: the engine donates the trainables, which must never alias the base)."""
    flat = _flat(frozen)
    out = {}
    for key, layers in layout:
        v = flat[key][...]
        out[key] = jnp.array(v if layers is None else v[np.asarray(layers)], dtype=F32, copy=True)
    return out


def overlay(frozen: nnx.State, layout: Layout, copies: Mapping) -> nnx.State:
    """`frozen` with the selected weights replaced by `copies` (traceable; differentiable w.r.t. the copies). Only
    the overlaid leaves are new arrays; the rest of the base is shared."""
    want = dict(layout)
    flat = []
    for path, var in nnx.to_flat_state(frozen):
        key = ".".join(str(p) for p in path)
        if key in want:
            base, layers = var[...], want[key]
            c = jnp.asarray(copies[key]).astype(base.dtype)
            if c.shape != (base.shape if layers is None else (len(layers),) + base.shape[1:]):
                raise ValueError(f"full copy {key}: shape {c.shape} does not fit the base leaf {base.shape} at "
                                 f"layers {layers}")
            if layers is not None and tuple(layers) != tuple(range(base.shape[0])):
                c = base.at[np.asarray(layers)].set(c)
            var = var.replace(c)
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def with_blocks(model, layout: Layout, copies: Mapping):
    """A new model: `model` with the copies in place (for sampling; `model` is left as it was)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, overlay(state, layout, copies))


# --------------------------------------------------------------------------------------------------------------
# Files: the diffusers transformer's state-dict names, torch layout
# --------------------------------------------------------------------------------------------------------------

def save(path, model, layout: Layout, copies: Mapping, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the copies as `{diffusers key: torch-layout fp32 tensor}` atomically (one tensor in memory at a
    time)."""
    from turbojax.convert.safetensors_io import write_safetensors

    leaves = {".".join(l.jax_path): l for l in _leaves(model)}
    specs = []
    for key, layers in layout:
        leaf, arr = leaves[key], copies[key]
        if leaf.stacked:
            for j, i in enumerate(layers):
                shape = leaf.torch_shape(tuple(arr.shape))
                specs.append((leaf.torch_keys[i], shape, np.float32,
                              lambda leaf=leaf, arr=arr, j=j: leaf.to_torch(np.asarray(arr[j:j + 1], np.float32))[0]))
        else:
            specs.append((leaf.torch_keys[0], leaf.torch_shape(tuple(arr.shape)), np.float32,
                          lambda leaf=leaf, arr=arr: leaf.to_torch(np.asarray(arr, np.float32))[0]))
    specs.sort(key=lambda s: s[0])
    return write_safetensors(Path(path), specs, {"format": "pt", **(metadata or {})})


def load(path, model) -> tuple[Layout, dict]:
    """(layout, fp32 copies) of a blocks file for `model` (scanned or not, whichever the file was written from);
    every tensor must be a parameter of the model with its shape."""
    from turbojax.convert.params import flat_params
    from turbojax.convert.safetensors_io import open_safetensors

    path = Path(path)
    if not path.is_file():
        raise BlocksFileError(f"{path}: file not found")
    f = open_safetensors(path)  # SafetensorsError (a ValueError) on anything that is not a safetensors file
    params = flat_params(model)
    by_key = {}
    for leaf in _leaves(model):
        for i, k in enumerate(leaf.torch_keys):
            by_key[k] = (leaf, i if leaf.stacked else None)
    groups: dict[tuple, dict] = {}
    for k in f.keys():
        if k not in by_key:
            raise BlocksFileError(f"{path}: tensor {k!r} is not a parameter of this {model.family} transformer")
        leaf, i = by_key[k]
        want = leaf.torch_shape(tuple(params[leaf.jax_path].shape))
        if tuple(f.shape(k)) != want:
            raise BlocksFileError(f"{path}: tensor {k!r} has shape {tuple(f.shape(k))}, this model's is {want}")
        groups.setdefault(leaf.jax_path, (leaf, {}))[1][i] = np.asarray(f.get(k), np.float32)
    if not groups:
        raise BlocksFileError(f"{path}: holds no tensors")
    layout, copies = [], {}
    for jax_path, (leaf, parts) in sorted(groups.items()):
        key = ".".join(jax_path)
        layers = tuple(sorted(parts)) if leaf.stacked else None
        copies[key] = np.asarray(leaf.to_jax([parts[i] for i in (layers or [None])]), np.float32)
        layout.append((key, layers))
    return tuple(layout), copies
