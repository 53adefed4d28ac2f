"""ArcFlow (shared docs `distillation.md` §3, pi-Flow §5): the momentum policy, its analytic step, and the
policy-imitation loss. Pure functions of arrays; the model-facing part (heads, trunk LoRA, export) is
`turbojax.distill.arcflow_heads`.

One student NFE at `(x_src, sigma_src)` outputs, per pixel, a K-component policy: velocities `v_k`, mixture logits
(`pi = softmax`) and K-1 log-rates `a_k = ln gamma_k` (component 0 has gamma = 1: a constant velocity). Inside the
step the velocity is

    v(sigma) = sum_k pi_k v_k gamma_k^(sigma_src - sigma)

and, with `h = sigma_a - sigma_b`, `tau_a = sigma_src - sigma_a`, its integral has the closed form

    x(sigma_b) = x(sigma_a) - h sum_k pi_k v_k gamma_k^tau_a phi(h a_k),   phi(z) = expm1(z) / z,

so a whole step costs one network evaluation and no sub-steps. `phi` switches to its series near 0 inside a
double `where`, so value and gradient stay finite for gamma -> 1 (the reference clamps |z| >= 1e-4 instead).

Layout: a policy's arrays are `[B, *tokens, K, C, P]` (means) and `[B, *tokens, K, 1, P]` (logits, log-rates),
P = pixels per token (Qwen-Image: the 2 x 2 patch, so the packed channel index is `c * 4 + p` as diffusers packs
latents), C = channels per pixel; `x` is `[B, *tokens, C * P]`. Times are per-sample `[B]` arrays.

Training (pi-ID, `policy_loss`): the data-free student runs its steps from pure noise; inside each segment it
visits `num_states` states on a mixed trajectory (sub-intervals rolled with the detached, component-dropped-out
policy, alternating with teacher Euler sub-steps whose share `r` decays 1 -> 0 over `decay_iters` iterations), and
at each state regresses the policy's average velocity over a short window (`window_substeps / total_substeps`
raw-time units, or over the teacher's sub-interval plus that window) onto the teacher's CFG velocity. The next
segment starts from the detached policy's analytic step: no gradient crosses steps. Loss per segment
`loss_scale * MSE`, total `sum_s w_s L_s` with `w_s` the raw segment length by default (the reference's weights).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from turbojax.distill.losses import shift_sigma, true_cfg

F32 = jnp.float32
PHI_SERIES = 0.05  # |z| below this: phi by its series (expm1(z)/z loses ~1e-7/|z| of its gradient to cancellation)


class Policy(NamedTuple):
    """One step's policy (a pytree): means `[B, *T, K, C, P]`, logits and log-rates `[B, *T, K, 1, P]` (log-rate
    of component 0 is 0). Logits need not be normalised: every use takes the softmax over K."""
    means: jax.Array
    logits: jax.Array
    log_rates: jax.Array

    @property
    def num_components(self) -> int:
        return self.means.shape[-3]


def phi(z: jax.Array) -> jax.Array:
    """`expm1(z) / z` with phi(0) = 1; finite value and gradient everywhere (double `where`: the unused branch
    never sees a 0 denominator, so its gradient cannot be NaN)."""
    z = jnp.asarray(z, F32)
    small = jnp.abs(z) < PHI_SERIES
    z_safe = jnp.where(small, 1.0, z)
    series = 1.0 + z * (0.5 + z * (1.0 / 6.0 + z * (1.0 / 24.0 + z * (1.0 / 120.0))))  # error < |z|^5 / 720
    return jnp.where(small, series, jnp.expm1(z_safe) / z_safe)


def _t(s, ref: jax.Array) -> jax.Array:
    """Per-sample times `[B]` shaped to broadcast against a policy array `[B, *T, K, 1, P]`."""
    return jnp.asarray(s, F32).reshape((-1,) + (1,) * (ref.ndim - 1))


def _mix(pol: Policy, factor: jax.Array) -> jax.Array:
    """`sum_k pi_k v_k factor_k` as `[B, *T, C * P]`."""
    w = jax.nn.softmax(pol.logits.astype(F32), axis=-3)
    y = jnp.sum(w * factor * pol.means.astype(F32), axis=-3)
    return y.reshape(*y.shape[:-2], -1)


def velocity(pol: Policy, sigma_src, sigma) -> jax.Array:
    """Instantaneous velocity `v(sigma)` of the policy made at `sigma_src`."""
    a = pol.log_rates.astype(F32)
    return _mix(pol, jnp.exp(a * _t(jnp.asarray(sigma_src, F32) - sigma, a)))


def mean_velocity(pol: Policy, sigma_src, sigma_a, sigma_b) -> jax.Array:
    """Average velocity over `[sigma_b, sigma_a]` = displacement / h, written without the division so that it is
    exact (the instantaneous velocity) as h -> 0."""
    a = pol.log_rates.astype(F32)
    tau = _t(jnp.asarray(sigma_src, F32) - sigma_a, a)
    h = _t(jnp.asarray(sigma_a, F32) - sigma_b, a)
    return _mix(pol, jnp.exp(a * tau) * phi(a * h))


def integrate(pol: Policy, sigma_src, x_a, sigma_a, sigma_b) -> jax.Array:
    """The state at `sigma_b` of the policy's ODE started from `x_a` at `sigma_a` (closed form, any direction)."""
    h = jnp.asarray(sigma_a, F32) - sigma_b
    return x_a.astype(F32) - h.reshape((-1,) + (1,) * (x_a.ndim - 1)) * mean_velocity(pol, sigma_src, sigma_a,
                                                                                         sigma_b)


