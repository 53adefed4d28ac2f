"""From a config to a method: the networks on the shared base, the trainables, the turns and their optimisers.

`build(cfg, base_model, latent_shape, rng)` returns a `Method` for `cfg.method` (today "dmd2": DMD2, with GAN when
`cfg.gan.weight > 0`). The config fields are documented in `configs/digits_dmd2_gan.py`. With `gan.features =
"dino"` the caller loads the frozen DINOv2 and VAE decoder first (`dino_disc.load`) and passes them as `dino`; the
turns then get `method.frozen(base_state)` as their frozen argument.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from turbojax import lora
from turbojax.distill import dmd2
from turbojax.distill.denoiser import denoiser_for, feature_dim, num_layers, taps_at_depths
from turbojax.distill.discriminator import FeatureDiscriminator
from turbojax.distill.engine import GroupOpt, Turn, make_tx
from turbojax.distill.nets import Nets, disc_pure
from turbojax.lora import unmerged

METHODS = ("dmd2", "pcm", "turbopp", "arcflow")


@dataclasses.dataclass
class Method:
    """What train.py needs of a method. Methods whose student is more than one LoRA (ArcFlow's heads, Turbo++'s
    per-step adapters) override `export` and `digits_images`; the defaults serve a single LoRA student."""
    name: str
    nets: Nets
    turns: list[Turn]
    txs: dict
    params: dict              # initial trainables {group: pytree}
    settings: Any
    export_group: str = "student"  # the group exported as the distilled LoRA (its EMA when kept)
    # (workdir, state, base, cfg, step) -> files written; default: the LoRA in both layouts + sampler.json
    export: Callable | None = None
    # (teacher, state, labels, seed, cfg) -> uint8 digits [N, 32, 32, 1] from the student (demo grids, quality)
    digits_images: Callable | None = None
    # frozen arrays beside the base (the DINO discriminator's DINO and VAE-decoder states); never trained or saved
    frozen_extra: dict | None = None

    def frozen(self, base_state):
        """The turns' frozen argument: the base state, wrapped with `frozen_extra` when there is one."""
        if self.frozen_extra is None:
            return base_state
        from turbojax.distill.nets import FrozenArrays
        return FrozenArrays(base=base_state, **self.frozen_extra)

    def write_outputs(self, workdir, state, base, cfg, step: int, train_s_per_step: float | None = None) -> list:
        from turbojax.distill import export as export_lib
        if self.export is not None:
            files = self.export(workdir, state, base, cfg, step)
            if train_s_per_step is not None:  # custom exports: record it in their JSON side files
                export_lib.add_json_fields([f for f in files if str(f).endswith(".json")],
                                           {"train_s_per_step": round(float(train_s_per_step), 4)})
            return files
        return export_lib.export_student(workdir, export_adapter(self, state), base, self, cfg, step=step,
                                         train_s_per_step=train_s_per_step)

    def sample_digits(self, teacher, state, labels, seed: int, cfg):
        if self.digits_images is not None:
            return self.digits_images(teacher, state, labels, seed, cfg)
        from turbojax.digits import model as digits_model
        return digits_model.generate(teacher, labels, seed=seed, sigmas=list(cfg.student.sigmas) + [0.0],
                                     guidance=float(cfg.student.cfg), adapters=export_adapter(self, state))


def _adapter(model, spec, rng, init_file: str = ""):
    if init_file:
        adapter = unmerged.fold_scales(lora.load(init_file, model))
        return {p: {k: np.asarray(v, np.float32) for k, v in e.items()} for p, e in adapter.items()}
    return lora.init_adapter(model, list(spec.targets), int(spec.rank), float(spec.alpha), rng=rng)


