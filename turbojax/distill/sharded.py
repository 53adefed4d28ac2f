"""Shardings of a distillation run on a (data, fsdp, tensor) mesh: the frozen arguments, the trainables, their
optimiser states and EMA, and the batches (shared docs `scale.md` §4, issue 13).

Everything derives from the one logical-axis resolver (`turbojax.sharding.logical_to_spec`) and the base's `axes`
metadata, so a trainable is laid out like the base weight it belongs to:

- frozen base (and the DINO / VAE-decoder states beside it): each parameter by its own logical axes;
- LoRA factors `{module path: {"a": [..., in, r], "b": [..., r, out]}}`: `a`'s in-dim as the base kernel's in-dim,
  `b`'s out-dim as its out-dim, the rank replicated (so `x @ a` and `h @ b` need no reshuffle of the activations
  beyond what the base matmul needs);
- trainables that copy base weights (Turbo++ full blocks, ArcFlow's fully trained modules: dotted parameter paths
  as keys) like those weights; anything else (discriminator heads, ArcFlow policy heads: small, no axes) replicated;
- optimiser states by structure: a leaf whose key path ends with a parameter's key path and has its shape (Adam
  mu / nu under any chain / multi_transform / masked wrapper) takes that parameter's sharding, the rest (counts,
  schedules) is replicated. `optax.tree_map_params` cannot be used: `engine.make_tx` labels groups by reading the
  params' structure, which its placeholder does not have;
- EMA like the parameters of its group;
- batches: the leading (batch) dim over data x fsdp, scalars replicated.

`plan(mesh, turns, txs, params, frozen)` gathers them into a `StepShardings` the `Engine` jits its steps with.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from turbojax.sharding import DEFAULT_RULES, logical_to_spec


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _parts(path) -> tuple[str, ...]:
    return tuple(_key_name(k) for k in path)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def base_axes(base_state) -> dict[str, tuple]:
    """Dotted parameter path -> logical axes of every variable of the base state (nnx.State)."""
    out = {}
    for path, var in nnx.to_flat_state(base_state):
        out[".".join(str(p) for p in path)] = tuple(var.get_metadata().get("axes", ()))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Frozen arguments
# ---------------------------------------------------------------------------------------------------------------
def frozen_shardings(frozen, mesh: Mesh, rules=DEFAULT_RULES):
    """A prefix tree of `frozen` (an nnx.State, or a pytree of them such as `nets.FrozenArrays`) holding one
    NamedSharding per variable, from its `axes` metadata; bare arrays and variables without axes are replicated."""
    def one(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("axes", ())
            return NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules) if axes else PartitionSpec())
        return replicated(mesh)
    return jax.tree.map(one, frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _base_of(frozen):
    from turbojax.distill.nets import Nets
    return Nets.base_state(frozen)


# ---------------------------------------------------------------------------------------------------------------
# Trainables
# ---------------------------------------------------------------------------------------------------------------
def _leaf_spec(parts: tuple[str, ...], shape, axes_of: Mapping[str, tuple], mesh, rules) -> PartitionSpec:
    if len(parts) >= 2 and parts[-1] in ("a", "b"):  # a LoRA factor of the Linear at parts[:-1]?
        for i in range(len(parts) - 1):
            kernel = axes_of.get(".".join(parts[i:-1]) + ".kernel")
            if kernel is None or len(kernel) < 2:
                continue
            names = (kernel[-2], None) if parts[-1] == "a" else (None, kernel[-1])
            spec = logical_to_spec(names, shape, mesh, rules)
            if not any(spec):  # unsharded (`b` of a heads/mlp kernel on an fsdp-only mesh): the rank dim instead
                names = (kernel[-2], "lora_rank") if parts[-1] == "a" else ("lora_rank", kernel[-1])
                spec = logical_to_spec(names, shape, mesh, rules)
            return spec
    for i in range(len(parts)):  # a copy of a base weight (possibly a subset of a stack's layers)
        axes = axes_of.get(".".join(parts[i:]))
        if axes is not None and len(shape) >= len(axes):
            return logical_to_spec(axes, shape, mesh, rules)
    return PartitionSpec()


def trainable_shardings(params: Mapping, base_state, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """`{group: tree of NamedSharding}` matching `params` (see the module docstring for the rules)."""
    axes_of = base_axes(base_state)

    def one(path, leaf):
        return NamedSharding(mesh, _leaf_spec(_parts(path), np.shape(leaf), axes_of, mesh, rules))
    return {g: jax.tree_util.tree_map_with_path(one, tree) for g, tree in params.items()}


def opt_shardings(opt_state, params: Mapping, param_shardings: Mapping, mesh: Mesh):
    """Shardings of an optimiser state (arrays or ShapeDtypeStructs) of `params` (`{group: tree}`): a leaf whose key
    path ends with a parameter's key path and has its shape takes that parameter's sharding, the rest is
    replicated."""
    index = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings)):
        index[_parts(path)] = (tuple(np.shape(leaf)), sh)
    depths = sorted({len(k) for k in index}, reverse=True)

    def one(path, leaf):
        parts = _parts(path)
        for d in depths:
            hit = index.get(parts[-d:]) if d <= len(parts) else None
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return replicated(mesh)
    return jax.tree_util.tree_map_with_path(one, opt_state)


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------
def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)


def batch_shardings(batch, mesh: Mesh):
    """Per leaf: the leading dim over data x fsdp (it must divide), scalars replicated."""
    axes = batch_axes(mesh)
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

    def one(path, leaf):
        shape = np.shape(leaf)
        if not shape or n == 1:
            return replicated(mesh)
        if shape[0] % n:
            raise ValueError(f"batch entry {jax.tree_util.keystr(path)} of shape {tuple(shape)}: its leading (batch) "
                             f"dim must be a multiple of the {n} data-parallel devices (mesh data x fsdp)")
        return NamedSharding(mesh, PartitionSpec(axes if len(axes) > 1 else axes[0]))
    return jax.tree_util.tree_map_with_path(one, batch)


# ---------------------------------------------------------------------------------------------------------------
# The plan the engine jits with
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class StepShardings:
    """In/out shardings of every engine step: `state` matches `engine.init_state`'s tree, `frozen` is a prefix tree
    of the frozen argument; batches get theirs per call (`batch`), keys and metrics are replicated."""
    mesh: Mesh
    state: Any
    frozen: Any

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    @property
    def params(self):
        return self.state["params"]

    def batch(self, batch):
        return batch_shardings(batch, self.mesh)

    def put_frozen(self, frozen):
        return jax.device_put(frozen, self.frozen)

    def put_batch(self, batch):
        return jax.device_put(batch, self.batch(batch))


def plan(mesh: Mesh, turns: Sequence, txs: Mapping, params: Mapping, frozen, rules=DEFAULT_RULES) -> StepShardings:
    """The shardings of a run: `turns` / `txs` / `params` as `engine.Engine` takes them, `frozen` the turns' frozen
    argument (its base state's `axes` metadata places the LoRA factors)."""
    psh = trainable_shardings(params, _base_of(frozen), mesh, rules)
    opt = {}
    for t in turns:
        group = {g: params[g] for g in t.groups}
        abstract = jax.eval_shape(txs[t.name].init, group)  # shapes only: eval_shape drops shardings (scale.md §7)
        opt[t.name] = opt_shardings(abstract, group, {g: psh[g] for g in t.groups}, mesh)
    ema = {g: psh[g] for g in sorted({g for t in turns for g in t.ema})}
    return StepShardings(mesh, {"params": psh, "opt": opt, "ema": ema}, frozen_shardings(frozen, mesh, rules))
