"""turbojax training entry point (big_vision style: one narrative script, policy in the config).

    python train.py                                   # the embedded demo: DMD2 + GAN on the digits teacher
    python train.py --config configs/qwen_image_dmd2_gan.py --config.init_from Qwen-Image-2512 ...
    python train.py --config configs/qwen_image_lora.py [--config.total_steps 100 ...] [--workdir DIR]

Two stories share the set-up and the guards: `distill` (a config with `method`: DMD2 + GAN on the engine of
`turbojax.distill`, the frozen base serving as teacher, student and fake score) and the LoRA flow-matching
fine-tune of a frozen Qwen-Image transformer (`configs/qwen_image_lora.py`). Only the trainables (LoRA `a`/`b`,
discriminator heads, their optimizer states and EMA) are differentiated and checkpointed; LoRA scales and the frozen
base stay fixed. Training resumes from the
latest checkpoint in the workdir. The reusable machinery lives in `turbojax.training` (config checks, checkpoints,
NaN/Inf and SIGTERM guards, metrics log); this file only tells the story.

Multi-host (`--config.distributed.*`, `turbojax.distributed`): every process runs this script with the same config
(and its own `process_id`, or `distributed.auto` on Cloud TPU / SLURM); the mesh spans all hosts' devices, each host
reads only its rows of every global batch, Orbax checkpoints are saved and restored by all processes together, and
process 0 alone prints, logs, draws sample grids and writes the exports.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from turbojax.training import UserError, run_cli
from turbojax.training import config as config_lib

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "digits_dmd2_gan.py"  # the embedded demo: DMD2 + GAN on the digits teacher
DISTILL_METHODS = ("dmd2", "pcm", "turbopp", "arcflow")


class _NoLog:
    """The metrics log of processes other than 0 (only process 0 writes files)."""

    def write(self, step, metrics) -> str:
        return ""


def _say(*args, **kwargs):
    """print on process 0 only (after jax.distributed is joined; one process: always)."""
    from turbojax import distributed
    if distributed.is_primary():
        print(*args, **kwargs)


def _any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (a SIGTERM seen by one host stops all at the same step;
    a collective, so every process calls it every step)."""
    import jax
    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def config_mesh(cfg):
    """The config's (data, fsdp, tensor) mesh, checked against the batch size; one error line for either."""
    from turbojax.sharding import make_mesh
    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as e:
        raise UserError(f"--config.mesh: {e}") from None
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % n_batch_shards:
        raise UserError(f"--config.batch_size {cfg.batch_size} must be a multiple of the {n_batch_shards} "
                        f"data-parallel devices (mesh data x fsdp)")
    return mesh

