"""Sharded on-disk tables: keyed folders, shards committed one by one, resumable after a kill.

A cache is a folder `<root>/<kind>-<key16>/` holding `manifest.json` and shards `<table>-00003.safetensors`. The key
is the SHA-256 of the JSON of everything that determines the content (`fields`), so a changed input lands in a new
folder: a stale cache is never reused and never deleted (it is named in a message, and the user removes it).

Writing: the manifest is committed first (without `complete`), then each shard through a temp sibling + rename
(`turbojax.convert.atomic.commit_file`), so a shard file that exists is complete. A rerun after a kill finds the
same folder by its key and builds only the missing shards; shards are pure functions of their record range, so the
resumed cache equals an uninterrupted build byte for byte. The manifest is committed again with `complete: true`
and the summary (counts, skipped files) at the end.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from turbojax.convert import atomic

MANIFEST = "manifest.json"
FULL_HASH_LIMIT = 64 << 20   # files up to this size are hashed whole
SAMPLE_BYTES = 1 << 20       # larger ones: head (header + first tensors), 8 evenly spaced blocks and the tail


class CacheError(ValueError):
    """A user-facing cache problem (missing / incomplete cache, foreign folder); one `error:` line."""


def file_digest(path: Path) -> str:
    """SHA-256 of a file: whole up to 64 MiB; above, its size, first 16 MiB (the safetensors header and the first
    tensors), 8 spaced 1 MiB blocks and the last 1 MiB (hashing a 16 GB encoder whole would cost a minute at
    every start; fine-tuned weights of the same shapes differ in every sampled block)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(SAMPLE_BYTES * 8), b""):
                h.update(chunk)
        else:
            h.update(f.read(16 * SAMPLE_BYTES))
            for k in range(1, 9):
                f.seek(size * k // 10)
                h.update(f.read(SAMPLE_BYTES))
            f.seek(size - SAMPLE_BYTES)
            h.update(f.read())
    return h.hexdigest()


def folder_fingerprint(folder) -> str:
    """Fingerprint of a model component folder (weights, config, tokenizer files): names and file digests."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(str(p.relative_to(folder)).encode() + b"\0" + file_digest(p).encode() + b"\0")
    return h.hexdigest()


def key_of(fields: Mapping) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _diff(old: Mapping, new: Mapping) -> str:
    keys = sorted(set(old) | set(new))
    changed = [k for k in keys if old.get(k) != new.get(k)]
    def short(v):
        s = json.dumps(v, default=str)
        return s if len(s) <= 40 else s[:37] + "..."
    return ", ".join(f"{k} {short(old.get(k))} -> {short(new.get(k))}" for k in changed[:4]) + \
        (f" (+{len(changed) - 4} more)" if len(changed) > 4 else "")


def locate(root, kind: str, fields: Mapping, *, progress: Callable[[str], None] = print) -> Path:
    """The folder of the cache of `kind` for `fields` (it may not exist yet). Other caches of the same kind in
    `root` are stale for these inputs: they are named, with what changed, and left alone."""
    root = Path(root)
    key = key_of(fields)
    folder = root / f"{kind}-{key[:16]}"
    if folder.exists():
        man = _read_manifest(folder)
        if man is None and any(not p.name.startswith(".") for p in folder.iterdir()):  # temps: a build starting
            raise CacheError(f"{folder} exists but holds no readable {MANIFEST}: not a turbojax cache; move it away")
        if man is not None and man.get("key") != key:  # a 16-hex-digit prefix collision: practically never
            raise CacheError(f"{folder}/{MANIFEST} has key {man.get('key')}, expected {key}; move the folder away")
        return folder
    for other in sorted(root.glob(f"{kind}-*")):
        man = _read_manifest(other) if other.is_dir() else None
        if man is not None and man.get("kind") == kind:
            progress(f"{kind} cache {other} was built from other inputs ({_diff(man.get('fields', {}), fields)}); "
                     f"it is left as it is and a new one is built in {folder}")
    return folder


def _write_json(path: Path, obj) -> None:
    atomic.commit_file(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True, default=str).encode()))


def shard_name(table: str, index: int) -> str:
    return f"{table}-{index:05d}.safetensors"


def build(folder: Path, kind: str, fields: Mapping, tables: Mapping[str, int],
          make_shard: Callable[[str, int], tuple[dict[str, np.ndarray], dict]], *,
          progress: Callable[[str], None] = print, desc: str = "") -> dict:
    """Build the missing shards of `folder` and return its manifest.

    `tables` maps a table name to its number of shards; `make_shard(table, i)` returns (arrays, summary) for shard
    i: the arrays are written with the summary (JSON) as safetensors metadata, so that the final manifest
    can add the summaries of shards written by an earlier, killed run."""
    from safetensors.numpy import save
    from turbojax.utils import progress_bar
    folder.mkdir(parents=True, exist_ok=True)
    for tmp in folder.glob(".*.tmp"):  # temps of a killed run: this keyed folder is ours, never a user's
        tmp.unlink(missing_ok=True)
    man = _read_manifest(folder)
    if man is not None and man.get("complete"):
        return man
    key = key_of(fields)
    man = {"kind": kind, "key": key, "fields": dict(fields), "tables": dict(tables), "complete": False}
    _write_json(folder / MANIFEST, man)
    todo = [(t, i) for t, n in tables.items() for i in range(n) if not (folder / shard_name(t, i)).is_file()]
    done = sum(tables.values()) - len(todo)
    if done:
        progress(f"resuming the {kind} cache in {folder}: {done} of {sum(tables.values())} shards already written")
    for table, i in progress_bar(todo, desc=desc or f"{kind} cache", unit="shard"):
        arrays, summary = make_shard(table, i)
        meta = {"summary": json.dumps(summary, sort_keys=True)}  # one key: safetensors orders keys by hash
        data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta)
        atomic.commit_file(folder / shard_name(table, i), lambda f, d=data: f.write(d))
    man["summary"] = summarize(folder, tables)
    man["complete"] = True
    _write_json(folder / MANIFEST, man)
    return man


def summarize(folder: Path, tables: Mapping[str, int]) -> dict:
    """Per table: summed numbers and concatenated lists of the shards' summaries."""
    from safetensors import safe_open
    out: dict = {}
    for table, n in tables.items():
        agg: dict = {}
        for i in range(n):
            with safe_open(str(folder / shard_name(table, i)), "np") as f:
                for k, v in json.loads((f.metadata() or {}).get("summary", "{}")).items():
                    agg[k] = agg.get(k, [] if isinstance(v, list) else 0) + v
        out[table] = agg
    return out


def is_complete(folder: Path) -> bool:
    man = _read_manifest(Path(folder))
    return bool(man and man.get("complete"))


def open_complete(folder: Path, kind: str, hint: str) -> dict:
    man = _read_manifest(folder)
    if man is None or man.get("kind") != kind:
        raise CacheError(f"no {kind} cache in {folder}; {hint}")
    if not man.get("complete"):
        raise CacheError(f"the {kind} cache in {folder} is incomplete (a build was interrupted); {hint}")
    return man


class Table:
    """Random access to the records of one table (rows of `key` arrays per shard, concatenated), memory-mapped."""

    def __init__(self, folder: Path, table: str, shards: int):
        from safetensors import safe_open
        self.files = [safe_open(str(Path(folder) / shard_name(table, i)), "np") for i in range(shards)]
        self.keys = set(self.files[0].keys()) if self.files else set()

    def column(self, key: str) -> np.ndarray:
        """One small array concatenated over shards (lengths, prompt ids)."""
        return np.concatenate([f.get_tensor(key) for f in self.files]) if self.files else np.zeros(0)

    def rows_per_shard(self, key: str) -> np.ndarray:
        return np.asarray([f.get_slice(key).get_shape()[0] for f in self.files], np.int64)

    def slice(self, shard: int, key: str, lo: int, hi: int) -> np.ndarray:
        return self.files[shard].get_slice(key)[lo:hi]

