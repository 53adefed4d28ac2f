"""The jitted steps of a distillation config, built abstractly on a TPU mesh: no weight is ever allocated.

The same construction as `train.py distill()`: the config's base model (`nnx.eval_shape`, bf16 frozen base), with
`gan.features = "dino"` the frozen DINOv2 and VAE decoder (`turbojax.plan.dino`, abstract, assembled as
`dino_disc.load` does), the method (`methods.build`: LoRA roles, discriminator heads, turns, optimisers),
`sharded.plan` for the shardings and `engine.make_step` for the steps. Every array argument (frozen base and DINO /
VAE states, trainables, optimiser states, EMA, batch) is a `jax.ShapeDtypeStruct` carrying the `NamedSharding` the
real run would give it, so `jit(...).lower(...)` sees exactly the layouts of a real step on that mesh.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.plan.topology import PlanError

F32 = jnp.float32


@dataclasses.dataclass
class Step:
    """One jitted step ready to lower: `fn` jitted with in/out shardings and donation, `args` abstract."""
    name: str
    fn: Callable
    args: tuple


@dataclasses.dataclass
class Setup:
    steps: list[Step]
    model_config: Any
    global_batch: int
    latent_shape: tuple
    text_len: int
    num_params: int
    num_trainable: int
    dino: dict | None = None  # the DINO GAN's networks (turbojax.plan.dino), when the config runs it


def model_preset(cfg, config_path: str, override: str = "") -> str:
    """The base model preset: --model, else the config's `model`, else guessed from the config file's name."""
    if override:
        return override
    if cfg.get("model"):
        return str(cfg.model)
    stem = Path(config_path.split(":")[0]).stem
    if stem.startswith("qwen_image"):
        return "qwen_image"
    if stem.startswith("z_image"):
        return "z_image_turbo"
    raise PlanError(f"--config {config_path}: cannot tell the base model; give --model (e.g. qwen_image, "
                    "z_image_turbo, qwen_image_tiny)")


def _abstract_adapter(model, targets, rank, alpha=None, *, rng=None, dtype=F32):
    """`lora.init_adapter` with ShapeDtypeStruct factors (same checks, same paths and shapes, no values)."""
    from turbojax.lora.adapters import linear_kernels
    patterns = [re.compile(t) for t in ([targets] if isinstance(targets, str) else list(targets))]
    kernels = {p: s for p, s in linear_kernels(model).items() if any(r.fullmatch(p) for r in patterns)}
    if not kernels:
        raise ValueError(f"LoRA targets {targets!r} match no Linear layer")
    alpha = float(rank if alpha is None else alpha)
    out = {}
    for path, shape in sorted(kernels.items()):
        *lead, n_in, n_out = shape
        out[path] = {"a": jax.ShapeDtypeStruct((*lead, n_in, rank), jnp.dtype(dtype)),
                     "b": jax.ShapeDtypeStruct((*lead, rank, n_out), jnp.dtype(dtype)),
                     "scale": np.full(tuple(lead), alpha / rank, np.float32)}
    return out


@contextlib.contextmanager
def abstract_lora():
    """Within: new LoRA adapters are abstract (a 20B base with rank-64 student and fake LoRAs would otherwise draw
    ~3.4 GB of random factors on the host just to read their shapes)."""
    from turbojax import lora
    from turbojax.lora import adapters
    saved = lora.init_adapter, adapters.init_adapter
    lora.init_adapter = adapters.init_adapter = _abstract_adapter
    try:
        yield
    finally:
        lora.init_adapter, adapters.init_adapter = saved


def _with_sharding(tree, shardings):
    """Abstract leaves of `tree` (arrays / ShapeDtypeStructs / nnx Variables) carrying `shardings` (a matching tree
    or prefix tree at the Variables)."""
    def one(x, sh):
        if isinstance(x, nnx.Variable):
            return x.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh))
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh)
    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _materialise_small(model, max_elements: int = 1 << 26) -> None:
    """Zeros in place of the abstract values of the model's small variables (everything but the block stacks), for
    methods that read base values while they are built (ArcFlow copies the output layer into its heads); the
    compile sees shapes only, so the values do not matter."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable) and isinstance(node.get_value(), jax.ShapeDtypeStruct) \
                and int(np.prod(node.shape)) <= max_elements:
            node.set_value(np.zeros(node.shape, node.dtype))


