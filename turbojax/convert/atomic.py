"""Atomic outputs: a file or a folder either appears complete at its final path or not at all.

Conversions write gigabytes; an interrupted or failing run must never leave a half-written checkpoint where a
complete one is expected (or destroy the previous one), so everything is written next to the destination and renamed
into place at the end.
"""
from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def commit_file(path: Path, write: Callable[[Any], None]) -> Path:
    """Write through a new temp file next to `path` (same filesystem, so the final os.replace is atomic), fsync,
    rename; on any error the temp file is removed and `path` is untouched. Mode 0o666 lets the umask apply."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_output_dir(dst, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh sibling temp dir; on success it becomes `dst`, on error it is deleted and `dst` is untouched.

    An existing non-empty `dst` is an error unless `overwrite`, in which case it is replaced only once the new
    folder is complete (moved aside, the new one renamed in, then the old one deleted).
    """
    dst = Path(dst)

    def check():
        if dst.exists() and not dst.is_dir():
            raise FileExistsError(f"{dst} exists and is not a folder; refusing to replace it")
        if dst.is_dir() and any(dst.iterdir()) and not overwrite:
            raise FileExistsError(f"{dst} already exists and is not empty; pass overwrite=True to replace it")

    check()  # fail before any expensive work
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        check()  # dst may have appeared while we were writing
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{secrets.token_hex(4)}")
            os.replace(dst, old)
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old, dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
