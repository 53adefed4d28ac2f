"""Streaming safetensors writer: the header is computed from declared shapes/dtypes up front, then a producer is
asked for each tensor in file order and each is dropped before the next; the bytes equal the reference writer's
(format facts: `safetensors_format`)."""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from turbojax.convert.atomic import commit_file as _commit
from turbojax.convert.safetensors_format import (DEFAULT_INDEX_NAME, SafetensorsError, _CHUNK_BYTES, _Entry, _NP_OF,
                                                 _RANK, _dtype_name, _index_filename)


@dataclass(frozen=True)
class _Planned(_Entry):  # offsets here are relative to the data region
    name: str = ""
    producer: Callable[[], Any] | None = None


def _as_specs(tensors) -> list[tuple]:
    """Accept an iterable of (name, shape, dtype, producer) or a mapping name -> array / (shape, dtype, producer)."""
    if isinstance(tensors, Mapping):
        out = []
        for name, v in tensors.items():
            if isinstance(v, tuple) and len(v) == 3 and callable(v[2]):
                out.append((name, *v))
            else:
                v = v if hasattr(v, "dtype") and hasattr(v, "shape") else np.asarray(v)
                out.append((name, tuple(v.shape), v.dtype, (lambda v=v: v)))
        return out
    return list(tensors)


def _check_metadata(path, metadata):
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in metadata.items()):
        raise SafetensorsError(f"{path}: metadata must map str to str, got {metadata!r}")
    return dict(metadata)


def _plan(path, tensors, metadata) -> tuple[bytes, list[_Planned]]:
    metadata = _check_metadata(path, metadata)
    specs, seen = [], set()
    for spec in _as_specs(tensors):
        if len(spec) != 4:
            raise SafetensorsError(f"{path}: tensors must be (name, shape, dtype, producer), got {spec!r}")
        name, shape, dtype, producer = spec
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"{path}: invalid tensor name {name!r}")
        if name in seen:
            raise SafetensorsError(f"{path}: key {name!r} is given twice")
        seen.add(name)
        st = _dtype_name(dtype)
        if st is None:
            raise SafetensorsError(f"{path}: key {name!r}: unsupported dtype {dtype!r}")
        try:
            shape = tuple(int(d) for d in shape)
        except TypeError:
            raise SafetensorsError(f"{path}: key {name!r}: shape must be a sequence of ints, got {shape!r}") from None
        if any(d < 0 for d in shape):
            raise SafetensorsError(f"{path}: key {name!r}: negative dimension in {shape}")
        specs.append((name, st, shape, producer))
    # The reference writer's order: dtype rank descending, then name (Python str order == UTF-8 byte order).
    specs.sort(key=lambda s: (-_RANK[s[1]], s[0]))
    # (With no tensors and metadata={} the reference writer emits broken JSON; we write `{"__metadata__":{}}`.)
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    planned, pos = [], 0
    for name, st, shape, producer in specs:
        dt = _NP_OF[st]
        end = pos + math.prod(shape) * dt.itemsize
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [pos, end]}
        planned.append(_Planned(st, dt, shape, pos, end, name, producer))
        pos = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, planned


def safetensors_header(tensors, metadata=None) -> bytes:
    """The 8-byte length plus padded JSON header `write_safetensors` would write (producers are not called)."""
    return _plan("<header>", tensors, metadata)[0]


def _progress_enabled(enabled: bool) -> bool:
    if not enabled or os.environ.get("TURBOJAX_NO_PROGRESS") == "1":
        return False
    force = os.environ.get("TURBOJAX_PROGRESS")
    return force != "0" and (force == "1" or sys.stderr.isatty())


