"""DMD2 + GAN (shared docs `distillation.md` §1, §9): the generator turn's and the critic turn's losses.

Each is a pure function `(trainable, others, frozen, batch, key) -> (loss, metrics)`; the engine differentiates it
w.r.t. `trainable` only and owns the optimisers (FastGen / Model-Optimizer design). Groups: `student` (LoRA
factors), `fake` (fake-score LoRA factors), `disc` (discriminator heads).

Generator turn: backward-simulate the student to a random step k of its sigma list (earlier steps without grad),
predict x0 at step k, noise it at a shifted random time, and take the distribution-matching gradient between the
teacher (with CFG: the real score) and the fake score (no CFG); plus the non-saturating GAN loss of the
discriminator on features of the same teacher pass (or of the fake score: the DMD2 paper's choice).
Critic turn: flow-matching loss of the fake score on detached student samples, and the discriminator loss on
features of noised student samples vs noised reals (real latents and/or teacher samples, mixed by the data side),
with an optional R1 penalty on the heads' inputs.

Discriminators: `gan.features` "teacher" / "fake" are heads on the backbone's features of noised latents;
"dino" (`dino_disc.py`) are heads on a frozen DINOv2's tokens of VAE-decoded clean latents. Both sit behind one
interface: `critic_logits` (fakes and reals -> logits, and R1) for the critic turns and `gan_generator_term` for the
generator's, which DMD2 and Turbo++ share.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from turbojax.distill import losses as L
from turbojax.distill.nets import Nets
from turbojax.distill.rollout import simulate

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class DMD2Settings:
    student_sigmas: tuple[float, ...]  # without the final 0, e.g. (1.0, 0.75)
    rollout: str = "euler"
    real_cfg: float = 4.0
    cfg_rescale: bool = True
    dm_weight: float = 1.0
    dm_time: tuple[float, float] = (0.02, 0.98)
    dm_shift: float = 1.0
    fake_time: tuple[float, float] = (0.0, 1.0)
    fake_shift: float = 1.0
    gan_weight: float = 0.0        # generator's GAN term (0: DMD2 without GAN)
    gan_d_weight: float = 1.0      # discriminator loss weight in the critic turn
    gan_features: str = "teacher"  # "teacher" (one teacher pass serves both), "fake" or "dino" (DINOv2 heads)
    gan_time: tuple[float, float] = (0.02, 0.98)
    gan_shift: float = 1.0
    r1_weight: float = 0.0

    @property
    def gan(self) -> bool:
        return self.gan_weight > 0


def _cond(batch):
    return {"ctx": batch["ctx"], "mask": batch.get("mask")}


def _neg(batch):
    return {"ctx": batch["neg_ctx"], "mask": batch.get("neg_mask")}


def _concat(a, b):
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def real_score_velocity(nets: Nets, frozen, x_t, sigma, batch, s: DMD2Settings, taps=()):
    """Teacher velocity with CFG (Qwen true CFG; CFG <= 1 or no negative prompt: the conditional pass alone), and
    the conditional pass's features when `taps` are asked (gradient flows to `x_t` through them)."""
    teacher = nets.teacher(frozen)
    use_cfg = s.real_cfg > 1.0 and "neg_ctx" in batch
    if not use_cfg:
        res = nets.velocity(teacher, x_t, sigma, _cond(batch), taps)
        return res if taps else (res, None)
    if taps:  # the features need the gradient of the conditional pass only
        v_c, feats = nets.velocity(teacher, x_t, sigma, _cond(batch), taps)
        v_u = nets.velocity(teacher, jax.lax.stop_gradient(x_t), sigma, _neg(batch))
    else:  # one batched pass for both halves
        both = nets.velocity(teacher, jnp.concatenate([x_t, x_t]), jnp.concatenate([sigma, sigma]),
                             _concat(_cond(batch), _neg(batch)))
        v_c, v_u = jnp.split(both, 2)
        feats = None
    return L.true_cfg(v_c, v_u, s.real_cfg, s.cfg_rescale), feats


