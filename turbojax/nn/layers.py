"""Basic layers shared by every turbojax model.

Every parameter carries logical axis names in its `axes` metadata (resolved to mesh axes by
`turbojax.sharding`). Parameters are stored in `param_dtype`; matmuls run in the compute `dtype`;
norm statistics are always taken in float32 (the PyTorch references do the same).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def broadcast_rows(v: jax.Array, shape: Sequence[int]) -> jax.Array:
    """`jnp.broadcast_to(v, shape)` for a per-sample or shared vector (bias, norm weight, modulation `[B, 1, D]`)
    whose gradient sums the broadcast rows as a 2-D `[rows, D]` reduction, accumulated in fp32.

    Why: autodiff's own transpose of the broadcast is a `reduce_sum` over the token axis of a `[1, S, D]` product,
    which XLA:CPU fuses into a reduction ~75x slower than the same sum over `[S, D]` (measured at batch 1, S=1024,
    D=512: 12 ms vs 0.16 ms). A training step has a few dozen of them per block (biases, modulation shifts,
    scales and gates, norm weights), which made them a large share of the backward."""
    shape = tuple(int(n) for n in shape)
    if tuple(v.shape) == shape:
        return v
    return _broadcast_rows_fn(tuple(v.shape), shape, jnp.dtype(v.dtype))(v)


@functools.lru_cache(maxsize=None)
def _broadcast_rows_fn(vshape: tuple, shape: tuple, dtype):
    full = (1,) * (len(shape) - len(vshape)) + vshape
    reduced = tuple(i for i, (a, b) in enumerate(zip(full, shape)) if a == 1 and b != 1)
    kept = [i for i, (a, b) in enumerate(zip(full, shape)) if a != 1]
    # One 2-D reduction when every summed axis comes before every kept one (size-1 axes aside).
    flat = not kept or not reduced or max(reduced) < min(kept)
    width = math.prod(shape[i] for i in kept)

    @jax.custom_vjp
    def bcast(v):
        return jnp.broadcast_to(v, shape)

    def fwd(v):
        return jnp.broadcast_to(v, shape), None

    def bwd(_, ct):
        ct = ct.astype(jnp.float32)
        total = jnp.sum(ct.reshape(-1, width), axis=0) if flat else jnp.sum(ct, axis=reduced, keepdims=True)
        return (total.reshape(vshape).astype(dtype),)

    bcast.defvjp(fwd, bwd)
    return bcast


def dot_acc32(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` (`w` 2-D, contracting x's last axis) accumulated and returned in fp32, with a backward built for
    the GEMM kernels:

    * Half-precision operands get half-precision backward products. Autodiff's own transpose of a dot asked for an
      fp32 result hands the fp32 cotangent to both backward products, and XLA:CPU then converts the other (bf16)
      operand, a whole weight stack per scanned layer, to fp32 and runs fp32 GEMMs (medium bf16 Qwen-Image
      fwd+bwd: backward GEMMs at 3x the forward's time). The callers round the result to the half dtype, so the
      cotangent holds half-precision values and casting it back loses nothing; dx and dw come out in the
      operands' dtypes, as torch's bf16 backward gives them.
    * On CPU the weight gradient `x^T g` contracts the token axis, the major axis of both operands. XLA:CPU's fast
      GEMM (YNNPACK) does not take a transposed left operand, so that product falls back to Eigen at half the
      speed in bf16 (~160-200 GFLOP/s against ~400 for the same product in forward layout on an AVX512-BF16
      host, ~10 % slower in fp32). `transposed_copy` writes `x^T` once (one pass over x) and the product runs in
      forward layout.

    fp32 off CPU keeps autodiff's path (accelerator GEMMs take either layout)."""
    if x.dtype == jnp.float32 and w.dtype == jnp.float32 and not _on_cpu():
        return jnp.dot(x, w, preferred_element_type=jnp.float32)
    return _dot_acc32(x, w)


def _on_cpu() -> bool:
    from turbojax.nn.attention import current_platform  # imported here: attention imports this module
    return current_platform() == "cpu"


def transposed_copy(a: jax.Array) -> jax.Array:
    """`a.T` of a 2-D array, materialised in row-major order: flattened behind an optimization barrier, XLA's
    layout assignment cannot turn the transpose into a column-major view (which a dot would then read
    transposed)."""
    n, m = a.shape
    return jax.lax.optimization_barrier(a.T.reshape(-1)).reshape(m, n)


