"""Initial latents from a user's file (`sample.py --noise FILE`), to compare with other implementations.

`load(spec)` reads a .npy or .npz (one array, or one named `noise` / `latents`; never unpickled) of finite floats;
`fit(...)` puts it in the pipeline's layout: Qwen-Image packed `[N, (H/16)(W/16), 4C]`, Z-Image `[N, C, H/8, W/8]`,
from either that layout or the unpacked `torch.randn` layouts `[N, C, H/8, W/8]`, `[N, C, 1, H/8, W/8]` and
`[N, 1, C, H/8, W/8]` (packed as diffusers' pipelines pack them). Bad input raises `NoiseFileError` with one line
naming the flag, the file and the shape.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

VAE_SCALE = 8


class NoiseFileError(ValueError):
    pass


def load(spec: str) -> np.ndarray:
    path = Path(spec)
    if not path.is_file():
        raise NoiseFileError(f"--noise {spec}: file not found" + (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix.lower() not in (".npy", ".npz"):
        raise NoiseFileError(f"--noise {spec}: expected a .npy or .npz file of initial latents")
    try:
        data = np.load(path, allow_pickle=False)
        if hasattr(data, "files"):  # an .npz archive (NpzFile)
            with data:
                names = list(data.files)
                pick = [n for n in ("noise", "latents") if n in names] or (names if len(names) == 1 else [])
                if not pick:
                    raise NoiseFileError(f"--noise {spec}: the .npz holds {names or 'no arrays'}; expected one "
                                         "array, or one named 'noise' or 'latents'")
                data = data[pick[0]]
    except NoiseFileError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise NoiseFileError(f"--noise {spec}: not a readable numpy array file ({e})") from None
    if not isinstance(data, np.ndarray) or data.dtype.kind != "f":
        got = getattr(data, "dtype", type(data))
        raise NoiseFileError(f"--noise {spec}: expected a float array of latents, got dtype {got}")
    if data.ndim == 0 or data.size == 0:
        raise NoiseFileError(f"--noise {spec}: expected an array of latents, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise NoiseFileError(f"--noise {spec}: holds NaN or Inf values")
    return data.astype(np.float32)


def fit(data: np.ndarray, spec: str, family: str, count: int, height: int, width: int,
              channels: int | None) -> np.ndarray:
    """`data` in the pipeline's layout for `count` images of `height x width` with `channels` latent channels
    (None: not known yet, any). Unpacked inputs are packed for Qwen-Image exactly as `QwenImagePipeline` packs its
    `[B, 1, C, h, w]` noise; a frame axis of 1 is dropped for Z-Image (`ZImagePipeline` latents are `[B, C, h, w]`)."""
    h, w = height // VAE_SCALE, width // VAE_SCALE
    c = channels or "C"
    shapes = [(count, c, h, w), (count, c, 1, h, w), (count, 1, c, h, w)]
    listed = " / ".join(str(s).replace("'", "") for s in shapes)
    if family == "qwen_image":
        packed = str((count, (h // 2) * (w // 2), "4C" if channels is None else 4 * channels)).replace("'", "")
        listed = f"packed {packed} or unpacked {listed}"
    why = (f"--noise {spec}: array of shape {tuple(data.shape)} does not fit {count} image(s) of {width}x{height}; "
           f"expected {listed}" + ("" if channels else " (C = latent channels)"))
    x = data
    if x.ndim == 5:
        if x.shape[2] == 1:
            x = x[:, :, 0]
        elif x.shape[1] == 1:
            x = x[:, 0]
        else:
            raise NoiseFileError(why)
    ok_c = lambda v: channels is None or v == channels  # noqa: E731
    if x.ndim == 4 and x.shape[0] == count and x.shape[2:] == (h, w) and ok_c(x.shape[1]):
        if family == "qwen_image":
            from turbojax.sampling import pack_latents
            return np.asarray(pack_latents(x), np.float32)
        return x
    if (family == "qwen_image" and data.ndim == 3 and data.shape[:2] == (count, (h // 2) * (w // 2))
            and data.shape[2] % 4 == 0 and ok_c(data.shape[2] // 4)):
        return data
    raise NoiseFileError(why)


def latent_channels(model: Path, family: str) -> int | None:
    """Latent channels from the pipeline folder's JSON configs (cheap); None when not readable (e.g. a turbojax
    export), then the check waits for the loaded pipeline."""
    comp, key = ("transformer", "in_channels") if family == "qwen_image" else ("vae", "latent_channels")
    try:
        v = json.loads((model / comp / "config.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        return None
    return v // 4 if family == "qwen_image" else v