def _write_tensor(f, path, t: _Planned, arr) -> None:
    arr = np.asarray(arr)  # also brings jax arrays / numpy scalars to the host
    if tuple(arr.shape) != t.shape:
        raise SafetensorsError(f"{path}: key {t.name!r}: producer returned shape {tuple(arr.shape)}, declared "
                               f"{t.shape}")
    got = _dtype_name(arr.dtype)
    if got != t.dtype_name:
        hint = (" (np.save/np.load turn ml_dtypes arrays into raw void bytes: .view() them as the real dtype)"
                if arr.dtype.kind == "V" else "")
        raise SafetensorsError(f"{path}: key {t.name!r}: producer returned dtype {arr.dtype} "
                               f"({got or 'unsupported'}), declared {t.dtype_name}{hint}")
    nbytes = t.end - t.begin
    if not nbytes:
        return
    if arr.flags.c_contiguous and arr.dtype == t.dtype:
        # Zero-copy: a memmap or a fresh array goes straight to the file.
        f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        return
    # Non-contiguous or big-endian: convert a slab of rows at a time so the extra memory stays bounded.
    a = arr.reshape(1) if arr.ndim == 0 else arr
    row = max(1, a[:1].nbytes if a.shape[0] else 1)
    step = max(1, _CHUNK_BYTES // row)
    for i in range(0, a.shape[0], step):
        chunk = np.ascontiguousarray(a[i: i + step], dtype=t.dtype)
        f.write(memoryview(chunk.reshape(-1).view(np.uint8)))
        del chunk


def write_safetensors(path, tensors, metadata: Mapping[str, str] | None = None, *, progress: bool = False,
                      desc: str | None = None) -> Path:
    """Write a safetensors file atomically, calling each producer once, in file order, one tensor in memory.

    `tensors`: iterable of `(name, shape, dtype, producer)` (dtype: numpy dtype or safetensors name such as "BF16";
    `producer()` returns the array, e.g. a memmap) or a mapping name -> array. The bytes equal what
    `safetensors.numpy.save_file` / `safetensors.torch.save_file` write for the same tensors and metadata
    (metadata keys stay in the given order). A temp file in the same folder is renamed over `path` at the end;
    on any error it is removed and `path` is untouched.
    """
    path = Path(path)
    header, planned = _plan(path, tensors, metadata)
    total = len(header) + (planned[-1].end if planned else 0)
    bar = None
    if _progress_enabled(progress):
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=desc or path.name, unit="B", unit_scale=True, unit_divisor=1024, leave=False)

    def write(f):
        f.write(header)
        for i, t in enumerate(planned):
            arr = t.producer()
            _write_tensor(f, path, t, arr)
            del arr  # drop it before the next producer runs: peak memory stays at one tensor
            if bar is not None:
                bar.update(t.end - t.begin)
                bar.set_postfix_str(f"{i + 1}/{len(planned)} tensors", refresh=False)
        if f.tell() != total:  # cannot happen unless a check above is wrong; never leave a bad file behind
            raise SafetensorsError(f"{path}: wrote {f.tell()} bytes, expected {total}")

    try:
        if bar is not None:
            bar.update(len(header))
        return _commit(path, write)
    finally:
        if bar is not None:
            bar.close()


def format_index_json(weight_map: Mapping[str, str], metadata: Mapping[str, Any]) -> str:
    """The shard index text exactly as diffusers' `save_pretrained` writes it."""
    return json.dumps({"metadata": dict(metadata), "weight_map": dict(weight_map)}, indent=2, sort_keys=True) + "\n"


def write_index_json(path, index: str | bytes | Mapping[str, Any]) -> Path:
    """Write a shard index atomically: str/bytes verbatim (no newline translation), a dict in diffusers' format."""
    if isinstance(index, Mapping):
        index = format_index_json(index["weight_map"], index.get("metadata", {}))
    data = index.encode("utf-8") if isinstance(index, str) else bytes(index)
    return _commit(Path(path), lambda f: f.write(data))


def write_sharded(folder, layout: Mapping[str, Sequence[str]], tensors, *, metadata: Mapping[str, str] | None = None,
                  file_metadata: Mapping[str, Mapping[str, str] | None] | None = None,
                  index_name: str = DEFAULT_INDEX_NAME, index: str | bytes | Mapping | bool | None = None,
                  index_metadata: Mapping[str, Any] | None = None, progress: bool = False) -> list[Path]:
    """Write the files of `layout` ({file name: keys}) into the existing `folder`, plus the shard index.

    `tensors`: mapping key -> `(shape, dtype, producer)` or array; every key must be placed in exactly one file.
    Each file gets `file_metadata[name]` if given, else `metadata` (diffusers uses {"format": "pt"}).
    Index: `index=None` writes one in diffusers' format when there is more than one file, with metadata
    `{"total_size": sum of tensor bytes, **index_metadata}`; a str/bytes `index` is written verbatim (to reproduce
    an original index exactly), a dict is formatted like diffusers, `False` writes none. Files are written one by
    one (each atomically); wrap the call in `atomic_output_dir` for an all-or-nothing folder.
    """
    folder = Path(folder)
    specs = {s[0]: s for s in _as_specs(tensors)}
    placed: dict[str, str] = {}
    for fname, keys in layout.items():
        _index_filename(folder / index_name, "<layout>", fname)
        for k in keys:
            if k in placed:
                raise SafetensorsError(f"{folder}: key {k!r} is placed in both {placed[k]!r} and {fname!r}")
            if k not in specs:
                raise SafetensorsError(f"{folder}: key {k!r} of {fname!r} has no tensor")
            placed[k] = fname
    unplaced = sorted(set(specs) - set(placed))
    if unplaced:
        raise SafetensorsError(f"{folder}: key {unplaced[0]!r} is in no file of the layout ({len(unplaced)} such)")
    written = []
    for i, (fname, keys) in enumerate(layout.items()):
        meta = file_metadata[fname] if file_metadata is not None and fname in file_metadata else metadata
        written.append(write_safetensors(folder / fname, [specs[k] for k in keys], meta, progress=progress,
                                         desc=f"{fname} [{i + 1}/{len(layout)}]"))
    if index is None and len(layout) > 1:
        # dtypes were validated by write_safetensors above
        total = sum(math.prod(int(d) for d in s[1]) * _NP_OF[_dtype_name(s[2])].itemsize for s in specs.values())
        index = {"metadata": {"total_size": total, **(index_metadata or {})}, "weight_map": placed}
    if index is not None and index is not False:
        written.append(write_index_json(folder / index_name, index))
    return written
