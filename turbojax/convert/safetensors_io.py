"""Torch-free, streaming safetensors I/O: one tensor in memory at a time, byte-identical to the reference writer.

Real checkpoints are larger than host memory, so the reader parses the header itself and reads each tensor with
one positioned read (or a memory map), and the writer computes the header from declared shapes/dtypes up front and
then asks a producer for each tensor in file order, dropping it before asking for the next.

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

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from turbojax.convert.atomic import atomic_output_dir, commit_file as _commit

__all__ = [
    "CANONICAL_WEIGHTS", "DEFAULT_INDEX_NAME", "SafetensorsError", "SafetensorsFile", "SafetensorsFolder",
    "atomic_output_dir", "choose_weights", "format_index_json", "open_safetensors", "safetensors_header", "write_index_json", "write_safetensors",
    "write_sharded",
]

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


def _read_header(path: Path) -> tuple[int, dict[str, str] | None, dict[str, _Entry]]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise SafetensorsError(f"{path}: file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size} (truncated or not a "
                                   "safetensors file)")
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: header length {n} is above the {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise SafetensorsError(f"{path}: header does not start with '{{' (not a safetensors file?)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(path, "header"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object")

    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise SafetensorsError(f"{path}: __metadata__ must be an object of string values, got {metadata!r}")
    data_start, data_size = 8 + n, size - 8 - n
    entries = {key: _parse_entry(path, key, info, data_start) for key, info in header.items()}

    # The tensors must tile the data region exactly; checking the ends first names a truncated file as such.
    for key, e in entries.items():
        if e.end - data_start > data_size:
            raise SafetensorsError(
                f"{path}: key {key!r}: data_offsets [{e.begin - data_start}, {e.end - data_start}] run past the "
                f"data region ({data_size} bytes); the file is truncated ({size} bytes, expected at least "
                f"{e.end})")
    pos, prev = data_start, None
    for key, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin < pos:
            raise SafetensorsError(f"{path}: key {key!r} overlaps key {prev!r} in the data region")
        if e.begin > pos:
            raise SafetensorsError(f"{path}: key {key!r}: {e.begin - pos} bytes before it belong to no tensor")
        if e.nbytes:
            pos, prev = e.end, key
    if pos != size:
        raise SafetensorsError(f"{path}: {size - pos} trailing bytes after the last tensor"
                               + (f" {prev!r}" if prev else ""))
    return n, metadata, entries


class _Reader:
    """Reading API shared by one file and a folder of shards (`files`: name -> file, `_file_of`: key -> name).

    `get(key)` returns a fresh, writable array read from disk with one positioned read; `get(key, mmap=True)`
    returns a read-only `np.memmap` view instead, which costs no memory until touched. Dtypes are little-endian.
    """

    path: Path
    files: dict[str, "SafetensorsFile"]
    _file_of: dict[str, str]
    _metadata: dict | None
    index_path: Path | None = None
    index_text: str | None = None  # the index file's exact text, to write it back verbatim
    index_json: dict | None = None

    def _locate(self, key) -> tuple["SafetensorsFile", _Entry]:
        try:
            f = self.files[self._file_of[key]]
        except (KeyError, TypeError):
            raise KeyError(f"{key!r} is not a tensor of {self.path}") from None
        return f, f._entries[key]

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._file_of)

    def __contains__(self, key) -> bool:
        return key in self._file_of

    def shape(self, key) -> tuple[int, ...]:
        return self._locate(key)[1].shape

    def dtype(self, key) -> np.dtype:
        return self._locate(key)[1].dtype

    def st_dtype(self, key) -> str:
        """The dtype as written in the header ("BF16", "F32", ...)."""
        return self._locate(key)[1].dtype_name

    def nbytes(self, key) -> int:
        return self._locate(key)[1].nbytes

    def file_of(self, key) -> str:
        return self._locate(key)[0].path.name

    def get(self, key, *, mmap: bool = False) -> np.ndarray:
        f, e = self._locate(key)
        if mmap and e.nbytes:
            view = np.memmap(f.path, dtype=e.dtype, mode="r", offset=e.begin, shape=(math.prod(e.shape),))
            return view.reshape(e.shape)
        arr = np.empty(e.shape, e.dtype)
        buf = memoryview(arr.reshape(-1).view(np.uint8))
        with open(f.path, "rb", buffering=0) as fh:
            fh.seek(e.begin)
            done = 0
            while done < e.nbytes:
                got = fh.readinto(buf[done: done + _READ_CHUNK])
                if not got:
                    raise SafetensorsError(f"{f.path}: key {key!r}: file ended after {done} of {e.nbytes} bytes "
                                           "(was it modified after opening?)")
                done += got
        return arr

    def spec(self, key) -> tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]:
        """`(key, shape, dtype, producer)` for `write_safetensors`; the producer maps the tensor, copying nothing."""
        e = self._locate(key)[1]
        return key, e.shape, e.dtype, (lambda: self.get(key, mmap=True))

    @property
    def metadata(self) -> dict | None:
        """A copy of the `__metadata__` (file order) or of the index's "metadata"; None when absent (not `{}`)."""
        return None if self._metadata is None else dict(self._metadata)

    @property
    def layout(self) -> dict[str, list[str]]:
        """{file name: sorted keys}, files in name order (diffusers' -0000i-of-0000n names sort by shard)."""
        return {name: sorted(f._entries) for name, f in self.files.items()}


