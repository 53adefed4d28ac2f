"""Few-step distillation on one frozen base: pure losses (`losses`), the methods' turns (`dmd2`, `pcm`, `turbopp`,
`arcflow` + `arcflow_heads`), the engine that jits them (`engine`), the networks on the shared base (`nets`),
discriminator heads, rollouts, per-family denoiser adapters, the method builder (`methods`), default config
(`config`), exports, and the 2-D known-answer problem (`toy`). Submodules load on first use."""
from turbojax._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(__name__, __path__)
