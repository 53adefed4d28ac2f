"""The one attention entry point: `attention(q, k, v, key_mask, impl=...)`, layout `[B, S, H, D]`.

Implementations:
  * "xla"   – reference einsum path (CPU tests, any backend): logits and softmax in fp32.
  * "cudnn" – `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16 only).
  * "splash" – slot for the TPU Pallas splash kernel; raises until the TPU work lands, so a config that asks for
    it fails loudly instead of silently running something else.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "splash")


def _xla_attention(q, k, v, key_mask, scale):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None, *,
              impl: str = "xla", scale: float | None = None) -> jax.Array:
    """Multi-head attention over `[B, S, H, D]` tensors; `key_mask` is `[B, S_k]` bool (True = attend)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "xla":
        return _xla_attention(q, k, v, key_mask, scale)
    if impl == "cudnn":
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    if impl == "splash":
        raise NotImplementedError("attention impl 'splash' (TPU Pallas) is a reserved slot and not available yet; "
                                  "use 'xla' or 'cudnn'")
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLEMENTATIONS}")