@jax.custom_vjp
def _dot_acc32(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _dot_acc32_fwd(x, w):
    return _dot_acc32(x, w), (x, w)


def _dot_acc32_bwd(res, ct):
    x, w = res
    g = ct.astype(x.dtype)
    dx = jnp.dot(g, w.T.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if _on_cpu():  # batch and tokens sum into dw
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        dw = jnp.dot(transposed_copy(x2), g2, preferred_element_type=jnp.float32)
    else:  # no reshape: a batch axis sharded over a mesh stays as it is
        lead = tuple(range(x.ndim - 1))
        dw = jax.lax.dot_general(x, g, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
    return dx, dw.astype(w.dtype)


_dot_acc32.defvjp(_dot_acc32_fwd, _dot_acc32_bwd)


# Activations with a hand-written backward that keeps only their input. Autodiff of tanh-GELU saves five
# intermediates of the MLP's widest activation per layer (5 x [S, 4D] fp32 stacks through a scan) and XLA:CPU then
# fuses that whole backward into a transposing copy for the LoRA gradient GEMM, which was a quarter of a LoRA
# training step on the medium Qwen-Image; recomputing from x costs one pass over it.
_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_K = 0.044715


# The forward values are evaluated in fp32 and rounded once to x's dtype, as torch's CPU and CUDA kernels do for
# half-precision inputs. jax.nn's functions on a bf16 array round every intermediate instead, which on XLA:CPU
# (no native bf16 arithmetic) also costs a convert pair per intermediate: a dozen per element for tanh-GELU, the
# most expensive elementwise fusion of the bf16 Qwen-Image forward. fp32 inputs are unchanged.
@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """`jax.nn.gelu(x, approximate=True)` (torch's GELU(approximate="tanh")), computed in fp32."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


def _gelu_fwd(x):
    return gelu_tanh(x), x


def _gelu_bwd(x, ct):
    x32 = x.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (x32 + _GELU_K * x32 * x32 * x32))
    d = 0.5 * (1 + t) + 0.5 * x32 * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_K * x32 * x32)
    return ((ct.astype(jnp.float32) * d).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def silu(x: jax.Array) -> jax.Array:
    """`jax.nn.silu(x)` computed in fp32, with a backward that keeps only x (see `gelu_tanh`)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def _silu_fwd(x):
    return silu(x), x


def _silu_bwd(x, ct):
    x32 = x.astype(jnp.float32)
    sig = jax.nn.sigmoid(x32)
    return ((ct.astype(jnp.float32) * sig * (1 + x32 * (1 - sig))).astype(x.dtype),)


silu.defvjp(_silu_fwd, _silu_bwd)


class LoraParam(nnx.Variable):
    """A LoRA factor attached to a `Linear` for training (unmerged). Not an `nnx.Param`, so the frozen base's state,
    key tables, exports and shardings never see it; `nnx.split(model, LoraParam, ...)` separates the trainables."""


def _param(rngs: nnx.Rngs, init, shape: Sequence[int], dtype, axes: Axes) -> nnx.Param:
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


class Linear(nnx.Module):
    """`y = x @ kernel + bias`; `kernel` is `[in, out]`, i.e. the transpose of torch's `weight`."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True,
                 axes: Axes = ("embed", "mlp"), param_dtype=jnp.float32, dtype=jnp.float32):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
        self.kernel = _param(rngs, init, (in_features, out_features), param_dtype, axes)
        self.bias = (_param(rngs, nnx.initializers.zeros_init(), (out_features,), param_dtype, axes[1:])
                     if use_bias else None)
        self.dtype = dtype
        # Optional unmerged LoRA (`turbojax.lora.unmerged.attach`): y += lora_scale * (x @ lora_a) @ lora_b. Training
        # keeps the delta out of the frozen kernel: merging it would rebuild every targeted weight each step.
        # `lora_scale` is a static float (alpha / r), so it is never trained.
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        # Accumulate in fp32 and round once, after the bias, like torch's bf16 addmm. Asking for an fp32 result also
        # selects XLA:CPU's fast bf16 x bf16 -> fp32 GEMM (~6x the bf16 -> bf16 one); fp32 compute is unchanged.
        xc = x.astype(self.dtype)
        y = dot_acc32(xc, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + broadcast_rows(self.bias[...].astype(jnp.float32), y.shape)
        if self.lora_a is not None:
            h = dot_acc32(xc, self.lora_a[...].astype(self.dtype))
            y = y + self.lora_scale * dot_acc32(h.astype(self.dtype), self.lora_b[...].astype(self.dtype))
        return y.astype(self.dtype)


class SwiGLU(nnx.Module):
    """`down(SiLU(gate(x)) * up(x))` without biases (Qwen2/Qwen3 `mlp`, Z-Image `feed_forward`: w1=gate, w3=up,
    w2=down); the key tables map these names to each checkpoint's."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, use_bias=False)
        self.gate = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
        self.up = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
        self.down = Linear(hidden, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(silu(self.gate(x)) * self.up(x))


class RMSNorm(nnx.Module):
    """diffusers/transformers RMSNorm: statistics in fp32, scaled by a learned weight (`scale`)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6, axes: Axes = ("embed",),
                 param_dtype=jnp.float32, dtype=jnp.float32):
        self.scale = _param(rngs, nnx.initializers.ones_init(), (dim,), param_dtype, axes)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        w = self.scale[...]
        # torch casts the normalised tensor to a half-precision weight dtype *before* the product.
        if w.dtype != jnp.float32:
            y = y.astype(w.dtype)
        return (y * broadcast_rows(w, y.shape)).astype(self.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, statistics in fp32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def timestep_sinusoid(t: jax.Array, dim: int = 256, *, scale: float = 1000.0, max_period: float = 10000.0,
                      dtype=jnp.float32) -> jax.Array:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale)`: `[cos | sin]`.

    Mirrors the reference's rounding: the frequency table is cast to the timestep dtype (bf16 in a bf16 model)
    before the fp32 product, and the product is taken as `(t * f) * scale`.
    """
    half = dim // 2
    exponent = -jnp.log(jnp.float32(max_period)) * jnp.arange(half, dtype=jnp.float32) / jnp.float32(half)
    freqs = jnp.exp(exponent).astype(dtype).astype(jnp.float32)
    args = (t.astype(dtype).astype(jnp.float32)[:, None] * freqs[None, :]) * jnp.float32(scale)
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
