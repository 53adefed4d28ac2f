"""Z-Image Turbo++ style teacher-aligned end-to-end 2-step distillation (shared docs `distillation.md` §4).

The paper (arXiv 2606.12575) has no public code; only its three ideas are known, and each is one switch here:

1. Step-decoupled parameters: one student LoRA per step on the one frozen base (roles `student_1`, `student_2`,
   ...; groups of the same names). [the paper's parameterisation (LoRA vs full copies) is unknown: per-step LoRAs are
   the cheap proxy; `init_student_lora` warm-starts every step from one LoRA, e.g. a PCM one] Option: per-step full
   copies of selected weights (`turbopp.full_blocks`, groups `student_1_blocks`, ...; `turbopp_blocks.py`), the
   base's weights at init, overlaid on the frozen base when that step's model is assembled; LoRA may adapt other
   modules of the same step (or none: `lora.student.targets` empty).
2. Distribution-aligned adversarial learning: the discriminator's reals are teacher samples (the batches' `real`
   pool with `gan.real_mix` 0), heads on frozen-teacher features of noised samples (DMD2's diffusion GAN), the
   non-saturating loss. [the backbone and taps are unknown: frozen-teacher features as in our DMD2; or
   `gan.features = "dino"`: heads on a frozen DINOv2's tokens of the VAE-decoded clean samples, `dino_disc.py`]
3. End-to-end training: the student runs all its steps from pure noise in one differentiable pass, so the
   final-image losses reach the step-1 adapter through step 2 (`turbopp.end_to_end`; False detaches between
   steps, the ablation); each step's forward is rematerialised (`turbopp.remat`) so memory stays at one step's
   activations. An explicit step-boundary loss keeps the intermediate meaningful: by default the squared error
   between the student's state at each boundary sigma and the teacher's ODE state at the same sigma from the same
   noise (`turbopp.boundary_weight`, Euler with CFG over `turbopp.teacher_steps` sub-steps; the "step-1 loss").
   [its form is unknown: regression to the teacher's trajectory state is the issue's default]

Optional terms: DMD2's distribution-matching gradient on the final image (`dmd.weight` > 0, with a fake-score LoRA
trained in the critic turn; one aggregator says Turbo++ keeps one), and a regression of the final image to the
teacher's ODE end point from the same noise (`turbopp.final_weight`, off by default: it costs the whole teacher
trajectory). Turns: `generator` (the per-step students), `critic` (fake score and/or heads).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from turbojax.distill import losses as L
from turbojax.distill.dmd2 import _cond, critic_logits, gan_generator_term, real_score_velocity
from turbojax.distill.nets import Nets
from turbojax.distill.pcm import check_sigmas, sigma_grid

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TurboPPSettings:
    student_sigmas: tuple[float, ...]
    shift: float = 3.0
    teacher_steps: int = 8        # teacher sub-steps on [0, sigmas[0]] for the trajectory targets
    real_cfg: float = 4.0         # teacher CFG of the trajectory targets
    dm_cfg: float = 4.0           # CFG of the DMD term's real score
    cfg_rescale: bool = True
    end_to_end: bool = True
    remat: bool = True
    boundary_weight: float = 1.0
    final_weight: float = 0.0
    dm_weight: float = 0.0
    dm_time: tuple[float, float] = (0.02, 0.98)
    dm_shift: float = 1.0
    fake_time: tuple[float, float] = (0.0, 1.0)
    fake_shift: float = 1.0
    gan_weight: float = 0.0
    gan_d_weight: float = 1.0
    gan_time: tuple[float, float] = (0.02, 0.98)
    gan_shift: float = 1.0
    full_blocks: tuple = ()       # turbopp_blocks.Layout of the per-step full copies (empty: LoRA only)

    @property
    def steps(self) -> int:
        return len(self.student_sigmas)

    @property
    def gan(self) -> bool:
        return self.gan_weight > 0

    @property
    def dmd(self) -> bool:
        return self.dm_weight > 0


def role_name(step: int) -> str:
    """The role / group of the adapter that serves step `step` (1-based)."""
    return f"student_{step}"


def blocks_name(step: int) -> str:
    """The group of step `step`'s full copies (`turbopp.full_blocks`)."""
    return f"student_{step}_blocks"


