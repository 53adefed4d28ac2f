"""Checkpoint conversion: `python -m turbojax.convert to-jax|to-torch SRC DST`, or from Python
`turbojax.convert.to_jax(src, dst)` / `to_torch(src, dst)` / `convert_pipeline(src, dst, "to-jax")`.

Submodules and those functions load on first use (importing the package stays cheap)."""
import importlib

_SUBMODULES = ("atomic", "folders", "keytable", "params", "safetensors_io")
_FUNCTIONS = {"to_jax": "folders", "to_torch": "folders", "convert_pipeline": "folders"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f"{__name__}.{_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_FUNCTIONS))
