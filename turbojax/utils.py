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
