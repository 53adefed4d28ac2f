"""turbojax: few-step distillation of text-to-image diffusion transformers in JAX."""
__version__ = "0.1.0"