def step_model(nets: Nets, frozen, own: dict, step: int, s: TurboPPSettings):
    """Step `step`'s model (traceable): the frozen base with the step's full copies overlaid, plus its LoRA;
    `own` holds the step's groups (either may be absent)."""
    from turbojax.distill import turbopp_blocks

    if blocks_name(step) in own:
        frozen = turbopp_blocks.overlay(nets.base_state(frozen), s.full_blocks, own[blocks_name(step)])
    name = role_name(step)
    return nets.role(name, frozen, own[name]) if name in own else nets.teacher(frozen)


def teacher_states(nets: Nets, frozen, x_T, batch, s: TurboPPSettings) -> list:
    """The teacher's CFG Euler trajectory from `x_T` at `sigmas[0]` (sub-step grid with the student's sigmas added),
    without gradient: its states at each student boundary `sigmas[1:]`, and its end point when `final_weight` > 0."""
    grid = sigma_grid(s.student_sigmas, s.teacher_steps, s.shift)[::-1]  # descending, edges included
    wanted = [float(np.float32(x)) for x in s.student_sigmas[1:]] + ([0.0] if s.final_weight > 0 else [])
    if not wanted:
        return []
    idx = [int(np.argmin(np.abs(grid - w))) for w in wanted]  # the edges are on the grid
    stop = max(idx)
    b = x_T.shape[0]
    sig = jnp.asarray(grid[:stop + 1])

    def body(x, i):
        s_i, s_next = jnp.full((b,), sig[i]), jnp.full((b,), sig[i + 1])
        v, _ = real_score_velocity(nets, frozen, x, s_i, batch, s)
        x = x + L.bcast(s_next - s_i, x) * v
        return x, x

    _, xs = jax.lax.scan(body, x_T.astype(F32), jnp.arange(stop))
    return [jax.lax.stop_gradient(xs[i - 1]) for i in idx]  # xs[j] is the state at grid[j + 1]


def rollout(nets: Nets, frozen, students: dict, x_T, cond, s: TurboPPSettings):
    """All student steps from `x_T`: step i uses adapter `student_{i+1}` (and its full copies
    `student_{i+1}_blocks` when kept); Euler between steps, the last step predicts x0. Gradient flows through the
    states unless `end_to_end` is off. Returns (x0, boundary states)."""
    sig = [float(x) for x in s.student_sigmas] + [0.0]
    b = x_T.shape[0]
    x, states = x_T.astype(F32), []
    for i in range(s.steps):
        own = {g: students[g] for g in (role_name(i + 1), blocks_name(i + 1)) if g in students}
        sigma = jnp.full((b,), sig[i], F32)

        def vel(own, x, step=i + 1, sigma=sigma):
            return nets.velocity(step_model(nets, frozen, own, step, s), x, sigma, cond)

        v = (jax.checkpoint(vel) if s.remat else vel)(own, x)
        if i == s.steps - 1:
            return L.x0_from_velocity(x, sigma, v), states
        x = x + (sig[i + 1] - sig[i]) * v
        states.append(x)
        if not s.end_to_end:
            x = jax.lax.stop_gradient(x)


def _noise(nets: Nets, batch, key):
    return jax.random.normal(key, (batch["ctx"].shape[0], *nets.latent_shape), F32)


