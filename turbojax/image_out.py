"""Writing generated images without ever destroying what the user already has.

`plan_output` decides, before any model is loaded, what `--out` means and which exact files will be written:

* `NAME.png` / `.jpg` / `.jpeg` / `.webp`: one image, or a grid of all images, in that format;
* `NAME.npz`: `images` uint8 `[N, H, W, 3]`, `prompts`, `seeds`;
* a path without an extension or ending in a separator (or an existing folder not named like one of the files
  above): `00000.png`, `00001.png`, ... inside that folder (created if missing); other files in it are never
  touched.

A file we would write that already exists is refused unless `overwrite`, and even then only those exact names are
replaced; a folder is never replaced by a file or a file by a folder. Every file is written to a temp sibling and
renamed into place (all of a folder's images are complete before the first one is published), with the usual
umask permissions.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

FILE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".npz": "NPZ"}
FOLDER = "folder"
_EXIF_DESCRIPTION = 0x010E  # ImageDescription: JPEG/WebP carry the metadata there as JSON (no PNG text chunks)


class OutputError(ValueError):
    """A user's `--out` we must not or cannot write; the message starts with the path."""


@dataclasses.dataclass(frozen=True)
class OutputPlan:
    path: Path                 # the file, or the folder
    kind: str                  # "PNG", "JPEG", "WEBP", "NPZ" (one file) or FOLDER
    files: tuple[Path, ...]    # every file that will be written, nothing else is created or replaced
    overwrite: bool = False


def folder_names(count: int) -> list[str]:
    return [f"{i:05d}.png" for i in range(count)]


def plan_output(out: str, count: int, overwrite: bool = False) -> OutputPlan:
    """What writing `count` images to `out` will do; raises OutputError for anything we will not write."""
    if not str(out).strip():
        raise OutputError(f"{out!r}: empty path")
    path = Path(out)
    trailing_sep = str(out).endswith(("/", os.sep) + ((os.altsep,) if os.altsep else ()))
    suffix = path.suffix.lower()
    if trailing_sep or not suffix:
        kind = FOLDER
    elif suffix in FILE_FORMATS:
        kind = FILE_FORMATS[suffix]
        if path.is_dir():
            raise OutputError(f"{out}: exists and is a folder; refusing to replace it with a {kind} file (end the "
                              "path with / to write PNGs into that folder)")
    elif path.is_dir():
        kind = FOLDER  # an existing folder whose name has a dot ("run.v2")
    else:
        raise OutputError(f"{out}: extension {path.suffix!r} is not a format we write; use .png (one image or a grid), "
                          ".jpg/.jpeg, .webp, .npz, or a name without extension (or ending in /) for a folder of "
                          "PNGs")
    if kind == "WEBP":
        from PIL import features
        if not features.check("webp"):
            raise OutputError(f"{out}: this Pillow was built without WebP support; use .png or .jpg")
    if kind == FOLDER:
        if os.path.lexists(path) and not path.is_dir():
            raise OutputError(f"{out}: exists and is not a folder; refusing to replace it (give a new folder name, "
                              "or a .png/.npz file name)")
        files = tuple(path / n for n in folder_names(count))
    else:
        files = (path,)
    plan = OutputPlan(path, kind, files, overwrite)
    check_plan(plan)
    return plan


def check_plan(plan: OutputPlan) -> None:
    """Refuse clashes: run when planning and again just before writing (files may appear while we sample)."""
    folder = plan.path if plan.kind == FOLDER else plan.path.parent
    for anc in (folder, *folder.parents):
        if os.path.lexists(anc):
            if not anc.is_dir():
                raise OutputError(f"{plan.path}: {anc} exists and is not a folder")
            break
    for f in plan.files:
        if not os.path.lexists(f):
            continue
        if f.is_dir() and not f.is_symlink():
            raise OutputError(f"{f}: exists and is a folder; refusing to replace a folder with an image file")
        if not plan.overwrite:
            what = f"{f.name} (one of the names {plan.files[0].name}..{plan.files[-1].name} we would write)" \
                if plan.kind == FOLDER else "the file"
            raise OutputError(f"{f}: already exists; refusing to replace {what}. Pass --overwrite to replace "
                              "exactly the files this run writes, or choose another --out")


