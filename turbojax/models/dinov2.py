"""DINOv2 ViT feature extractor (transformers `Dinov2Model` / `Dinov2WithRegistersModel`) as a Flax NNX module.

Used frozen, as the feature network of the distillation discriminators (ADD / Wuli: trainable heads on the tokens
of several blocks). Inference only: dropout, drop-path and the mask token's pre-training use have no place here.

    model = turbojax.models.from_diffusers("dinov2-base")  # transformers folder: config.json + model.safetensors
    x = dino_preprocess(images, 224)                          # [-1, 1] NHWC -> ImageNet-normalised, 224 x 224
    out = model(x, layers=(2, 5, 8, 11))
    out.last_hidden_state      # [B, 1 + R + N, D] after the final LayerNorm (transformers' last_hidden_state)
    out.hidden_states[j]       # after block layers[j], before any norm (transformers' hidden_states[layers[j] + 1])

Token order is `[CLS, R registers, N patches]` (patches row-major), as in transformers.

Pitfalls this file gets right on purpose:
  * position embeddings are resampled to the input's patch grid with torch's bicubic: `Dinov2Model` uses
    `F.interpolate(mode="bicubic", antialias=False)` (Keys a = -0.75, border pixels replicated, source coordinates
    computed in fp32 like torch), `Dinov2WithRegistersModel` uses `antialias=True` (Pillow's a = -0.5 kernel,
    stretched when shrinking, weights renormalised at the borders). Both are host-built `[out, in]` matrices applied
    in fp32, so they are exact, differentiable and cost nothing at run time. Older transformers releases of
    `Dinov2Model` passed `scale_factor=(grid + 0.1) / sqrt(N)` (the original repository's offset) instead of
    `size=grid`, which moves the sampling points slightly; we follow current transformers (`size=`), the version
    the parity tests run against;
  * registers are inserted after the CLS token *after* the position embeddings are added (they have none);
  * the SwiGLU FFN (giant models) keeps the checkpoint's fused `weights_in` (gate rows first, then up) and its
    hidden width `(int(hidden * mlp_ratio * 2 / 3) + 7) // 8 * 8`; `hidden_act` does not apply to it;
  * the patch embedding is a stride-p convolution written as a reshape and one matmul (same sums as the conv).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.nn.attention import attention
from turbojax.nn.blocks import make_blocks, run_blocks
from turbojax.nn.layers import Linear, broadcast_rows
from turbojax.nn.remat import remat_policy

# transformers' ACT2FN names we implement (the MLP's activation; computed in fp32 like torch's kernels)
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class _Dinov2Fields:
    """Architecture fields shared by both variants (names follow transformers' `Dinov2Config`)."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 14
    image_size: int = 518  # the grid of the stored position embeddings: (image_size // patch_size) ** 2
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0  # initial LayerScale value (random init only; checkpoints store lambda1)
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False
    hidden_act: str = "gelu"

    @property
    def grid(self) -> int:
        """Side of the square patch grid the position embeddings were trained on."""
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        h = int(self.hidden_size * self.mlp_ratio)
        return (int(h * 2 / 3) + 7) // 8 * 8 if self.use_swiglu_ffn else h

    def validate(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} gives an empty MLP")
        if not self.use_swiglu_ffn and self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not implemented; choose one of {sorted(ACTIVATIONS)}")
        if getattr(self, "num_register_tokens", 0) < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")
        return self


@dataclasses.dataclass(frozen=True)
class Dinov2Config(_Dinov2Fields):
    """transformers `Dinov2Model`. `use_mask_token` only decides whether the checkpoint carries `mask_token`."""
    use_mask_token: bool = True


@dataclasses.dataclass(frozen=True)
class Dinov2WithRegistersConfig(_Dinov2Fields):
    """transformers `Dinov2WithRegistersModel`: `num_register_tokens` learned tokens after CLS, antialiased
    position-embedding resampling. A sibling of `Dinov2Config`, not a subclass, so a config names its family."""
    num_register_tokens: int = 4


# facebook/dinov2-{small,base,large,giant} and their -with-registers twins (518 px, patch 14)
_SIZES = {"small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
          "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
          "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
          "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True)}
_TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, patch_size=4, image_size=16)
DINOV2_PRESETS = {**{f"dinov2_{k}": Dinov2Config(**v) for k, v in _SIZES.items()},
                  "dinov2_tiny": Dinov2Config(**_TINY)}
DINOV2_REG_PRESETS = {**{f"dinov2_with_registers_{k}": Dinov2WithRegistersConfig(**v) for k, v in _SIZES.items()},
                      "dinov2_with_registers_tiny": Dinov2WithRegistersConfig(**_TINY)}


# --------------------------------------------------------------------------------------------------------------
# transformers config.json -> config
# --------------------------------------------------------------------------------------------------------------

_MODEL_TYPES = {Dinov2Config: "dinov2", Dinov2WithRegistersConfig: "dinov2_with_registers"}


def _square(raw: dict, key: str, default: int, source: str) -> int:
    """transformers allows `image_size` / `patch_size` as [h, w]; the position grid is square, so both must agree."""
    v = raw.get(key)
    if v is None:
        return default
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{source}: key {key!r} is {v}; only square sizes (an integer or [n, n]) are supported")
        v = v[0]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{source}: key {key!r} is {v!r}; expected a positive integer")
    return v


def config_from_transformers(raw: dict, source: str, config_cls: type = Dinov2Config):
    """Build a config from a transformers `config.json` dict of `Dinov2Model` or `Dinov2WithRegistersModel`.

    Dropout, drop-path and initialisation keys are ignored (inference only), and so are the backbone keys
    (`out_features`, `apply_layernorm`, ...), which only concern `Dinov2Backbone`'s heads. Values that would change
    the computation and are not implemented raise ValueError naming the file and key.
    """
    model_type = raw.get("model_type")
    if model_type is not None and model_type != _MODEL_TYPES[config_cls]:
        raise ValueError(f"{source}: model_type {model_type!r} is not {_MODEL_TYPES[config_cls]!r}")
    default = config_cls()
    hidden, heads = raw.get("hidden_size", default.hidden_size), raw.get("num_attention_heads",
                                                                         default.num_attention_heads)
    if raw.get("head_dim") is not None and raw["head_dim"] * heads != hidden:
        raise ValueError(f"{source}: head_dim {raw['head_dim']} != hidden_size / num_attention_heads; "
                         "DINOv2 with a separate head_dim is not implemented")
    kw = {f.name: raw[f.name] for f in dataclasses.fields(config_cls)
          if raw.get(f.name) is not None and f.name not in ("image_size", "patch_size")}
    kw["image_size"] = _square(raw, "image_size", default.image_size, source)
    kw["patch_size"] = _square(raw, "patch_size", default.patch_size, source)
    try:
        return config_cls(**kw).validate()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


# --------------------------------------------------------------------------------------------------------------
# Bicubic resampling of the position grid, exactly as torch's F.interpolate(mode="bicubic", align_corners=False)
# --------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """`[n_out, n_in]` fp32 weights of torch's 1-D bicubic resize (`out = W @ in`), separable in 2-D."""
    if antialias:  # torch's _upsample_bicubic2d_aa (Pillow's filter): a = -0.5, support widened when shrinking
        a, scale = -0.5, n_in / n_out
        stretch = max(scale, 1.0)

        def f(x):
            x = np.abs(x)
            return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                            np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))

        w = np.zeros((n_out, n_in))
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo = max(int(center - 2 * stretch + 0.5), 0)
            hi = min(int(center + 2 * stretch + 0.5), n_in)
            taps = f((np.arange(lo, hi) - center + 0.5) / stretch)
            w[i, lo:hi] = taps / taps.sum()
        return w.astype(np.float32)
    # torch's upsample_bicubic2d: Keys a = -0.75 on the 4 nearest pixels, indices clamped (border replicated);
    # source coordinate and coefficients in fp32, as torch computes them for fp32 input
    f32 = np.float32
    a = f32(-0.75)

    def near(x):  # |x| <= 1
        return ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)

    def far(x):  # 1 < |x| < 2
        return ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a

    scale = f32(n_in) / f32(n_out)
    w = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        src = scale * (f32(i) + f32(0.5)) - f32(0.5)
        x0 = min(int(np.floor(src)), n_in - 1)
        t = f32(min(max(src - f32(x0), f32(0)), f32(1)))
        for k, c in enumerate((far(t + f32(1)), near(t), near(f32(1) - t), far(f32(2) - t))):
            w[i, min(max(x0 - 1 + k, 0), n_in - 1)] += c
    return w