def _group_opt(cfg, name: str, every: int = 1) -> GroupOpt:
    """Group `name`'s optimiser settings; `every`: its turn runs every `every`-th step (the LR schedule counts the
    group's updates, total_steps / every)."""
    g, every = cfg.opt[name], max(int(every), 1)
    return GroupOpt(lr=float(g.lr), warmup_steps=int(cfg.opt.warmup_steps), weight_decay=float(cfg.opt.weight_decay),
                    b1=float(cfg.opt.b1), b2=float(cfg.opt.b2), schedule=str(cfg.opt.get("schedule", "constant")),
                    updates=-(-int(cfg.total_steps) // every),
                    decay_updates=-(-int(cfg.opt.get("decay_steps", 0)) // every))


def dmd2_settings(cfg) -> dmd2.DMD2Settings:
    return dmd2.DMD2Settings(
        student_sigmas=tuple(float(s) for s in cfg.student.sigmas), rollout=cfg.student.rollout,
        real_cfg=float(cfg.dmd.real_cfg), cfg_rescale=bool(cfg.dmd.cfg_rescale), dm_weight=float(cfg.dmd.weight),
        dm_time=tuple(cfg.dmd.time), dm_shift=float(cfg.dmd.time_shift), fake_time=tuple(cfg.fake.time),
        fake_shift=float(cfg.fake.time_shift), gan_weight=float(cfg.gan.weight), gan_d_weight=float(cfg.gan.d_weight),
        gan_features=cfg.gan.features, gan_time=tuple(cfg.gan.time), gan_shift=float(cfg.gan.time_shift),
        r1_weight=float(cfg.gan.r1_weight))


def dino_heads(cfg, base_model, dino, key) -> dict:
    """The DINO discriminator's heads (graphdef, template, params; no taps: the teacher is not read)."""
    from turbojax.distill import dino_disc
    return dino_disc.init_heads(dino.gan, dino_disc.text_dim(base_model), int(cfg.gan.hidden), key)


def build(cfg, base_model, latent_shape, rng: jax.Array, *, cap_len: int | None = None, dino=None) -> Method:
    """`dino`: the loaded DINO discriminator (`dino_disc.load`), required when `gan.features` is "dino"."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of {METHODS}")
    gan = cfg.get("gan")
    wants_dino = gan is not None and gan.get("features") == "dino" and float(gan.get("weight", 0.0)) > 0
    if wants_dino and cfg.method not in ("dmd2", "turbopp"):
        raise ValueError(f"gan.features 'dino' works with the methods dmd2 and turbopp, not {cfg.method!r}")
    if wants_dino and dino is None:
        raise ValueError("gan.features 'dino': the DINOv2 discriminator is not loaded (train.py loads gan.dino; "
                         "callers pass dino=dino_disc.load(cfg, base, latent_shape))")
    if cfg.method == "turbopp":  # its own module builds it (lazy: it imports this one)
        from turbojax.distill import turbopp
        return turbopp.build(cfg, base_model, latent_shape, rng, cap_len=cap_len, dino=dino if wants_dino else None)
    if cfg.method == "pcm":
        from turbojax.distill import pcm
        return pcm.build(cfg, base_model, latent_shape, rng, cap_len=cap_len)
    if cfg.method == "arcflow":  # policy heads + trunk LoRA (lazy import: it imports this module)
        from turbojax.distill import arcflow_heads
        return arcflow_heads.build_method(cfg, base_model, latent_shape, rng, cap_len=cap_len)
    graphdef, frozen = nnx.split(base_model)
    k_student, k_fake, k_disc = jax.random.split(rng, 3)
    student = _adapter(base_model, cfg.lora.student, k_student, cfg.init_student_lora)
    fake = _adapter(base_model, cfg.lora.fake, k_fake)
    roles = {"student": unmerged.make_role(graphdef, frozen, student),
             "fake": unmerged.make_role(graphdef, frozen, fake)}
    s = dmd2_settings(cfg)
    if s.gan_features not in ("teacher", "fake", "dino"):
        raise ValueError(f"gan.features must be 'teacher', 'fake' or 'dino', got {s.gan_features!r}")
    params = {"student": unmerged.factors_of(student), "fake": unmerged.factors_of(fake)}
    disc_graphdef = disc_template = None
    taps = ()
    if s.gan and s.gan_features == "dino":
        heads = dino_heads(cfg, base_model, dino, k_disc)
        disc_graphdef, disc_template, params["disc"] = heads["disc"], heads["disc_template"], heads["params"]
    elif s.gan:
        taps = taps_at_depths(cfg.gan.depths, num_layers(base_model))
        disc = FeatureDiscriminator(feature_dim(base_model), len(taps), hidden=int(cfg.gan.hidden),
                                    rngs=nnx.Rngs(int(jax.random.randint(k_disc, (), 0, 2 ** 31 - 1))))
        disc_graphdef, disc_state = nnx.split(disc)
        disc_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), disc_state)
        params["disc"] = disc_pure(disc_state)
    nets = Nets(base=graphdef, roles=roles, denoiser=denoiser_for(base_model, latent_shape, cap_len),
                latent_shape=tuple(latent_shape), disc=disc_graphdef, disc_template=disc_template, taps=taps,
                dino=dino.gan if s.gan and s.gan_features == "dino" else None)
    critic_groups = ("fake", "disc") if s.gan else ("fake",)
    turns = [Turn("generator", ("student",), dmd2.generator_loss(nets, s), every=int(cfg.ttur_ratio),
                  ema=("student",) if cfg.ema_decay > 0 else ()),
             Turn("critic", critic_groups, dmd2.critic_loss(nets, s))]
    clip = float(cfg.opt.grad_clip)
    txs = {"generator": make_tx({"student": _group_opt(cfg, "student", int(cfg.ttur_ratio))}, clip),
           "critic": make_tx({g: _group_opt(cfg, g) for g in critic_groups}, clip)}
    return Method("dmd2", nets, turns, txs, params, s,
                  frozen_extra=dino.arrays if s.gan and s.gan_features == "dino" else None)


def export_adapter(method: Method, state: Mapping, use_ema: bool = True) -> dict:
    """The distilled student as an adapter `{path: {"a", "b", "scale"}}` (its EMA when one is kept)."""
    g = method.export_group
    factors = state["ema"][g] if use_ema and g in state.get("ema", {}) else state["params"][g]
    return unmerged.adapter_of(method.nets.roles[g], jax.device_get(factors))
