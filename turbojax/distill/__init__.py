"""Few-step distillation on one frozen base: pure losses (`losses`), the methods' turns (`dmd2`, `pcm`, `turbopp`,
`arcflow` + `arcflow_heads`), the engine that jits them (`engine`), the networks on the shared base (`nets`),
discriminator heads, rollouts, per-family denoiser adapters, the method builder (`methods`), default config
(`config`), exports, and the 2-D known-answer problem (`toy`). Submodules load on first use."""
import importlib
import pkgutil


def __getattr__(name: str):
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")})