def latent_and_text(model_config, resolution: int):
    """One sample's latent in the model layout and the text width, for a square image of `resolution` pixels."""
    if resolution % 16:
        raise PlanError(f"--resolution {resolution}: must be a multiple of 16")
    if hasattr(model_config, "joint_attention_dim"):  # Qwen-Image: packed [N, in_channels], 2x2 patches of /8 latents
        return ((resolution // 16) ** 2, model_config.in_channels), model_config.joint_attention_dim
    return (model_config.in_channels, 1, resolution // 8, resolution // 8), model_config.cap_feat_dim


def build(cfg, preset: str, mesh, *, resolution: int, batch_per_chip: int, text_len: int, attention: str,
          num_layers: int | None = None, dino: str = "") -> Setup:
    """Every jitted step of `cfg`'s method on `mesh`, abstract. `num_layers` overrides the model's
    depth (the per-layer FLOP count compiles 1- and 2-layer copies); `dino` is the `--dino` preset ("": the
    `gan.dino` folder's config, else the default; see `turbojax.plan.dino`)."""
    from turbojax import models
    from turbojax.distill import methods, sharded
    from turbojax.distill.engine import init_state, make_step
    from turbojax.plan import dino as dino_lib

    if cfg.get("method") not in methods.METHODS:
        raise PlanError(f"--config: method {cfg.get('method')!r} is not a distillation method {methods.METHODS}")
    if dino and not dino_lib.wanted(cfg):
        gan = cfg.get("gan") or {}
        raise PlanError(f"--dino {dino}: the config's GAN does not read DINO features (gan.features "
                        f"{gan.get('features')!r}, gan.weight {gan.get('weight')}); it needs "
                        "--config.gan.features dino and a gan.weight above 0")
    try:
        fam, mcfg = models.get_preset(preset)
    except ValueError as e:
        raise PlanError(f"--model: {e}") from None
    if num_layers is not None:
        field = "num_layers" if hasattr(mcfg, "num_layers") else "n_layers"
        mcfg = dataclasses.replace(mcfg, **{field: num_layers})
    dtype = jnp.dtype(cfg.dtype)
    base = models.abstract_model(fam, mcfg, param_dtype=jnp.dtype(cfg.param_dtype), dtype=dtype,
                                 scan_layers=cfg.scan_layers,
                                 remat=cfg.remat, attention_impl=attention)
    if cfg.method == "arcflow":  # its heads start from the base's output layer values: give the small layers zeros
        _materialise_small(base)
    latent_shape, text_dim = latent_and_text(mcfg, resolution)
    n_dp = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch = batch_per_chip * n_dp
    planned = dino_lib.build(cfg, base, latent_shape, preset=dino, attention=attention) if dino_lib.wanted(cfg) \
        else None
    with abstract_lora():
        try:
            method = methods.build(cfg, base, latent_shape, jax.random.key(int(cfg.seed) + 1), cap_len=text_len,
                                   dino=planned.loaded if planned else None)
        except (ValueError, KeyError) as e:
            raise PlanError(f"--config: {e}") from None
    _, base_state = nnx.split(base)
    # as in train.py: the base state, wrapped with the DINO and VAE-decoder states (nets.FrozenArrays) for the DINO
    # GAN; sharded.plan gives each frozen variable its sharding from its logical axes, whichever network it is in
    frozen = method.frozen(base_state)
    plan = sharded.plan(mesh, method.turns, method.txs, method.params, frozen)
    abstract_state = jax.eval_shape(lambda p: init_state(p, method.turns, method.txs), method.params)
    state = _with_sharding(abstract_state, plan.state)
    frozen = _with_sharding(frozen, plan.frozen)

    def sds(shape, dt):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dt))
    batch = {"ctx": sds((global_batch, text_len, text_dim), F32), "mask": sds((global_batch, text_len), F32),
             "real": sds((global_batch, *latent_shape), F32), "iteration": sds((), jnp.int32)}
    # the negative prompt's embedding for the teacher's CFG: the prompt data always carries one (data.negative_prompt)
    batch["neg_ctx"], batch["neg_mask"] = batch["ctx"], batch["mask"]
    try:
        bsh = plan.batch(batch)
    except ValueError as e:
        raise PlanError(f"--batch-per-chip: {e}") from None
    batch = _with_sharding(batch, bsh)
    key = jax.ShapeDtypeStruct(jax.random.key(0).shape, jax.random.key(0).dtype, sharding=plan.replicated)
    steps = []
    for turn in method.turns:
        shardings_step = make_step(turn, method.txs[turn.name], float(cfg.ema_decay), shardings=plan)
        fn = jax.jit(shardings_step.step, in_shardings=(plan.state, plan.frozen, bsh, plan.replicated),
                     out_shardings=(plan.state, plan.replicated), donate_argnums=shardings_step.donate_argnums)
        steps.append(Step(turn.name, fn, (state, frozen, batch, key)))
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(base_state))
    n_train = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(method.params))
    return Setup(steps, mcfg, global_batch, tuple(latent_shape), text_len, n_params, n_train,
                 planned.info if planned else None)
