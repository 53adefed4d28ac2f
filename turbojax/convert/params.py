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

    Without a sharding a leaf is transformed on the host whole (stacked layers included) and placed on the default
    device right away, so host memory stays near one leaf. `shardings` maps a JAX leaf path to a
    `jax.sharding.Sharding`; such a leaf is built block by block, each addressable device's block read on its own.
    `get(key)` may return a lazy array (a safetensors memory map) that is only indexed, so a host reads just the
    layers and rows / columns its devices hold, never the whole leaf (the multi-host rule: no process needs, or
    may assume it has, another process's shards).
    """
    graphdef, state = nnx.split(model)
    params = flat_params(state)
    leaves = model_leaves(model, fam)
    check_keys(leaves, params, available, source)
    new_values = {}
    for leaf in progress_bar(leaves, desc=f"loading {fam.name}", enabled=progress, unit="tensor"):
        target = params[leaf.jax_path]
        dtype = param_dtype or target.dtype
        sharding = shardings.get(leaf.jax_path) if shardings else None
        if sharding is None:
            host = _cast(leaf.to_jax([get(k) for k in leaf.torch_keys]), dtype)
            new_values[leaf.jax_path] = jnp.asarray(host)
        else:
            new_values[leaf.jax_path] = _place_sharded(leaf, get, tuple(target.shape), dtype, sharding)
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = path_str(path)
        flat.append((path, var.replace(new_values[key]) if key in new_values else var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _cast(host: np.ndarray, dtype) -> np.ndarray:
    # through fp32 so that e.g. bf16 -> fp16 rounds once from the exact value (numpy has no direct bf16 casts)
    if host.dtype == dtype:
        return host
    return host.astype(np.float32).astype(dtype) if host.dtype != np.float32 else host.astype(dtype)


def _bounds(index, shape) -> tuple[tuple[int, int], ...]:
    """(start, stop) per dim of a `make_array_from_callback` index (slices, possibly fewer than dims)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append((start, stop))
    return tuple(out)


def read_block(leaf: Leaf, get: Callable[[str], np.ndarray], bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The block `bounds` ((start, stop) per JAX dim) of `leaf` in JAX layout, reading only what it covers.

    JAX dim d of one layer is torch dim `perm[d]` (transposed kernels, conv permutations), so the JAX block maps to
    one torch block per layer; a stacked leaf's first dim picks the layers (one torch key each)."""
    if leaf.stacked:
        (l0, l1), rest = bounds[0], bounds[1:]
        keys = leaf.torch_keys[l0:l1]
    else:
        keys, rest = leaf.torch_keys, bounds
    if leaf.perm is not None:
        perm = leaf.perm
    else:
        perm = tuple(reversed(range(len(rest)))) if leaf.transpose else tuple(range(len(rest)))
    torch_index: list = [slice(None)] * len(rest)
    for d, (a, b) in enumerate(rest):
        torch_index[perm[d]] = slice(a, b)
    # np.array copies just the block out of a memory map (or an in-memory tensor) so the map is released at once
    return leaf.to_jax([np.array(get(k)[tuple(torch_index)]) for k in keys])


def _place_sharded(leaf: Leaf, get, shape: tuple[int, ...], dtype, sharding) -> jax.Array:
    """The leaf on `sharding`, one addressable device at a time: each distinct block is read, cast and placed on
    its device before the next is read (`make_array_from_callback` would hold every local block on the host at
    once: a whole stacked leaf on one host); replicas of a block are copied from the device that holds it."""
    placed: dict = {}
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        bounds = _bounds(index, shape)
        if bounds in placed:
            arrays.append(jax.device_put(placed[bounds], device))
            continue
        arr = jax.device_put(_cast(read_block(leaf, get, bounds), dtype), device)
        arr.block_until_ready()  # the host block is free before the next read
        placed[bounds] = arr
        arrays.append(arr)
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def export_tensors(model, fam):
    """Yield `(torch_key, np.ndarray)` for every parameter, in table order (host copies, one leaf at a time)."""
    params = flat_params(model)
    for leaf in model_leaves(model, fam):
        host = np.asarray(jax.device_get(params[leaf.jax_path][...]))
        yield from zip(leaf.torch_keys, leaf.to_torch(host))