def main(argv: list[str]) -> int:
    # Every command-line mistake is reported here, before JAX is imported or any folder is created.
    cfg, flag_values = config_lib.parse_args(argv, default_config=DEFAULT_CONFIG, flags={"workdir": None},
                                             search_dirs=[HERE])
    config_lib.validate(cfg)
    workdir = config_lib.check_workdir(flag_values["workdir"] or cfg.workdir,
                                       "--workdir" if flag_values["workdir"] else "--config.workdir")
    # Multi-host: join the other processes before any JAX computation (a no-op for one process)
    from turbojax import distributed
    distributed.initialize(distributed.settings(cfg.get("distributed")), where="--config.distributed")
    from turbojax.utils import release_host_memory_early
    release_host_memory_early()  # the base loads tensor by tensor: keep the host peak near model/N + one part
    if cfg.get("method") in DISTILL_METHODS:
        return distill(cfg, workdir)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from absl import logging as absl_logging
    from flax import nnx

    from turbojax import distributed, lora, models
    from turbojax.nn import attention
    from turbojax.sharding import batch_sharding, param_shardings
    from turbojax.training.checkpoints import Checkpoints
    from turbojax.training.guards import MetricsBuffer, StopSignal
    from turbojax.training.metrics_log import MetricsLog
    from turbojax.utils import progress_bar

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    jax.config.update("jax_compilation_cache_dir", str(HERE / ".jax_cache"))

    # ---------------------------------------------------------------------------------------------------------
    # Mesh and frozen base model, sharded at birth
    # ---------------------------------------------------------------------------------------------------------
    mesh = config_mesh(cfg)
    if cfg.attention_impl not in attention.IMPLEMENTATIONS:  # otherwise only seen when the step is traced
        raise UserError(f"--config.attention_impl must be one of {', '.join(attention.IMPLEMENTATIONS)}; "
                        f"got {cfg.attention_impl!r}")
    param_dtype, dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    model_kw = dict(param_dtype=param_dtype, dtype=dtype, scan_layers=cfg.scan_layers, remat=cfg.remat,
                    attention_impl=cfg.attention_impl)
    try:
        if cfg.init_from:
            base = models.from_diffusers(cfg.init_from, mesh=mesh, **model_kw)
        else:
            abstract = nnx.eval_shape(lambda: models.create(cfg.model, seed=cfg.seed, **model_kw))
            shardings = param_shardings(abstract, mesh)
            out_shardings = nnx.from_flat_state([(p, shardings[tuple(str(x) for x in p)])
                                                 for p, _ in nnx.to_flat_state(nnx.state(abstract))])
            state = jax.jit(lambda: nnx.state(models.create(cfg.model, seed=cfg.seed, **model_kw)),
                            out_shardings=out_shardings)()
            base = nnx.merge(nnx.graphdef(abstract), state)
    except (ValueError, OSError) as e:  # unknown preset / remat / attention name, missing or bad weights folder
        source = f"--config.init_from {cfg.init_from}" if cfg.init_from else f"model {cfg.model}"
        raise UserError(f"cannot build the {source}: {e}") from None
    graphdef, frozen = nnx.split(base)
    mcfg = base.config
    primary = distributed.is_primary()
    _say("base model %s: %.2fM params" % (cfg.model,
                sum(int(np.prod(v.shape)) for v in jax.tree.leaves(frozen)) / 1e6), flush=True)

    # ---------------------------------------------------------------------------------------------------------
    # Trainables: LoRA a/b (fp32 masters) + optimizer; the scale alpha/r is fixed, outside the gradient
    # ---------------------------------------------------------------------------------------------------------
    try:
        adapter = lora.init_adapter(base, list(cfg.lora.targets), cfg.lora.rank, cfg.lora.alpha,
                                    rng=jax.random.key(cfg.seed + 1))
    except ValueError as e:
        raise UserError(f"--config.lora.targets: {e}") from None
    trainable, fixed = lora.split_trainable(adapter)
    # optax's warm-up with 0 steps stays at lr 0 forever, so no warm-up is a constant schedule
    schedule = (optax.warmup_constant_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps
                else optax.constant_schedule(cfg.lr))
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay))
    train_state = {"trainable": trainable, "opt": tx.init(trainable), "step": jnp.zeros((), jnp.int32)}

    # ---------------------------------------------------------------------------------------------------------
    # Data: a fixed synthetic set of (latent, text feature) pairs until the data pipeline lands
    # ---------------------------------------------------------------------------------------------------------
    h, w = cfg.latent_hw
    data_rng = np.random.default_rng(cfg.seed)
    n_tok = h * w
    proto = data_rng.standard_normal((4, n_tok, mcfg.in_channels)).astype(np.float32)
    labels = data_rng.integers(0, 4, cfg.num_examples)
    latents = proto[labels] + 0.1 * data_rng.standard_normal((cfg.num_examples, n_tok, mcfg.in_channels))
    text_proto = data_rng.standard_normal((4, cfg.text_len, mcfg.joint_attention_dim)).astype(np.float32)
    texts = text_proto[labels]
    img_shapes = ((1, h, w),)

    def loss_fn(trainable, fixed, frozen, x0, ctx, rng):
        model = nnx.merge(graphdef, lora.merge_params(frozen, lora.join_trainable(trainable, fixed)))
        k1, k2 = jax.random.split(rng)
        noise = jax.random.normal(k1, x0.shape, jnp.float32)
        sigma = jax.nn.sigmoid(jax.random.normal(k2, (x0.shape[0],)))  # logit-normal time
        x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        v = model.forward(x_t, ctx, None, sigma, img_shapes).astype(jnp.float32)
        return jnp.mean(jnp.square(v - (noise - x0)))

    @jax.jit
    def train_step(train_state, fixed, frozen, x0, ctx, rng):
        loss, grads = jax.value_and_grad(loss_fn)(train_state["trainable"], fixed, frozen, x0, ctx, rng)
        updates, opt = tx.update(grads, train_state["opt"], train_state["trainable"])
        new = {"trainable": optax.apply_updates(train_state["trainable"], updates), "opt": opt,
               "step": train_state["step"] + 1}
        # grad_norm catches NaN/Inf gradients behind a finite loss; param_norm catches an update that overflowed
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads),
                     "param_norm": optax.global_norm(new["trainable"])}

    # ---------------------------------------------------------------------------------------------------------
    # Checkpoints (trainables only), resume, metrics log
    # ---------------------------------------------------------------------------------------------------------
    ckpt = Checkpoints(workdir / "checkpoints", every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
                       hint="resume with the config it was trained with (e.g. the old --config.lora.rank / "
                            "targets) or start a new --workdir")
    try:
        train_state, start = ckpt.restore_latest(train_state)
        if start:
            _say(f"resumed from step {start}", flush=True)

        # -----------------------------------------------------------------------------------------------------
        # Loop: the host syncs only to log or to save, and a state is saved only after its metrics (and those
        # of every step before it) were found finite. SIGTERM saves the current step and exits 0.
        # -----------------------------------------------------------------------------------------------------
        if start >= cfg.total_steps:
            _say(f"nothing to train: the checkpoint is at step {start}, total_steps is {cfg.total_steps}",
                 flush=True)
        bsh = batch_sharding(mesh)
        try:  # this host's rows of every global batch (all rows on one host)
            host, hosts = distributed.host_rows(bsh, cfg.batch_size)
        except ValueError as e:
            raise UserError(f"--config.mesh: {e}") from None
        rows = slice(host * cfg.batch_size // hosts, (host + 1) * cfg.batch_size // hosts)
        buffer = MetricsBuffer()
        log_cm = (MetricsLog(workdir / "metrics.jsonl", resume_step=start) if primary
                  else contextlib.nullcontext(_NoLog()))
        with log_cm as metrics_log, StopSignal() as stop:
            for step in progress_bar(range(start + 1, cfg.total_steps + 1), desc="train", enabled=primary,
                                     total=max(cfg.total_steps - start, 0), unit="step"):
                idx = np.random.default_rng(cfg.seed * 100003 + step - 1).choice(cfg.num_examples, cfg.batch_size)
                x0, ctx = (jax.make_array_from_process_local_data(bsh, a[idx[rows]].astype(np.float32),
                                                                  (cfg.batch_size,) + a.shape[1:])
                           for a in (latents, texts))
                train_state, metrics = train_step(train_state, fixed, frozen, x0, ctx,
                                                  jax.random.key(cfg.seed * 7919 + step - 1))
                buffer.push(step, metrics)
                # read once (a signal arriving later in this step is seen next step), and agreed by all hosts
                stopping = _any_process(stop.requested)
                log_now = step % cfg.log_every == 0 or step == cfg.total_steps
                final = step == cfg.total_steps or stopping
                if log_now or final or ckpt.should_save(step):
                    records = buffer.flush()  # NonFiniteError here: nothing of this state is saved
                    if log_now:
                        _say(metrics_log.write(step, records[-1][1]), end="", flush=True)
                    ckpt.save(step, train_state, force=final)
                if stopping:
                    ckpt.wait()
                    _say(f"{stop.signame or 'SIGTERM on another host'}: saved the checkpoint of step {step} to "
                         f"{ckpt.path(step)}; rerun the same command to resume", flush=True)
                    return 0
    finally:
        ckpt.close()  # lets an async save of an earlier (good) state finish, also on errors

    out = workdir / "lora.safetensors"
    if start >= cfg.total_steps and out.is_file():
        _say(f"{out} is already there")  # a finished run rerun changes nothing
        return 0
    trained = distributed.host_copy(train_state["trainable"])  # every process: factors may span hosts
    if not primary:
        return 0
    try:
        lora.save(out, lora.join_trainable(trained, fixed), base, layout="diffusers")
    except lora.LoraFormatError as e:  # all-zero `b` after training (lr 0): nothing to write
        raise UserError(f"{e} (the trained LoRA is still zero; is --config.lr 0?)") from None
    print(f"saved LoRA (diffusers layout) to {out}")
    return 0


# =============================================================================================================
# Distillation
# =============================================================================================================
def distill(cfg, workdir: Path) -> int:
    """Few-step distillation (DMD2 + GAN today): one frozen base serves as teacher, student and fake score."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from absl import logging as absl_logging
    from flax import nnx

    from turbojax import distributed
    from turbojax.distill import export as export_lib
    from turbojax.distill import methods, sharded
    from turbojax.distill.engine import Engine
    from turbojax.training.checkpoints import Checkpoints
    from turbojax.training.guards import MetricsBuffer, StopSignal
    from turbojax.training.metrics_log import MetricsLog
    from turbojax.utils import progress_bar

    absl_logging.set_verbosity(absl_logging.WARNING)
    jax.config.update("jax_compilation_cache_dir", str(HERE / ".jax_cache"))
    dtype = jnp.dtype(cfg.dtype)
    primary, multi = distributed.is_primary(), jax.process_count() > 1
    say = lambda m: _say(m, flush=True)  # noqa: E731  (progress of the data set-up, process 0 only)
    # The mesh first: a bad mesh or a batch it cannot split is reported before any data or model work
    mesh = config_mesh(cfg)
    gan_cfg = cfg.get("gan") or {}
    dino_gan = gan_cfg.get("features") == "dino" and float(gan_cfg.get("weight", 0.0)) > 0
    if dino_gan:  # the DINOv2 discriminator's cheap checks, before any data work (it is loaded below)
        from turbojax.distill import dino_disc
        try:
            dino_disc.check_config(cfg)
        except ValueError as e:
            raise UserError(f"--config.{e}") from None

    # ---------------------------------------------------------------------------------------------------------
    # The frozen base (teacher) and the data the turns read
    # ---------------------------------------------------------------------------------------------------------
    from turbojax.data import buckets as buckets_lib
    try:
        if buckets_lib.from_config(cfg.data) and cfg.data.kind != "cache":
            raise UserError(f"--config.data.buckets: aspect-ratio buckets need --config.data.kind cache (the "
                            f"per-bucket real-image and teacher caches), not {cfg.data.kind!r}")
    except buckets_lib.BucketError as e:
        raise UserError(f"--config.{e}") from None
    if cfg.data.kind == "digits":
        from turbojax.digits import model as digits_model
        from turbojax.digits import training as digits_training
        try:
            base = digits_model.load_teacher(cfg.init_from or None, dtype=dtype, scan_layers=cfg.scan_layers)
        except (ValueError, OSError) as e:
            raise UserError(f"--config.init_from {cfg.init_from or '(the shipped digits teacher)'}: {e}") from None
        batches = digits_training.batches(cfg, base, progress=say)
        from turbojax.digits import data as digits_data
        latent_shape, cap_len = (digits_data.NUM_TOKENS, digits_data.TOKEN_DIM), None
    elif cfg.data.kind == "prompts":  # a diffusers pipeline folder + a prompt file encoded at start-up
        from turbojax import pipelines
        from turbojax.data import encoded
        from turbojax.data.prompts import PromptFileError
        if not cfg.init_from:
            raise UserError("--config.init_from: give the teacher's diffusers pipeline folder (Qwen-Image(-2512), "
                            "Z-Image(-Turbo)) or its turbojax export")
        if not cfg.data.prompts:
            raise UserError("--config.data.prompts: give a prompt file (.txt, one per line, or .jsonl)")
        try:
            pipe = pipelines.from_diffusers(cfg.init_from, dtype=dtype, scan_layers=cfg.scan_layers,
                                            attention_impl=cfg.attention_impl, mesh=mesh)  # sharded at birth
        except (ValueError, OSError) as e:
            raise UserError(f"--config.init_from {cfg.init_from}: {e}") from None
        try:
            batches, latent_shape, cap_len = encoded.prompt_batches(cfg, pipe,
                                                                    progress=say)
        except PromptFileError as e:
            raise UserError(f"--config.data.prompts {e}") from None
        base = pipe.transformer
        del pipe  # the text encoder and the VAE leave memory: training holds the transformer only
    elif cfg.data.kind == "cache":  # the same inputs from on-disk caches (turbojax.cache), built first if missing
        from turbojax.cache import training_data
        batches, base, latent_shape, cap_len = training_data(cfg, workdir, progress=say, mesh=mesh)
    else:
        raise UserError(f"--config.data.kind must be 'digits', 'prompts' or 'cache', got {cfg.data.kind!r}")
    # Multi-host: this host reads only its rows of every global batch (those its devices hold on the mesh)
    try:
        host, hosts = distributed.host_rows(sharded.batch_shardings(
            {"x": jax.ShapeDtypeStruct((int(cfg.batch_size),), jnp.float32)}, mesh)["x"], int(cfg.batch_size))
    except ValueError as e:
        raise UserError(f"--config.mesh: {e}") from None
    if hasattr(batches, "set_host"):
        batches.set_host(host, hosts)
    elif (getattr(batches, "host", 0), getattr(batches, "hosts", 1)) != (host, hosts):
        raise UserError(f"--config.mesh: this host's devices hold batch rows block {host} of {hosts}, but the data "
                        f"reader reads block {getattr(batches, 'host', 0)} of {getattr(batches, 'hosts', 1)}; lay "
                        "the batch (data x fsdp) over the hosts or use data.kind prompts")
    graphdef, frozen = nnx.split(base)
    # Multi-host digits demo: keep this host's copy of the tiny teacher for the sample grids (process 0 draws them
    # alone, so they cannot run on arrays spread over the hosts)
    grid_base = base if multi and cfg.data.kind == "digits" else None
    # The frozen base on the mesh by its logical axes (a no-op for a base loaded onto it); `base` is rebuilt on the
    # placed arrays so one copy exists
    frozen = distributed.put(frozen, sharded.frozen_shardings(frozen, mesh))
    base = nnx.merge(graphdef, frozen)
    say("teacher: %.2fM frozen params; %d prompts" % (
        sum(int(np.prod(v.shape)) for v in jax.tree.leaves(frozen)) / 1e6, batches.num_prompts))

    # ---------------------------------------------------------------------------------------------------------
    # Method: LoRA roles on the shared base, discriminator heads, turns and optimisers; with gan.features "dino"
    # the frozen DINOv2 and the VAE decoder (reloaded from init_from) join the frozen arguments
    # ---------------------------------------------------------------------------------------------------------
    dino = None
    if dino_gan:
        try:
            dino = dino_disc.load(cfg, base, latent_shape)
        except ValueError as e:
            raise UserError(f"--config.{e}") from None
    try:
        method = methods.build(cfg, base, latent_shape, jax.random.key(cfg.seed + 1), cap_len=cap_len, dino=dino)
    except (ValueError, KeyError) as e:
        raise UserError(f"--config: {e}") from None
    except OSError as e:  # e.g. a missing --config.init_student_lora file
        raise UserError(f"--config: {e.filename or ''}: {e.strerror or e}") from None
    # Aspect-ratio buckets: each bucket's turns are the method's, built for its latent shape (same trainables, same
    # optimisers, one shared state); the engine runs the step of the bucket each batch names
    bucket_turns = {}
    for name, shape in (getattr(batches, "latent_shapes", None) or {}).items():
        bdino = dino_disc.at_latent_shape(dino, shape) if dino is not None else None
        bucket_turns[name] = methods.build(cfg, base, shape, jax.random.key(cfg.seed + 1), cap_len=cap_len,
                                           dino=bdino).turns
    if bucket_turns:
        say(f"aspect-ratio buckets: {', '.join(bucket_turns)} (steps drawn by their share of the reals)")
    frozen = method.frozen(frozen)  # the base state (+ the DINO discriminator's frozen arrays)
    # Trainables, optimiser states and EMA laid out like the base weights they adapt; every step jitted with explicit
    # in/out shardings and the state donated
    plan = sharded.plan(mesh, method.turns, method.txs, method.params, frozen)
    frozen = distributed.put(frozen, plan.frozen)  # = plan.put_frozen, also from arrays each host loaded
    engine = Engine(method.turns, method.txs, float(cfg.ema_decay), seed=int(cfg.seed), shardings=plan,
                    bucket_turns=bucket_turns)
    state = engine.init_state(method.params)
    n_train = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state["params"]))
    say(f"method {method.name}: {n_train / 1e6:.3f}M trainable params in {sorted(state['params'])}; turns "
        + ", ".join(f"{t.name} every {t.every}" for t in method.turns)
        + "; mesh " + " x ".join(f"{a} {n}" for a, n in mesh.shape.items())
        + (f"; {jax.process_count()} processes" if multi else ""))

    # ---------------------------------------------------------------------------------------------------------
    # Checkpoints (trainables + optimiser states + EMA), resume
    # ---------------------------------------------------------------------------------------------------------
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoints(workdir / "checkpoints", every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
                       hint="resume with the config it was trained with (LoRA ranks / targets, GAN depths) or "
                            "start a new --workdir")
    state, start = ckpt.restore_latest(state)
    if start:
        say(f"resumed from step {start}")

    def batch_for(turn: str, it: int):
        """The global batch of `turn` at `it`, assembled from this host's rows."""
        local = {k: np.asarray(v) for k, v in batches.batch(turn, it).items() if k != "prompt"}
        bucket = local.pop("bucket", None)  # aspect-ratio buckets: the engine runs this bucket's step
        shapes = {k: jax.ShapeDtypeStruct((int(cfg.batch_size),) + v.shape[1:], v.dtype) for k, v in local.items()}
        batch = distributed.global_batch(local, plan.batch(shapes), int(cfg.batch_size))
        batch["iteration"] = np.asarray(it, np.int32)  # for losses with schedules (ArcFlow's teacher share)
        if bucket is not None:
            batch["bucket"] = str(bucket)
        return batch

    def host_state():
        """The trainables and EMA as host arrays (every process calls it: they may be spread over the hosts)."""
        return distributed.host_copy({"params": state["params"], "ema": state["ema"]}) if multi else state

    def grid():
        """The sample grid on process 0 (None elsewhere); every process calls it."""
        st = host_state()
        if not primary:
            return None
        labels = np.tile(np.arange(10), 4)
        teacher = base if grid_base is None else grid_base
        return digits_training.tile(method.sample_digits(teacher, st, labels, 0, cfg), 10)

    # ---------------------------------------------------------------------------------------------------------
    # Loop: TTUR turns, NaN/Inf guard before every save, SIGTERM saves and exits 0
    # ---------------------------------------------------------------------------------------------------------
    tb = export_lib.tensorboard(workdir, enabled=primary)
    buffer = MetricsBuffer()
    timer = {"t0": None, "steps": 0}  # training time per step, from the second step on (the first one compiles)
    try:
        log_cm = MetricsLog(workdir / "metrics.jsonl", start) if primary else contextlib.nullcontext(_NoLog())
        with StopSignal() as stop, log_cm as log:
            bar = progress_bar(range(start, cfg.total_steps), desc="distill", total=cfg.total_steps - start,
                               unit="step", enabled=primary)
            for it in bar:
                step = it + 1
                if timer["t0"] is None and it > start:
                    jax.block_until_ready(state)
                    timer["t0"], timer["from"] = time.perf_counter(), it
                state, metrics = engine.iteration(state, frozen, lambda turn: batch_for(turn, it), it)
                buffer.push(step, metrics)
                last = step == cfg.total_steps
                # read once (a signal arriving later is seen at the next step), and agreed by all hosts
                stopping = _any_process(stop.requested)
                due_save = ckpt.should_save(step) or last or stopping
                if step % cfg.log_every == 0 or due_save:
                    for s, m in buffer.flush():  # raises on the first non-finite step: nothing bad is saved
                        if s % cfg.log_every == 0 or s == step:
                            log.write(s, m)
                            tb.scalars(s, m)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in m.items()
                                         if k.endswith(("/loss", "dm", "gan_d"))}, refresh=False)
                if due_save:
                    ckpt.save(step, state, force=last or stopping)
                if cfg.sample_every and (step % cfg.sample_every == 0 or last) and cfg.data.kind == "digits":
                    image = grid()
                    if image is not None:
                        tb.image(step, "samples", image)
                if stopping:
                    ckpt.wait()
                    say(f"stopped by {stop.signame or 'SIGTERM on another host'} at step {step}; checkpoint saved "
                        f"in {ckpt.path(step)}; rerun the same command to resume")
                    return 0
        ckpt.wait()
    finally:
        tb.close()
        ckpt.close()
    per_step = None
    if timer["t0"] is not None and cfg.total_steps - timer["from"] >= 1:
        jax.block_until_ready(state)
        per_step = (time.perf_counter() - timer["t0"]) / (cfg.total_steps - timer["from"])
    out_state = host_state()  # exports are written by process 0 alone, from host arrays
    image = grid() if cfg.data.kind == "digits" else None
    if not primary:
        return 0
    files = method.write_outputs(workdir, out_state, base, cfg, max(start, cfg.total_steps), per_step)
    print("exported " + ", ".join(str(f) for f in files), flush=True)
    if image is not None:
        path = export_lib.write_png(workdir / "samples.png", image)
        print(f"wrote sample grid {path} (rows: seeds, columns: digits 0-9; {len(cfg.student.sigmas)} steps)")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("TURBOJAX_LOGLEVEL", "WARNING"))
    sys.exit(run_cli(main))