def generator_loss(nets: Nets, s: TurboPPSettings):
    def loss_fn(trainable, others, frozen, batch, key):
        k_noise, k_t, k_eps = jax.random.split(key, 3)
        x_T = _noise(nets, batch, k_noise)
        cond = _cond(batch)
        x0, states = rollout(nets, frozen, trainable, x_T, cond, s)
        loss, metrics = jnp.zeros((), F32), {}
        targets = teacher_states(nets, frozen, x_T, batch, s) if (s.boundary_weight > 0 or s.final_weight > 0) \
            else []
        if s.boundary_weight > 0 and states:
            l_b = sum(jnp.mean(jnp.square(x - t)) for x, t in zip(states, targets)) / len(states)
            loss = loss + s.boundary_weight * l_b
            metrics["boundary"] = l_b
        if s.final_weight > 0:
            l_f = jnp.mean(jnp.square(x0 - targets[-1]))
            loss = loss + s.final_weight * l_f
            metrics["final"] = l_f
        if s.dmd or s.gan:
            b = x0.shape[0]
            t = L.sample_sigma(k_t, b, *(s.dm_time if s.dmd else s.gan_time), s.dm_shift if s.dmd else s.gan_shift)
            x_t = L.add_noise(x0, jax.random.normal(k_eps, x0.shape, F32), t)
            taps = nets.taps if s.gan else ()  # () with the DINO discriminator: it reads x0, not the teacher
            if s.dmd:
                v_real, feats = real_score_velocity(nets, frozen, x_t, t, batch,
                                                    dataclasses.replace(s, real_cfg=s.dm_cfg), taps)
                v_fake = nets.velocity(nets.role("fake", frozen, others["fake"]), jax.lax.stop_gradient(x_t), t,
                                       cond)
                l_dm, g_abs = L.dmd_loss(x0, L.x0_from_velocity(x_t, t, jax.lax.stop_gradient(v_real)),
                                         L.x0_from_velocity(x_t, t, jax.lax.stop_gradient(v_fake)))
                loss = loss + s.dm_weight * l_dm
                metrics |= {"dm": l_dm, "dm_grad": g_abs}
            else:
                feats = nets.velocity(nets.teacher(frozen), x_t, t, cond, taps)[1] if taps else None
            if s.gan:
                l_gan, m = gan_generator_term(nets, others["disc"], feats, frozen=frozen, x0=x0, cond=cond)
                loss = loss + s.gan_weight * l_gan
                metrics |= m
        return loss, metrics
    return loss_fn


def critic_loss(nets: Nets, s: TurboPPSettings):
    """The fake score's flow-matching loss on detached student samples (with DMD) and the heads' loss: noised
    student samples vs noised teacher samples (the batches' reals), frozen-teacher features."""
    def loss_fn(trainable, others, frozen, batch, key):
        k_noise, k_t, k_eps, k_td, k_ef, k_er = jax.random.split(key, 6)
        cond = _cond(batch)
        students = {g: v for g, v in others.items() if g.startswith("student_")}
        x0, _ = rollout(nets, frozen, students, _noise(nets, batch, k_noise), cond,
                        dataclasses.replace(s, remat=False))
        x0 = jax.lax.stop_gradient(x0)
        b = x0.shape[0]
        loss, metrics = jnp.zeros((), F32), {}
        if s.dmd:
            t = L.sample_sigma(k_t, b, *s.fake_time, s.fake_shift)
            eps = jax.random.normal(k_eps, x0.shape, F32)
            v_fake = nets.velocity(nets.role("fake", frozen, trainable["fake"]), L.add_noise(x0, eps, t), t, cond)
            l_fake = L.flow_matching_loss(v_fake, x0, eps)
            loss = loss + l_fake
            metrics["fake_fm"] = l_fake
        if s.gan:
            if "real" not in batch:
                raise ValueError("the Turbo++ discriminator needs reals (teacher samples) in the batch")
            logits_fake, logits_real, _ = critic_logits(nets, trainable["disc"], frozen, x0, batch["real"], cond,
                                                        (k_td, k_ef, k_er), s, backbone=nets.teacher(frozen))
            l_d = L.gan_discriminator_loss(logits_real, logits_fake)
            loss = loss + s.gan_d_weight * l_d
            metrics |= {"gan_d": l_d, "d_real": jnp.mean(logits_real), "d_fake": jnp.mean(logits_fake)}
        return loss, metrics
    return loss_fn


# --------------------------------------------------------------------------------------------------------------
# Config and method
# --------------------------------------------------------------------------------------------------------------