def dropout(pol: Policy, key: jax.Array, p: float) -> Policy:
    """Drop each component of each sample with probability `p` (never all of them): the reference's "GM dropout"
    of the rollout policy, which keeps the imitation states off the policy's single most likely path."""
    if p <= 0.0:
        return pol
    k = pol.num_components
    shape = (pol.logits.shape[0],) + (1,) * (pol.logits.ndim - 4) + (k, 1, 1)
    drop = jax.random.uniform(key, shape) < p
    drop = drop & ~jnp.all(drop, axis=-3, keepdims=True)
    return pol._replace(logits=jnp.where(drop, -1e30, pol.logits.astype(F32)))


# --------------------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------------------

def sample(policy_fn: Callable, x_T: jax.Array, sigmas: Sequence[float]) -> jax.Array:
    """One NFE per interval of `sigmas` (ending at 0): `policy_fn(x, sigma [B]) -> Policy`, then the analytic
    step to the next sigma. 2 NFE: `[1, 0.75, 0]`; any longer list works the same way (e.g. 4 NFE)."""
    sigmas = [float(s) for s in sigmas]
    if sigmas[-1] != 0.0:
        sigmas = sigmas + [0.0]
    b = x_T.shape[0]
    x = x_T.astype(F32)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sig = jnp.full((b,), s, F32)
        x = integrate(policy_fn(x, sig), sig, x, sig, jnp.full((b,), s_next, F32))
    return x


def unshift(sigma: float, shift: float) -> float:
    """Raw time of a shifted sigma (inverse of `shift_sigma`)."""
    return sigma / (shift - (shift - 1.0) * sigma)