def resize_position_grid(pos: jax.Array, out_hw: tuple[int, int], antialias: bool) -> jax.Array:
    """`pos [g, g, D]` -> `[h, w, D]` with torch's bicubic (computed in fp32, returned in pos's dtype)."""
    g = pos.shape[0]
    if (g, g) == tuple(out_hw):
        return pos  # what transformers does too (and the resize would be the identity)
    wh, ww = (jnp.asarray(bicubic_matrix(g, n, antialias)) for n in out_hw)
    out = jnp.einsum("hi,ijd,wj->hwd", wh, pos.astype(jnp.float32), ww, precision=jax.lax.Precision.HIGHEST)
    return out.astype(pos.dtype)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_preprocess(images: jax.Array, size: int | tuple[int, int], *, patch_size: int = 14) -> jax.Array:
    """Images in [-1, 1] `[B, H, W, 3]` -> DINOv2 input `[B, h, w, 3]` fp32: [0, 1], resized, ImageNet-normalised.

    `size` is the output (h, w) (an int for square), each a positive multiple of `patch_size`. The resize is
    antialiased bilinear (`jax.image.resize(method="linear", antialias=True)`, the same weights as torch's
    `F.interpolate(mode="bilinear", antialias=True)`): a documented choice, not transformers' processor (shortest
    edge 256 bicubic + centre crop 224, on uint8 images), because the discriminator needs a differentiable map of
    the generator's float samples. Nothing is clipped, so gradients reach pixels outside [-1, 1] too.
    """
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if min(h, w) < 1 or h % patch_size or w % patch_size:
        raise ValueError(f"dino_preprocess size {(h, w)} must be positive multiples of patch_size {patch_size}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"dino_preprocess expects NHWC RGB images [B, H, W, 3], got shape {images.shape}")
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    if x.shape[1:3] != (h, w):
        x = jax.image.resize(x, (x.shape[0], h, w, 3), method="linear", antialias=True)
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


# --------------------------------------------------------------------------------------------------------------
# Modules (attribute names mirror transformers' modules; dinov2_keys.py maps them to the checkpoint's names)
# --------------------------------------------------------------------------------------------------------------

class LayerNorm(nnx.Module):
    """torch `nn.LayerNorm` with weight (`scale`) and bias; statistics and affine in fp32, result in `dtype`."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=("embed",))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * broadcast_rows(self.scale[...].astype(jnp.float32), y.shape)
        return (y + broadcast_rows(self.bias[...].astype(jnp.float32), y.shape)).astype(self.dtype)


class PatchEmbed(nnx.Module):
    """Conv2d(C, D, kernel = stride = p) as patchify + matmul; `kernel [p, p, C, D]` (HWIO of torch's weight)."""

    def __init__(self, cfg: _Dinov2Fields, *, rngs: nnx.Rngs, param_dtype, dtype):
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=(0, 1, 2), out_axis=3)
        self.kernel = nnx.Param(init(rngs.params(), (p, p, c, d), param_dtype), axes=(None, None, None, "embed"))
        self.bias = nnx.Param(jnp.zeros((d,), param_dtype), axes=("embed",))
        self.p, self.dtype = p, dtype

    def __call__(self, x):  # [B, H, W, C] -> [B, (H/p)(W/p), D], patches row-major like torch's flatten(2)
        b, h, w, c = x.shape
        p = self.p
        x = x.astype(self.dtype).reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)
        k = self.kernel[...].astype(self.dtype).reshape(p * p * c, -1)
        y = jnp.dot(x, k, preferred_element_type=jnp.float32)
        return (y + broadcast_rows(self.bias[...].astype(jnp.float32), y.shape)).astype(self.dtype)