def turbopp_config() -> ml_collections.ConfigDict:
    """`dmd2_config()` with `method = "turbopp"` and the `turbopp` fields (each an unknown of the paper made a
    switch, see the module doc):

      turbopp.teacher_steps    teacher Euler sub-steps over [0, sigmas[0]] for the trajectory targets (8: the
                               8-step Z-Image-Turbo teacher of the paper; the student's sigmas are added to the grid)
      turbopp.teacher_cfg      CFG of the teacher trajectory (1 for Z-Image-Turbo); the DMD real score uses dmd.real_cfg
      turbopp.boundary_weight  weight of the step-boundary ("step-1") regression to the teacher's trajectory state
      turbopp.final_weight     weight of a regression of the final image to the teacher's end point (0 = off)
      turbopp.end_to_end       gradient from step 2 into step 1 (False: detached, the ablation)
      turbopp.remat            rematerialise each step's forward in the end-to-end pass
      turbopp.full_blocks      regex or list of regexes selecting weights that become per-step full copies (default
                               empty: LoRA only). Each is fully matched against a parameter's dotted path and its
                               module's, with the layer index after the stack name for one block
                               (`transformer_blocks\.(0|1)\..*`: blocks 0 and 1; Z-Image `layers\.0\..*`) or
                               without it for every layer (`transformer_blocks\.attn\..*`, as LoRA targets are
                               spelled); the same regex works with and without scan_layers. With scanned stacks
                               only the selected layers are copied (a `[k, ...]` slice written into the frozen
                               stack when the step's model is assembled). Each step trains its own fp32 copy
                               (group `student_{k}_blocks`, initialised from the frozen base, EMA'd and checkpointed
                               like the LoRAs), exported as `step{k}_blocks.safetensors` (diffusers names, torch
                               layout). A module may not be both copied and in `lora.student.targets` (error);
                               with scan_layers a LoRA target covers every layer of its stack, so pick LoRA targets
                               among the other modules, or none (`lora.student.targets` empty: copies only).
      opt.blocks.lr            the copies' LR (full weights: lower than a LoRA's)

    `dmd.weight` is the optional DMD term (0 = off, no fake score), `gan.weight` the adversarial one with reals =
    teacher samples (`gan.real_mix` 0), `lora.student` the spec of every per-step adapter, `opt.student` their LR."""
    from turbojax.distill.config import dmd2_config

    c = dmd2_config()
    c.method = "turbopp"
    c.workdir = "out/turbopp"
    c.turbopp = ml_collections.ConfigDict(dict(teacher_steps=8, teacher_cfg=4.0, boundary_weight=1.0,
                                               final_weight=0.0, end_to_end=True, remat=True, full_blocks=[]))
    c.opt.blocks = ml_collections.ConfigDict(dict(lr=1e-5))
    c.dmd.weight = 0.0
    c.gan.weight = 0.03
    c.gan.real_mix = 0.0
    return c


def settings_from(cfg) -> TurboPPSettings:
    t = cfg.turbopp
    return TurboPPSettings(
        student_sigmas=tuple(float(x) for x in cfg.student.sigmas), shift=float(cfg.student.shift),
        teacher_steps=int(t.teacher_steps), real_cfg=float(t.teacher_cfg), cfg_rescale=bool(cfg.dmd.cfg_rescale),
        end_to_end=bool(t.end_to_end), remat=bool(t.remat), boundary_weight=float(t.boundary_weight),
        final_weight=float(t.final_weight), dm_cfg=float(cfg.dmd.real_cfg), dm_weight=float(cfg.dmd.weight),
        dm_time=tuple(cfg.dmd.time),
        dm_shift=float(cfg.dmd.time_shift), fake_time=tuple(cfg.fake.time), fake_shift=float(cfg.fake.time_shift),
        gan_weight=float(cfg.gan.weight), gan_d_weight=float(cfg.gan.d_weight), gan_time=tuple(cfg.gan.time),
        gan_shift=float(cfg.gan.time_shift))