# --------------------------------------------------------------------------------------------------------------
# Policy imitation
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ArcFlowSettings:
    sigmas: tuple[float, ...]          # the student's sigma list without the final 0, e.g. (1.0, 0.75)
    shift: float = 3.0                 # raw time -> sigma warp the list was made with (intermediate states too)
    guidance: float = 4.0              # teacher CFG (Qwen true CFG against the negative prompt)
    cfg_rescale: bool = False          # rescale the CFG velocity per token to the conditional norm
    num_states: int = 4                # intermediate states per segment
    window_substeps: int = 3           # averaging window, in substeps of 1 / total_substeps raw time
    total_substeps: int = 128
    decay_iters: int = 1000            # teacher share of the trajectory: 1 -> 0 linearly over these iterations
    dropout: float = 0.1               # component dropout of the rollout policy
    loss_scale: float = 30.0
    segment_weights: tuple[float, ...] = ()  # per segment; empty: the raw segment lengths

    @property
    def raw(self) -> tuple[float, ...]:
        return tuple(unshift(float(s), self.shift) for s in self.sigmas) + (0.0,)

    @property
    def weights(self) -> tuple[float, ...]:
        if self.segment_weights:
            if len(self.segment_weights) != len(self.sigmas):
                raise ValueError(f"arcflow.segment_weights has {len(self.segment_weights)} entries for "
                                 f"{len(self.sigmas)} student steps")
            return tuple(float(w) for w in self.segment_weights)
        r = self.raw
        return tuple(r[i] - r[i + 1] for i in range(len(self.sigmas)))

    def window(self, segment: float) -> float:
        """Window length in raw time: `window_substeps` substeps of the segment split into ~`total_substeps` per
        unit (the reference's rounding)."""
        n = max(1, round(segment * self.total_substeps))
        return min(self.window_substeps * segment / n, segment)

    def check(self) -> "ArcFlowSettings":
        s = list(self.sigmas)
        if not s or any(not 0.0 < a <= 1.0 for a in s) or any(a <= b for a, b in zip(s, s[1:])):
            raise ValueError(f"student.sigmas {tuple(s)} must decrease within (0, 1] (the final 0 is implied)")
        if self.num_states < 1:
            raise ValueError(f"arcflow.num_states must be >= 1, got {self.num_states}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"arcflow.dropout must lie in [0, 1), got {self.dropout}")
        self.weights  # noqa: B018 (raises on a bad length)
        return self


def teacher_ratio(iteration, decay_iters: int) -> jax.Array:
    """Teacher share of the imitation trajectory: 1 at iteration 0, 0 from `decay_iters` on (0 if no decay)."""
    if decay_iters <= 0:
        return jnp.zeros((), F32)
    it = jnp.asarray(iteration, F32)
    return 1.0 - jnp.minimum(it, decay_iters) / decay_iters


def teacher_cfg_velocity(velocity_fn: Callable, x, sigma, cond, neg, guidance: float, rescale: bool):
    """Teacher velocity with true CFG (one batched pass for both halves); CFG <= 1 or no negative: cond only."""
    if guidance <= 1.0 or neg is None:
        return velocity_fn(x, sigma, cond)
    both = velocity_fn(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                       jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, neg))
    v_c, v_u = jnp.split(both, 2)
    return true_cfg(v_c, v_u, guidance, rescale)


