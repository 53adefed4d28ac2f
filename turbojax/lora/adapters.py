"""Pure-functional LoRA adapters on the Linear layers of a frozen base model.

An adapter is a plain pytree: `{module path: {"a": [..., in, r], "b": [..., r, out], "scale": [...]}}` where the
module path is the dotted NNX path of a `Linear` (e.g. "transformer_blocks.attn.to_q") and the leading `...` is the
`layers` axis for scanned stacks. The weight delta is `scale * a @ b` (so `a` is torch's `lora_A.weight.T` and `b`
is `lora_B.weight.T`, `scale = alpha / r`). Nothing here mutates a model: `merge` returns new parameters and the
adapter itself is the trainable pytree handed to Optax (levanter style: differentiate only the trainables).
"""
from __future__ import annotations

import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.convert.params import flat_params

Adapter = dict  # {module path: {"a", "b", "scale"}}


def linear_kernels(model) -> dict[str, tuple[int, ...]]:
    """Dotted module path -> kernel shape for every Linear in `model` (stacked kernels keep their layer axis)."""
    return {".".join(p[:-1]): tuple(v.shape) for p, v in flat_params(model).items() if p[-1] == "kernel"}


def init_adapter(model, targets: str | list[str], rank: int, alpha: float | None = None, *, rng: jax.Array,
                 dtype=jnp.float32) -> Adapter:
    """Fresh adapter on every Linear whose module path fully matches one of the regexes in `targets`.

    PEFT-style init: `a` random (Kaiming-uniform over fan-in), `b` zeros, so the adapted model starts equal to
    the base. Kept in `dtype` (fp32 masters by default) whatever the base dtype is.
    """
    patterns = [re.compile(t) for t in ([targets] if isinstance(targets, str) else targets)]
    kernels = {p: s for p, s in linear_kernels(model).items() if any(r.fullmatch(p) for r in patterns)}
    if not kernels:
        raise ValueError(f"LoRA targets {targets!r} match no Linear layer; module paths look like "
                         f"{sorted(linear_kernels(model))[:6]}")
    alpha = float(rank if alpha is None else alpha)
    adapter = {}
    for i, (path, shape) in enumerate(sorted(kernels.items())):
        *lead, n_in, n_out = shape
        bound = 1.0 / np.sqrt(n_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, n_in, rank), dtype, -bound, bound)
        adapter[path] = {"a": a, "b": jnp.zeros((*lead, rank, n_out), dtype),
                         "scale": jnp.full(tuple(lead), alpha / rank, jnp.float32)}
    return adapter


def delta(entry: Mapping[str, jax.Array]) -> jax.Array:
    """`scale * a @ b` in fp32, broadcast over stacked layers."""
    d = jnp.einsum("...ir,...ro->...io", entry["a"].astype(jnp.float32), entry["b"].astype(jnp.float32))
    return d * jnp.asarray(entry["scale"], jnp.float32)[..., None, None]


def merge_params(params: nnx.State, adapters: list[tuple[Adapter, float]] | Adapter, strength: float = 1.0
                 ) -> nnx.State:
    """Return `params` (an `nnx.State` of Params) with adapter deltas added to the matching kernels.

    `adapters` is one adapter or a list of `(adapter, strength)`. Deltas are summed in fp32 and cast back to the
    kernel dtype once. Works under jit and under `jax.grad` w.r.t. the adapters.
    """
    if isinstance(adapters, dict):
        adapters = [(adapters, strength)]
    kernels = {".".join(p[:-1]): p for p in flat_params(params) if p[-1] == "kernel"}
    totals: dict[str, jax.Array] = {}
    for adapter, s in adapters:
        for path, entry in adapter.items():
            if path not in kernels:
                raise KeyError(f"adapter module {path!r} is not a Linear of this model")
            totals[path] = totals.get(path, 0.0) + s * delta(entry)
    flat = []
    for p, var in nnx.to_flat_state(params):
        key = ".".join(str(x) for x in p[:-1])
        if p[-1] == "kernel" and key in totals:
            k = var[...]
            if totals[key].shape != k.shape:
                raise ValueError(f"adapter {key}: delta shape {totals[key].shape} != kernel {k.shape}")
            var = var.replace((k.astype(jnp.float32) + totals[key]).astype(k.dtype))
        flat.append((p, var))
    return nnx.from_flat_state(flat)


def apply(model, adapters, strength: float = 1.0):
    """A new model with the adapters merged in; `model` itself is left as it was."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, merge_params(params, adapters, strength), rest)


def unapply(model, adapters, strength: float = 1.0):
    """Inverse of `apply` (exact in fp32 up to rounding; in bf16 merging and unmerging both round)."""
    return apply(model, adapters, -strength)