class Embeddings(nnx.Module):
    def __init__(self, cfg: _Dinov2Fields, *, rngs: nnx.Rngs, param_dtype, dtype):
        d, n = cfg.hidden_size, cfg.grid ** 2
        normal = nnx.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(normal(rngs.params(), (1, 1, d), param_dtype), axes=(None, None, "embed"))
        # unused at inference (it replaces masked patches in pre-training); kept so exports stay loadable checkpoints
        self.mask_token = (nnx.Param(jnp.zeros((1, d), param_dtype), axes=(None, "embed"))
                           if getattr(cfg, "use_mask_token", True) else None)
        self.position_embeddings = nnx.Param(normal(rngs.params(), (1, n + 1, d), param_dtype),
                                             axes=(None, None, "embed"))
        r = getattr(cfg, "num_register_tokens", 0)
        self.register_tokens = (nnx.Param(jnp.zeros((1, r, d), param_dtype), axes=(None, None, "embed"))
                                if isinstance(cfg, Dinov2WithRegistersConfig) else None)
        self.patch_embeddings = PatchEmbed(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.grid, self.patch, self.dtype = cfg.grid, cfg.patch_size, dtype
        self.antialias = isinstance(cfg, Dinov2WithRegistersConfig)

    def __call__(self, pixel_values):
        b, h, w, _ = pixel_values.shape
        gh, gw = h // self.patch, w // self.patch
        x = self.patch_embeddings(pixel_values)
        pos = self.position_embeddings[...]
        d = pos.shape[-1]
        patch_pos = resize_position_grid(pos[0, 1:].reshape(self.grid, self.grid, d), (gh, gw), self.antialias)
        pos = jnp.concatenate([pos[:, :1], patch_pos.reshape(1, gh * gw, d)], axis=1).astype(self.dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + pos
        if self.register_tokens is not None:
            regs = jnp.broadcast_to(self.register_tokens[...].astype(self.dtype), (b,) + self.register_tokens.shape[1:])
            x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
        return x


class Attention(nnx.Module):
    def __init__(self, cfg: _Dinov2Fields, *, rngs, param_dtype, dtype, impl: str):
        d = cfg.hidden_size
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.q_proj = Linear(d, d, use_bias=cfg.qkv_bias, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(d, d, use_bias=cfg.qkv_bias, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(d, d, use_bias=cfg.qkv_bias, axes=("embed", "heads"), **kw)
        self.o_proj = Linear(d, d, axes=("heads", "embed"), **kw)
        self.heads, self.impl = cfg.num_attention_heads, impl

    def __call__(self, x):
        def split(t):
            return t.reshape(*t.shape[:-1], self.heads, -1)

        o = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), None, impl=self.impl)
        return self.o_proj(o.reshape(*o.shape[:2], -1))


class MLP(nnx.Module):
    def __init__(self, cfg: _Dinov2Fields, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.fc1 = Linear(cfg.hidden_size, cfg.mlp_hidden, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(cfg.mlp_hidden, cfg.hidden_size, axes=("mlp", "embed"), **kw)
        self.act = cfg.hidden_act

    def __call__(self, x):
        h = self.fc1(x)
        return self.fc2(ACTIVATIONS[self.act](h.astype(jnp.float32)).astype(h.dtype))


class SwiGLUFFN(nnx.Module):
    """`weights_out(silu(x1) * x2)` with `x1, x2 = chunk(weights_in(x), 2)` (biases on all projections)."""

    def __init__(self, cfg: _Dinov2Fields, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.weights_in = Linear(cfg.hidden_size, 2 * cfg.mlp_hidden, axes=("embed", "mlp"), **kw)
        self.weights_out = Linear(cfg.mlp_hidden, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        h = self.weights_in(x)
        gate, up = jnp.split(h, 2, axis=-1)
        return self.weights_out((jax.nn.silu(gate.astype(jnp.float32)).astype(h.dtype) * up))


class LayerScale(nnx.Module):
    def __init__(self, cfg: _Dinov2Fields, *, param_dtype, dtype):
        self.lambda1 = nnx.Param(jnp.full((cfg.hidden_size,), cfg.layerscale_value, param_dtype), axes=("embed",))
        self.dtype = dtype

    def __call__(self, x):
        return x * broadcast_rows(self.lambda1[...].astype(self.dtype), x.shape)


class Block(nnx.Module):
    """Pre-norm ViT block with LayerScale; returns a 1-tuple (the carry of `run_blocks`)."""

    def __init__(self, cfg: _Dinov2Fields, *, rngs, param_dtype, dtype, impl: str):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        eps = cfg.layer_norm_eps
        self.norm1 = LayerNorm(cfg.hidden_size, eps=eps, rngs=rngs, **kw)
        self.attention = Attention(cfg, rngs=rngs, impl=impl, **kw)
        self.layer_scale1 = LayerScale(cfg, **kw)
        self.norm2 = LayerNorm(cfg.hidden_size, eps=eps, rngs=rngs, **kw)
        self.mlp = (SwiGLUFFN if cfg.use_swiglu_ffn else MLP)(cfg, rngs=rngs, **kw)
        self.layer_scale2 = LayerScale(cfg, **kw)

    def __call__(self, h):
        h = h + self.layer_scale1(self.attention(self.norm1(h)))
        return (h + self.layer_scale2(self.mlp(self.norm2(h))),)


class Dinov2Output(NamedTuple):
    last_hidden_state: jax.Array  # [B, 1 + R + N, D], after the final LayerNorm
    hidden_states: tuple[jax.Array, ...] = ()  # one per requested block, in request order, before any norm


class Dinov2Model(nnx.Module):
    """DINOv2 ViT (with or without registers, by config type). Inputs are NHWC, ImageNet-normalised (see
    `dino_preprocess`), with H and W multiples of the patch size; other sizes than the trained one resample the
    position embeddings (see the module docstring)."""

    def __init__(self, config: _Dinov2Fields = DINOV2_PRESETS["dinov2_base"], *, rngs: nnx.Rngs | None = None,
                 param_dtype=jnp.float32, dtype=jnp.float32, scan_layers: bool = True, remat: str = "none",
                 attention_impl: str = "auto"):
        cfg = config.validate()
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        remat_policy(remat)  # validate the name early
        self.config, self.dtype, self.scan_layers, self.remat = cfg, dtype, scan_layers, remat
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.embeddings = Embeddings(cfg, rngs=rngs, **kw)
        self.layers = make_blocks(lambda r: Block(cfg, rngs=r, impl=attention_impl, **kw), cfg.num_hidden_layers,
                                  rngs, scan=scan_layers)
        self.layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs, **kw)

    @property
    def family(self) -> str:
        return "dinov2_with_registers" if isinstance(self.config, Dinov2WithRegistersConfig) else "dinov2"

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + registers: patch tokens start at this index."""
        return 1 + getattr(self.config, "num_register_tokens", 0)

    def check_input(self, shape: Sequence[int]) -> None:
        cfg = self.config
        if len(shape) != 4 or shape[-1] != cfg.num_channels:
            raise ValueError(f"pixel_values must be NHWC [B, H, W, {cfg.num_channels}], got shape {tuple(shape)}")
        if shape[1] < cfg.patch_size or shape[2] < cfg.patch_size or shape[1] % cfg.patch_size \
                or shape[2] % cfg.patch_size:
            raise ValueError(f"pixel_values height and width must be positive multiples of the patch size "
                             f"{cfg.patch_size}, got {tuple(shape[1:3])} (dino_preprocess resizes to such a size)")

    # ---- pure forward on arrays (traced under jit; call it inside the discriminator's own jit) ----
    def forward(self, pixel_values: jax.Array, layers: Sequence[int] = ()) -> Dinov2Output:
        """`pixel_values [B, H, W, C]` -> last hidden state and the hidden states after blocks `layers` (0-based).

        With `layers` and `scan_layers=True` the scan emits every block's output and the requested ones are
        gathered (no dynamic slicing; fine at DINOv2's depth, and what the backward keeps anyway)."""
        self.check_input(pixel_values.shape)
        n = self.config.num_hidden_layers
        taps = tuple(int(i) for i in layers)
        bad = [i for i in taps if not 0 <= i < n]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has blocks 0..{n - 1}")
        h = self.embeddings(pixel_values)
        res = run_blocks(self.layers, (h,), (), scan=self.scan_layers, remat=self.remat, taps=taps)
        (h,), feats = res if taps else (res, [])
        return Dinov2Output(self.layernorm(h), tuple(feats))

    def __call__(self, pixel_values, layers: Sequence[int] = ()) -> Dinov2Output:
        x = jnp.asarray(pixel_values)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"pixel_values must be float (normalised images), got {x.dtype}")
        self.check_input(x.shape)
        graphdef, state = nnx.split(self)
        return _jitted_forward(graphdef, state, x, tuple(int(i) for i in layers))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _jitted_forward(graphdef, state, pixel_values, layers):
    return nnx.merge(graphdef, state).forward(pixel_values, layers)