def segment_loss(pol: Policy, pol_rollout: Policy, teacher_fn: Callable, x_src, step: int, ratio, key,
                 s: ArcFlowSettings):
    """pi-ID on student step `step` (0-based): (mean squared velocity error over the states, the detached state at
    the segment end). `pol` carries the gradient; `pol_rollout` (detached, dropped out) rolls the trajectory;
    `teacher_fn(x, sigma) -> v` is the teacher's CFG velocity."""
    raw_src, raw_dst = s.raw[step], s.raw[step + 1]
    sigmas = tuple(float(x) for x in s.sigmas) + (0.0,)
    b = x_src.shape[0]
    n = s.num_states
    seg = raw_src - raw_dst
    window = s.window(seg)
    span = seg - window
    k_s, k_t = jax.random.split(key)
    # where the student rolls (sorted cuts of (1 - r) span) and the teacher's sub-steps (r span, split in n)
    cuts = jnp.sort(jax.random.uniform(k_s, (b, n), F32) * ((1.0 - ratio) * span), axis=-1)
    student_iv = jnp.diff(cuts, axis=-1, prepend=jnp.zeros((b, 1), F32))
    tcuts = jnp.sort(jax.random.uniform(k_t, (b, n - 1), F32), axis=-1)
    teacher_iv = jnp.diff(tcuts, axis=-1, prepend=jnp.zeros((b, 1), F32), append=jnp.ones((b, 1), F32))
    teacher_iv = teacher_iv * (ratio * span)

    def warp(r):
        return shift_sigma(jnp.maximum(r, 0.0), s.shift)

    sig_src = jnp.full((b,), sigmas[step], F32)
    x = jax.lax.stop_gradient(x_src.astype(F32))
    r, sig = jnp.full((b,), raw_src, F32), sig_src
    errs = []
    for j in range(n):
        r_a = jnp.maximum(r - student_iv[:, j], 0.0)
        r_b = jnp.maximum(r_a - teacher_iv[:, j], 0.0)
        sig_a = warp(r_a)
        x_a = jax.lax.stop_gradient(integrate(pol_rollout, sig_src, x, sig, sig_a))
        target = jax.lax.stop_gradient(teacher_fn(x_a, sig_a))
        pred = mean_velocity(pol, sig_src, sig_a, warp(r_b - window))
        errs.append(jnp.mean(jnp.square(pred - target)))
        sig_b = warp(r_b)
        x = x_a + (sig_b - sig_a).reshape((-1,) + (1,) * (x.ndim - 1)) * target  # the teacher's Euler sub-step
        r, sig = r_b, sig_b
    x_dst = integrate(pol_rollout, sig_src, x, sig, jnp.full((b,), sigmas[step + 1], F32))
    return jnp.mean(jnp.stack(errs)), jax.lax.stop_gradient(x_dst)


def policy_loss(student_fn: Callable, teacher_fn: Callable, latent_shape: Sequence[int], s: ArcFlowSettings):
    """The engine loss `(trainable, others, frozen, batch, key) -> (loss, metrics)`.

    `student_fn(trainable, frozen, x, sigma, cond) -> Policy` (gradient w.r.t. `trainable`);
    `teacher_fn(frozen, x, sigma, cond) -> v` (the plain teacher; CFG is applied here). The batch gives `ctx`
    (+ `mask`), `neg_ctx` (+ `neg_mask`) for CFG, and `iteration` for the teacher-share schedule (absent: 0 share,
    fully on-policy)."""
    s.check()
    weights = s.weights

    def loss_fn(trainable, others, frozen, batch, key):
        cond = {"ctx": batch["ctx"], "mask": batch.get("mask")}
        neg = {"ctx": batch["neg_ctx"], "mask": batch.get("neg_mask")} if "neg_ctx" in batch else None
        ratio = teacher_ratio(batch["iteration"], s.decay_iters) if "iteration" in batch else jnp.zeros((), F32)
        b = batch["ctx"].shape[0]
        k_noise, key = jax.random.split(key)
        x = jax.random.normal(k_noise, (b, *latent_shape), F32)

        def teacher(x_t, sig):
            return teacher_cfg_velocity(lambda xx, ss, cc: teacher_fn(frozen, xx, ss, cc), x_t, sig, cond, neg,
                                        s.guidance, s.cfg_rescale)

        total = jnp.zeros((), F32)
        metrics = {"teacher_ratio": ratio}
        for i in range(len(s.sigmas)):
            k_seg, k_drop = jax.random.split(jax.random.fold_in(key, i))
            sig = jnp.full((b,), float(s.sigmas[i]), F32)
            pol = student_fn(trainable, frozen, x, sig, cond)
            rollout = dropout(jax.lax.stop_gradient(pol), k_drop, s.dropout)
            mse, x = segment_loss(pol, rollout, teacher, x, i, ratio, k_seg, s)
            total = total + weights[i] * s.loss_scale * mse
            metrics[f"mse{i + 1}"] = mse
        return total, metrics

    return loss_fn
