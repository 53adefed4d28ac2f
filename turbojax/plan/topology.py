"""TPU topologies for ahead-of-time compiles from a CPU host: devices, the (data, fsdp, tensor) mesh, chip figures.

`libtpu` beside jax gives compile-only TPU devices for a named topology (`v5e:4x4`, `v5p:4x4x4`, multi-slice with
`num_slices`); nothing runs on them, but XLA:TPU compiles for them and reports real per-device memory and the real
out-of-HBM error (shared docs `scale.md` §1, §3).
"""
from __future__ import annotations

import dataclasses
import re

from jax.sharding import Mesh

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
    """The (data, fsdp, tensor) mesh over `devices`, laid out as a real run lays it out (`turbojax.sharding.make_mesh`:
    Auto axes; with several slices the `data` axis spans them over DCN); its errors as PlanError."""
    from turbojax.sharding import make_mesh
    try:
        return make_mesh(*(sizes[a] for a in MESH_AXES), devices=devices, num_slices=num_slices)
    except ValueError as e:
        raise PlanError(f"--mesh {sizes}: {e}") from None


def chip_of(devices: list) -> Chip:
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise PlanError(f"--topology: no chip figures for device kind {kind!r}; known: {sorted(CHIPS)}")
    return CHIPS[kind]
