"""turbojax: few-step distillation of text-to-image diffusion transformers in JAX.

`import turbojax` is cheap (no JAX import); submodules load on first use, so `turbojax.models.from_diffusers(...)`
and `turbojax.pipelines.from_diffusers(...)` work after a plain `import turbojax`.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("checkpoint", "convert", "lora", "models", "nn", "pipelines", "sampling", "schedules", "sharding",
               "testing", "text", "utils")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # also binds it here: later lookups skip this hook
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
