"""LoRA applied unmerged inside the blocks, for training: `y = x @ W + scale * (x @ a) @ b` in every targeted Linear.

One frozen base state serves several roles (teacher = the base alone, student = base + student LoRA, fake score =
base + fake-score LoRA). A role is a graphdef whose targeted `Linear`s carry `LoraParam` slots; its model is
`nnx.merge(role.graphdef, base_state, role.lora_state(factors))`, so no copy of the base is ever made and the
merged weight `W + s a b` (a full-size temporary per targeted matrix, ~27 GiB per chip at 20B, `scale.md` §0) never
exists. The trainable pytree is `{module path: {"a", "b"}}` (fp32 masters); `scale = alpha / r` is a static float in
the graphdef, so it can never be trained. `turbojax.lora.adapters` keeps the merged form for inference and export.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from turbojax.nn.layers import Linear, LoraParam

Factors = dict  # {module path: {"a": [..., in, r], "b": [..., r, out]}}


@dataclasses.dataclass(frozen=True)
class LoraRole:
    """A frozen base with LoRA slots on some Linears. `paths` maps our dotted module path to its NNX path."""
    graphdef: nnx.GraphDef
    paths: Mapping[str, tuple]
    scales: Mapping[str, float]

    def lora_state(self, factors: Factors) -> nnx.State:
        flat = []
        for path, key in self.paths.items():
            flat.append((key + ("lora_a",), LoraParam(factors[path]["a"])))
            flat.append((key + ("lora_b",), LoraParam(factors[path]["b"])))
        return nnx.from_flat_state(flat)

    def model(self, base_state: nnx.State, factors: Factors):
        """The model of this role (traceable: call it inside jit / grad with the factors as the variables)."""
        return nnx.merge(self.graphdef, base_state, self.lora_state(factors))


def _module_at(model, key: tuple):
    node = model
    for k in key:
        node = node[k] if isinstance(k, int) else getattr(node, k)
    return node


def _linear_keys(model) -> dict[str, tuple]:
    """Dotted path (as `lora.linear_kernels` spells it) -> NNX path tuple of every Linear."""
    out = {}
    for key, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            out[".".join(str(k) for k in key)] = tuple(key)
    return out


def uniform_scale(path: str, scale) -> float:
    s = np.unique(np.asarray(scale, np.float32))
    if s.size != 1:
        raise ValueError(f"adapter {path}: per-layer scales {s.tolist()} differ; fold them into `b` first "
                         "(`fold_scales`)")
    return float(s[0])


def fold_scales(adapter: Mapping) -> dict:
    """Adapter with per-layer scales folded into `b` (scale 1 everywhere): same delta, uniform static scale. Used for
    LoRA files whose layers carry different alphas (or untouched layers with scale 0)."""
    out = {}
    for path, e in adapter.items():
        if "scale" not in e:  # LoKr / LoHa / DoRA / full deltas: merge-only, no low-rank factors to train
            raise ValueError(f"module {path}: a merge-only adapter entry (LoKr / LoHa / DoRA / .diff) cannot "
                             "warm-start a trainable LoRA; use a plain LoRA file")
        s = np.asarray(e["scale"], np.float32)
        if np.unique(s).size == 1:
            out[path] = dict(e)
        else:
            b = np.asarray(e["b"], np.float32) * s[..., None, None]
            out[path] = {"a": np.asarray(e["a"], np.float32), "b": b, "scale": np.ones_like(s)}
    return out


def make_role(graphdef: nnx.GraphDef, base_state: nnx.State, adapter: Mapping) -> LoraRole:
    """A role from an adapter `{path: {"a", "b", "scale"}}` (arrays or `jax.ShapeDtypeStruct`s, e.g. from
    `lora.init_adapter` or `lora.load`); only the shapes and the scales are read here."""
    model = nnx.merge(graphdef, base_state)  # fresh module objects; the arrays are shared, not copied
    keys = _linear_keys(model)
    paths, scales = {}, {}
    for path, e in adapter.items():
        if path not in keys:
            raise KeyError(f"adapter module {path!r} is not a Linear of this model")
        lin = _module_at(model, keys[path])
        k_shape, a, b = tuple(lin.kernel.shape), e["a"], e["b"]
        if tuple(a.shape[:-1]) != k_shape[:-1] or tuple(b.shape[-1:]) != k_shape[-1:] or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"adapter {path}: a {tuple(a.shape)} / b {tuple(b.shape)} do not fit kernel {k_shape}")
        lin.lora_a = LoraParam(jax.ShapeDtypeStruct(a.shape, a.dtype))
        lin.lora_b = LoraParam(jax.ShapeDtypeStruct(b.shape, b.dtype))
        lin.lora_scale = scales[path] = uniform_scale(path, e["scale"])
        paths[path] = keys[path]
    role_graphdef, _, _ = nnx.split(model, LoraParam, ...)
    return LoraRole(role_graphdef, paths, scales)


def factors_of(adapter: Mapping) -> Factors:
    """The trainable part of an adapter: `{path: {"a", "b"}}` (drop the fixed `scale`)."""
    return {p: {"a": e["a"], "b": e["b"]} for p, e in adapter.items()}


def adapter_of(role: LoraRole, factors: Factors) -> dict:
    """Back to the adapter form `{path: {"a", "b", "scale"}}` that `lora.save` / `lora.apply` take."""
    out = {}
    for p, f in factors.items():
        a = np.asarray(f["a"], np.float32)
        out[p] = {"a": a, "b": np.asarray(f["b"], np.float32),
                  "scale": np.full(a.shape[:-2], role.scales[p], np.float32)}
    return out