def backbone_features(nets: Nets, backbone, x_fake, x_real, sigma, cond, *, frozen: bool = True):
    """One pass of `backbone` (teacher or fake score) over noised fakes and reals together: (features of the
    fakes, features of the reals) at `nets.taps`; `frozen` holds them constant (teacher features)."""
    b = x_fake.shape[0]
    _, feats = nets.velocity(backbone, jnp.concatenate([x_fake, x_real]), jnp.concatenate([sigma, sigma]),
                             _concat(cond, cond), nets.taps)
    if frozen:
        feats = jax.lax.stop_gradient(feats)
    return [f[:b] for f in feats], [f[b:] for f in feats]


def gan_generator_term(nets: Nets, disc_params, feats, *, frozen=None, x0=None, cond=None):
    """The generator's non-saturating GAN loss and its metrics: on `feats`, the backbone's features of its noised
    samples (feature heads), or, with the DINO discriminator, on its clean samples `x0` decoded and judged (needs
    `frozen` and `cond`; the gradient flows through DINO and the VAE decode into `x0`)."""
    disc = nets.discriminator(disc_params)
    if nets.dino is not None:
        logits = disc(nets.dino.features(frozen, x0), nets.dino.text(cond))
    else:
        logits = disc(feats, nets.denoiser.grid)
    l_gan = L.gan_generator_loss(logits)
    return l_gan, {"gan_g": l_gan, "d_fake_g": jnp.mean(logits)}


def critic_logits(nets: Nets, disc_params, frozen, x0_fake, x0_real, cond, keys, s, *, backbone=None,
                  backbone_frozen: bool = True, r1: bool = False):
    """The discriminator's logits on clean fakes and reals (latents in the model layout), and the R1 penalty on
    the heads' inputs at the reals when `r1` (else None). Feature heads: both noised at one random time per
    sample (`s.gan_time`, `s.gan_shift`; `keys` = time, fake-noise and real-noise keys), one `backbone` pass.
    DINO: both decoded clean (no noise, the keys are not used), one DINO pass."""
    disc = nets.discriminator(disc_params)
    if nets.dino is not None:
        b = x0_fake.shape[0]
        feats = jax.lax.stop_gradient(nets.dino.features(frozen, jnp.concatenate([x0_fake, x0_real])))
        f_fake, f_real = [f[:b] for f in feats], [f[b:] for f in feats]
        c = nets.dino.text(cond)

        def head(f):
            return disc(f, c)
    else:
        k_td, k_ef, k_er = keys
        td = L.sample_sigma(k_td, x0_fake.shape[0], *s.gan_time, s.gan_shift)
        x_fake = L.add_noise(x0_fake, jax.random.normal(k_ef, x0_fake.shape, F32), td)
        x_real = L.add_noise(x0_real, jax.random.normal(k_er, x0_fake.shape, F32), td)
        f_fake, f_real = backbone_features(nets, backbone, x_fake, x_real, td, cond, frozen=backbone_frozen)

        def head(f):
            return disc(f, nets.denoiser.grid)

    logits_fake = head(f_fake)
    if not r1:
        return logits_fake, head(f_real), None
    logits_real, vjp = jax.vjp(head, f_real)
    (g_real,) = vjp(jnp.ones_like(logits_real))
    return logits_fake, logits_real, L.r1_penalty(g_real)


def student_sample(nets: Nets, role: str, frozen, factors, batch, key, s: DMD2Settings, *, k=None):
    """Backward simulation to a random (or given) step k, then the student's x0 at step k (with gradient w.r.t.
    `factors` unless they are stop-gradient'ed by the caller). Returns (x0, k)."""
    k_idx, k_noise, k_roll = jax.random.split(key, 3)
    sig = jnp.asarray(tuple(s.student_sigmas) + (0.0,), F32)
    n = len(s.student_sigmas)
    k = jax.random.randint(k_idx, (), 0, n) if k is None else k
    x_T = jax.random.normal(k_noise, (batch["ctx"].shape[0], *nets.latent_shape), F32)
    frozen_student = nets.role(role, frozen, jax.lax.stop_gradient(factors))
    cond = _cond(batch)
    x_k, s_k = simulate(lambda x, t: nets.velocity(frozen_student, x, t, cond), x_T, sig, k, k_roll, s.rollout)
    v = nets.velocity(nets.role(role, frozen, factors), x_k, s_k, cond)
    return L.x0_from_velocity(x_k, s_k, v), k


