"""turbojax training entry point (big_vision style: one narrative script, policy in the config).

    python train.py --config configs/qwen_image_lora.py [--config.total_steps 100 ...]

Today it runs LoRA flow-matching fine-tuning of a frozen Qwen-Image transformer; the distillation objectives
(DMD2, PCM, ArcFlow, Turbo++) plug into the same loop. Only the trainables (the LoRA adapter and its optimizer
state) are differentiated and checkpointed; the frozen base stays in `param_dtype`. Training resumes from the
latest checkpoint in `workdir`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/qwen_image_lora.py", "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Overrides config.workdir.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import orbax.checkpoint as ocp
    from flax import nnx

    from turbojax import lora, models
    from turbojax.sharding import batch_sharding, make_mesh, param_shardings
    from turbojax.utils import progress_bar

    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    cfg = FLAGS.config
    workdir = Path(FLAGS.workdir or cfg.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    cache = Path(__file__).resolve().parent / ".jax_cache"
    jax.config.update("jax_compilation_cache_dir", str(cache))

    # ---------------------------------------------------------------------------------------------------------
    # Mesh and frozen base model, sharded at birth
    # ---------------------------------------------------------------------------------------------------------
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    param_dtype, dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    model_kw = dict(param_dtype=param_dtype, dtype=dtype, scan_layers=cfg.scan_layers, remat=cfg.remat,
                    attention_impl=cfg.attention_impl)
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
    graphdef, frozen = nnx.split(base)
    mcfg = base.config
    print("base model %s: %.2fM params" % (cfg.model,
                 sum(int(np.prod(v.shape)) for v in jax.tree.leaves(frozen)) / 1e6), flush=True)

    # ---------------------------------------------------------------------------------------------------------
    # Trainables: LoRA adapter (fp32 masters) + optimizer
    # ---------------------------------------------------------------------------------------------------------
    adapter = lora.init_adapter(base, list(cfg.lora.targets), cfg.lora.rank, cfg.lora.alpha,
                                rng=jax.random.key(cfg.seed + 1))
    schedule = optax.warmup_constant_schedule(0.0, cfg.lr, cfg.warmup_steps)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay))
    train_state = {"adapter": adapter, "opt": tx.init(adapter), "step": jnp.zeros((), jnp.int32)}

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

    def loss_fn(adapter, frozen, x0, ctx, rng):
        model = nnx.merge(graphdef, lora.merge_params(frozen, adapter))
        k1, k2 = jax.random.split(rng)
        noise = jax.random.normal(k1, x0.shape, jnp.float32)
        sigma = jax.nn.sigmoid(jax.random.normal(k2, (x0.shape[0],)))  # logit-normal time
        x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        v = model.forward(x_t, ctx, None, sigma, img_shapes).astype(jnp.float32)
        return jnp.mean(jnp.square(v - (noise - x0)))

    @jax.jit
    def train_step(train_state, frozen, x0, ctx, rng):
        loss, grads = jax.value_and_grad(loss_fn)(train_state["adapter"], frozen, x0, ctx, rng)
        updates, opt = tx.update(grads, train_state["opt"], train_state["adapter"])
        new = {"adapter": optax.apply_updates(train_state["adapter"], updates), "opt": opt,
               "step": train_state["step"] + 1}
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    # ---------------------------------------------------------------------------------------------------------
    # Checkpointing (trainables only) and resume
    # ---------------------------------------------------------------------------------------------------------
    manager = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True,
                                             save_interval_steps=cfg.checkpoint_every))
    if manager.latest_step() is not None:
        step0 = manager.latest_step()
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), train_state)
        train_state = manager.restore(step0, args=ocp.args.StandardRestore(target))
        print(f"resumed from step {step0}", flush=True)
    start = int(train_state["step"])

    # ---------------------------------------------------------------------------------------------------------
    # Loop
    # ---------------------------------------------------------------------------------------------------------
    bsh = batch_sharding(mesh)
    metrics_path = workdir / "metrics.jsonl"
    for step in progress_bar(range(start, cfg.total_steps), desc="train", total=cfg.total_steps - start,
                             unit="step"):
        idx = np.random.default_rng(cfg.seed * 100003 + step).choice(cfg.num_examples, cfg.batch_size)
        x0 = jax.device_put(latents[idx].astype(np.float32), bsh)
        ctx = jax.device_put(texts[idx], bsh)
        train_state, metrics = train_step(train_state, frozen, x0, ctx, jax.random.key(cfg.seed * 7919 + step))
        manager.save(step + 1, args=ocp.args.StandardSave(train_state))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.total_steps:
            m = {k: float(v) for k, v in metrics.items()} | {"step": step + 1}
            print(json.dumps(m), flush=True)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
    manager.wait_until_finished()

    out = workdir / "lora.safetensors"
    lora.save(out, train_state["adapter"], base, layout="diffusers")
    print(f"saved LoRA (diffusers layout) to {out}")


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("TURBOJAX_LOGLEVEL", "INFO"))
    app.run(main)
