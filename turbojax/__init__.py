"""turbojax: few-step distillation of text-to-image diffusion transformers in JAX.

`import turbojax` is cheap (no JAX import); submodules load on first use, so `turbojax.models.from_diffusers(...)`
and `turbojax.pipelines.from_diffusers(...)` work after a plain `import turbojax`.
"""
import importlib
import pkgutil

__version__ = "0.1.0"


def __getattr__(name: str):
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")  # also binds it here: later lookups skip this
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the submodule exists but needs something missing: say what
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")})
