"""Meshes and the one logical-axis resolver.

Parameters carry logical axis names (`axes` metadata: "embed", "heads", "mlp", "layers", ...). A rule table maps
logical names to mesh axes with Linen's semantics: rules are tried in order, a mesh axis is used at most once per
array, a mesh axis is only used if it divides the dimension, and unmapped names are replicated.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from turbojax.convert.params import flat_params

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or tuple of mesh axes); several rows per name are alternatives, first fit wins.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("mod", "tensor"),
    ("text_embed", "fsdp"),
    ("embed_out", "tensor"),
    ("head_dim", None),
    ("lora_rank", "fsdp"),  # a LoRA factor's rank dim, used only when its kernel's axes leave it unsharded
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None, *,
              num_slices: int | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh with Auto axes; one size may be -1 to take the remaining devices.

    Devices are laid out by `mesh_utils` (on TPU along the physical torus, so that fsdp / tensor collectives ride
    neighbouring links; elsewhere in `jax.devices()` order). On a multi-slice TPU job (`num_slices`, by default the
    number of distinct `slice_index` among the devices) the `data` axis spans the slices over DCN and must be a
    multiple of their number; fsdp and tensor stay inside a slice (ICI), as MaxText lays out DCN data parallelism.
    ValueError with the reason when the sizes do not fit the devices."""
    from jax.experimental import mesh_utils
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh sizes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    if num_slices is None:
        num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    try:
        if num_slices > 1:
            if sizes[0] % num_slices:
                raise ValueError(f"data={sizes[0]} must be a multiple of the {num_slices} slices (the data axis "
                                 "spans them over DCN)")
            ici = (sizes[0] // num_slices, sizes[1], sizes[2])
            arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices,
                                                       allow_split_physical_axes=True)
        else:
            arr = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    except (NotImplementedError, AssertionError) as e:  # mesh_utils' ways of saying the shape does not map
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         ) from None
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_mesh_sizes(text: str) -> dict[str, int]:
    """"data=1,fsdp=-1,tensor=1" -> {"data": 1, "fsdp": -1, "tensor": 1} (the command lines' `--mesh`): axes not
    named are 1, except that fsdp takes the remaining devices (-1) when no axis does; ValueError naming the part."""
    sizes = {a: 1 for a in MESH_AXES}
    named = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, val = part.partition("=")
        key = key.strip()
        if not eq or key not in sizes or key in named:
            raise ValueError(f"{text!r}: expected data=N,fsdp=N,tensor=N (each axis at most once)")
        try:
            sizes[key] = int(val)
        except ValueError:
            raise ValueError(f"{text!r}: {key}={val.strip()!r} is not an integer") from None
        if sizes[key] == 0 or sizes[key] < -1:
            raise ValueError(f"{text!r}: {key} must be >= 1 or -1 (the remaining devices)")
        named.add(key)
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"{text!r}: at most one axis may be -1")
    if "fsdp" not in named and -1 not in sizes.values():
        sizes["fsdp"] = -1
    return sizes


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES
                    ) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axes (leading unnamed dims are `layers`)."""
    axes = ("layers",) * (len(shape) - len(axes)) + tuple(axes)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        choice = None
        for rule_name, mesh_axes in rules:
            if rule_name != name or mesh_axes is None:
                continue
            cand = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            cand = tuple(a for a in cand if mesh.shape[a] > 1)
            if not cand or used & set(cand):
                continue
            if dim % int(np.prod([mesh.shape[a] for a in cand])):
                continue
            choice = cand[0] if len(cand) == 1 else cand
            used |= set(cand)
            break
        spec.append(choice)
    return PartitionSpec(*spec)


def param_shardings(model, mesh: Mesh, rules=DEFAULT_RULES) -> dict[tuple[str, ...], NamedSharding]:
    """Leaf path -> NamedSharding for every parameter of a (possibly abstract) model."""
    out = {}
    for path, var in flat_params(model).items():
        axes = var.get_metadata().get("axes", ())
        out[path] = NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules))
    return out


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over data x fsdp (the axes of size > 1), everything else replicated."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
    """`x` constrained to the sharding its logical axes resolve to on the mesh set by `jax.set_mesh`; a no-op
    without one (tests, one device), so code calls it unconditionally. Activations use "batch", "length", "embed",
    "heads". Rules naming a mesh axis the current mesh lacks are skipped."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or len(logical_axes) != x.ndim:
        return x
    names = set(mesh.axis_names)
    usable = []
    for name, axes in rules:
        cand = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if all(a in names for a in cand):
            usable.append((name, axes))
    spec = logical_to_spec(logical_axes, x.shape, mesh, tuple(usable))
    return jax.lax.with_sharding_constraint(x, spec)


RESIDUAL_AXES = ("batch", "length", "embed")


def constrain_residual(tree):
    """Every `[B, L, D]` array of `tree` (a block stack's carry: the residual streams) constrained to
    ("batch", "length", "embed"): one sample per data-parallel chip, so XLA never gathers the batch inside the
    stack (`scale.md` §0 cause 2). Arrays of other ranks pass through."""
    return jax.tree.map(lambda x: constrain(x, RESIDUAL_AXES) if getattr(x, "ndim", 0) == 3 else x, tree)


def constrain_per_sample(x: jax.Array) -> jax.Array:
    """A per-sample vector `[B, F]` (the timestep modulations of a DiT block) constrained to the batch layout
    ("batch", replicated features); a no-op without a mesh.

    Why: these come out of a Linear whose output features are tensor-sharded ("mod" -> tensor). Left to
    propagation, XLA:CPU (jax 0.10.2, Shardy and GSPMD alike) computed wrong values on a (data=2, fsdp=2, tensor=2)
    mesh when such a vector scales an MLP output with the batch over data x fsdp (errors of order 1; the 1-D
    meshes and 2-axis meshes were exact). Pinning the vector to the batch layout gives the exact result, and it
    is the layout the elementwise modulation needs anyway (each chip holds its own samples' vectors)."""
    return constrain(x, ("batch",) + (None,) * (x.ndim - 1))
