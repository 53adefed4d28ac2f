"""diffusers `AutoencoderKL` (the FLUX.1 VAE, also used by Z-Image) as a Flax NNX module, plus the pieces both
turbojax VAEs share (convolutions, GroupNorm, latent distribution, tiling).

Public API mirrors diffusers, with arrays in diffusers' NCHW layout:

    vae = turbojax.models.from_diffusers("Z-Image-Turbo/vae")
    dist = vae.encode(images).latent_dist          # images [B, 3, H, W] in [-1, 1]
    z_dit = vae.normalize_latents(dist.mode())     # (z - shift_factor) * scaling_factor
    images = vae.decode(vae.denormalize_latents(z_dit)).sample
    vae.enable_tiling()                            # diffusers' overlapping tiles + linear blending

Internally everything runs channels-last (NHWC), the layout XLA's convolutions prefer; `encode_nhwc` /
`decode_nhwc` skip the transposes. Parameters mirror diffusers' module names (see `vae_keys.py`). GroupNorm
statistics are taken in fp32; convolutions accumulate in fp32 and round once after the bias, like `Linear`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.nn.attention import attention
from turbojax.nn.layers import Linear
from turbojax.nn.remat import checkpointed_chain

# Logical axis names of VAE parameters. None of them is in the sharding rules, so VAEs are replicated (they are
# small: 84 M / 127 M parameters) and never collide with the transformer's "embed"/"mlp" rules.
CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
CHANNEL_AXES = ("conv_out",)

ACTIVATIONS: dict[str, Callable] = {  # diffusers `get_activation` names
    "silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False), "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


def activation(name: str) -> Callable:
    """The activation evaluated in fp32 and rounded once, as torch does for half-precision inputs."""
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    fn = ACTIVATIONS[name]
    return lambda x: fn(x.astype(jnp.float32)).astype(x.dtype)


silu = activation("silu")


# ----------------------------------------------------------------------------------------------------------------
# Shared layers
# ----------------------------------------------------------------------------------------------------------------

def conv_nhwc(x, kernel, bias, *, stride: int = 1, padding, dtype):
    """2-D convolution, NHWC input and HWIO kernel, fp32 accumulation, rounded to `dtype` after the bias."""
    y = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype)


def conv_params(rngs, shape, param_dtype, axes, use_bias=True):
    """(kernel, bias) Params; torch's default init (uniform, bound 1/sqrt(fan_in)); real weights get loaded."""
    init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    kernel = nnx.Param(init(rngs.params(), tuple(shape), param_dtype), axes=axes)
    bias = nnx.Param(jnp.zeros((shape[-1],), param_dtype), axes=CHANNEL_AXES) if use_bias else None
    return kernel, bias


class Conv2d(nnx.Module):
    """torch `nn.Conv2d`; `padding` is an int (all sides) or `((top, bottom), (left, right))`."""

    def __init__(self, cin: int, cout: int, k: int, *, rngs, param_dtype, dtype, stride: int = 1, padding=None):
        self.kernel, self.bias = conv_params(rngs, (k, k, cin, cout), param_dtype, CONV_AXES)
        p = k // 2 if padding is None else padding
        self.padding = ((p, p), (p, p)) if isinstance(p, int) else tuple(tuple(q) for q in p)
        self.stride, self.dtype = stride, dtype

    def __call__(self, x):
        return conv_nhwc(x, self.kernel[...], self.bias[...], stride=self.stride, padding=self.padding,
                         dtype=self.dtype)


