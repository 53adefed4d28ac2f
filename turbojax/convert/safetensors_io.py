"""Torch-free, streaming safetensors I/O: one tensor in memory at a time, byte-identical to the reference writer.

Real checkpoints are larger than host memory, so the reader parses the header itself and reads each tensor with
one positioned read (or a memory map), and the writer computes the header from declared shapes/dtypes up front and
then asks a producer for each tensor in file order, dropping it before asking for the next.

The format itself (dtypes, header entries, errors) is `safetensors_format`; the writer is `safetensors_write`,
re-exported here so that callers import one module.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from turbojax.convert.atomic import atomic_output_dir
from turbojax.convert.safetensors_format import (DEFAULT_INDEX_NAME, MAX_HEADER_BYTES, SafetensorsError,
                                                 _Entry, _READ_CHUNK, _index_filename, _no_duplicates, _parse_entry)
from turbojax.convert.safetensors_write import (format_index_json, safetensors_header, write_index_json,  # noqa: F401
                                                write_safetensors, write_sharded)

__all__ = [
    "CANONICAL_WEIGHTS", "DEFAULT_INDEX_NAME", "SafetensorsError", "SafetensorsFile", "SafetensorsFolder",
    "atomic_output_dir", "choose_weights", "format_index_json", "open_safetensors", "safetensors_header",
    "write_index_json", "write_safetensors", "write_sharded",
]


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
