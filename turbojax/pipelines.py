"""Text-to-image pipelines: tokenizer + text encoder -> jitted sampling loop -> VAE decode, for Qwen-Image(-2512)
and Z-Image(-Turbo), equal to diffusers' `QwenImagePipeline` / `ZImagePipeline` given the same inputs.

    pipe = turbojax.pipelines.from_diffusers("Qwen-Image-2512", loras=[("turbo_2step.safetensors", 1.0)],
                                             dtype=jnp.bfloat16)
    images = pipe(["a red fox in snow"], steps=2, guidance=1.0, sigmas=[1.0, 0.75], seed=0)  # uint8 [N, H, W, 3]

    pipe = turbojax.pipelines.from_diffusers("Qwen-Image-2512", arcflow="runs/arcqwen")    # an ArcFlow student
    images = pipe(["a red fox in snow"], seed=0)             # the folder's sigma list (2 NFE), analytic steps
    images = pipe(["a red fox in snow"], steps=4, seed=0)    # its 4-step list (arcflow.json `alt_sigmas`)

Each stage (text encoding, the sampling loop, VAE decode) is a jitted function compiled once per shape; calls with
new prompts of the same batch size and bucketed length reuse the compiled code.

On a mesh (`from_diffusers(..., mesh=turbojax.sharding.make_mesh(...))`) the weights are loaded sharded by their
logical axes, and every stage runs under `jax.set_mesh(mesh)` with the batch (noise, text embeddings, latents)
laid out over data x fsdp when the number of images divides it (else replicated), so the activations'
constraints and the splash attention's `shard_map` see the mesh; the result equals sampling without a mesh.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax import models, sampling, schedules, text

PIPELINES = {"QwenImagePipeline": "qwen_image", "ZImagePipeline": "z_image"}
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
VAE_SCALE = 8


class PipelineError(ValueError):
    pass


def read_model_index(folder: Path) -> tuple[str, dict]:
    """(family, model_index dict) of a diffusers pipeline folder; every component folder must exist."""
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise PipelineError(f"{folder}: no model_index.json (expected a diffusers pipeline folder, e.g. a local "
                            "copy of Qwen-Image or Z-Image-Turbo)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({e})") from None
    cls = index.get("_class_name")
    if cls not in PIPELINES:
        raise PipelineError(f"{path}: pipeline class {cls!r} is not supported; turbojax runs {sorted(PIPELINES)}")
    missing = [c for c in COMPONENTS if not (Path(folder) / c).is_dir()]
    if missing:
        raise PipelineError(f"{folder}: missing pipeline components {missing} (need {list(COMPONENTS)})")
    return PIPELINES[cls], index


@dataclasses.dataclass
class Text2ImagePipeline:
    family: str
    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: schedules.SchedulerConfig
    name: str = ""
    # replaces the Euler loop when set: `schedule(steps, sigmas) -> sigmas` and `denoise(pipe, latents, cond,
    # sigmas, height=, width=) -> latents` (an ArcFlow student: `turbojax.distill.arcflow_heads.PipelineSampler`)
    sampler: Any = None
    mesh: Any = None  # a jax.sharding.Mesh: the stages run on it (module docstring)

    def _on_mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _place_batch(self, tree):
        """Batch-leading arrays over data x fsdp when the batch divides them, else replicated (no mesh: as is).
        A list (Z-Image's per-prompt caption arrays, `[L_i, D]` each) has no batch axis: replicated."""
        if self.mesh is None:
            return tree
        per_sample = isinstance(tree, list)
        from jax.sharding import NamedSharding, PartitionSpec

        from turbojax.sharding import batch_sharding
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]

        def put(x):
            if x is None:
                return None
            x = jnp.asarray(x)
            ok = not per_sample and x.ndim >= 1 and x.shape[0] % shards == 0
            return jax.device_put(x, batch_sharding(self.mesh) if ok else NamedSharding(self.mesh, PartitionSpec()))
        return jax.tree.map(put, tree, is_leaf=lambda x: x is None)

    # ---- stages ----
    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int = 512):
        if self.family == "qwen_image":
            return text.encode_qwen_image_prompts(self.tokenizer, self.text_encoder, list(prompts),
                                                  max_sequence_length)
        return text.encode_z_image_prompts(self.tokenizer, self.text_encoder, list(prompts), max_sequence_length)

    def noise(self, seed: int, batch: int, height: int, width: int):
        """Initial latents in the diffusers pipeline's own layout (pass the same array to it as `latents=`)."""
        key = jax.random.key(seed)
        if self.family == "qwen_image":
            return sampling.qwen_image_noise(key, batch, height, width, self.vae.config.z_dim)
        return sampling.z_image_noise(key, batch, height, width, self.vae.config.latent_channels)

    def sigmas(self, steps: int, height: int, width: int, sigmas=None, scheduler: str | None = None):
        cfg = schedules.PRESETS[scheduler] if scheduler else self.scheduler
        if scheduler and scheduler not in schedules.PRESETS:
            raise PipelineError(f"unknown scheduler preset {scheduler!r}; known: {sorted(schedules.PRESETS)}")
        if sigmas:
            return schedules.explicit_sigmas(sigmas)
        return schedules.pipeline_sigmas(cfg, steps, self.family, height=height, width=width)

    def denoise(self, latents, cond, neg, sigmas, *, height, width, guidance, cfg_normalization=0.0,
                cfg_truncation=1.0):
        if self.sampler is not None:
            return self.sampler.denoise(self, latents, cond, sigmas, height=height, width=width)
        if self.family == "qwen_image":
            (embeds, mask), (nembeds, nmask) = cond, (neg or (None, None))
            return sampling.sample_qwen_image(self.transformer, latents, embeds, sigmas, height=height, width=width,
                                              prompt_embeds_mask=mask, negative_prompt_embeds=nembeds,
                                              negative_prompt_embeds_mask=nmask, true_cfg_scale=guidance)
        return sampling.sample_z_image(self.transformer, latents, cond, sigmas, negative_prompt_embeds=neg,
                                       guidance_scale=guidance, cfg_normalization=cfg_normalization,
                                       cfg_truncation=cfg_truncation)

    def decode(self, latents, *, height: int, width: int, tiled: bool | None = None) -> np.ndarray:
        """Diffusion-space latents -> uint8 images `[B, H, W, 3]` (diffusers' postprocess: (x/2+0.5), round).

        Untiled, the whole stage (unpacking, latent de-normalisation, VAE decode, clamp, quantisation) is one jitted
        function; tiled, each tile is (see the VAEs' `decode_nhwc`) and the blending runs on the host."""
        graphdef, state = nnx.split(self.vae)
        r = VAE_SCALE
        if tiled is None:
            tiled = self.vae.wants_tiling(height // r, width // r)
        if not tiled:
            return np.asarray(_decode_stage(graphdef, state, latents, self.family, height, width))
        z = _vae_latents(graphdef, state, latents, self.family, height, width)
        return np.asarray(_to_uint8(self.vae.decode_nhwc(z, tiled=True)))

    # ---- all together ----
    def __call__(self, prompts: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 steps: int | None = None, guidance: float | None = None, width: int = 1024, height: int = 1024,
                 seed: int = 0,
                 noise=None, sigmas=None, scheduler: str | None = None, max_sequence_length: int = 512,
                 cfg_normalization: float = 0.0, cfg_truncation: float = 1.0, tiled_decode: bool | None = None,
                 timings: dict | None = None) -> np.ndarray:
        """uint8 images `[N, H, W, 3]` for `prompts` (one image each). `guidance` (default 1) is the Qwen
        `true_cfg_scale` (CFG when > 1 and a negative prompt is given) or the Z-Image `guidance_scale` (CFG when > 0);
        `steps` defaults to 8.

        With a `sampler` (an ArcFlow folder) the sigmas are the folder's list of `steps` steps (default: the one it
        was trained for) unless `sigmas` are given, `scheduler` is not used, and there is no CFG: `guidance`
        must be left unset or off (<= 1 for Qwen-Image, 0 for Z-Image)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise PipelineError("no prompts given")
        if self.sampler is not None:
            if guidance is not None and (guidance > 1.0 if self.family == "qwen_image" else guidance > 0.0):
                raise PipelineError(f"guidance {guidance}: an ArcFlow student samples without CFG (it learnt the "
                                    "teacher's guided velocity); leave guidance unset")
            guidance = 1.0 if self.family == "qwen_image" else 0.0
        else:
            steps = 8 if steps is None else steps
            guidance = 1.0 if guidance is None else guidance
        if width % 16 or height % 16 or width <= 0 or height <= 0:
            raise PipelineError(f"width and height must be positive multiples of 16, got {width}x{height}")
        with self._on_mesh():
            return self._generate(prompts, negative_prompt, steps, guidance, width, height, seed, noise, sigmas,
                                  scheduler, max_sequence_length, cfg_normalization, cfg_truncation, tiled_decode,
                                  timings)

    def _generate(self, prompts, negative_prompt, steps, guidance, width, height, seed, noise, sigmas, scheduler,
                  max_sequence_length, cfg_normalization, cfg_truncation, tiled_decode, timings):
        times = timings if timings is not None else {}
        t0 = time.perf_counter()
        cond = self._place_batch(self.encode_prompts(prompts, max_sequence_length))
        use_cfg = guidance > 1.0 if self.family == "qwen_image" else guidance > 0.0
        neg = None
        if use_cfg and (negative_prompt is not None or self.family == "z_image"):
            negs = negative_prompt if negative_prompt is not None else ""
            negs = [negs] * len(prompts) if isinstance(negs, str) else list(negs)
            if len(negs) != len(prompts):
                raise PipelineError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
            neg = self._place_batch(self.encode_prompts(negs, max_sequence_length))
        jax.block_until_ready(cond)
        t1 = time.perf_counter()
        latents = self.noise(seed, len(prompts), height, width) if noise is None else jnp.asarray(noise, jnp.float32)
        expected = self.noise_shape(len(prompts), height, width)
        if tuple(latents.shape) != expected:
            raise PipelineError(f"noise has shape {tuple(latents.shape)}, expected {expected} for "
                                f"{len(prompts)} images of {width}x{height}")
        latents = self._place_batch(latents)
        if self.sampler is not None:
            try:
                s = self.sampler.schedule(steps, sigmas)
            except ValueError as e:
                raise PipelineError(str(e)) from None
        else:
            s = self.sigmas(steps, height, width, sigmas, scheduler)
        out = self.denoise(latents, cond, neg, s, height=height, width=width, guidance=guidance,
                           cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation)
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        images = self.decode(out, height=height, width=width, tiled=tiled_decode)
        t3 = time.perf_counter()
        times.update(text_encode=t1 - t0, transformer=t2 - t1, vae_decode=t3 - t2, steps=len(s) - 1)
        return images

    def noise_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        if self.family == "qwen_image":
            return (batch, (height // 16) * (width // 16), self.transformer.config.in_channels)
        return (batch, self.vae.config.latent_channels, height // VAE_SCALE, width // VAE_SCALE)


def from_diffusers(folder, *, loras=(), dtype=jnp.float32, text_dtype=None, vae_dtype=jnp.float32,
                   scan_layers: bool = True, attention_impl: str = "auto", mesh=None,
                   progress: bool = True, arcflow=None) -> Text2ImagePipeline:
    """Load a local diffusers pipeline folder (or one exported by `python -m turbojax.convert to-jax`).

    `loras`: `[(file, scale), ...]` merged into the transformer; a LoRA made for another model family fails with
    an error naming the file and its first unknown module.
    `arcflow`: an ArcFlow student folder (`lora.safetensors`, `heads.safetensors`, `arcflow.json`; README) for this
    family: the pipeline then samples with its policy, analytically integrated over the folder's sigma list, and
    its `transformer` is the student's trunk (base + `loras` + the folder's LoRA and final AdaLN). A folder made for
    another family or latent size raises `ArcFlowFormatError` naming the file.
    """
    folder = Path(folder)
    family, _ = read_model_index(folder)
    transformer = models.from_diffusers(folder / "transformer", dtype=dtype, scan_layers=scan_layers,
                                        attention_impl=attention_impl, mesh=mesh, progress=progress)
    if transformer.family != family:
        raise PipelineError(f"{folder}/transformer holds a {transformer.family} model, expected {family}")
    transformer = _with_loras(transformer, loras, family)
    sampler = None
    if arcflow is not None:
        from turbojax.distill import arcflow_heads
        student = arcflow_heads.load_student(arcflow, transformer)
        sampler = arcflow_heads.PipelineSampler(student, arcflow)
        transformer = student.model()  # shares the student's arrays: the base is not kept twice
    text_encoder = models.from_diffusers(folder / "text_encoder", dtype=text_dtype or dtype,
                                         scan_layers=scan_layers, attention_impl=attention_impl, mesh=mesh,
                                         progress=progress)
    vae = models.from_diffusers(folder / "vae", dtype=vae_dtype, mesh=mesh, progress=progress)
    expected_vae = "qwen_image_vae" if family == "qwen_image" else "autoencoder_kl"
    if vae.family != expected_vae:
        raise PipelineError(f"{folder}/vae holds a {vae.family} model; {family} pipelines use {expected_vae}")
    return Text2ImagePipeline(family, transformer, vae, text_encoder, text.load_tokenizer(folder / "tokenizer"),
                              schedules.SchedulerConfig.from_pretrained(folder), name=folder.name, sampler=sampler,
                              mesh=mesh)


def _with_loras(transformer, loras, family):
    """Merge all LoRAs at once (one rounding to the weight dtype); name the file that does not fit."""
    from turbojax import lora
    adapters = []
    for spec in loras:
        file, scale = (spec, 1.0) if isinstance(spec, (str, Path)) else spec
        try:
            adapters.append((lora.load(file, transformer), float(scale)))
        except lora.LoraFormatError as e:
            raise PipelineError(f"LoRA {file} does not fit this {family} transformer: {e}") from None
    return lora.apply(transformer, adapters) if adapters else transformer


# ---- jitted decode stage (module level so that compiled functions are shared by pipelines and calls) ----

def _latents_nhwc(vae, latents, family: str, height: int, width: int):
    """Sampler output -> de-normalised NHWC latents in the VAE's dtype."""
    if family == "qwen_image":
        z = sampling.unpack_latents(latents, height, width)[:, :, 0]  # [B, C, h, w]
    else:
        z = jnp.asarray(latents)
    z = vae.denormalize_latents(z.astype(jnp.float32), axis=1).astype(vae.dtype)
    return jnp.transpose(z, (0, 2, 3, 1))


def _quantise(img):
    return jnp.round(jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _decode_stage(graphdef, state, latents, family: str, height: int, width: int):
    vae = nnx.merge(graphdef, state)
    images = _quantise(vae.decode_nhwc(_latents_nhwc(vae, latents, family, height, width), tiled=False))
    return sampling.batch_layout(images)  # on a mesh: each device decodes and keeps its own samples


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _vae_latents(graphdef, state, latents, family: str, height: int, width: int):
    return _latents_nhwc(nnx.merge(graphdef, state), latents, family, height, width)


_to_uint8 = jax.jit(_quantise)