def build(cfg, base_model, latent_shape, rng, *, cap_len=None, dino=None):
    from flax import nnx

    from turbojax.distill import methods as M
    from turbojax.distill import turbopp_blocks
    from turbojax.distill.denoiser import denoiser_for
    from turbojax.distill.engine import Turn, make_tx
    from turbojax.distill.pcm import feature_heads
    from turbojax.lora import unmerged

    check_sigmas(cfg.student.sigmas)
    s = settings_from(cfg)
    if s.steps < 2:
        raise ValueError("turbopp trains per-step adapters end to end: student.sigmas needs at least 2 steps")
    if s.teacher_steps < 1:
        raise ValueError(f"turbopp.teacher_steps must be >= 1, got {s.teacher_steps}")
    if not (s.gan or s.dmd or s.final_weight > 0):
        raise ValueError("turbopp needs a final-image loss: gan.weight, dmd.weight or turbopp.final_weight > 0")
    graphdef, frozen = nnx.split(base_model)
    keys = jax.random.split(rng, s.steps + 2)
    patterns = cfg.turbopp.get("full_blocks", [])
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    layout = turbopp_blocks.select(base_model, patterns) if patterns else ()
    with_lora = bool(list(cfg.lora.student.targets)) or bool(cfg.init_student_lora) or not layout
    s = dataclasses.replace(s, full_blocks=layout)
    roles, params = {}, {}
    for i in range(s.steps):
        if with_lora:
            a = M._adapter(base_model, cfg.lora.student, keys[i], cfg.init_student_lora)
            if i == 0:
                turbopp_blocks.check_no_lora(layout, a, "init_student_lora" if cfg.init_student_lora
                                             else "lora.student.targets")
            roles[role_name(i + 1)] = unmerged.make_role(graphdef, frozen, a)
            params[role_name(i + 1)] = unmerged.factors_of(a)
        if layout:
            params[blocks_name(i + 1)] = turbopp_blocks.init_copies(frozen, layout)
    if s.dmd:
        fake = M._adapter(base_model, cfg.lora.fake, keys[-2])
        roles["fake"] = unmerged.make_role(graphdef, frozen, fake)
        params["fake"] = unmerged.factors_of(fake)
    disc = (M.dino_heads(cfg, base_model, dino, keys[-1]) if dino is not None else
            feature_heads(cfg, base_model, keys[-1])) if s.gan else None
    if disc is not None:
        params["disc"] = disc["params"]
    nets = Nets(base=graphdef, roles=roles, denoiser=denoiser_for(base_model, latent_shape, cap_len),
                latent_shape=tuple(latent_shape), dino=dino.gan if dino is not None and s.gan else None,
                **({k: disc[k] for k in ("disc", "disc_template", "taps") if k in disc} if disc else {}))
    students = tuple(g for i in range(s.steps) for g in (role_name(i + 1), blocks_name(i + 1)) if g in params)
    clip = float(cfg.opt.grad_clip)
    critic_groups = tuple(g for g, on in (("fake", s.dmd), ("disc", s.gan)) if on)
    turns = [Turn("generator", students, generator_loss(nets, s), every=int(cfg.ttur_ratio) if critic_groups else 1,
                  ema=students if cfg.ema_decay > 0 else ())]
    every = turns[0].every  # the LR schedules count the generator's updates
    txs = {"generator": make_tx({g: M._group_opt(cfg, "blocks" if g.endswith("_blocks") else "student", every)
                                 for g in students}, clip)}
    if critic_groups:
        turns.append(Turn("critic", critic_groups, critic_loss(nets, s)))
        txs["critic"] = make_tx({g: M._group_opt(cfg, g) for g in critic_groups}, clip)
    m = M.Method("turbopp", nets, turns, txs, params, s, export_group=students[0],
                 frozen_extra=dino.arrays if dino is not None and s.gan else None)
    m.export = lambda workdir, state, base, cfg_, step: export(m, workdir, state, base, cfg_, step)
    m.digits_images = lambda teacher, state, labels, seed, cfg_: digits_images(m, teacher, state, labels, seed,
                                                                               cfg_)
    return m



# --------------------------------------------------------------------------------------------------------------
# Per-step adapters: export, reload, sampling
# --------------------------------------------------------------------------------------------------------------

def _trained(state, g: str, use_ema: bool):
    return state["ema"][g] if use_ema and g in state.get("ema", {}) else state["params"][g]


def step_adapters(method, state, use_ema: bool = True) -> list[dict | None]:
    """The per-step students as adapters `[{path: {"a", "b", "scale"}}]` in step order (their EMA when kept);
    None for a step without LoRA (full copies only)."""
    from turbojax.lora import unmerged

    out = []
    for i in range(method.settings.steps):
        g = role_name(i + 1)
        out.append(unmerged.adapter_of(method.nets.roles[g], jax.device_get(_trained(state, g, use_ema)))
                   if g in state["params"] else None)
    return out


def step_blocks(method, state, use_ema: bool = True) -> list[tuple | None]:
    """Each step's full copies `(layout, {path: array})` in step order (their EMA when kept); None without them."""
    lay = method.settings.full_blocks
    return [(lay, _trained(state, blocks_name(i + 1), use_ema)) if blocks_name(i + 1) in state["params"] else None
            for i in range(method.settings.steps)]


def step_files(step: int) -> dict:
    return {"diffusers": f"lora_step{step}.safetensors", "comfy": f"lora_step{step}_comfy.safetensors"}


