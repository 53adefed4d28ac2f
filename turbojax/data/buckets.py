"""Aspect-ratio buckets: train at several resolutions instead of centre-cropping every real image to one.

`data.buckets` lists the training resolutions as "WxH" strings (e.g. "1024x1024,1216x832,832x1216"; empty: off, one
resolution `data.width` x `data.height`). Each real image goes to the bucket whose aspect ratio is nearest its own
(in log ratio, so 2:1 and 1:2 are equally far from 1:1), and is resized and centre-cropped to that bucket, so a
landscape photo loses its sides to a landscape crop instead of to a square one. Every training batch belongs to one
bucket (its latents, its noise and its reals share one shape, one compiled step per bucket and turn); which bucket
a step uses is drawn from (seed, stream, step), weighted by the number of discriminator reals in each bucket, so a
resumed run draws the same buckets as a straight one.

Sides must be multiples of 16: the VAE downsamples by 8 and both transformers patchify by 2.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np

MULTIPLE = 16


class BucketError(ValueError):
    pass


def name(size: tuple[int, int]) -> str:
    """"WxH", the bucket's key in caches, batches and logs."""
    return f"{int(size[0])}x{int(size[1])}"


def parse(spec) -> list[tuple[int, int]]:
    """`data.buckets` (a comma-separated string or a sequence of "WxH" strings) -> [(width, height), ...]; [] when
    empty. Errors name the entry and what is wrong with it."""
    if spec is None:
        return []
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    out = []
    for s in items:
        parts = s.lower().split("x")
        try:
            w, h = (int(p) for p in parts)
        except ValueError:
            raise BucketError(f"data.buckets: {s!r} is not WIDTHxHEIGHT (e.g. 1216x832)") from None
        if w <= 0 or h <= 0 or w % MULTIPLE or h % MULTIPLE:
            raise BucketError(f"data.buckets: {s!r}: both sides must be positive multiples of {MULTIPLE} "
                              "(VAE factor 8 x patch 2)")
        if (w, h) in out:
            raise BucketError(f"data.buckets: {s!r} is listed twice")
        out.append((w, h))
    return out


def from_config(data_cfg) -> list[tuple[int, int]]:
    return parse(data_cfg.get("buckets", ""))


def nearest(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest width / height (log ratio; ties: the first listed)."""
    r = math.log(width / height)
    return int(np.argmin([abs(r - math.log(w / h)) for w, h in buckets]))


def image_size(path) -> tuple[int, int] | None:
    """(width, height) from the file's header without decoding it; None when it cannot be read (the image is then
    reported and skipped by the latents builder, as without buckets)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return (int(w), int(h)) if w > 0 and h > 0 else None


def assign(paths, buckets: Sequence[tuple[int, int]]) -> list[int]:
    """The bucket index of each image (unreadable images: bucket 0, where they are reported and skipped)."""
    out = []
    for p in paths:
        size = image_size(p)
        out.append(0 if size is None else nearest(size[0], size[1], buckets))
    return out


def pick(seed: int, stream: str, step: int, weights: Sequence[float]) -> int:
    """The bucket of `stream`'s batch at `step`: a draw from (seed, stream, step) alone, so it is the same on every
    host and after a resume."""
    w = np.asarray(weights, np.float64)
    if len(w) == 1:
        return 0
    rng = np.random.default_rng([int(seed), zlib.crc32(stream.encode()), int(step), 0xB0C])
    return int(rng.choice(len(w), p=w / w.sum()))
