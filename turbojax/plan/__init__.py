"""AOT memory plan: `python -m turbojax.plan --config configs/NAME.py --topology v5e:4x4 ...`.

Builds a distillation config's real full-size networks abstractly (no weights), lowers and compiles every jitted
step of its method for a named TPU topology from this (CPU) host, and reports per step the per-device memory
against the chip's HBM, whether it fits, FLOPs per device corrected for scan, and a roofline step-time estimate.
See `turbojax.plan.measure` for the method and `turbojax.plan.__main__` for the flags; `run(argv)` is the CLI.
"""
from turbojax.plan.cli import run

__all__ = ["run"]