def export(method, workdir, state, base, cfg, step: int) -> list[Path]:
    """Each step's adapter in both LoRA layouts and its full copies (`step{k}_blocks.safetensors`, diffusers names,
    torch layout) when kept, and `sampler.json` whose `step_adapters` says which files serve which step (1-based, at
    which sigma); each file also carries the settings and its step in its metadata."""
    from turbojax import lora
    from turbojax.convert.atomic import commit_file
    from turbojax.distill import export as export_lib
    from turbojax.distill import turbopp_blocks

    workdir = Path(workdir)
    adapters, blocks = step_adapters(method, state), step_blocks(method, state)
    settings = export_lib.sampler_settings(cfg, method.name, step)
    settings["step_adapters"] = [
        {"step": i + 1, "sigma": float(sig), **(step_files(i + 1) if adapters[i] is not None else {}),
         **({"blocks": f"step{i + 1}_blocks.safetensors"} if blocks[i] is not None else {})}
        for i, sig in enumerate(cfg.student.sigmas)]
    out = []
    for i, (adapter, bl) in enumerate(zip(adapters, blocks)):
        meta = {"turbojax_sampler": json.dumps(settings), "turbojax_step": str(i + 1)}
        if adapter is not None:
            for layout, name in step_files(i + 1).items():
                path = workdir / name
                lora.save(path, adapter, base, layout=layout)
                export_lib._add_metadata(path, meta)
                out.append(path)
        if bl is not None:
            out.append(turbopp_blocks.save(workdir / settings["step_adapters"][i]["blocks"], base, *bl, meta))
    side = workdir / "sampler.json"
    commit_file(side, lambda fh: fh.write((json.dumps(settings, indent=2) + "\n").encode()))
    return out + [side]


def _entries(folder: Path, settings: dict) -> list[dict]:
    entries = sorted(settings["step_adapters"], key=lambda e: int(e["step"]))
    if [int(e["step"]) for e in entries] != list(range(1, len(entries) + 1)):
        raise ValueError(f"{folder / 'sampler.json'}: step_adapters must number the steps 1..N")
    return entries


def load_steps(folder, model, layout: str = "diffusers") -> tuple[list[dict | None], dict]:
    """(per-step adapters in step order, None for a step without LoRA, sampler settings) of an exported Turbo++
    folder; `load_step_blocks` gives the steps' full copies."""
    from turbojax import lora

    folder = Path(folder)
    settings = json.loads((folder / "sampler.json").read_text())
    return [lora.load(folder / e[layout], model) if layout in e else None for e in _entries(folder, settings)], \
        settings


def load_step_blocks(folder, model, settings: dict) -> list[tuple | None]:
    """Each step's full copies `(layout, {path: array})` of an exported folder (None for a step without)."""
    from turbojax.distill import turbopp_blocks

    folder = Path(folder)
    return [turbopp_blocks.load(folder / e["blocks"], model) if "blocks" in e else None
            for e in _entries(folder, settings)]


def step_models(base, adapters, blocks=None) -> list:
    """One merged model per step: `base` with the step's full copies in place, then its LoRA merged."""
    from turbojax import lora
    from turbojax.distill import turbopp_blocks

    blocks = blocks or [None] * len(adapters)
    if len(blocks) != len(adapters):
        raise ValueError(f"{len(adapters)} per-step adapters but {len(blocks)} per-step full copies")
    out = []
    for a, b in zip(adapters, blocks):
        m = turbopp_blocks.with_blocks(base, *b) if b is not None else base
        out.append(lora.apply(m, [(a, 1.0)]) if a is not None else m)
    return out


def digits_tokens(teacher, adapters, labels, seed: int, sigmas, guidance: float = 1.0, *, blocks=None,
                  batch_size: int = 500) -> np.ndarray:
    """Packed digits latents from per-step adapters (and full copies): step i runs `step_models(...)[i]` for one
    Euler step of the sigma list (the last one to 0), noise of image j from `seed + j` as in
    `turbojax.digits.model.generate`."""
    from turbojax import sampling
    from turbojax.digits import data, model as dm

    labels = np.asarray(labels, np.int64).reshape(-1)
    sig = [float(x) for x in sigmas] + [0.0]
    if len(adapters) != len(sig) - 1:
        raise ValueError(f"{len(adapters)} per-step adapters for a {len(sig) - 1}-step sigma list")
    models = step_models(teacher, adapters, blocks)
    x_all = dm.noise(len(labels), seed)
    emb, mask = dm.class_condition(labels)
    nemb, nmask = dm.class_condition(np.full(len(labels), dm.EMPTY))
    out = []
    for lo in range(0, len(labels), batch_size):
        hi = min(lo + batch_size, len(labels))
        kw = dict(negative_prompt_embeds=nemb[lo:hi], negative_prompt_embeds_mask=nmask[lo:hi]) if guidance > 1 \
            else {}
        x = x_all[lo:hi]
        for i, model in enumerate(models):
            x = sampling.sample_qwen_image(model, x, emb[lo:hi], np.asarray(sig[i:i + 2], np.float32),
                                           height=data.SAMPLER_SIZE, width=data.SAMPLER_SIZE,
                                           prompt_embeds_mask=mask[lo:hi], true_cfg_scale=float(guidance),
                                           precision="fp32", **kw)
        out.append(np.asarray(x, np.float32))
    return np.concatenate(out)


