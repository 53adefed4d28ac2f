"""The DINOv2 discriminator (`gan.features = "dino"`, the ADD / Wuli choice): trainable heads on the tokens of a
frozen DINOv2 at several depths, judging VAE-decoded images.

What the discriminator sees. Both the student's x0 and the reals (the batches' `real` latents: teacher samples
and/or real-image latents, as the data side mixes them) are decoded by the frozen VAE decoder to pixels, resized
and ImageNet-normalised (`dino_preprocess`, differentiable), and run through the frozen DINOv2. The samples are
**clean** (no noise, unlike the feature heads' diffusion GAN): ADD's choice, since DINO was trained on clean images
and its features of noised pixels say little. The generator's gradient flows from the logit through the heads,
DINO, the resize and the VAE decode into the student's x0 (the VAE's output clamp is not applied, so saturated
pixels still pass gradient; fakes and reals are treated alike). Nothing of DINO or the VAE is trained or
checkpointed: their arrays travel as frozen arguments beside the base (`nets.FrozenArrays`).

The heads (one per chosen block; ADD / StyleGAN-T style, simplified). Each reads that block's tokens `[CLS,
patches]` (registers dropped), LayerNorm'ed without parameters (DINO's hidden states differ in scale from block to
block and carry outlier tokens; the norm makes one learning rate fit all heads). Patch tokens: 1x1 conv (a linear
map) -> GroupNorm -> LeakyReLU(0.2), then a residual 1-D conv of kernel 9 over the row-major token sequence ->
GroupNorm -> LeakyReLU, then a 1x1 conv to one logit per token, averaged. CLS token: linear -> LeakyReLU -> linear
to one logit. With `gan.dino_cond` the head adds a projection term (ADD conditions its heads on the prompt):
`<mean patch feature + CLS feature, W c> / sqrt(hidden)` with `c` the mask-weighted mean of the prompt embedding.
GroupNorm instead of StyleGAN-T's spectral norm + BatchNorm: no running statistics in the state, no power
iteration, and the batch can be tiny (1 per device at 1024 px); R1 (`gan.r1_weight`) on the heads' inputs is the
optional regulariser, as for the feature heads. The logits of the heads are averaged; the loss is the engine's
non-saturating one (`losses.gan_*_loss`), so "dino" is a drop-in for "teacher" / "fake" features.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.distill.discriminator import _groups

F32 = jnp.float32
DEFAULT_DEPTHS = (0.25, 0.5, 0.75, 1.0)  # StyleGAN-T / ADD: blocks 2, 5, 8, 11 of a 12-block ViT
METHODS = ("dmd2", "turbopp")
FAMILIES = ("qwen_image", "z_image")
VAE_SCALE = 8


# --------------------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------------------

def _lrelu(x):
    return jax.nn.leaky_relu(x, 0.2)


class TokenHead(nnx.Module):
    def __init__(self, dim: int, hidden: int, cond_dim: int, *, rngs: nnx.Rngs, kernel: int = 9):
        groups = _groups(hidden, max(1, hidden // 8))  # >= 8 channels per group, as the feature heads
        self.inp = nnx.Linear(dim, hidden, rngs=rngs)
        self.norm_in = nnx.GroupNorm(hidden, num_groups=groups, rngs=rngs)
        self.conv = nnx.Conv(hidden, hidden, (kernel,), padding="SAME", rngs=rngs)
        self.norm = nnx.GroupNorm(hidden, num_groups=groups, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)
        self.cls_in = nnx.Linear(dim, hidden, rngs=rngs)
        self.cls_out = nnx.Linear(hidden, 1, rngs=rngs)
        self.proj = nnx.Linear(cond_dim, hidden, rngs=rngs) if cond_dim else None
        self.hidden = hidden

    def __call__(self, tokens: jax.Array, c: jax.Array | None) -> jax.Array:
        """`tokens [B, 1 + N, D]` (CLS first), `c [B, Dc]` or None -> logits `[B]`."""
        x = tokens.astype(F32)
        mu = jnp.mean(x, axis=-1, keepdims=True)
        x = (x - mu) * jax.lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + 1e-6)
        h = _lrelu(self.norm_in(self.inp(x[:, 1:])))
        h = h + _lrelu(self.norm(self.conv(h)))
        g = _lrelu(self.cls_in(x[:, 0]))
        logit = jnp.mean(self.out(h)[..., 0], axis=1) + self.cls_out(g)[:, 0]
        if self.proj is not None and c is not None:
            e = self.proj(c.astype(F32))
            logit = logit + jnp.sum((jnp.mean(h, axis=1) + g) * e, axis=-1) / math.sqrt(self.hidden)
        return logit


class DinoDiscriminator(nnx.Module):
    """One `TokenHead` per DINO block; parameters fp32 (trainables are fp32 masters)."""

    def __init__(self, dim: int, n_layers: int, *, hidden: int = 256, cond_dim: int = 0, rngs: nnx.Rngs):
        if n_layers < 1:
            raise ValueError("the DINO discriminator needs at least one DINO block")
        self.heads = nnx.List([TokenHead(dim, hidden, cond_dim, rngs=rngs) for _ in range(n_layers)])

    def __call__(self, features: Sequence[jax.Array], c: jax.Array | None = None) -> jax.Array:
        if len(features) != len(self.heads):
            raise ValueError(f"discriminator has {len(self.heads)} heads, got {len(features)} feature maps")
        return jnp.mean(jnp.stack([head(f, c) for head, f in zip(self.heads, features)]), axis=0)


# --------------------------------------------------------------------------------------------------------------
# The frozen part: VAE decode + DINO (graphdefs and static settings; the arrays are frozen arguments)
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class DinoGan:
    dino: nnx.GraphDef
    vae: nnx.GraphDef            # (post_quant_conv or None, decoder)
    family: str                  # the latent layout: "qwen_image" (packed tokens) or "z_image" ([B, C, 1, h, w])
    image_hw: tuple[int, int]    # decoded pixels
    denorm: tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (scale, shift): model latents -> VAE latents
    vae_dtype: Any
    layers: tuple[int, ...]      # DINO blocks the heads read (0-based)
    size: tuple[int, int]        # DINO input resolution
    patch_size: int
    prefix: int                  # CLS + registers
    dim: int
    cond: bool

    def images(self, vae_state, x) -> jax.Array:
        """Model-layout latents -> NHWC images (fp32, about [-1, 1], not clamped), differentiable."""
        from turbojax import sampling
        h, w = self.image_hw
        x = x.astype(F32)
        z = sampling.unpack_latents(x, h, w)[:, :, 0] if self.family == "qwen_image" else x[:, :, 0]
        scale, shift = (jnp.asarray(v, F32).reshape(1, -1, 1, 1) for v in self.denorm)
        z = jnp.transpose(z * scale + shift, (0, 2, 3, 1)).astype(self.vae_dtype)
        post, decoder = nnx.merge(self.vae, vae_state)
        # the decode is differentiated at the training resolution: checkpointing each resnet of its up blocks
        # costs one more decoder forward and keeps only their inputs (Qwen-Image DMD2 + GAN at 1024 px on
        # v5e:4x4: see bench/plans/README.md)
        return decoder(post(z) if post is not None else z, remat=True).astype(F32)

    def features(self, frozen, x) -> list[jax.Array]:
        """`[CLS, patch tokens]` `[B, 1 + N, D]` at each of `layers` for latents `x` (`frozen`: FrozenArrays)."""
        from turbojax.models.dinov2 import dino_preprocess
        pixels = dino_preprocess(self.images(frozen.vae, x), self.size, patch_size=self.patch_size)
        dino = nnx.merge(self.dino, frozen.dino)
        out = dino.forward(pixels.astype(dino.dtype), self.layers)
        p = self.prefix
        return [jnp.concatenate([f[:, :1], f[:, p:]], axis=1).astype(F32) for f in out.hidden_states]

    def text(self, cond: Mapping) -> jax.Array | None:
        """The mask-weighted mean of the prompt embedding `[B, Dc]` (None without `gan.dino_cond`)."""
        if not self.cond:
            return None
        ctx = cond["ctx"].astype(F32)
        mask = cond.get("mask")
        m = jnp.ones(ctx.shape[:2], F32) if mask is None else mask.astype(F32)
        return jnp.sum(ctx * m[..., None], axis=1) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)


@dataclasses.dataclass
class LoadedDino:
    """What `load` gives `methods.build`: the static part (into `Nets.dino`) and the frozen arrays."""
    gan: DinoGan
    arrays: dict  # {"dino": nnx.State, "vae": nnx.State}


def resolve_layers(spec: Sequence, n_layers: int) -> tuple[int, ...]:
    """`gan.dino_layers` -> block indices. Integers (or strings of integers, as a comma list on the command line
    gives them) are 0-based indices (negative from the end); floats are fractions of the depth in (0, 1]
    (`taps_at_depths`: 0.5 of 12 blocks -> block 5); empty: `DEFAULT_DEPTHS`."""
    from turbojax.distill.denoiser import taps_at_depths
    items = list(spec) if spec else list(DEFAULT_DEPTHS)
    out = []
    for v in items:
        if isinstance(v, str):
            try:
                v = int(v) if v.strip().lstrip("+-").isdigit() else float(v)
            except ValueError:
                raise ValueError(f"gan.dino_layers: {v!r} is neither a block index nor a fraction of depth") from None
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"gan.dino_layers: {v!r} is neither a block index nor a fraction of depth")
        if isinstance(v, (int, np.integer)):
            i = int(v) + (n_layers if v < 0 else 0)
            if not 0 <= i < n_layers:
                raise ValueError(f"gan.dino_layers: block {v} out of range, the DINOv2 has blocks 0..{n_layers - 1}")
            out.append(i)
        else:
            if not 0.0 < float(v) <= 1.0:
                raise ValueError(f"gan.dino_layers: fraction {v} must lie in (0, 1] (or give integer indices)")
            out.extend(taps_at_depths([float(v)], n_layers))
    return tuple(sorted(set(out)))


def _size(cfg) -> tuple[int, int]:
    s = cfg.gan.get("dino_size", 224)
    h, w = (s, s) if isinstance(s, (int, np.integer)) else tuple(s)
    return int(h), int(w)


def check_method(cfg) -> None:
    """The checks that need no DINOv2 folder (the AOT plan builds the DINOv2 from a preset): method, data kind."""
    if cfg.method not in METHODS:
        raise ValueError(f"gan.features 'dino' works with the methods {', '.join(METHODS)}, not {cfg.method!r}")
    if cfg.data.kind == "digits":
        raise ValueError("gan.features 'dino' needs a latent pipeline with a VAE (data.kind prompts or cache on "
                         "Qwen-Image / Z-Image); the digits demo has no VAE and no DINOv2 weights ship with it: "
                         "use gan.features teacher")


def check_config(cfg) -> None:
    """The cheap checks, run before any data work: method, data kind, folder, size, layers. Raises ValueError with
    a message that starts with the config key."""
    from turbojax.checkpoint import META_FILE
    from turbojax.models.registry import read_component_config
    check_method(cfg)
    if not cfg.gan.get("dino"):
        raise ValueError("gan.dino: give a DINOv2 folder (transformers Dinov2Model / Dinov2WithRegistersModel "
                         "with config.json + model.safetensors, or its turbojax export)")
    folder = Path(cfg.gan.dino).expanduser()
    if not folder.is_dir():
        raise ValueError(f"gan.dino {cfg.gan.dino}: no such folder")
    if (folder / META_FILE).is_file():
        return  # our export: its config is checked when it loads
    try:
        fam, dcfg, _ = read_component_config(folder)
    except (ValueError, OSError) as e:
        raise ValueError(f"gan.dino {cfg.gan.dino}: {e}") from None
    if fam.name not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(f"gan.dino {cfg.gan.dino}: holds a {fam.name} model, not a DINOv2")
    _check_size(cfg, dcfg.patch_size)
    resolve_layers(cfg.gan.get("dino_layers", ()), dcfg.num_hidden_layers)


def _check_size(cfg, patch: int):
    h, w = _size(cfg)
    if h < patch or w < patch or h % patch or w % patch:
        raise ValueError(f"gan.dino_size {cfg.gan.dino_size} must be a positive multiple of the DINOv2 patch size "
                         f"{patch} (224 for patch 14)")


def image_hw(family: str, latent_shape: Sequence[int]) -> tuple[int, int]:
    if family == "qwen_image":
        from turbojax.distill.denoiser import qwen_grid
        gh, gw = qwen_grid(latent_shape)
        return 16 * gh, 16 * gw
    return VAE_SCALE * int(latent_shape[-2]), VAE_SCALE * int(latent_shape[-1])


def at_latent_shape(loaded: LoadedDino, latent_shape) -> LoadedDino:
    """The same DINO discriminator (same frozen arrays, no copy) decoding latents of another shape: one per
    aspect-ratio bucket."""
    gan = dataclasses.replace(loaded.gan, image_hw=image_hw(loaded.gan.family, latent_shape))
    return dataclasses.replace(loaded, gan=gan)


def load(cfg, base_model, latent_shape, *, vae=None, progress: bool = False) -> LoadedDino:
    """The frozen DINOv2 (`gan.dino`, in the config dtype) and the VAE decoder of `cfg.init_from` (fp32, the
    pipelines' VAE dtype; or `vae` when the caller holds it), with the static settings of the discriminator."""
    from turbojax import models
    check_config(cfg)
    family = teacher_family(base_model)
    try:
        dino = models.from_diffusers(Path(cfg.gan.dino).expanduser(), dtype=jnp.dtype(cfg.dtype),
                                     scan_layers=bool(cfg.scan_layers), attention_impl=cfg.attention_impl,
                                     progress=progress)
    except (ValueError, OSError) as e:
        raise ValueError(f"gan.dino {cfg.gan.dino}: {e}") from None
    layers = dino_layers(cfg, dino, f"gan.dino {cfg.gan.dino}")  # before the VAE is read: a bad DINO fails fast
    if vae is None:
        try:
            vae = models.from_diffusers(Path(cfg.init_from) / "vae", dtype=jnp.float32, progress=progress)
        except (ValueError, OSError) as e:
            raise ValueError(f"init_from {cfg.init_from}: the DINO discriminator decodes with its VAE: {e}") from None
    return assemble(cfg, family, latent_shape, dino, vae, layers, vae_source=f"init_from {cfg.init_from}")


# The two steps below are shared by `load` (weights from disk) and the AOT memory plan (`turbojax.plan`, abstract
# full-size models): both work on in-memory models and read only configs, never weight values.

def teacher_family(base_model) -> str:
    family = getattr(base_model, "family", None)
    if family not in FAMILIES:
        raise ValueError(f"gan.features 'dino' needs a Qwen-Image or Z-Image teacher, got a {family} model")
    return family


def dino_layers(cfg, dino, source: str) -> tuple[int, ...]:
    """Check a DINOv2 model (loaded or abstract; `source` names it in errors) against `gan.dino_size` and
    `gan.dino_layers`; the blocks the heads read."""
    if getattr(dino, "family", None) not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(f"{source}: holds a {getattr(dino, 'family', '?')} model, not a DINOv2")
    _check_size(cfg, dino.config.patch_size)
    return resolve_layers(cfg.gan.get("dino_layers", ()), dino.config.num_hidden_layers)


def assemble(cfg, family: str, latent_shape, dino, vae, layers, *, vae_source: str) -> LoadedDino:
    """The discriminator's static part and frozen arrays from a DINOv2 (checked by `dino_layers`) and the family's
    VAE (loaded or abstract: the latent de-normalisation comes from its config); only the decoder is kept."""
    expected = "qwen_image_vae" if family == "qwen_image" else "autoencoder_kl"
    if getattr(vae, "family", None) != expected:
        raise ValueError(f"{vae_source}: vae holds a {getattr(vae, 'family', '?')} model; "
                         f"{family} uses {expected}")
    dcfg = dino.config
    channels = int(latent_shape[-1]) // 4 if family == "qwen_image" else int(latent_shape[0])
    probe = jnp.zeros((1, channels, 1, 1), F32)
    shift = np.asarray(vae.denormalize_latents(probe, axis=1), np.float32).reshape(-1)
    scale = np.asarray(vae.denormalize_latents(probe + 1.0, axis=1), np.float32).reshape(-1) - shift
    vae_graph, vae_state = nnx.split((vae.post_quant_conv, vae.decoder))  # the encoder is not kept
    dino_graph, dino_state = nnx.split(dino)
    gan = DinoGan(dino=dino_graph, vae=vae_graph, family=family, image_hw=image_hw(family, latent_shape),
                  denorm=(tuple(float(x) for x in scale), tuple(float(x) for x in shift)), vae_dtype=vae.dtype,
                  layers=layers, size=_size(cfg), patch_size=int(dcfg.patch_size), prefix=int(dino.num_prefix_tokens),
                  dim=int(dcfg.hidden_size), cond=bool(cfg.gan.get("dino_cond", True)))
    return LoadedDino(gan, {"dino": dino_state, "vae": vae_state})


def init_heads(gan: DinoGan, cond_dim: int, hidden: int, key) -> dict:
    """The heads as the engine holds discriminators: graphdef, abstract template, pure fp32 params."""
    from turbojax.distill.nets import disc_pure
    disc = DinoDiscriminator(gan.dim, len(gan.layers), hidden=hidden, cond_dim=cond_dim if gan.cond else 0,
                             rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 2 ** 31 - 1))))
    graphdef, state = nnx.split(disc)
    return {"disc": graphdef, "disc_template": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
            "params": disc_pure(state)}


def text_dim(base_model) -> int:
    """Width of the prompt embedding the base reads (the heads' conditioning input)."""
    c = base_model.config
    return int(c.joint_attention_dim if hasattr(c, "joint_attention_dim") else c.cap_feat_dim)
