"""diffusers `AutoencoderKLQwenImage` (the Qwen-Image VAE, a Wan-2.1 causal 3-D VAE) for single images.

Spec: shared docs `architectures.md` §3 and §6 pitfall 9. With one frame the causal 3-D VAE is exactly 2-D:

  * a causal conv3d pads `2 * p_t` zero frames in front only, so one frame only meets the **last temporal tap**:
    it is a 2-D conv with `W[:, :, -1]` (1x1x1 convs are 1x1 convs). The full `[kt, kh, kw, in, out]` kernels
    are kept as parameters so checkpoints round-trip byte for byte; only `kernel[-1]` is used at run time;
  * the resamplers' `time_conv`s only act from the second chunk of a video on, so they are parameters that
    images never use (8 of them in the real checkpoint);
  * the norm is an L2 normalisation over channels times sqrt(C) times gamma (not mean-square + eps).

API (diffusers' layout `[B, C, 1, H, W]`; 4-D `[B, C, H, W]` is accepted too and gives 4-D results):

    vae = turbojax.models.from_diffusers("Qwen-Image/vae")
    dist = vae.encode(images).latent_dist              # images in [-1, 1], H and W multiples of 8
    z_dit = vae.normalize_latents(dist.mode())         # (z - latents_mean) / latents_std
    images = vae.decode(vae.denormalize_latents(z_dit)).sample   # clamped to [-1, 1]

Video (more than one frame) is not supported.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from turbojax.models.vae_flux import (CHANNEL_AXES, CONV_AXES, Conv2d, DecoderOutput, DiagonalGaussian,
                                      EncoderOutput, Tiling, check_image, conv_nhwc, conv_params, jitted, silu,
                                      single_head_attention, tiled_apply, upsample_nearest2x)
from turbojax.nn.remat import checkpointed_chain

QWEN_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                     -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
QWEN_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                    1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class QwenImageVAEConfig:
    """diffusers `AutoencoderKLQwenImage` config; defaults are the class defaults (== the published VAE)."""
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # sic: diffusers' spelling
    dropout: float = 0.0  # training only
    input_channels: int = 3
    latents_mean: tuple[float, ...] = QWEN_LATENTS_MEAN
    latents_std: tuple[float, ...] = QWEN_LATENTS_STD

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** len(self.temperal_downsample)

    def validate(self) -> "QwenImageVAEConfig":
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries, got "
                             f"{len(self.temperal_downsample)}")
        if self.attn_scales:
            # diffusers builds such encoder blocks but cannot run them (the attention block is called with the
            # feature-cache arguments it does not take), so no working checkpoint can need them.
            raise NotImplementedError("AutoencoderKLQwenImage with non-empty attn_scales is not supported")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} values, expected z_dim={self.z_dim}")
        return self


QWEN_IMAGE_VAE = QwenImageVAEConfig()
QWEN_IMAGE_VAE_TINY = QwenImageVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                                         latents_mean=(0.1, -0.2, 0.3, -0.4), latents_std=(1.5, 0.5, 2.0, 1.0))


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------

class CausalConv3d(nnx.Module):
    """`QwenImageCausalConv3d` on one frame: kernel `[kt, kh, kw, in, out]`, applied as the 2-D conv of its last
    temporal tap with "same" spatial zero padding."""

    def __init__(self, cin: int, cout: int, k: tuple[int, int, int], *, rngs, param_dtype, dtype):
        self.kernel, self.bias = conv_params(rngs, (*k, cin, cout), param_dtype, ("conv_t",) + CONV_AXES)
        self.padding = ((k[1] // 2,) * 2, (k[2] // 2,) * 2)
        self.dtype = dtype

    def __call__(self, x):
        return conv_nhwc(x, self.kernel[...][-1], self.bias[...], padding=self.padding, dtype=self.dtype)


def conv3(cin, cout, **kw):
    return CausalConv3d(cin, cout, (3, 3, 3), **kw)


def conv1(cin, cout, **kw):
    return CausalConv3d(cin, cout, (1, 1, 1), **kw)


class RMSNorm(nnx.Module):
    """`QwenImageRMS_norm`: `x / max(||x||_2, 1e-12) * sqrt(C) * gamma` over channels (the norm in fp32).

    gamma keeps the checkpoint's shape, `[C, 1, 1, 1]` (`images=False`) or `[C, 1, 1]` (`images=True`)."""

    def __init__(self, dim: int, *, images: bool, rngs, param_dtype, dtype):
        del rngs
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.gamma = nnx.Param(jnp.ones(shape, param_dtype), axes=CHANNEL_AXES + (None,) * (len(shape) - 1))
        self.scale, self.dtype = dim ** 0.5, dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        y = (x32 / jnp.maximum(norm, 1e-12)).astype(x.dtype)
        return (y * self.scale * self.gamma[...].reshape(-1)).astype(self.dtype)


class ResidualBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, **kw):
        self.norm1 = RMSNorm(cin, images=False, **kw)
        self.conv1 = conv3(cin, cout, **kw)
        self.norm2 = RMSNorm(cout, images=False, **kw)
        self.conv2 = conv3(cout, cout, **kw)
        self.conv_shortcut = conv1(cin, cout, **kw) if cin != cout else None

    def __call__(self, x):
        h = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return self.conv2(silu(self.norm2(self.conv1(silu(self.norm1(x)))))) + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H*W positions of a frame, fused qkv 1x1 conv, residual."""

    def __init__(self, dim: int, *, impl: str, **kw):
        self.norm = RMSNorm(dim, images=True, **kw)
        self.to_qkv = Conv2d(dim, 3 * dim, 1, **kw)
        self.proj = Conv2d(dim, dim, 1, **kw)
        self.impl = impl

    def __call__(self, x):
        b, h, w, c = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b, h * w, 3 * c), 3, axis=-1)
        return self.proj(single_head_attention(q, k, v, self.impl).reshape(b, h, w, c)) + x


class Resample(nnx.Module):
    """`QwenImageResample`. Up: nearest x2 then a 3x3 conv halving channels. Down: zero-pad right/bottom, 3x3
    stride-2 conv. The "3d" modes add a `time_conv` that single images never use (kept for the checkpoint)."""

    def __init__(self, dim: int, mode: str, **kw):
        self.up = mode.startswith("up")
        if self.up:
            self.resample = Conv2d(dim, dim // 2, 3, **kw)
        else:
            self.resample = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
        self.time_conv = (CausalConv3d(dim, 2 * dim if self.up else dim, (3, 1, 1), **kw) if mode.endswith("3d")
                          else None)

    def __call__(self, x):
        return self.resample(upsample_nearest2x(x) if self.up else x)


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, impl: str, **kw):
        self.resnets = nnx.List([ResidualBlock(dim, dim, **kw) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, impl=impl, **kw)])

    def __call__(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder3d(nnx.Module):
    def __init__(self, cfg: QwenImageVAEConfig, *, impl: str, **kw):
        dims = [cfg.base_dim * u for u in (1,) + tuple(cfg.dim_mult)]
        self.conv_in = conv3(cfg.input_channels, dims[0], **kw)
        blocks = []  # one flat list of residual blocks and resamplers, indexed like diffusers' `down_blocks`
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, **kw))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d", **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], impl=impl, **kw)
        self.norm_out = RMSNorm(dims[-1], images=False, **kw)
        self.conv_out = conv3(dims[-1], 2 * cfg.z_dim, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        return self.conv_out(silu(self.norm_out(self.mid_block(x))))


class UpBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, mode: str | None, **kw):
        self.resnets = nnx.List([ResidualBlock(cin if i == 0 else cout, cout, **kw)
                                 for i in range(num_res_blocks + 1)])
        self.upsamplers = nnx.List([Resample(cout, mode, **kw)]) if mode else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers else x


class Decoder3d(nnx.Module):
    def __init__(self, cfg: QwenImageVAEConfig, *, impl: str, **kw):
        mult = tuple(cfg.dim_mult)
        dims = [cfg.base_dim * u for u in (mult[-1],) + mult[::-1]]
        temporal_up = tuple(cfg.temperal_downsample)[::-1]
        self.conv_in = conv3(cfg.z_dim, dims[0], **kw)
        self.mid_block = MidBlock(dims[0], impl=impl, **kw)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the previous block's upsampler halved the channels
                cin //= 2
            mode = None if i == len(mult) - 1 else ("upsample3d" if temporal_up[i] else "upsample2d")
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, mode, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], images=False, **kw)
        self.conv_out = conv3(dims[-1], cfg.input_channels, **kw)

    def __call__(self, z, *, remat: bool = False):
        """`remat`: each resnet and upsampler of the up blocks under `jax.checkpoint` (for decodes that are
        differentiated, see `checkpointed_chain`); the values are the same."""
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = checkpointed_chain([*blk.resnets, *(blk.upsamplers or ())], x) if remat else blk(x)
        return self.conv_out(silu(self.norm_out(x)))


def _encode_fn(parts, x):
    encoder, quant_conv = parts
    return quant_conv(encoder(x))


def _decode_fn(parts, z):
    post_quant_conv, decoder = parts
    return decoder(post_quant_conv(z))


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------

class AutoencoderKLQwenImage(nnx.Module):
    """The Qwen-Image VAE for single images; see the module docstring for the API."""

    family = "qwen_image_vae"

    def __init__(self, config: QwenImageVAEConfig = QWEN_IMAGE_VAE, *, rngs: nnx.Rngs | None = None,
                 param_dtype=jnp.float32, dtype=jnp.float32, scan_layers: bool = False, remat: str = "none",
                 attention_impl: str = "auto"):
        del remat  # inference module: nothing to rematerialise
        cfg = config.validate()
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        # scan_layers has no meaning here (no stack of identical layers); kept so checkpoints record what was asked
        self.config, self.dtype, self.scan_layers = cfg, dtype, scan_layers
        self.encoder = Encoder3d(cfg, impl=attention_impl, **kw)
        self.quant_conv = conv1(2 * cfg.z_dim, 2 * cfg.z_dim, **kw)
        self.post_quant_conv = conv1(cfg.z_dim, cfg.z_dim, **kw)
        self.decoder = Decoder3d(cfg, impl=attention_impl, **kw)
        self.enable_tiling(256, 256, 192, 192)  # diffusers' defaults
        self.use_tiling = False

    @property
    def spatial_compression_ratio(self) -> int:
        return self.config.spatial_compression_ratio

    # ---- tiling (diffusers' attribute names and defaults) ----
    def enable_tiling(self, tile_sample_min_height: int | None = None, tile_sample_min_width: int | None = None,
                      tile_sample_stride_height: int | None = None, tile_sample_stride_width: int | None = None):
        """Tiles of `tile_sample_min_*` pixels every `tile_sample_stride_*` pixels; the overlap is blended."""
        r = self.spatial_compression_ratio
        th = tile_sample_min_height or self.tile_sample_min_height
        tw = tile_sample_min_width or self.tile_sample_min_width
        sh = tile_sample_stride_height or self.tile_sample_stride_height
        sw = tile_sample_stride_width or self.tile_sample_stride_width
        for name, v in (("tile height", th), ("tile width", tw), ("stride height", sh), ("stride width", sw)):
            if int(v) != v or v < r or v % r:
                raise ValueError(f"{name} must be a positive multiple of {r}, got {v}")
        if sh > th or sw > tw:
            raise ValueError(f"tile strides ({sh}, {sw}) must not exceed the tile size ({th}, {tw})")
        self.tile_sample_min_height, self.tile_sample_min_width = int(th), int(tw)
        self.tile_sample_stride_height, self.tile_sample_stride_width = int(sh), int(sw)
        self.use_tiling = True

    def disable_tiling(self):
        self.use_tiling = False

    def _geometry(self):
        r = self.spatial_compression_ratio
        sample = (self.tile_sample_min_height, self.tile_sample_min_width)
        stride = (self.tile_sample_stride_height, self.tile_sample_stride_width)
        return sample, stride, (sample[0] // r, sample[1] // r), (stride[0] // r, stride[1] // r)

    def wants_tiling(self, latent_height: int, latent_width: int) -> bool:
        """Whether `decode` tiles latents of this size by default (tiling enabled and larger than one tile)."""
        ltile = self._geometry()[2]
        return bool(self.use_tiling and (latent_height > ltile[0] or latent_width > ltile[1]))

    # ---- channels-last core ----
    def encode_nhwc(self, x, *, tiled: bool | None = None):
        """Moments `[B, H/8, W/8, 2*z_dim]` (mean | logvar, logvar not yet clamped) of NHWC images."""
        x = jnp.asarray(x)
        r = self.spatial_compression_ratio
        check_image(x, self.config.input_channels, r)
        fn = jitted(_encode_fn, (self.encoder, self.quant_conv))
        sample, stride, ltile, lstride = self._geometry()
        if tiled is None:
            tiled = self.use_tiling and (x.shape[1] > sample[0] or x.shape[2] > sample[1])
        if not tiled:
            return fn(x)
        blend = (ltile[0] - lstride[0], ltile[1] - lstride[1])
        return tiled_apply(fn, x, Tiling(sample, stride, blend, lstride), (x.shape[1] // r, x.shape[2] // r))

    def decode_nhwc(self, z, *, tiled: bool | None = None):
        """NHWC images clamped to [-1, 1] from NHWC latents.

        diffusers skips the clamp on its tiled path; we clamp the blended mosaic, so the two agree after clamping
        (pipelines clamp again when post-processing anyway)."""
        z = jnp.asarray(z)
        r = self.spatial_compression_ratio
        check_image(z, self.config.z_dim, 1, "latents")
        fn = jitted(_decode_fn, (self.post_quant_conv, self.decoder))
        sample, stride, ltile, lstride = self._geometry()
        if tiled is None:
            tiled = self.wants_tiling(z.shape[1], z.shape[2])
        if not tiled:
            return jnp.clip(fn(z), -1.0, 1.0)
        blend = (sample[0] - stride[0], sample[1] - stride[1])
        out = tiled_apply(fn, z, Tiling(ltile, lstride, blend, stride), (z.shape[1] * r, z.shape[2] * r))
        return jnp.clip(out, -1.0, 1.0)

    # ---- diffusers-style API: [B, C, 1, H, W] (or [B, C, H, W]) ----
    @staticmethod
    def _to_nhwc(x, what: str):
        x = jnp.asarray(x)
        if x.ndim == 5:
            if x.shape[2] != 1:
                raise ValueError(f"{what}: only single images are supported (frames axis of size 1), got shape "
                                 f"{tuple(x.shape)}; video needs the causal feature cache, not implemented")
            x = x[:, :, 0]
        elif x.ndim != 4:
            raise ValueError(f"{what}: expected [B, C, 1, H, W] or [B, C, H, W], got shape {tuple(x.shape)}")
        return jnp.transpose(x, (0, 2, 3, 1))

    @staticmethod
    def _from_nhwc(y, ndim: int):
        y = jnp.transpose(y, (0, 3, 1, 2))
        return y[:, :, None] if ndim == 5 else y

    def _encode(self, x, tiled):
        nd = jnp.ndim(x)
        moments = self._from_nhwc(self.encode_nhwc(self._to_nhwc(x, "images"), tiled=tiled), nd)
        return DiagonalGaussian.from_moments(moments, axis=1)

    def _decode(self, z, tiled):
        return self._from_nhwc(self.decode_nhwc(self._to_nhwc(z, "latents"), tiled=tiled), jnp.ndim(z))

    def encode(self, x, return_dict: bool = True):
        dist = self._encode(x, None)
        return EncoderOutput(dist) if return_dict else (dist,)

    def decode(self, z, return_dict: bool = True):
        out = self._decode(z, None)
        return DecoderOutput(out) if return_dict else (out,)

    def tiled_encode(self, x, return_dict: bool = True):
        dist = self._encode(x, True)
        return EncoderOutput(dist) if return_dict else (dist,)

    def tiled_decode(self, z, return_dict: bool = True):
        out = self._decode(z, True)
        return DecoderOutput(out) if return_dict else (out,)

    def __call__(self, sample, sample_posterior: bool = False, return_dict: bool = True, key=None):
        dist = self.encode(sample).latent_dist
        z = dist.sample(key) if sample_posterior else dist.mode()
        return self.decode(z, return_dict=return_dict)

    # ---- latents <-> diffusion-model space ----
    def _stats(self, ndim: int, axis: int):
        shape = [1] * ndim
        shape[axis] = self.config.z_dim
        return (jnp.asarray(self.config.latents_mean, jnp.float32).reshape(shape),
                jnp.asarray(self.config.latents_std, jnp.float32).reshape(shape))

    def normalize_latents(self, z, axis: int = 1):
        """VAE latents -> transformer space: `(z - latents_mean) / latents_std` (fp32, rounded once)."""
        mean, std = self._stats(jnp.ndim(z), axis)
        return ((jnp.asarray(z, jnp.float32) - mean) / std).astype(jnp.asarray(z).dtype)

    def denormalize_latents(self, z, axis: int = 1):
        """Inverse of `normalize_latents`: `z * latents_std + latents_mean` (the Qwen pipeline writes it as
        `z / (1 / std) + mean`, equal up to fp32 round-off)."""
        mean, std = self._stats(jnp.ndim(z), axis)
        return (jnp.asarray(z, jnp.float32) * std + mean).astype(jnp.asarray(z).dtype)


def structure(cfg: QwenImageVAEConfig) -> dict[str, int]:
    """Structural sizes for the key table (`Family.stack_sizes`)."""
    return {"levels": len(cfg.dim_mult), "num_res_blocks": cfg.num_res_blocks}
