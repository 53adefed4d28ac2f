"""Atomic outputs: a file or a folder either appears complete at its final path or not at all.

Conversions write gigabytes; an interrupted or failing run must never leave a half-written checkpoint where a
complete one is expected (or destroy the previous one), so everything is written next to the destination and renamed
into place at the end.

A folder is built in a hidden sibling `.DST.tmp-XXXXXXXX` holding a lock file of its writer; a run killed too hard
to clean up (SIGKILL, power loss) leaves it behind, and the next run into the same DST removes it once no live
process holds its lock. An `Interrupted` exception (raised by the CLI's SIGTERM / SIGINT handler) unwinds through
the same cleanup as any error; it is held back while a finished folder is being swapped into place.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: liveness falls back to the writer's pid
    fcntl = None

WRITER_FILE = ".turbojax-writer"  # inside a temp folder: the lock (and pid) of the process writing it


class DestinationExists(FileExistsError):
    """DST is a non-empty folder and overwriting was not asked for (the CLI names its own flag in the hint)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        super().__init__(f"{path} already exists and is not empty; pass overwrite=True to replace it")


class Interrupted(KeyboardInterrupt):
    """A termination signal arrived; raised from the handler so that every temp output is removed on the way out."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


# ---- signals ----------------------------------------------------------------------------------------------------

_critical = 0  # > 0 while a finished folder is being renamed into place: a signal then is held back
_pending: list[int] = []
_depth = 0  # atomic_output_dir nesting (a pipeline folder holds component folders)


def raise_interrupted(signum, frame=None):
    """Signal handler (`signal.signal(signal.SIGTERM, raise_interrupted)`): raise `Interrupted`, or hold it back
    until the rename in progress is done so that DST is never left half-swapped."""
    if _critical:
        _pending.append(signum)
        return
    raise Interrupted(signum)


@contextmanager
def held_interrupts(reraise: bool = True) -> Iterator[None]:
    """Hold back `Interrupted` (from `raise_interrupted`) during a step that must not be cut short (a rename, an
    Orbax save whose background commit would outlive the folder it writes into), then raise it if `reraise`."""
    global _critical
    _critical += 1
    try:
        yield
    finally:
        _critical -= 1
    if reraise and not _critical and _pending:
        raise Interrupted(_pending.pop())


# ---- files --------------------------------------------------------------------------------------------------------

def current_umask() -> int:
    """The process umask (reading it needs setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path, *, folder: bool = False) -> None:
    """Give `path` the mode a plain `open()` / `mkdir()` would (0o666 / 0o777 minus the umask); for files written
    by libraries that create them 0o600 (safetensors' `save_file`, `tempfile.mkstemp`)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def copy_file(src, dst) -> Path:
    """Copy the bytes only: the copy gets the usual mode of a new file, not the source's (which may be 0o600)."""
    shutil.copyfile(src, dst)
    return Path(dst)


def copy_tree(src, dst) -> Path:
    """`shutil.copytree` without copying modes (new folders and files get the umask's defaults); links followed."""
    src, dst = Path(src), Path(dst)
    dst.mkdir()
    for item in sorted(src.iterdir()):
        (copy_tree if item.is_dir() else copy_file)(item, dst / item.name)
    return dst


def write_temp(path: Path, write: Callable[[Any], None]) -> Path:
    """A complete, fsynced new temp sibling of `path` written by `write(file)` (mode 0o666, so the umask applies,
    unlike mkstemp's 0600); removed again if `write` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit_file(path: Path, write: Callable[[Any], None]) -> Path:
    """Write through a new temp file next to `path` (same filesystem, so the final os.replace is atomic), fsync,
    rename; on any error the temp file is removed and `path` is untouched."""
    tmp = write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(path)


# ---- folders ------------------------------------------------------------------------------------------------------

def _claim(tmp: Path):
    """Create the writer file in `tmp` and lock it for the life of this run; returns the open file (keep it)."""
    f = open(tmp / WRITER_FILE, "w")
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    f.flush()
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # filesystem without locks: the pid recorded above decides
    return f


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: treat as alive
    return True


def _abandoned(tmp: Path) -> bool:
    """Whether the temp folder `tmp` belongs to no live writer (unknown folders count as in use)."""
    marker = tmp / WRITER_FILE
    try:
        f = open(marker, "r+")
    except OSError:
        return False  # no writer file (not ours, or just being created / renamed): leave it
    with f:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True  # nobody holds the lock: its writer is gone (the lock dies with the process)
            except BlockingIOError:
                return False
            except OSError:
                pass  # locks not supported here: fall back to the pid
        try:
            info = json.loads(f.read())
            return info["host"] == socket.gethostname() and not _pid_alive(int(info["pid"]))
        except (ValueError, KeyError, TypeError):
            return False


def remove_stale_temps(dst) -> list[Path]:
    """Remove `.DST.tmp-XXXXXXXX` siblings of `dst` left by dead runs, and the `.DST.old-XXXXXXXX` copy a dead run
    was deleting after its swap. A `.old` copy with no `dst` (the run died between moving DST aside and moving the
    new folder in) is moved back to `dst`. Only exact matches of our naming are touched; returns what was removed."""
    dst = Path(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    try:
        siblings = [p for p in parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    temps = [p for p in siblings if ".tmp-" in p.name]
    olds = [p for p in siblings if ".old-" in p.name]
    removed = []
    live_writer = False
    for t in temps:
        if _abandoned(t):
            shutil.rmtree(t, ignore_errors=True)
            removed.append(t)
        else:
            live_writer = True
    if live_writer or not olds:
        return removed  # a concurrent run may be swapping right now: its `.old` copy is its own business
    if not dst.exists() and len(olds) == 1:
        os.replace(olds[0], dst)
        warnings.warn(f"{dst}: restored from {olds[0].name} left by an interrupted run", stacklevel=3)
        return removed
    if dst.exists():
        for o in olds:
            shutil.rmtree(o, ignore_errors=True)
            removed.append(o)
    return removed


@contextmanager
def atomic_output_dir(dst, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh sibling temp dir; on success it becomes `dst`, on error it is deleted and `dst` is untouched.

    An existing non-empty `dst` is an error (`DestinationExists`) unless `overwrite`, in which case it is replaced
    only once the new folder is complete (moved aside, the new one renamed in, then the old one deleted). Temp
    folders of dead runs into the same `dst` are removed first (`remove_stale_temps`).
    """
    global _depth
    dst = Path(dst)

    def check():
        if dst.exists() and not dst.is_dir():
            raise FileExistsError(f"{dst} exists and is not a folder; refusing to replace it")
        if dst.is_dir() and any(dst.iterdir()) and not overwrite:
            raise DestinationExists(dst)

    if _pending:
        raise Interrupted(_pending.pop())
    remove_stale_temps(dst)
    check()  # fail before any expensive work
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()  # mode 0o777 minus the umask: it becomes the output folder
    writer = None
    _depth += 1
    try:
        writer = _claim(tmp)
        yield tmp
        # Inside an enclosing output a held signal stops the run right after the swap (the outer folder is then
        # removed); for the outermost one the work is complete and in place, so the run ends normally (the next
        # atomic_output_dir of this process raises it).
        with held_interrupts(reraise=_depth > 1):
            check()  # dst may have appeared while we were writing
            writer.close()
            (tmp / WRITER_FILE).unlink()
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
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _depth -= 1
