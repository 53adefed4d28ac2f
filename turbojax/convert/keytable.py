"""Declarative checkpoint key tables: one table per model serves both conversion directions.

A table is a list of `Module(jax, torch, kind)` rows. `jax` is the dotted path of an NNX module inside our model,
`torch` the dotted module name in the diffusers state dict; rows whose paths contain `{i}` live in a stack of
blocks (`stack` names the stack's attribute, e.g. "transformer_blocks"). The kind says how each parameter maps:

  linear:    torch `weight [out, in]` <-> `kernel [in, out]` (transposed), `bias` <-> `bias` (optional)
  norm:      torch `weight` <-> `scale`
  param:     torch tensor <-> a bare nnx.Param (same layout)
  conv2d:    torch `weight [out, in, kh, kw]` <-> `kernel [kh, kw, in, out]` (NHWC/HWIO), `bias` (optional)
  conv3d:    torch `weight [out, in, kt, kh, kw]` <-> `kernel [kt, kh, kw, in, out]`, `bias` (optional)
  groupnorm: torch `weight`, `bias` <-> `scale`, `bias` (any affine norm with a bias: GroupNorm, LayerNorm)

A row marked `optional` is skipped when the model lacks its first parameter (e.g. a shortcut conv that exists only
when channels change); strictness is kept because every model parameter must be covered by some row and every
checkpoint tensor must be named by one (`params.check_keys`).

Tables whose rows depend on a config (VAEs: the number of levels and blocks) are `BuiltKeyTable`s: the family's
`stack_sizes(config)` returns the structural sizes and `build(sizes)` returns the plain table.

With scanned blocks a JAX leaf holds all layers stacked on axis 0; `expand()` turns the table into leaf-level
`Leaf` rows, each knowing its torch keys and how to move a tensor across, so conversion can stream leaf by leaf.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Module:
    jax: str
    torch: str
    kind: str  # a key of _KIND_PARAMS
    optional: bool = False


# per kind: (torch param suffix, jax leaf name, layout), layout: False (same), True (2-D transpose) or the axis
# permutation taking the torch tensor to the JAX one.
_KIND_PARAMS = {
    "linear": (("weight", "kernel", True), ("bias", "bias", False)),
    "norm": (("weight", "scale", False),),
    "param": (("", "", False),),
    "conv2d": (("weight", "kernel", (2, 3, 1, 0)), ("bias", "bias", False)),
    "conv3d": (("weight", "kernel", (2, 3, 4, 1, 0)), ("bias", "bias", False)),
    "groupnorm": (("weight", "scale", False), ("bias", "bias", False)),
}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One JAX parameter leaf and the torch key(s) it corresponds to (several when layers are stacked)."""
    jax_path: tuple[str, ...]
    torch_keys: tuple[str, ...]
    transpose: bool
    stacked: bool
    perm: tuple[int, ...] | None = None  # torch -> JAX axis permutation (conv kernels); None: see `transpose`

    def _inverse(self) -> tuple[int, ...]:
        return tuple(int(i) for i in np.argsort(self.perm))

    def _in(self, t: np.ndarray) -> np.ndarray:
        if self.perm is not None:
            return np.transpose(t, self.perm)
        return t.T if self.transpose else t

    def _out(self, p: np.ndarray) -> np.ndarray:
        if self.perm is not None:
            return np.transpose(p, self._inverse())
        return p.T if self.transpose else p

    def to_jax(self, tensors: list[np.ndarray]) -> np.ndarray:
        arrs = [self._in(t) for t in tensors]
        return np.stack(arrs) if self.stacked else arrs[0]

    def to_torch(self, leaf: np.ndarray) -> list[np.ndarray]:
        parts = list(leaf) if self.stacked else [leaf]
        return [np.ascontiguousarray(self._out(p)) for p in parts]

    def torch_shape(self, jax_shape: tuple[int, ...]) -> tuple[int, ...]:
        s = jax_shape[1:] if self.stacked else jax_shape
        if self.perm is not None:
            return tuple(s[i] for i in self._inverse())
        return tuple(reversed(s)) if self.transpose else tuple(s)


@dataclasses.dataclass(frozen=True)
class KeyTable:
    top: tuple[Module, ...]
    stacks: dict  # stack attribute name -> tuple[Module, ...] with `{i}` in torch names

    def expand(self, num_layers: dict[str, int], scanned: bool, present: Callable[[tuple[str, ...]], bool]
               ) -> list[Leaf]:
        """Leaf rows for a model; `present(path)` says whether an optional leaf (e.g. a bias) exists in it."""
        leaves = []
        for m in self.top:
            leaves += _module_leaves(m, (), None, present)
        for stack, modules in self.stacks.items():
            n = num_layers[stack]
            for m in modules:
                if scanned:
                    leaves += _module_leaves(m, (stack,), list(range(n)), present)
                else:
                    for i in range(n):
                        leaves += _module_leaves(m, (stack, str(i)), [i], present, stacked=False)
        return leaves

    def linear_index(self, num_layers: dict[str, int], scanned: bool) -> dict[str, tuple[str, int | None]]:
        """diffusers Linear module name -> (our dotted module path, layer index in a scanned stack or None)."""
        out = {m.torch: (m.jax, None) for m in self.top if m.kind == "linear"}
        for stack, modules in self.stacks.items():
            for m in modules:
                if m.kind != "linear":
                    continue
                for i in range(num_layers[stack]):
                    out[m.torch.format(i=i)] = ((f"{stack}.{m.jax}", i) if scanned
                                                else (f"{stack}.{i}.{m.jax}", None))
        return out


@dataclasses.dataclass(frozen=True)
class BuiltKeyTable:
    """A key table built from a model's structural sizes (`Family.stack_sizes(config)`), for models whose module
    list depends on the config (how many levels / blocks) rather than on a stack of identical layers."""
    build: Callable[[dict], KeyTable]

    def expand(self, num_layers: dict, scanned: bool, present: Callable[[tuple[str, ...]], bool]) -> list[Leaf]:
        return self.build(num_layers).expand({}, scanned, present)

    def linear_index(self, num_layers: dict, scanned: bool) -> dict[str, tuple[str, int | None]]:
        return self.build(num_layers).linear_index({}, scanned)


def _module_leaves(m: Module, prefix, layers, present, stacked=True) -> list[Leaf]:
    rows = []
    for n, (t_suffix, j_leaf, layout) in enumerate(_KIND_PARAMS[m.kind]):
        jpath = prefix + tuple(m.jax.split(".")) + ((j_leaf,) if j_leaf else ())
        if not present(jpath):
            if m.optional and n == 0:
                return []
            if t_suffix == "bias":
                continue
            raise KeyError(f"key table names {'.'.join(jpath)} but the model has no such parameter")
        tname = m.torch + (f".{t_suffix}" if t_suffix else "")
        if layers is None:
            keys = (tname,)
        else:
            keys = tuple(tname.format(i=i) for i in layers)
        perm = layout if isinstance(layout, tuple) else None
        rows.append(Leaf(jpath, keys, layout is True, stacked and layers is not None, perm))
    return rows


def linear_modules(rows: Iterable[tuple[str, str]]) -> tuple[Module, ...]:
    return tuple(Module(j, t, "linear") for j, t in rows)
