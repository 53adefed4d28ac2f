"""PCM, Phased Consistency Models in flow-matching form (shared docs `distillation.md` §2; arXiv 2405.18407).

The student's sigma list splits [0, sigmas[0]] into phases: for 2 steps at (1, 0.75), the phases are [0.75, 1] and
[0, 0.75]. Inside a phase the student is a consistency function that maps any point of the teacher's ODE to the
phase's lower edge `e`, with the Euler/DDIM-style jump of its velocity:

    f(x_n, s_n) = x_n + (s_e - s_n) v_student(x_n, s_n)

so the N-phase sampler is the plain Euler sampler over the sigma list (the exported LoRA loads anywhere). Training
(the reference's SD3 script, `train_pcm_lora_sd3_adv.py`):

  * a grid of `grid_steps` teacher sub-steps (the shift-warped schedule; the phase edges are added to it), `n`
    uniform on it, `x_n` = real data (or teacher samples) noised to `s_n`;
  * the teacher takes one Euler step with CFG to the next grid point `s_{n-1}` (which never leaves the phase);
  * target = the same online student without gradient at `(x_{n-1}, s_{n-1})`, mapped to the same edge (on the
    edge itself the map is the identity: the boundary condition);
  * pseudo-Huber loss between `f(x_n)` and the target.

Optional adversarial consistency term (`gan.weight` > 0): both the prediction and the target are re-noised from the
edge to a random `s_adv` inside the phase and judged by heads on frozen-teacher features (one head per tap), hinge
loss; the discriminator turn runs after each student turn. Groups: `student` (LoRA), `disc` (heads).
`pcm.adv_reals = "data"` (ours, not the reference's) makes the discriminator's reals the batch's data latents noised to
`s_adv` instead of the re-noised targets: the reference's reals and fakes share `x_n`, the noise and the time and
differ only by the consistency error, which its heads barely separate (on the digits demo the hinge loss stays at
its chance value 2.0 for the whole run), while data reals judge the student's outputs against the data
distribution, as DMD2's GAN does.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from turbojax.distill import losses as L
from turbojax.distill.dmd2 import _cond, backbone_features, real_score_velocity
from turbojax.distill.nets import Nets

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PCMSettings:
    edges: tuple[float, ...]      # the student's sigma list without the final 0 (the phases' upper edges)
    grid_steps: int = 100         # teacher sub-steps on [0, 1] (PCM: N = 100)
    shift: float = 3.0            # the shift of the sub-step grid (the teacher's sampling schedule)
    real_cfg: float = 4.0         # the teacher solver's CFG (field names shared with DMD2's real score)
    cfg_rescale: bool = False
    huber_c: float = 0.001
    gan_weight: float = 0.0       # the student's adversarial weight (PCM: 0.1); 0 = no discriminator
    gan_d_weight: float = 1.0
    adv_reals: str = "target"     # the discriminator's reals: re-noised targets (PCM) or "data" noised to s_adv

    @property
    def gan(self) -> bool:
        return self.gan_weight > 0


def sigma_grid(edges, steps: int, shift: float) -> np.ndarray:
    """Ascending sub-step sigmas from 0 to `edges[0]`: the shift-warped uniform grid with every phase edge added
    (so the teacher's step from a grid point never crosses an edge)."""
    top = float(max(edges))
    pts = np.asarray(L.shift_sigma(np.linspace(0.0, 1.0, int(steps) + 1), shift), np.float64)
    pts = np.concatenate([pts[pts < top], [0.0, top], np.asarray(edges, np.float64)])
    return np.unique(np.round(pts, 7)).astype(np.float32)


def lower_edge(sigma: jax.Array, edges) -> jax.Array:
    """The lower edge of the phase holding `sigma`: the largest of (0, *edges) strictly below it."""
    e = jnp.asarray(sorted({0.0, *[float(x) for x in edges]}), F32)
    i = jnp.searchsorted(e, jnp.asarray(sigma, F32), side="left") - 1
    return e[jnp.clip(i, 0, e.shape[0] - 1)]


def upper_edge(sigma: jax.Array, edges) -> jax.Array:
    """The upper edge of the phase holding `sigma` (the smallest edge at or above it)."""
    e = jnp.asarray(sorted(float(x) for x in edges), F32)
    i = jnp.searchsorted(e, jnp.asarray(sigma, F32), side="left")
    return e[jnp.clip(i, 0, e.shape[0] - 1)]


def edge_map(x, sigma, v, sigma_edge):
    """`f(x, s) = x + (s_e - s) v`: the jump of velocity `v` from `s` to the phase edge `s_e`."""
    return x.astype(F32) + L.bcast(sigma_edge - sigma, x) * v.astype(F32)


def renoise(y, sigma_from, sigma_to, eps):
    """A sample at `sigma_from` carried forward to `sigma_to >= sigma_from` with fresh noise, keeping the rectified
    flow marginal `(1 - s) x0 + s eps` (the reference adds `(s_to - s_from) eps`, which undershoots the noise)."""
    r = (1.0 - sigma_to) / jnp.maximum(1.0 - sigma_from, 1e-6)
    std = jnp.sqrt(jnp.maximum(jnp.square(sigma_to) - jnp.square(r * sigma_from), 0.0))
    return L.bcast(r, y) * y.astype(F32) + L.bcast(std, y) * eps.astype(F32)


def consistency_pair(nets: Nets, frozen, factors, batch, key, s: PCMSettings):
    """(prediction with gradient w.r.t. `factors`, target without gradient, aux) for one batch: `x_n` from
    `batch["real"]`, the teacher's CFG Euler step, the online student at the next point as the target."""
    if "real" not in batch:
        raise ValueError("PCM noises data: the batch needs 'real' (real latents or teacher samples)")
    k_n, k_eps = jax.random.split(key)
    x0 = batch["real"].astype(F32)
    b = x0.shape[0]
    grid = jnp.asarray(sigma_grid(s.edges, s.grid_steps, s.shift))
    n = jax.random.randint(k_n, (b,), 1, grid.shape[0])
    s_n, s_prev = grid[n], grid[n - 1]
    s_e = lower_edge(s_n, s.edges)
    x_n = L.add_noise(x0, jax.random.normal(k_eps, x0.shape, F32), s_n)
    v_t, _ = real_score_velocity(nets, frozen, x_n, s_n, batch, s)
    x_prev = jax.lax.stop_gradient(x_n + L.bcast(s_prev - s_n, x_n) * v_t)
    cond = _cond(batch)
    target_model = nets.role("student", frozen, jax.lax.stop_gradient(factors))
    target = edge_map(x_prev, s_prev, nets.velocity(target_model, x_prev, s_prev, cond), s_e)
    pred = edge_map(x_n, s_n, nets.velocity(nets.role("student", frozen, factors), x_n, s_n, cond), s_e)
    return pred, jax.lax.stop_gradient(target), {"sigma": s_n, "sigma_edge": s_e, "x_n": x_n}


def _adv_inputs(pred, target, aux, key, s: PCMSettings, x0=None):
    """(fake, real, s_adv): the prediction re-noised from its edge to `s_adv` in the phase, and the target re-noised
    the same way or (`adv_reals` "data") the data `x0` noised to `s_adv` with the same noise."""
    k_t, k_eps = jax.random.split(key)
    s_e = aux["sigma_edge"]
    hi = upper_edge(aux["sigma"], s.edges)
    s_adv = s_e + jax.random.uniform(k_t, s_e.shape, F32) * (hi - s_e)
    eps = jax.random.normal(k_eps, pred.shape, F32)
    real = L.add_noise(x0.astype(F32), eps, s_adv) if s.adv_reals == "data" else renoise(target, s_e, s_adv, eps)
    return renoise(pred, s_e, s_adv, eps), real, s_adv


def student_loss(nets: Nets, s: PCMSettings):
    def loss_fn(trainable, others, frozen, batch, key):
        k_pair, k_adv = jax.random.split(key)
        pred, target, aux = consistency_pair(nets, frozen, trainable["student"], batch, k_pair, s)
        l_cm = L.pseudo_huber(pred, target, s.huber_c)
        loss, metrics = l_cm, {"cm": l_cm, "sigma": jnp.mean(aux["sigma"])}
        if s.gan:
            y_fake, _, s_adv = _adv_inputs(pred, target, aux, k_adv, s, batch["real"])
            _, feats = nets.velocity(nets.teacher(frozen), y_fake, s_adv, _cond(batch), nets.taps)
            logits = nets.discriminator(others["disc"])(feats, nets.denoiser.grid)
            l_adv = L.gan_hinge_generator_loss(logits)
            loss = loss + s.gan_weight * l_adv
            metrics |= {"adv_g": l_adv}
        return loss, metrics
    return loss_fn


def disc_loss(nets: Nets, s: PCMSettings):
    """Hinge loss of the heads: re-noised targets are the reals, re-noised predictions the fakes (same `x_n`,
    same re-noising noise and time, as the student turn draws them)."""
    def loss_fn(trainable, others, frozen, batch, key):
        k_pair, k_adv = jax.random.split(key)
        pred, target, aux = consistency_pair(nets, frozen, others["student"], batch, k_pair, s)
        y_fake, y_real, s_adv = _adv_inputs(jax.lax.stop_gradient(pred), target, aux, k_adv, s, batch["real"])
        cond = _cond(batch)
        f_fake, f_real = backbone_features(nets, nets.teacher(frozen), y_fake, y_real, s_adv, cond)
        disc = nets.discriminator(trainable["disc"])
        logits_fake = disc(f_fake, nets.denoiser.grid)
        logits_real = disc(f_real, nets.denoiser.grid)
        l_d = L.gan_hinge_discriminator_loss(logits_real, logits_fake)
        return s.gan_d_weight * l_d, {"adv_d": l_d, "d_real": jnp.mean(logits_real),
                                      "d_fake": jnp.mean(logits_fake)}
    return loss_fn


# --------------------------------------------------------------------------------------------------------------
# Config and method
# --------------------------------------------------------------------------------------------------------------

def pcm_config() -> ml_collections.ConfigDict:
    """`dmd2_config()` with `method = "pcm"` and the `pcm` fields:

      pcm.grid_steps   teacher sub-steps N on the shift-`student.shift` grid (PCM: 100)
      pcm.teacher_cfg  CFG of the teacher's Euler step (PCM hard-codes w = 3 in Imagen form, i.e. scale 4)
      pcm.cfg_rescale  norm-rescaled CFG (Qwen-Image's pipeline rescale)
      pcm.huber_c      the pseudo-Huber constant c (PCM: 0.001)
      pcm.adv_reals    the discriminator's reals: "target" (PCM: the re-noised consistency targets) or "data" (the
                       batch's data latents noised to the same time; see the module docstring)

    The student's sigma list are the phase edges; `gan.weight` is the adversarial weight (PCM: 0.1, 0 = none),
    `gan.d_weight`, `gan.depths`, `gan.hidden` the heads on frozen-teacher features; `opt.student` / `opt.disc`
    the learning rates (PCM: 5e-6 and 1e-5 at rank 32). The `fake` and `dmd` fields are unused. PCM noises data:
    the batches' reals (real latents mixed with teacher samples by `gan.real_mix`) are drawn whatever the GAN
    weight."""
    from turbojax.distill.config import dmd2_config

    c = dmd2_config()
    c.method = "pcm"
    c.workdir = "out/pcm"
    c.pcm = ml_collections.ConfigDict(dict(grid_steps=100, teacher_cfg=4.0, cfg_rescale=True, huber_c=0.001,
                                            adv_reals="target"))
    c.gan.weight = 0.1
    for role in ("student",):
        c.lora[role].rank, c.lora[role].alpha = 32, 32.0
    c.opt.student.lr = 5e-6
    c.opt.disc.lr = 1e-5
    c.opt.weight_decay = 1e-3
    c.ttur_ratio = 1
    c.ema_decay = 0.0  # the reference keeps no EMA
    return c


def settings_from(cfg) -> PCMSettings:
    return PCMSettings(edges=tuple(float(x) for x in cfg.student.sigmas), grid_steps=int(cfg.pcm.grid_steps),
                       shift=float(cfg.student.shift), real_cfg=float(cfg.pcm.teacher_cfg),
                       cfg_rescale=bool(cfg.pcm.cfg_rescale), huber_c=float(cfg.pcm.huber_c),
                       gan_weight=float(cfg.gan.weight), gan_d_weight=float(cfg.gan.d_weight),
                       adv_reals=str(cfg.pcm.get("adv_reals", "target")))


def check_sigmas(sigmas) -> None:
    s = [float(x) for x in sigmas]
    if not s or any(not 0.0 < x <= 1.0 for x in s) or any(a <= b for a, b in zip(s, s[1:])):
        raise ValueError(f"student.sigmas must strictly decrease within (0, 1] without the final 0, got {s}")


def build(cfg, base_model, latent_shape, rng, *, cap_len=None):
    """The PCM `Method`: a student LoRA (warm-startable from `init_student_lora`) and, with the adversarial term,
    heads on frozen-teacher features. Turns: `generator` (the consistency loss), `critic` (the heads)."""
    from flax import nnx

    from turbojax.distill import methods as M
    from turbojax.distill.denoiser import denoiser_for
    from turbojax.distill.engine import Turn, make_tx
    from turbojax.lora import unmerged

    check_sigmas(cfg.student.sigmas)
    s = settings_from(cfg)
    if s.adv_reals not in ("target", "data"):
        raise ValueError(f"pcm.adv_reals must be 'target' or 'data', got {s.adv_reals!r}")
    if s.grid_steps < len(s.edges):
        raise ValueError(f"pcm.grid_steps {s.grid_steps} must be at least the number of phases {len(s.edges)}")
    graphdef, frozen = nnx.split(base_model)
    k_student, k_disc = jax.random.split(rng)
    student = M._adapter(base_model, cfg.lora.student, k_student, cfg.init_student_lora)
    params = {"student": unmerged.factors_of(student)}
    disc = feature_heads(cfg, base_model, k_disc) if s.gan else None
    if disc is not None:
        params["disc"] = disc["params"]
    nets = Nets(base=graphdef, roles={"student": unmerged.make_role(graphdef, frozen, student)},
                denoiser=denoiser_for(base_model, latent_shape, cap_len), latent_shape=tuple(latent_shape),
                **({k: disc[k] for k in ("disc", "disc_template", "taps")} if disc else {}))
    clip = float(cfg.opt.grad_clip)
    turns = [Turn("generator", ("student",), student_loss(nets, s), ema=("student",) if cfg.ema_decay > 0 else ())]
    txs = {"generator": make_tx({"student": M._group_opt(cfg, "student")}, clip)}
    if s.gan:
        turns.append(Turn("critic", ("disc",), disc_loss(nets, s)))
        txs["critic"] = make_tx({"disc": M._group_opt(cfg, "disc")}, clip)
    return M.Method("pcm", nets, turns, txs, params, s)


def feature_heads(cfg, base_model, key) -> dict:
    """Discriminator heads on the base's features at `gan.depths` (shared with Turbo++): graphdef, abstract
    template, pure params, taps."""
    from flax import nnx

    from turbojax.distill.denoiser import feature_dim, num_layers, taps_at_depths
    from turbojax.distill.discriminator import FeatureDiscriminator
    from turbojax.distill.nets import disc_pure

    taps = taps_at_depths(cfg.gan.depths, num_layers(base_model))
    disc = FeatureDiscriminator(feature_dim(base_model), len(taps), hidden=int(cfg.gan.hidden),
                                rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 2 ** 31 - 1))))
    graphdef, state = nnx.split(disc)
    return {"disc": graphdef, "disc_template": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
            "params": disc_pure(state), "taps": taps}