def generator_loss(nets: Nets, s: DMD2Settings):
    def loss_fn(trainable, others, frozen, batch, key):
        k_sample, k_t, k_eps = jax.random.split(key, 3)
        x0, k = student_sample(nets, "student", frozen, trainable["student"], batch, k_sample, s)
        b = x0.shape[0]
        t = L.sample_sigma(k_t, b, *s.dm_time, s.dm_shift)
        x_t = L.add_noise(x0, jax.random.normal(k_eps, x0.shape, F32), t)
        teacher_taps = nets.taps if s.gan and s.gan_features == "teacher" else ()
        v_real, feats = real_score_velocity(nets, frozen, x_t, t, batch, s, teacher_taps)
        fake_model = nets.role("fake", frozen, others["fake"])
        if s.gan and s.gan_features == "fake":
            v_fake, feats = nets.velocity(fake_model, x_t, t, _cond(batch), nets.taps)
        else:
            v_fake = nets.velocity(fake_model, jax.lax.stop_gradient(x_t), t, _cond(batch))
        x0_real = L.x0_from_velocity(x_t, t, jax.lax.stop_gradient(v_real))
        x0_fake = L.x0_from_velocity(x_t, t, jax.lax.stop_gradient(v_fake))
        l_dm, g_abs = L.dmd_loss(x0, x0_real, x0_fake)
        loss = s.dm_weight * l_dm
        metrics = {"dm": l_dm, "dm_grad": g_abs, "k": k.astype(F32)}
        if s.gan:
            l_gan, m = gan_generator_term(nets, others["disc"], feats, frozen=frozen, x0=x0, cond=_cond(batch))
            loss = loss + s.gan_weight * l_gan
            metrics |= m
        return loss, metrics
    return loss_fn


def critic_loss(nets: Nets, s: DMD2Settings):
    def loss_fn(trainable, others, frozen, batch, key):
        k_sample, k_t, k_eps, k_td, k_ef, k_er = jax.random.split(key, 6)
        x0, _ = student_sample(nets, "student", frozen, others["student"], batch, k_sample, s)
        x0 = jax.lax.stop_gradient(x0)
        b = x0.shape[0]
        cond = _cond(batch)
        t = L.sample_sigma(k_t, b, *s.fake_time, s.fake_shift)
        eps = jax.random.normal(k_eps, x0.shape, F32)
        fake_model = nets.role("fake", frozen, trainable["fake"])
        v_fake = nets.velocity(fake_model, L.add_noise(x0, eps, t), t, cond)
        l_fake = L.flow_matching_loss(v_fake, x0, eps)
        loss, metrics = l_fake, {"fake_fm": l_fake}
        if s.gan:
            backbone = nets.teacher(frozen) if s.gan_features == "teacher" else fake_model
            logits_fake, logits_real, r1 = critic_logits(
                nets, trainable["disc"], frozen, x0, batch["real"], cond, (k_td, k_ef, k_er), s, backbone=backbone,
                backbone_frozen=s.gan_features == "teacher", r1=s.r1_weight > 0)
            if r1 is not None:
                loss = loss + s.r1_weight * r1
                metrics["r1"] = r1
            l_d = L.gan_discriminator_loss(logits_real, logits_fake)
            loss = loss + s.gan_d_weight * l_d
            metrics |= {"gan_d": l_d, "d_real": jnp.mean(logits_real), "d_fake": jnp.mean(logits_fake)}
        return loss, metrics
    return loss_fn