class GroupNorm(nnx.Module):
    """torch `nn.GroupNorm` over NHWC activations: biased variance, statistics and affine in fp32."""

    def __init__(self, groups: int, channels: int, *, eps: float = 1e-6, rngs, param_dtype, dtype):
        del rngs
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype), axes=CHANNEL_AXES)
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), axes=CHANNEL_AXES)
        self.groups, self.eps, self.dtype = groups, eps, dtype

    def __call__(self, x):
        b, c = x.shape[0], x.shape[-1]
        g = x.astype(jnp.float32).reshape(b, -1, self.groups, c // self.groups)
        mean = jnp.mean(g, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def upsample_nearest2x(x):
    """Nearest-neighbour x2 on NHWC (== torch "nearest" and "nearest-exact" for an integer factor of 2)."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def single_head_attention(q, k, v, impl: str):
    """`[B, S, C]` q/k/v as one head of width C (both VAEs' mid-block attention), scale 1/sqrt(C)."""
    return attention(q[:, :, None, :], k[:, :, None, :], v[:, :, None, :], None, impl=impl)[:, :, 0, :]


# ----------------------------------------------------------------------------------------------------------------
# Outputs (diffusers' result objects, arrays in diffusers' layout: channels on axis 1)
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """diffusers `DiagonalGaussianDistribution`: `logvar` already clamped to [-30, 20]; `mode()` is the mean."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments, axis: int = 1) -> "DiagonalGaussian":
        mean, logvar = jnp.split(moments, 2, axis=axis)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def mode(self):
        return self.mean

    def sample(self, key: jax.Array):
        """`mean + std * eps` with `eps ~ N(0, 1)` drawn from a JAX PRNG key (not torch's generator stream)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


@dataclasses.dataclass(frozen=True)
class EncoderOutput:
    latent_dist: DiagonalGaussian


@dataclasses.dataclass(frozen=True)
class DecoderOutput:
    sample: jax.Array


def nchw_to_nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


# ----------------------------------------------------------------------------------------------------------------
# Jitted application and tiling
# ----------------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 1))
def _jit_apply(fn, graphdef, state, x):
    return fn(nnx.merge(graphdef, state), x)


def jitted(fn, modules):
    """`x -> fn(modules, x)` compiled once per input shape. Only `modules` (not the whole VAE) enter the graphdef,
    so changing tiling settings on the VAE never retraces."""
    graphdef, state = nnx.split(modules)
    return lambda x: _jit_apply(fn, graphdef, state, x)


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> np.ndarray:
    """diffusers `blend_v` (axis 1 here, NHWC) / `blend_h` (axis 2): ramp from the end of `a` into the start of `b`.

    Weights are the Python floats `1 - y/e` and `y/e` rounded to fp32, as torch applies them, and the products and
    the sum are taken in the same order, so fp32 blends reproduce diffusers' arithmetic.
    """
    e = min(a.shape[axis], b.shape[axis], extent)
    if e <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = e
    wb = np.array([y / e for y in range(e)], np.float64).astype(np.float32).reshape(shape)
    wa = np.array([1 - y / e for y in range(e)], np.float64).astype(np.float32).reshape(shape)
    head = [slice(None)] * b.ndim
    tail = [slice(None)] * b.ndim
    head[axis], tail[axis] = slice(0, e), slice(a.shape[axis] - e, a.shape[axis])
    b = b.copy()
    b[tuple(head)] = a[tuple(tail)] * wa + b[tuple(head)] * wb
    return b


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile geometry of one tiled pass, in (height, width) pairs. Input tiles of `tile` start every `stride`;
    each output tile is blended over `blend` rows/columns with its (already blended) upper and left neighbours,
    then cropped to `keep`; the mosaic is finally cropped to the untiled output size."""
    tile: tuple[int, int]
    stride: tuple[int, int]
    blend: tuple[int, int]
    keep: tuple[int, int]


def tiled_apply(fn, x, tiling: Tiling, out_hw: tuple[int, int]) -> jax.Array:
    """Apply `fn` (NHWC -> NHWC) tile by tile, as diffusers' `tiled_encode` / `tiled_decode` do.

    Only one row of finished tiles is kept (on the host, fp32); device memory is bounded by one tile's activations.
    `fn` is jitted per tile shape (at most four shapes: interior, right edge, bottom edge, corner).
    """
    (th, tw), (sh, sw), (bh, bw), (kh, kw) = tiling.tile, tiling.stride, tiling.blend, tiling.keep
    h, w = x.shape[1:3]
    prev_row, rows, out_dtype = None, [], None
    for i in range(0, h, sh):
        row = []
        for col, j in enumerate(range(0, w, sw)):
            y = fn(x[:, i:i + th, j:j + tw])
            out_dtype = y.dtype
            t = np.asarray(jax.device_get(y), np.float32)
            if prev_row is not None:
                t = _blend(prev_row[col], t, bh, axis=1)
            if col > 0:
                t = _blend(row[-1], t, bw, axis=2)
            row.append(t)
        rows.append(np.concatenate([t[:, :kh, :kw] for t in row], axis=2))
        prev_row = row
    out = np.concatenate(rows, axis=1)[:, :out_hw[0], :out_hw[1]]
    return jnp.asarray(out).astype(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# AutoencoderKL
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers `AutoencoderKL` config; defaults are the class defaults (missing config.json keys mean those)."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # a pipeline hint (run the VAE in fp32); the weights do not depend on it
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> "AutoencoderKLConfig":
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types / up_block_types need one entry per block_out_channels ({n})")
        bad = sorted({t for t in self.down_block_types if t != "DownEncoderBlock2D"}
                     | {t for t in self.up_block_types if t != "UpDecoderBlock2D"})
        if bad:
            raise NotImplementedError(f"AutoencoderKL block types {bad} are not supported (only DownEncoderBlock2D "
                                      "/ UpDecoderBlock2D, as in the SD / SDXL / FLUX VAEs)")
        activation(self.act_fn)
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups "
                             f"{self.norm_num_groups}")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.latent_channels:
                raise ValueError(f"{name} has {len(v)} values, expected latent_channels={self.latent_channels}")
        return self


FLUX_VAE = AutoencoderKLConfig(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16, sample_size=1024,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
FLUX_VAE_TINY = dataclasses.replace(FLUX_VAE, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                                    latent_channels=4, norm_num_groups=4, sample_size=32)


class ResnetBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, groups: int, act: str, **kw):
        self.norm1 = GroupNorm(groups, cin, **kw)
        self.conv1 = Conv2d(cin, cout, 3, **kw)
        self.norm2 = GroupNorm(groups, cout, **kw)
        self.conv2 = Conv2d(cout, cout, 3, **kw)
        self.conv_shortcut = Conv2d(cin, cout, 1, **kw) if cin != cout else None
        self.act = act

    def __call__(self, x):
        act = activation(self.act)
        h = self.conv2(act(self.norm2(self.conv1(act(self.norm1(x))))))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Attention(nnx.Module):
    """diffusers `Attention(_from_deprecated_attn_block=True)`: GroupNorm, one head over H*W, residual."""

    def __init__(self, c: int, groups: int, *, impl: str, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.group_norm = GroupNorm(groups, c, **kw)
        lin = dict(axes=("conv_in", "conv_out"), **kw)
        self.to_q, self.to_k, self.to_v, self.to_out = (Linear(c, c, **lin) for _ in range(4))
        self.impl = impl

    def __call__(self, x):
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        o = single_head_attention(self.to_q(t), self.to_k(t), self.to_v(t), self.impl)
        return self.to_out(o).reshape(b, h, w, c) + x


class MidBlock(nnx.Module):
    def __init__(self, c: int, groups: int, act: str, add_attention: bool, *, impl: str, **kw):
        self.resnets = nnx.List([ResnetBlock2D(c, c, groups, act, **kw) for _ in range(2)])
        self.attentions = nnx.List([Attention(c, groups, impl=impl, **kw)] if add_attention else [])

    def __call__(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    """`Downsample2D(padding=0)`: zero-pad right/bottom by one, then a 3x3 stride-2 conv."""

    def __init__(self, c: int, **kw):
        self.conv = Conv2d(c, c, 3, stride=2, padding=((0, 1), (0, 1)), **kw)

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    def __init__(self, c: int, **kw):
        self.conv = Conv2d(c, c, 3, **kw)

    def __call__(self, x):
        return self.conv(upsample_nearest2x(x))


class Block(nnx.Module):
    """`DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then an optional resampler (named like diffusers)."""

    def __init__(self, cin, cout, n, groups, act, *, down: bool | None, **kw):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, act, **kw) for i in range(n)])
        self.downsamplers = nnx.List([Downsample(cout, **kw)]) if down is True else None
        self.upsamplers = nnx.List([Upsample(cout, **kw)]) if down is False else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for s in (self.downsamplers or self.upsamplers or ()):
            x = s(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, *, impl: str, **kw):
        ch, g, act = cfg.block_out_channels, cfg.norm_num_groups, cfg.act_fn
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, **kw)
        self.down_blocks = nnx.List([
            Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, act, down=True if i < len(ch) - 1 else None,
                  **kw) for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, act, cfg.mid_block_add_attention, impl=impl, **kw)
        self.conv_norm_out = GroupNorm(g, ch[-1], **kw)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, **kw)
        self.act = act

    def __call__(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        return self.conv_out(activation(self.act)(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, *, impl: str, **kw):
        ch, g, act = cfg.block_out_channels, cfg.norm_num_groups, cfg.act_fn
        rev = tuple(reversed(ch))
        self.conv_in = Conv2d(cfg.latent_channels, ch[-1], 3, **kw)
        self.mid_block = MidBlock(ch[-1], g, act, cfg.mid_block_add_attention, impl=impl, **kw)
        self.up_blocks = nnx.List([
            Block(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, act,
                  down=False if i < len(ch) - 1 else None, **kw) for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(g, ch[0], **kw)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, **kw)
        self.act = act

    def __call__(self, z, *, remat: bool = False):
        """`remat`: each resnet and upsampler of the up blocks under `jax.checkpoint` (for decodes that are
        differentiated, see `checkpointed_chain`); the values are the same."""
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = checkpointed_chain([*blk.resnets, *(blk.upsamplers or ())], x) if remat else blk(x)
        return self.conv_out(activation(self.act)(self.conv_norm_out(x)))


def _encode_fn(parts, x):
    encoder, quant_conv = parts
    m = encoder(x)
    return quant_conv(m) if quant_conv is not None else m


def _decode_fn(parts, z):
    post_quant_conv, decoder = parts
    return decoder(post_quant_conv(z) if post_quant_conv is not None else z)


def check_image(x, channels: int, multiple: int, what: str = "images"):
    """Raise a clear error unless `x` is NHWC with `channels` channels and sides divisible by `multiple`."""
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"{what}: expected {channels} channels, got shape {tuple(x.shape)} (channels-last view)")
    h, w = x.shape[1:3]
    if h < 1 or w < 1 or h % multiple or w % multiple:
        raise ValueError(f"{what}: height and width must be positive multiples of {multiple}, got {h}x{w}")


class AutoencoderKL(nnx.Module):
    """diffusers `AutoencoderKL` (images `[B, C, H, W]`). `encode` returns `EncoderOutput(latent_dist)`,
    `decode` returns `DecoderOutput(sample)` (or 1-tuples with `return_dict=False`), like diffusers."""

    family = "autoencoder_kl"

    def __init__(self, config: AutoencoderKLConfig = FLUX_VAE, *, rngs: nnx.Rngs | None = None,
                 param_dtype=jnp.float32, dtype=jnp.float32, scan_layers: bool = False, remat: str = "none",
                 attention_impl: str = "auto"):
        del remat  # inference module: nothing to rematerialise
        cfg = config.validate()
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        # scan_layers has no meaning here (no stack of identical layers); kept so checkpoints record what was asked
        self.config, self.dtype, self.scan_layers = cfg, dtype, scan_layers
        self.encoder = Encoder(cfg, impl=attention_impl, **kw)
        self.decoder = Decoder(cfg, impl=attention_impl, **kw)
        lc = cfg.latent_channels
        self.quant_conv = Conv2d(2 * lc, 2 * lc, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv2d(lc, lc, 1, **kw) if cfg.use_post_quant_conv else None
        s = cfg.sample_size
        self.tile_sample_min_size = int(s[0] if isinstance(s, (tuple, list)) else s)
        self.tile_overlap_factor = 0.25
        self.enable_tiling()  # validates and derives the latent tile size
        self.use_tiling = False  # off by default, as in diffusers; the settings stay for `tiled_decode`

    @property
    def spatial_compression_ratio(self) -> int:
        return self.config.spatial_compression_ratio

    # ---- tiling (diffusers' attributes and defaults: tiles of `sample_size`, 25 % overlap) ----
    def enable_tiling(self, tile_sample_min_size: int | None = None, tile_overlap_factor: float | None = None):
        """Square tiles of `tile_sample_min_size` pixels overlapping by `tile_overlap_factor`; unset arguments keep
        the current values (initially `sample_size` and 0.25, diffusers' attributes)."""
        size = int(tile_sample_min_size or self.tile_sample_min_size)
        f = self.tile_overlap_factor if tile_overlap_factor is None else float(tile_overlap_factor)
        latent = int(size / self.spatial_compression_ratio)
        if latent < 1 or not 0 <= f < 1 or int(latent * (1 - f)) < 1:
            raise ValueError(f"bad tiling: tile_sample_min_size={size} (>= {self.spatial_compression_ratio}) with "
                             f"overlap {f} leaves no stride")
        self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor = size, latent, f
        self.use_tiling = True

    def disable_tiling(self):
        self.use_tiling = False

    def _encode_tiling(self) -> Tiling:
        s, l, f = self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor
        stride, blend = int(s * (1 - f)), int(l * f)
        return Tiling((s, s), (stride, stride), (blend, blend), (l - blend, l - blend))

    def _decode_tiling(self) -> Tiling:
        s, l, f = self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor
        stride, blend = int(l * (1 - f)), int(s * f)
        return Tiling((l, l), (stride, stride), (blend, blend), (s - blend, s - blend))

    # ---- channels-last core ----
    def encode_nhwc(self, x, *, tiled: bool | None = None) -> jax.Array:
        """Moments `[B, H/8, W/8, 2*latent_channels]` (mean | logvar, logvar not yet clamped) of NHWC images."""
        x = jnp.asarray(x)
        r = self.spatial_compression_ratio
        check_image(x, self.config.in_channels, r)
        fn = jitted(_encode_fn, (self.encoder, self.quant_conv))
        if tiled is None:
            tiled = self.use_tiling and max(x.shape[1:3]) > self.tile_sample_min_size
        if not tiled:
            return fn(x)
        return tiled_apply(fn, x, self._encode_tiling(), (x.shape[1] // r, x.shape[2] // r))

    def wants_tiling(self, latent_height: int, latent_width: int) -> bool:
        """Whether `decode` tiles latents of this size by default (tiling enabled and larger than one tile)."""
        return bool(self.use_tiling and max(latent_height, latent_width) > self.tile_latent_min_size)

    def decode_nhwc(self, z, *, tiled: bool | None = None) -> jax.Array:
        """NHWC images (not clamped, as in diffusers' AutoencoderKL) from NHWC latents."""
        z = jnp.asarray(z)
        r = self.spatial_compression_ratio
        check_image(z, self.config.latent_channels, 1, "latents")
        fn = jitted(_decode_fn, (self.post_quant_conv, self.decoder))
        if tiled is None:
            tiled = self.wants_tiling(z.shape[1], z.shape[2])
        if not tiled:
            return fn(z)
        return tiled_apply(fn, z, self._decode_tiling(), (z.shape[1] * r, z.shape[2] * r))

    # ---- diffusers-style API (NCHW) ----
    def encode(self, x, return_dict: bool = True):
        x = jnp.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(x.shape)}")
        dist = DiagonalGaussian.from_moments(nhwc_to_nchw(self.encode_nhwc(nchw_to_nhwc(x))), axis=1)
        return EncoderOutput(dist) if return_dict else (dist,)

    def decode(self, z, return_dict: bool = True):
        z = jnp.asarray(z)
        if z.ndim != 4:
            raise ValueError(f"latents must be [B, C, h, w], got shape {tuple(z.shape)}")
        out = nhwc_to_nchw(self.decode_nhwc(nchw_to_nhwc(z)))
        return DecoderOutput(out) if return_dict else (out,)

    def tiled_encode(self, x, return_dict: bool = True):
        dist = DiagonalGaussian.from_moments(nhwc_to_nchw(self.encode_nhwc(nchw_to_nhwc(jnp.asarray(x)),
                                                                           tiled=True)), axis=1)
        return EncoderOutput(dist) if return_dict else (dist,)

    def tiled_decode(self, z, return_dict: bool = True):
        out = nhwc_to_nchw(self.decode_nhwc(nchw_to_nhwc(jnp.asarray(z)), tiled=True))
        return DecoderOutput(out) if return_dict else (out,)

    def __call__(self, sample, sample_posterior: bool = False, return_dict: bool = True, key=None):
        dist = self.encode(sample).latent_dist
        z = dist.sample(key) if sample_posterior else dist.mode()
        return self.decode(z, return_dict=return_dict)

    # ---- latents <-> diffusion-model space ----
    def _stats(self, ndim: int, axis: int):
        cfg = self.config
        shape = [1] * ndim
        shape[axis] = cfg.latent_channels
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            return (jnp.asarray(cfg.latents_mean, jnp.float32).reshape(shape),
                    jnp.asarray(cfg.latents_std, jnp.float32).reshape(shape))
        return jnp.float32(cfg.shift_factor or 0.0), jnp.float32(1.0)

    def normalize_latents(self, z, axis: int = 1):
        """VAE latents -> diffusion space: `(z - shift_factor) * scaling_factor` (FLUX / Z-Image / SD3), or
        `(z - latents_mean) * scaling_factor / latents_std` when the config has per-channel statistics."""
        mean, std = self._stats(z.ndim, axis)
        return ((z.astype(jnp.float32) - mean) * self.config.scaling_factor / std).astype(z.dtype)

    def denormalize_latents(self, z, axis: int = 1):
        """Inverse of `normalize_latents` (what pipelines do before `decode`: `z / scaling_factor + shift`)."""
        mean, std = self._stats(z.ndim, axis)
        return (z.astype(jnp.float32) * std / self.config.scaling_factor + mean).astype(z.dtype)


def structure(cfg: AutoencoderKLConfig) -> dict[str, int]:
    """Structural sizes for the key table (`Family.stack_sizes`)."""
    return {"levels": len(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block}


__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "FLUX_VAE", "FLUX_VAE_TINY", "DiagonalGaussian", "EncoderOutput",
           "DecoderOutput", "Tiling", "tiled_apply"]
