"""Filling a model's parameters from torch-layout tensors (and back), leaf by leaf, with strict key checks."""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.convert.keytable import Leaf
from turbojax.utils import progress_bar


class ConversionError(ValueError):
    """Missing, unexpected or mis-shaped keys; the message lists them."""


ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def path_str(path) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


def flat_params(model_or_state) -> dict[tuple[str, ...], nnx.Variable]:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return {path_str(p): v for p, v in nnx.to_flat_state(state)}


def model_leaves(model, fam) -> list[Leaf]:
    params = flat_params(model)
    leaves = fam.keys.expand(fam.stack_sizes(model.config), model.scan_layers, lambda p: p in params)
    covered = {l.jax_path for l in leaves}
    extra = sorted(".".join(p) for p in params if p not in covered)
    if extra:  # a model parameter the table forgot would silently keep its random init
        raise ConversionError(f"key table for {fam.name} does not cover parameters {extra}")
    return leaves


def strip_original_prefix(keys) -> dict[str, str]:
    """Map stripped name -> stored name when every key carries one of the 'original' checkpoint prefixes."""
    keys = list(keys)
    for prefix in ORIGINAL_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: k for k in keys}
    return {k: k for k in keys}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a diffusers tensor lives in a file: stored key, and which of `parts` equal row blocks (dim 0)."""
    key: str
    part: int = 0
    parts: int = 1


def default_source_names(keys: Iterable[str]) -> dict[str, Source]:
    """Stored keys are diffusers names, possibly all under one 'original' checkpoint prefix."""
    return {name: Source(stored) for name, stored in strip_original_prefix(keys).items()}


def source_reader(sources: Mapping[str, Source], get: Callable[[str], np.ndarray],
                  shape: Callable[[str], tuple]) -> tuple[Callable[[str], np.ndarray], dict[str, tuple]]:
    """(`get(diffusers name)`, `{diffusers name: shape}`) over a file's own `get(stored key)` / `shape(stored key)`,
    splitting fused tensors on the fly; the pair plugs straight into `load_into`."""
    available = {}
    for name, s in sources.items():
        shp = tuple(shape(s.key))
        if s.parts > 1:
            if not shp or shp[0] % s.parts:
                raise ConversionError(f"{s.key}: shape {shp} cannot be split into {s.parts} equal row blocks")
            shp = (shp[0] // s.parts,) + shp[1:]
        available[name] = shp

    def read(name: str) -> np.ndarray:
        s = sources[name]
        t = get(s.key)
        if s.parts == 1:
            return t
        n = t.shape[0] // s.parts
        return np.ascontiguousarray(t[s.part * n:(s.part + 1) * n])

    return read, available


def check_keys(leaves: list[Leaf], params: Mapping, available: Mapping[str, tuple], source: str):
    """Raise ConversionError naming every missing, unexpected or mis-shaped tensor."""
    expected = {}
    for leaf in leaves:
        shape = leaf.torch_shape(tuple(params[leaf.jax_path].shape))
        for k in leaf.torch_keys:
            expected[k] = shape
    missing = sorted(set(expected) - set(available))
    unexpected = sorted(set(available) - set(expected))
    misshaped = sorted(f"{k}: file {tuple(available[k])} vs model {expected[k]}"
                       for k in set(expected) & set(available) if tuple(available[k]) != expected[k])
    problems = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
            problems.append(f"{name} keys: {shown}")
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))


def load_into(model, fam, get: Callable[[str], np.ndarray], available: Mapping[str, tuple], source: str, *,
              param_dtype=None, shardings: Mapping | None = None, progress: bool = True):
    """Return `model` (abstract or real) with every parameter read through `get(torch_key)`.

    Tensors are transformed on the host one leaf at a time (stacked layers included) and placed on device right
    away, so host memory stays near one leaf. `shardings` maps a JAX leaf path to a `jax.sharding.Sharding`.
    """
    graphdef, state = nnx.split(model)
    params = flat_params(state)
    leaves = model_leaves(model, fam)
    check_keys(leaves, params, available, source)
    new_values = {}
    for leaf in progress_bar(leaves, desc=f"loading {fam.name}", enabled=progress, unit="tensor"):
        target = params[leaf.jax_path]
        dtype = param_dtype or target.dtype
        host = leaf.to_jax([get(k) for k in leaf.torch_keys])
        if host.dtype != dtype:
            host = host.astype(np.float32).astype(dtype) if host.dtype != np.float32 else host.astype(dtype)
        sharding = shardings.get(leaf.jax_path) if shardings else None
        new_values[leaf.jax_path] = jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = path_str(path)
        flat.append((path, var.replace(new_values[key]) if key in new_values else var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_tensors(model, fam):
    """Yield `(torch_key, np.ndarray)` for every parameter, in table order (host copies, one leaf at a time)."""
    params = flat_params(model)
    for leaf in model_leaves(model, fam):
        host = np.asarray(jax.device_get(params[leaf.jax_path][...]))
        yield from zip(leaf.torch_keys, leaf.to_torch(host))
