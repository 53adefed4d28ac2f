"""Small shared helpers."""
from __future__ import annotations

import os
import sys


def progress_bar(iterable, *, desc: str, enabled: bool = True, total=None, unit: str = "it"):
    """tqdm over `iterable` when enabled and stderr is a terminal (or TURBOJAX_PROGRESS=1); plain iterable otherwise."""
    force = os.environ.get("TURBOJAX_PROGRESS")
    if not enabled or force == "0" or (force != "1" and not sys.stderr.isatty()):
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False)


def return_freed_buffers_to_os() -> None:
    """Make glibc give every buffer of 1 MiB or more its own mapping, returned to the OS when freed.

    glibc serves mid-sized buffers from the heap once big ones were freed (dynamic mmap threshold), so reading a
    model tensor by tensor would keep the freed memory of earlier tensors (measured in `bench/load_memory.py`:
    +463-651 MiB over model/N for an Orbax export with the default, +83-145 MiB with this). Process-wide, hence
    called by the command-line entry points, not the library. Not on the CPU backend: there the device buffers are
    host buffers too, and mapping each one fresh would cost a page fault per 4 KiB touched on every step."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def release_host_memory_early() -> None:
    """`return_freed_buffers_to_os` on accelerator hosts (where a 20B load's host peak is what matters)."""
    import jax
    if jax.default_backend() != "cpu":
        return_freed_buffers_to_os()
