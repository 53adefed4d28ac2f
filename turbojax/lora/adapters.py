"""Pure-functional LoRA adapters on the Linear layers of a frozen base model.

An adapter is a plain pytree: `{module path: {"a": [..., in, r], "b": [..., r, out], "scale": [...]}}` where the
module path is the dotted NNX path of a `Linear` (e.g. "transformer_blocks.attn.to_q") and the leading `...` is the
`layers` axis for scanned stacks. The weight delta is `scale * a @ b` (so `a` is torch's `lora_A.weight.T` and `b`
is `lora_B.weight.T`, `scale = alpha / r`). Nothing here mutates a model: `merge` returns new parameters and the
trainable part (`split_trainable`: `a` and `b`, never `scale`) is what Optax sees (levanter style: differentiate only
the trainables).
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
    the base. Kept in `dtype` (fp32 masters by default) whatever the base dtype is. A rank < 1, a non-positive or
    non-finite alpha, a non-float dtype, an invalid regex or targets that match nothing raise ValueError.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    rank = int(rank)
    if alpha is not None and (isinstance(alpha, bool) or not np.isfinite(np.float64(alpha)) or alpha <= 0):
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"LoRA dtype {dtype!r} is not a dtype") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"LoRA dtype must be floating point (float32, bfloat16, ...), got {dt.name}")
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("LoRA targets are empty; give at least one regex over module paths")
    patterns = []
    for t in targets:
        try:
            patterns.append(re.compile(t))
        except (re.error, TypeError) as e:
            raise ValueError(f"LoRA target {t!r} is not a valid regex: {e}") from None
    kernels = {p: s for p, s in linear_kernels(model).items() if any(r.fullmatch(p) for r in patterns)}
    if not kernels:
        raise ValueError(f"LoRA targets {targets!r} match no Linear layer; module paths look like "
                         f"{sorted(linear_kernels(model))[:6]}")
    alpha = float(rank if alpha is None else alpha)
    adapter = {}
    for i, (path, shape) in enumerate(sorted(kernels.items())):
        *lead, n_in, n_out = shape
        bound = 1.0 / np.sqrt(n_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, n_in, rank), dt, -bound, bound)
        adapter[path] = {"a": a, "b": jnp.zeros((*lead, rank, n_out), dt),
                         "scale": jnp.full(tuple(lead), alpha / rank, jnp.float32)}
    return adapter


TRAINABLE_KEYS = ("a", "b")  # `scale` (alpha / r) is fixed metadata: never differentiated, optimised or checkpointed


def split_trainable(adapter: Adapter) -> tuple[dict, dict]:
    """`(trainable, fixed)`: `{path: {"a", "b"}}` for gradients / optimizer / checkpoints, `{path: {"scale", ...}}`
    for everything else. `join_trainable(trainable, fixed)` gives the adapter back."""
    trainable = {p: {k: v for k, v in e.items() if k in TRAINABLE_KEYS} for p, e in adapter.items()}
    fixed = {p: {k: v for k, v in e.items() if k not in TRAINABLE_KEYS} for p, e in adapter.items()}
    return trainable, fixed


def join_trainable(trainable: Mapping[str, Mapping], fixed: Mapping[str, Mapping]) -> Adapter:
    """Inverse of `split_trainable` (works under jit/grad: it only rebuilds dicts)."""
    if trainable.keys() != fixed.keys():
        raise KeyError(f"trainable and fixed parts cover different modules: "
                       f"{sorted(set(trainable) ^ set(fixed))[:4]}")
    return {p: {**fixed[p], **trainable[p]} for p in trainable}


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
