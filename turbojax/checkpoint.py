"""Model weights as Orbax checkpoints, written and read a bounded part at a time.

Layout of an exported model directory:

    turbojax.json        family, model config (+ the original config.json text), scan layout, leaf index, and
                         the source safetensors layout (so `to-torch` reproduces the original files byte for byte)
    params/part-00000/   Orbax (StandardCheckpointer) checkpoints, each holding a group of parameter leaves
    params/part-00001/   as a nested dict keyed by the module path

Orbax serialises a whole pytree at once and copies it on the way, so one checkpoint per bounded group of leaves
keeps peak host memory near one part (~`max_part_bytes`, or the largest single leaf) instead of the model size.
Each part restores straight into target shardings (`jax.ShapeDtypeStruct(..., sharding=...)`): every process reads
only the storage chunks that overlap its own devices' shards. Leaves are stored in chunks of at most `CHUNK_BYTES`
(Orbax's default for a host array is one compressed chunk per leaf, which every device would decompress whole to
take its slice: a stacked 60-layer leaf of a 20B model is 4.5 GB). Exports written before chunking still load.
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import jax
import numpy as np

from turbojax.convert.atomic import held_interrupts

META_FILE = "turbojax.json"
FORMAT_VERSION = 1
CHUNK_BYTES = 16 << 20  # storage chunk bound: what a device's read may over-fetch at a shard edge


class CheckpointError(ValueError):
    pass


def _nest(flat: Mapping[tuple[str, ...], object]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def plan_parts(leaves: Mapping[tuple[str, ...], tuple[tuple[int, ...], str]], max_part_bytes: int
               ) -> list[list[tuple[str, ...]]]:
    """Group leaf paths (in the given order) into parts of at most `max_part_bytes` (a larger leaf stands alone)."""
    parts, current, size = [], [], 0
    for path, (shape, dtype) in leaves.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if current and size + nbytes > max_part_bytes:
            parts.append(current)
            current, size = [], 0
        current.append(path)
        size += nbytes
    if current:
        parts.append(current)
    return parts


def write_params(directory: Path, leaves: Mapping[tuple[str, ...], tuple[tuple[int, ...], str]],
                 produce: Callable[[tuple[str, ...]], np.ndarray], meta: dict, *,
                 max_part_bytes: int = 1 << 30, progress: Callable[[Iterable], Iterable] = lambda x: x,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
    """Write `params/part-*` and `turbojax.json` into `directory` (expected empty; callers make it atomic)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()  # Orbax refuses relative paths
    parts = plan_parts(leaves, max_part_bytes)
    index = []
    with ocp.StandardCheckpointer() as ckpt:
        for i, part in enumerate(progress(parts)):
            values = {}
            for path in part:
                arr = produce(path)
                shape, dtype = leaves[path]
                if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != np.dtype(dtype):
                    raise CheckpointError(f"leaf {'.'.join(path)}: produced {arr.shape} {arr.dtype}, "
                                          f"expected {tuple(shape)} {dtype}")
                values[path] = arr
            name = f"part-{i:05d}"
            with held_interrupts():  # a signal mid-save would leave Orbax's commit thread writing into a folder
                ckpt.save(directory / "params" / name, _nest(values),  # that the caller's cleanup is removing
                          save_args=_nest({p: ocp.SaveArgs(chunk_byte_size=chunk_bytes) for p in values}))
                ckpt.wait_until_finished()
            _scrub_marker(directory / "params" / name)
            index.append({"name": name, "leaves": [".".join(p) for p in part]})
            del values
    meta = dict(meta, format_version=FORMAT_VERSION, parts=index,
                leaves={".".join(p): {"shape": list(s), "dtype": str(np.dtype(d))} for p, (s, d) in leaves.items()})
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _scrub_marker(part: Path) -> None:
    """Orbax's commit marker names the (temporary) folder it was written in: keep the words, drop the path, so an
    export carries no path of the machine that wrote it (it is written atomically into a temp folder and renamed)."""
    marker = part / "commit_success.txt"
    if marker.is_file() and marker.read_text().startswith("Checkpoint commit was successful"):
        marker.write_text("Checkpoint commit was successful.")


def read_meta(directory: Path) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a turbojax model checkpoint (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt metadata ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt metadata (expected a JSON object)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format_version {meta.get('format_version')}")
    missing = [k for k in ("family", "config", "scan_layers", "parts", "leaves") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: corrupt metadata (no {', '.join(map(repr, missing))})")
    for part in meta["parts"]:
        if not (Path(directory) / "params" / part["name"]).is_dir():
            raise CheckpointError(f"{directory}: missing checkpoint part params/{part['name']}")
    return meta


def iter_parts(directory: Path, meta: dict, targets: Mapping[tuple[str, ...], object] | None = None
               ) -> Iterator[dict[tuple[str, ...], object]]:
    """Yield `{leaf path: array}` part by part. `targets` maps paths to `jax.ShapeDtypeStruct`s (dtype cast and
    sharding applied on restore); without targets, host numpy arrays in the stored dtype are returned."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()  # Orbax refuses relative paths
    with ocp.StandardCheckpointer() as ckpt:
        for part in meta["parts"]:
            paths = [tuple(p.split(".")) for p in part["leaves"]]
            target = None
            if targets is not None:
                target = _nest({p: targets[p] for p in paths})
            try:
                with held_interrupts():  # see write_params
                    restored = ckpt.restore(directory / "params" / part["name"], target)
            except Exception as e:  # orbax raises many types; name the part that failed
                raise CheckpointError(f"{directory}/params/{part['name']}: cannot restore ({e})") from e
            flat = _flatten(restored)
            missing = [p for p in paths if p not in flat]
            if missing:
                raise CheckpointError(f"{directory}/params/{part['name']}: missing leaves "
                                      f"{['.'.join(p) for p in missing]}")
            del restored
            _trim_heap()
            yield {p: flat[p] for p in paths}


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc): a restore's reader threads free their decode buffers into
    per-thread malloc arenas, where they would otherwise pile up part after part (bench/load_memory.py)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def host_target(shape, dtype):
    """A restore target that lands on this process's first device unsharded (used when no mesh is given)."""
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
