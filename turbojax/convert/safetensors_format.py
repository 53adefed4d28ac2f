"""The safetensors format as this package reads and writes it: dtype table, header entries, errors.

Format facts this module relies on (checked against `safetensors` 0.8 and diffusers' `save_pretrained`):

* file = u64 little-endian header length N, N bytes of UTF-8 JSON padded with spaces to a multiple of 8, then the
  data region; `data_offsets` are relative to the first data byte and must tile it exactly (zero-size tensors sit
  at the same offset as their neighbour).
* the reference writer orders tensors by dtype rank, descending (U64, I64, F64, C64, F32, U32, I32, BF16, F16, ...,
  I8, U8, BOOL -- the reverse of its Rust `Dtype` enum), then by name; the JSON is compact (no spaces), non-ASCII
  is written raw, `__metadata__` comes first and is omitted when metadata is None.
* it writes metadata keys in hash-map order, which changes from run to run when there is more than one key; we
  keep the caller's (insertion) order, and the reader keeps the file's order, so re-writing a file read from disk
  reproduces it exactly.
* diffusers writes the shard index as `json.dumps(index, indent=2, sort_keys=True) + "\\n"` (ASCII-escaped) with
  `{"metadata": {"total_size": <sum of tensor bytes>}, "weight_map": {key: file}}`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

DEFAULT_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# The reference reader refuses headers above 100 MB; the cap also stops a corrupt length from making us read GBs.
MAX_HEADER_BYTES = 100_000_000
_CHUNK_BYTES = 64 << 20  # copy granularity for arrays that must be made contiguous / little-endian
_READ_CHUNK = 1 << 30  # a single read(2) returns at most ~2 GiB on Linux, so large tensors are read in pieces


class SafetensorsError(ValueError):
    """A malformed or inconsistent safetensors file, shard index or write request."""


def _ml(name):
    t = getattr(ml_dtypes, name, None)  # the rarer float8 types only exist in recent ml_dtypes
    return None if t is None else np.dtype(t)


# Ascending rank = the reference implementation's `Dtype` enum order; its writer sorts by rank descending. Sub-byte
# types (F4, F6_*) are packed and have no numpy equivalent, so they are not supported.
_DTYPE_TABLE = [
    ("BOOL", np.dtype(np.bool_)), ("U8", np.dtype("u1")), ("I8", np.dtype("i1")),
    ("F8_E5M2", _ml("float8_e5m2")), ("F8_E4M3", _ml("float8_e4m3fn")), ("F8_E8M0", _ml("float8_e8m0fnu")),
    ("F8_E4M3FNUZ", _ml("float8_e4m3fnuz")), ("F8_E5M2FNUZ", _ml("float8_e5m2fnuz")),
    ("I16", np.dtype("<i2")), ("U16", np.dtype("<u2")), ("F16", np.dtype("<f2")), ("BF16", _ml("bfloat16")),
    ("I32", np.dtype("<i4")), ("U32", np.dtype("<u4")), ("F32", np.dtype("<f4")), ("C64", np.dtype("<c8")),
    ("F64", np.dtype("<f8")), ("I64", np.dtype("<i8")), ("U64", np.dtype("<u8")),
]
_RANK = {name: i for i, (name, _) in enumerate(_DTYPE_TABLE)}
_NP_OF = {name: dt for name, dt in _DTYPE_TABLE if dt is not None}
_NAME_OF = {dt: name for name, dt in _NP_OF.items()}


def _dtype_name(dt) -> str | None:
    """safetensors name of a numpy dtype (either byte order) or of a safetensors name string; None if unsupported."""
    if isinstance(dt, str) and dt in _NP_OF:
        return dt
    try:
        dt = np.dtype(dt)
    except TypeError:
        return None
    return _NAME_OF.get(dt.newbyteorder("<") if dt.byteorder in "<>" else dt)


@dataclass(frozen=True)
class _Entry:
    dtype_name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _no_duplicates(path, what):
    def hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise SafetensorsError(f"{path}: {what} has duplicate key {k!r}")
            out[k] = v
        return out
    return hook


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(path, key, info, data_start) -> _Entry:
    where = f"{path}: key {key!r}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where}: header entry must be an object, got {type(info).__name__}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise SafetensorsError(f"{where}: header entry has no {field!r}")
    name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(name, str) or name not in _NP_OF:
        hint = "" if name not in _RANK else " (needs a newer ml_dtypes)"
        raise SafetensorsError(f"{where}: unsupported dtype {name!r}{hint}; supported: {sorted(_NP_OF)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    dtype = _NP_OF[name]
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise SafetensorsError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but "
                               f"{name}{shape} needs {expected}")
    return _Entry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _index_filename(index_path, key, fname) -> str:
    if not isinstance(fname, str) or not fname or fname in (".", "..") or "/" in fname or "\\" in fname:
        raise SafetensorsError(f"{index_path}: weight_map[{key!r}] must be a file name in the same folder, "
                               f"got {fname!r}")
    return fname