class SafetensorsFile(_Reader):
    """One `.safetensors` file; the header is parsed and validated on construction, tensors are read on demand."""

    def __init__(self, path):
        self.path = Path(path)
        self.header_size, self._metadata, self._entries = _read_header(self.path)
        self.files = {self.path.name: self}
        self._file_of = dict.fromkeys(self._entries, self.path.name)

    def __repr__(self):
        return f"SafetensorsFile({str(self.path)!r}, {len(self._entries)} tensors)"


def _index_filename(index_path, key, fname) -> str:
    if not isinstance(fname, str) or not fname or fname in (".", "..") or "/" in fname or "\\" in fname:
        raise SafetensorsError(f"{index_path}: weight_map[{key!r}] must be a file name in the same folder, "
                               f"got {fname!r}")
    return fname


# What diffusers (`diffusion_pytorch_model`) and transformers (`model`) load from a folder: the index of that name
# if present, else the single file. Other .safetensors beside them (a LoRA, an fp16 variant) are not the model.
CANONICAL_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def choose_weights(folder, weights_names: Sequence[str] = CANONICAL_WEIGHTS) -> tuple[Path, bool]:
    """(path, is_index) of the weights diffusers / transformers would load from `folder`.

    The canonical index (`<name>.index.json`) wins, then the canonical file; without either, the folder's only
    index, else its only `.safetensors`. Several candidates and no canonical one is ambiguous and raises, naming
    them. `weights_names`: the canonical names (a family's own, or both libraries' when unknown).
    """
    folder = Path(folder)

    def visible(pattern):
        return sorted(p for p in folder.glob(pattern) if not p.name.startswith(".") and p.is_file())

    # the caller's names first, then either library's (a diffusers-named file in a transformers folder is still
    # more likely the model than a variant's index)
    for names in (weights_names, CANONICAL_WEIGHTS):
        canonical = []
        for name in names:
            if (folder / (name + ".index.json")).is_file():
                canonical.append((folder / (name + ".index.json"), True))
            elif (folder / name).is_file():
                canonical.append((folder / name, False))
        if len(canonical) == 1:
            return canonical[0]
        if len(canonical) > 1:
            raise SafetensorsError(f"{folder}: both {[p.name for p, _ in canonical]} are present; it is unclear "
                                   "which is the model (keep one)")
    wanted = " / ".join(n for n in weights_names)
    indexes = visible("*.safetensors.index.json")
    if len(indexes) == 1:
        return indexes[0], True
    if len(indexes) > 1:
        raise SafetensorsError(f"{folder}: several shard indexes {[p.name for p in indexes]} and none is named "
                               f"{wanted}.index.json; keep only the model's")
    found = visible("*.safetensors")
    if not found:
        raise SafetensorsError(f"{folder}: no .safetensors file in this folder")
    if len(found) > 1:
        raise SafetensorsError(f"{folder}: several .safetensors files {[p.name for p in found]}, none named "
                               f"{wanted} and no *.safetensors.index.json saying how they fit together; it is "
                               "unclear which is the model")
    return found[0], False