def digits_images(method, teacher, state, labels, seed: int, cfg) -> np.ndarray:
    from turbojax.digits import data

    tokens = digits_tokens(teacher, step_adapters(method, state), labels, seed, cfg.student.sigmas,
                           float(cfg.student.cfg), blocks=step_blocks(method, state))
    return data.tokens_to_images(tokens)


def per_step_pipeline(pipe, step_loras, step_blocks=None):
    """`pipe` (a `turbojax.pipelines.Text2ImagePipeline`) whose denoising runs step i with its transformer plus
    the LoRA `step_loras[i] = (file, scale)` and/or with the full copies of the blocks file `step_blocks[i]` in
    place (the Turbo++ sampler; `sample.py --lora-step i:FILE --blocks-step i:FILE`; an empty list: none of that
    kind). The schedule must have exactly one step per entry; each step is one call of the pipeline's own sampler
    on its two sigmas."""
    from turbojax import lora
    from turbojax.distill import turbopp_blocks
    from turbojax.pipelines import PipelineError, Text2ImagePipeline

    step_loras, step_blocks = list(step_loras or []), list(step_blocks or [])
    if step_loras and step_blocks and len(step_loras) != len(step_blocks):
        raise PipelineError(f"{len(step_loras)} per-step LoRAs but {len(step_blocks)} per-step blocks files")
    transformers = []
    for i in range(max(len(step_loras), len(step_blocks))):
        t = pipe.transformer
        if step_blocks:
            try:
                t = turbopp_blocks.with_blocks(t, *turbopp_blocks.load(step_blocks[i], t))
            except ValueError as e:  # BlocksFileError, SafetensorsError
                msg = str(e) if str(e).startswith(str(step_blocks[i])) else f"{step_blocks[i]}: {e}"
                raise PipelineError(f"blocks file {msg}") from None
        if step_loras:
            file, scale = step_loras[i]
            try:
                adapter = lora.load(file, pipe.transformer)
            except lora.LoraFormatError as e:
                raise PipelineError(f"LoRA {file} does not fit this {pipe.family} transformer: {e}") from None
            t = lora.apply(t, [(adapter, float(scale))])
        transformers.append(t)

    class PerStepPipeline(Text2ImagePipeline):
        def denoise(self, latents, cond, neg, sigmas, **kw):
            sig = np.asarray(sigmas, np.float32)
            if len(sig) - 1 != len(transformers):
                raise PipelineError(f"{len(transformers)} per-step students (--lora-step / --blocks-step) for a "
                                    f"{len(sig) - 1}-step schedule; give one per step")
            x = latents
            for i, t in enumerate(transformers):
                x = Text2ImagePipeline.denoise(dataclasses.replace(self, transformer=t), x, cond, neg, sig[i:i + 2],
                                               **kw)
            return x

    return PerStepPipeline(**{f.name: getattr(pipe, f.name) for f in dataclasses.fields(pipe)})


def digits_sampler(teacher, folder):
    """`(sample(labels, seed) -> uint8 digits, train_s_per_step or None)` of an exported Turbo++ digits student
    (a `train.py` workdir holding `lora_step*.safetensors` and/or `step*_blocks.safetensors` + `sampler.json`), for
    `bench/distill_quality.py` rows."""
    from turbojax.digits import data

    adapters, settings = load_steps(folder, teacher)
    blocks = load_step_blocks(folder, teacher, settings)
    sig, guidance = settings["sigmas"][:-1], float(settings.get("guidance", 1.0))
    return ((lambda labels, seed: data.tokens_to_images(digits_tokens(teacher, adapters, labels, seed, sig,
                                                                       guidance, blocks=blocks))),
            settings.get("train_s_per_step"))
