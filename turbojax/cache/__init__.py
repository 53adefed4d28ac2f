"""On-disk data caches for distillation: prompt embeddings, real-image latents and teacher samples, read with grain.

    python -m turbojax.cache text    --config configs/qwen_image_dmd2_gan.py --config.init_from Qwen-Image-2512 \\
        --config.data.prompts prompts.jsonl --config.data.cache_dir caches
    python -m turbojax.cache latents --config ... --config.data.images photos/    # real images -> VAE latents
    python -m turbojax.cache teacher --config ...                                # teacher samples (GAN reals)
    python train.py --config ... --config.data.kind cache --config.data.cache_dir caches   # builds what is missing

    store     keyed folders of safetensors shards, committed one by one, resumable after a kill
    build     the text / latents / teacher builders (the pipeline's own encoder, VAE and sampler) and `ensure`
    records   memory-mapped random access to a complete cache
    loader    CacheBatches: grain-sampled batches in the engine's format, deterministic from (seed, stream, step)

`training_data(cfg, workdir)` is what train.py calls for `data.kind = "cache"`.
"""
from __future__ import annotations

from pathlib import Path

from turbojax._lazy import lazy_submodules

__getattr__, _submodules = lazy_submodules(__name__, __path__)  # store, build, records, loader load on first use


def __dir__():
    return sorted(set(globals()) | set(_submodules()))


def training_data(cfg, workdir, *, progress=print, mesh=None):
    """(batches, frozen transformer, latent shape of one sample, caption length) for a distillation run (with
    aspect-ratio buckets `batches.latent_shapes` maps each bucket to its latent shape): the caches
    the config needs are built first when missing (the pipeline is then loaded once and its text encoder and VAE
    dropped); otherwise only the transformer is loaded. With `mesh`, the weights are read shard by shard onto it
    (no host holds the whole model)."""
    import jax
    import jax.numpy as jnp

    from turbojax import models
    from turbojax.cache import build, loader, store
    from turbojax.data.prompts import PromptFileError
    from turbojax.training import UserError

    if not cfg.init_from:
        raise UserError("--config.init_from: give the teacher's diffusers pipeline folder (Qwen-Image(-2512), "
                        "Z-Image(-Turbo))")
    if not cfg.data.prompts:
        raise UserError("--config.data.prompts: give a prompt file (.txt, one per line, or .jsonl)")
    loaded = {}

    def load_pipe(c):
        loaded["pipe"] = build._load_pipe(c, mesh=mesh)
        return loaded["pipe"]

    try:
        root = build.cache_root(cfg, workdir)
        # one builder: on a multi-host run the other processes wait for process 0's caches (shared storage)
        folders = build.ensure(cfg, root, build.needed(cfg), progress=progress, load_pipe=load_pipe,
                               build_missing=jax.process_index() == 0)
        batches = loader.from_config(cfg, folders)
    except PromptFileError as e:
        raise UserError(f"--config.data.prompts {e}") from None
    except (store.CacheError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    except ValueError as e:  # a pipeline folder that does not load, a bad batch size for the hosts
        raise UserError(f"--config.init_from {cfg.init_from}: {e}") from None
    if "pipe" in loaded:
        base = loaded.pop("pipe").transformer  # the text encoder and the VAE leave memory with the pipeline
    else:
        try:
            base = models.from_diffusers(Path(cfg.init_from) / "transformer", dtype=jnp.dtype(cfg.dtype),
                                         scan_layers=cfg.scan_layers, attention_impl=cfg.attention_impl,
                                         mesh=mesh)
        except (ValueError, OSError) as e:
            raise UserError(f"--config.init_from {cfg.init_from}: {e}") from None
    from turbojax.data import buckets
    from turbojax.distill.denoiser import latent_shape_for
    channels = base.config.in_channels
    sizes = buckets.from_config(cfg.data)
    # with aspect-ratio buckets: one latent shape per bucket (train.py builds each bucket's steps); the first
    # bucket's is the run's default shape
    batches.latent_shapes = {buckets.name(s): latent_shape_for(batches.family, channels, s[1], s[0]) for s in sizes}
    h, w = (sizes[0][1], sizes[0][0]) if sizes else (int(cfg.data.height), int(cfg.data.width))
    latent_shape = latent_shape_for(batches.family, channels, h, w)
    progress(f"{batches.num_prompts} prompts from the text cache {folders['text']}"
             + "".join(f", {k} cache {v}" for k, v in folders.items() if k != "text"))
    return batches, base, latent_shape, batches.cap_len