class SafetensorsFolder(_Reader):
    """The weights of a model folder: one `.safetensors` file, or shards listed by a `*.safetensors.index.json`,
    chosen as diffusers / transformers choose them (`choose_weights`).

    Same reading API as `SafetensorsFile`; keys are unique across shards. `metadata` is the index's "metadata" for
    a sharded folder, else the single file's `__metadata__`.
    """

    def __init__(self, path, index: str | os.PathLike | None = None,
                 weights_names: Sequence[str] = CANONICAL_WEIGHTS):
        self.path = Path(path)
        if index is None:
            chosen, is_index = choose_weights(self.path, weights_names)
            index = chosen if is_index else None
        self.index_path = None if index is None else Path(index)
        self.files, self._file_of = {}, {}
        if self.index_path is None:
            f = SafetensorsFile(chosen)
            self.files, self._file_of, self._metadata = f.files, f._file_of, f._metadata
            return
        self._open_index()

    def _open_index(self):
        ip = self.index_path
        try:
            self.index_text = ip.read_bytes().decode("utf-8")
            index = json.loads(self.index_text, object_pairs_hook=_no_duplicates(ip, "index"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{ip}: not valid UTF-8 JSON ({e})") from None
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise SafetensorsError(f"{ip}: expected an object with a 'weight_map' object")
        meta = index.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise SafetensorsError(f"{ip}: 'metadata' must be an object, got {meta!r}")
        self.index_json = index
        self._metadata = None if meta is None else dict(meta)
        wanted: dict[str, set[str]] = {}
        for key, fname in index["weight_map"].items():
            wanted.setdefault(_index_filename(ip, key, fname), set()).add(key)
            self._file_of[key] = fname
        for fname in sorted(wanted):
            p = self.path / fname
            if not p.is_file():
                raise SafetensorsError(f"{ip}: shard {fname!r} (holding e.g. {min(wanted[fname])!r}) does not exist "
                                       f"in {self.path}")
            shard = SafetensorsFile(p)
            have = set(shard.keys())
            missing, extra = sorted(wanted[fname] - have), sorted(have - wanted[fname])
            if missing:
                raise SafetensorsError(f"{ip}: key {missing[0]!r} is listed in shard {fname!r} but {p} does not "
                                       f"hold it ({len(missing)} missing)")
            if extra:
                where = self._file_of.get(extra[0])
                why = f"the index puts it in {where!r}" if where else "the index does not list it"
                raise SafetensorsError(f"{p}: holds key {extra[0]!r} but {why} ({len(extra)} such keys)")
            self.files[fname] = shard

    def __repr__(self):
        return f"SafetensorsFolder({str(self.path)!r}, {len(self.files)} files, {len(self._file_of)} tensors)"


def open_safetensors(path, weights_name: str | None = None) -> SafetensorsFile | SafetensorsFolder:
    """Open a `.safetensors` file, a folder (single file or sharded with an index), or an index JSON file.

    For a folder, `weights_name` is the model's canonical file name (e.g. `model.safetensors` for a transformers
    checkpoint); by default either library's name counts (see `choose_weights`)."""
    p = Path(path)
    if p.is_dir():
        return SafetensorsFolder(p, weights_names=(weights_name,) if weights_name else CANONICAL_WEIGHTS)
    if p.is_file():
        if p.name.endswith(".index.json"):
            return SafetensorsFolder(p.parent, index=p)
        return SafetensorsFile(p)
    raise FileNotFoundError(f"{p}: no such safetensors file or folder")


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
