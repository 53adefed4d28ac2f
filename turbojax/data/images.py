"""Real images from a folder (PNG / JPEG / WebP, recursive), resized and centre-cropped to the training resolution.

`list_images(folder)` is the sorted list of candidate files (by extension; the order is the record order of the
latents cache). `load_image(path, width, height)` returns uint8 `[H, W, 3]` or raises `BadImage` with the reason:
unreadable and corrupt files are skipped by the caller and counted in its summary, never fatal.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class BadImage(ValueError):
    pass


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def load_image(path, width: int, height: int) -> np.ndarray:
    """uint8 `[height, width, 3]`: scaled so the shorter side fits (Lanczos), then the centre crop."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated files fail here, not later
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: {type(e).__name__}: {e}") from None
    w, h = im.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - width) // 2, (nh - height) // 2
    return np.asarray(im.crop((left, top, left + width, top + height)), np.uint8)
