"""Packages whose submodules load on first attribute access (`turbojax.distill.dmd2`, `turbojax.cache.loader`), so
that importing the package costs nothing and the README's dotted paths resolve."""
import importlib
import pkgutil


def lazy_submodules(package: str, path):
    """`(__getattr__, __dir__)` for the package `package` whose `__path__` is `path`."""
    def __getattr__(name: str):
        if not name.startswith("_"):
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted({m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_")})
    return __getattr__, __dir__
