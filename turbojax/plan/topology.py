"""TPU topologies for ahead-of-time compiles from a CPU host: devices, the (data, fsdp, tensor) mesh, chip figures.

`libtpu` beside jax gives compile-only TPU devices for a named topology (`v5e:4x4`, `v5p:4x4x4`, multi-slice with
`num_slices`); nothing runs on them, but XLA:TPU compiles for them and reports real per-device memory and the real
out-of-HBM error (shared docs `scale.md` §1, §3).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
from jax.sharding import AxisType, Mesh

from turbojax.sharding import MESH_AXES

GIB = 1024 ** 3
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v5|v6e):\d+x\d+(x\d+)?$")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures: HBM as the XLA:TPU compiler states it; bf16 peak and HBM bandwidth from the Cloud TPU docs
    (`scale.md` §3)."""
    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bytes_per_s: float


CHIPS = {
    "TPU v5 lite": Chip("v5e", int(15.75 * GIB), 197e12, 819e9),
    "TPU v5": Chip("v5p", int(95.74 * GIB), 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", int(31.25 * GIB), 918e12, 1640e9),
    "TPU v4": Chip("v4", int(31.25 * GIB), 275e12, 1228e9),  # HBM: the 32 GiB part, as the v6e figure [U]
}


class PlanError(ValueError):
    """A bad topology, mesh or flag (one `error:` line)."""


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The compile-only TPU devices of a topology such as "v5e:4x4" (`num_slices` > 1: a multi-slice system)."""
    if not _TOPOLOGY.match(name):
        raise PlanError(f"--topology {name!r}: expected GEN:AxB[xC] with GEN one of v4, v5e, v5p, v6e "
                        "(e.g. v5e:4x4, v5p:4x4x4)")
    if num_slices < 1:
        raise PlanError(f"--num-slices {num_slices}: must be >= 1")
    from jax.experimental import topologies
    kw = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **kw).devices)
    except Exception as e:  # libtpu refuses the shape: its message names the reason
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"--topology {name!r}: {msg}") from None


def parse_mesh(text: str) -> dict[str, int]:
    """`--mesh data=1,fsdp=-1,tensor=1` -> sizes (`turbojax.sharding.parse_mesh_sizes`, errors as PlanError)."""
    from turbojax.sharding import parse_mesh_sizes
    try:
        return parse_mesh_sizes(text)
    except ValueError as e:
        raise PlanError(f"--mesh {e}") from None


def build_mesh(devices: list, sizes: dict[str, int], num_slices: int = 1) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` with Auto axes. With several slices the `data` axis spans them
    (DCN) and must be a multiple of `num_slices`; `fsdp` and `tensor` stay inside a slice (ICI)."""
    from jax.experimental import mesh_utils
    sizes = dict(sizes)
    n = len(devices)
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if -1 in sizes.values():
        if n % known:
            raise PlanError(f"--mesh {sizes}: {n} devices do not divide into it")
        sizes[next(k for k, v in sizes.items() if v == -1)] = n // known
    shape = tuple(sizes[a] for a in MESH_AXES)
    if int(np.prod(shape)) != n:
        raise PlanError(f"--mesh {sizes} needs {int(np.prod(shape))} devices; the topology has {n}")
    try:
        if num_slices > 1:
            if shape[0] % num_slices:
                raise PlanError(f"--mesh data={shape[0]} must be a multiple of --num-slices {num_slices} "
                                "(the data axis spans the slices)")
            ici = (shape[0] // num_slices, shape[1], shape[2])
            arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices,
                                                       allow_split_physical_axes=True)
        else:
            arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (NotImplementedError, ValueError, AssertionError) as e:
        if isinstance(e, PlanError):
            raise
        raise PlanError(f"--mesh {sizes}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def chip_of(devices: list) -> Chip:
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise PlanError(f"--topology: no chip figures for device kind {kind!r}; known: {sorted(CHIPS)}")
    return CHIPS[kind]