def grid(images: np.ndarray) -> np.ndarray:
    """Images `[N, H, W, C]` on a near-square grid (row-major), black where the last row is short."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, im in enumerate(images):
        out[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    return out


def _joined_meta(metas: Sequence[dict]) -> dict:
    if len(metas) == 1:
        return dict(metas[0])
    return {**metas[0], "prompt": " | ".join(str(m["prompt"]) for m in metas),
            "seed": ",".join(str(m["seed"]) for m in metas)}


def _image_writer(image: np.ndarray, kind: str, meta: dict) -> Callable:
    from PIL import Image

    def write(f):
        arr = np.ascontiguousarray(image)
        im = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)  # grayscale
        if kind == "PNG":
            from PIL.PngImagePlugin import PngInfo
            info = PngInfo()
            for k, v in meta.items():
                info.add_itxt(k, str(v))
            im.save(f, format="PNG", pnginfo=info)
        else:
            exif = Image.Exif()
            exif[_EXIF_DESCRIPTION] = json.dumps({k: str(v) for k, v in meta.items()}, ensure_ascii=True)
            im.save(f, format=kind, quality=95, exif=exif)
    return write


def _npz_writer(images: np.ndarray, metas: Sequence[dict], arrays: dict | None = None) -> Callable:
    def write(f):
        buf = io.BytesIO()  # np.savez seeks; write the finished archive in one go
        np.savez(buf, images=images, prompts=np.array([str(m["prompt"]) for m in metas]),
                 seeds=np.array([int(m["seed"]) for m in metas], np.int64), **(arrays or {}))
        f.write(buf.getvalue())
    return write


def _write_temp(path: Path, write: Callable) -> Path:
    from turbojax.convert.atomic import write_temp
    return write_temp(path, write)


def _publish(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename `tmp` to `dst`. Without `overwrite` a hard link makes "only if absent" atomic, so a file that appeared
    after `check_plan` is still never replaced."""
    if overwrite:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise OutputError(f"{dst}: appeared while sampling; refusing to replace it") from None
    except OSError:  # filesystem without hard links
        if os.path.lexists(dst):
            raise OutputError(f"{dst}: appeared while sampling; refusing to replace it") from None
        os.replace(tmp, dst)
        return
    tmp.unlink()


def write_output(plan: OutputPlan, images: np.ndarray, metas: Sequence[dict], arrays: dict | None = None
                 ) -> list[Path]:
    """Write uint8 `images` `[N, H, W, C]` (C = 3, or 1 for grayscale) as planned; returns the files written.
    `arrays`: extra named arrays of an `.npz` output (e.g. the digits demo's `labels`)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(metas):
        raise ValueError(f"expected uint8 [N, H, W, 3] images with one meta each, got {images.dtype} "
                         f"{images.shape} and {len(metas)} metas")
    if plan.kind == FOLDER and len(plan.files) != len(images):
        raise ValueError(f"planned {len(plan.files)} files for {len(images)} images")
    check_plan(plan)
    (plan.path if plan.kind == FOLDER else plan.path.parent).mkdir(parents=True, exist_ok=True)
    if plan.kind == FOLDER:
        jobs = [(f, _image_writer(im, "PNG", m)) for f, im, m in zip(plan.files, images, metas)]
    elif plan.kind == "NPZ":
        jobs = [(plan.path, _npz_writer(images, metas, arrays))]
    else:
        jobs = [(plan.path, _image_writer(images[0] if len(images) == 1 else grid(images), plan.kind,
                                          _joined_meta(metas)))]
    temps: list[Path] = []
    try:
        for f, write in jobs:
            temps.append(_write_temp(f, write))
        for tmp, (f, _) in zip(list(temps), jobs):
            _publish(tmp, f, plan.overwrite)
            temps.remove(tmp)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return [f for f, _ in jobs]
