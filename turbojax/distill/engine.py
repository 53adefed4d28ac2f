"""The distillation engine: optimiser turns assembled from pure losses, each one jitted pure step.

A method (DMD2 + GAN, and PCM, ArcFlow, Turbo++ on the same engine) is a list of `Turn`s. A turn names the trainable
groups it updates and the loss `(trainable, others, frozen, batch, key) -> (loss, metrics)` it minimises; `every`
makes the two-time-scale schedule (DMD2's TTUR: the critic every iteration, the generator every r-th). The state is
a plain pytree, trainables only (levanter style: the frozen base is an argument, never differentiated, never
checkpointed):

    {"params": {group: pytree}, "opt": {turn: optax state}, "ema": {group: pytree}}

Every step is `step(state, frozen, batch, key) -> (new_state, metrics)`, jitted with the state donated; metrics
carry the loss and the global gradient norm of the turn so the loop can stop on the first non-finite value.

On a mesh, `Engine(..., shardings=sharded.plan(mesh, ...))` jits every step with explicit in/out shardings (state
and frozen as planned, batches over data x fsdp, key and metrics replicated) and builds the initial state sharded;
without `shardings` the steps are plain jits (tests, the toy, one device).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Turn:
    name: str
    groups: tuple[str, ...]
    loss: Callable
    every: int = 1           # runs at iterations i with i % every == 0
    ema: tuple[str, ...] = ()  # groups whose EMA is updated after this turn


SCHEDULES = ("constant", "cosine", "linear", "wsd")


@dataclasses.dataclass(frozen=True)
class GroupOpt:
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    schedule: str = "constant"  # after the warm-up: constant, or decayed to 0 at `updates` (cosine, linear, wsd)
    updates: int = 0            # the group's optimiser updates in the whole run (its turn's share of the steps)
    decay_updates: int = 0      # wsd: the last `decay_updates` updates decay linearly to 0 (the rest stay constant)

    def learning_rate(self):
        """The LR as an optax schedule of the group's update count (part of the optimiser state, so a resumed run
        continues the schedule exactly)."""
        if self.schedule not in SCHEDULES:
            raise ValueError(f"opt.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        w = int(self.warmup_steps)
        if self.schedule == "constant":
            return optax.warmup_constant_schedule(0.0, self.lr, w) if w else self.lr
        n = max(int(self.updates) - w, 1)
        if self.schedule == "wsd":
            # warm-up, stable, decay: a run can be continued (more steps, the same constant LR) until its last
            # `decay_updates`, and averaging the iterates by annealing happens only at the end.
            if int(self.decay_updates) <= 0:
                raise ValueError("opt.schedule wsd needs opt.decay_steps > 0 (the steps the LR decays over at the "
                                 "run's end)")
            d = min(int(self.decay_updates), n)  # a run shorter than its decay decays all along
            decay = optax.join_schedules([optax.constant_schedule(self.lr), optax.linear_schedule(self.lr, 0.0, d)],
                                         [n - d])
        elif self.schedule == "cosine":
            decay = optax.cosine_decay_schedule(self.lr, n)
        else:
            decay = optax.linear_schedule(self.lr, 0.0, n)
        return optax.join_schedules([optax.linear_schedule(0.0, self.lr, w), decay], [w]) if w else decay


def make_tx(groups: Mapping[str, GroupOpt], clip: float) -> optax.GradientTransformation:
    """AdamW per group (own LR, warm-up, weight decay) after one global-norm clip over the turn's gradients."""
    def adamw(o: GroupOpt):
        return optax.adamw(o.learning_rate(), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)

    inner = optax.multi_transform({g: adamw(o) for g, o in groups.items()},
                                  lambda params: {g: jax.tree.map(lambda _: g, params[g]) for g in params})
    return optax.chain(optax.clip_by_global_norm(clip), inner) if clip and clip > 0 else inner


def init_state(params: Mapping, turns: Sequence[Turn], txs: Mapping[str, optax.GradientTransformation]) -> dict:
    ema_groups = sorted({g for t in turns for g in t.ema})
    return {"params": dict(params),
            "opt": {t.name: txs[t.name].init({g: params[g] for g in t.groups}) for t in turns},
            "ema": {g: jax.tree.map(jnp.array, params[g]) for g in ema_groups}}


def make_step(turn: Turn, tx: optax.GradientTransformation, ema_decay: float = 0.0, *, donate: bool = True,
              shardings=None):
    """The jitted pure step of one turn; with `shardings` (a `sharded.StepShardings`) jitted with explicit in/out
    shardings, one executable per batch layout (the turns' batches differ in keys: `real` for the critic)."""
    def step(state, frozen, batch, key):
        params = state["params"]
        trainable = {g: params[g] for g in turn.groups}
        others = jax.lax.stop_gradient({g: v for g, v in params.items() if g not in turn.groups})
        (loss, metrics), grads = jax.value_and_grad(turn.loss, has_aux=True)(trainable, others, frozen, batch, key)
        updates, opt = tx.update(grads, state["opt"][turn.name], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        ema = dict(state["ema"])
        for g in turn.ema:
            ema[g] = jax.tree.map(lambda e, p: (ema_decay * e + (1.0 - ema_decay) * p).astype(e.dtype),
                                  ema[g], new_trainable[g])
        new_state = {"params": {**params, **new_trainable}, "opt": {**state["opt"], turn.name: opt}, "ema": ema}
        metrics = {f"{turn.name}/{k}": v for k, v in metrics.items()}
        metrics[f"{turn.name}/loss"] = loss
        metrics[f"{turn.name}/grad_norm"] = optax.global_norm(grads)
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if shardings is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    return _ShardedStep(step, shardings, donate_argnums)


class _ShardedStep:
    """`step` jitted per batch tree (keys, ranks): in_shardings (state, frozen, batch, replicated key), out_shardings
    (state, replicated metrics). The batch is placed here, so callers may pass host arrays."""

    def __init__(self, step, shardings, donate_argnums):
        self.step, self.shardings, self.donate_argnums = step, shardings, donate_argnums
        self._jitted = {}

    def __call__(self, state, frozen, batch, key):
        sh = self.shardings
        bsh = sh.batch(batch)
        sig = (jax.tree.structure(batch), tuple(jnp.ndim(x) for x in jax.tree.leaves(batch)))
        fn = self._jitted.get(sig)
        if fn is None:
            fn = self._jitted[sig] = jax.jit(
                self.step, in_shardings=(sh.state, sh.frozen, bsh, sh.replicated),
                out_shardings=(sh.state, sh.replicated), donate_argnums=self.donate_argnums)
        # traced under the mesh: the models' activation constraints and splash attention's shard_map need it
        with jax.set_mesh(sh.mesh):
            return fn(state, frozen, jax.device_put(batch, bsh), key)


def turn_key(seed: int, iteration: int, turn_index: int) -> jax.Array:
    """Keys depend only on (seed, iteration, turn), so a resumed run draws exactly what the straight run drew."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), iteration), turn_index)


class Engine:
    """The turns of a method with their optimisers and jitted steps; `iteration` runs the turns due at step i."""

    def __init__(self, turns: Sequence[Turn], txs: Mapping[str, optax.GradientTransformation],
                 ema_decay: float = 0.0, seed: int = 0, shardings=None,
                 bucket_turns: Mapping[str, Sequence[Turn]] | None = None):
        """`shardings`: a `sharded.StepShardings` (`sharded.plan(mesh, turns, txs, params, frozen)`) to run on a
        mesh; the frozen argument must then be placed with `shardings.put_frozen` (committed arrays elsewhere are
        refused by the jitted steps). `bucket_turns`: aspect-ratio buckets, {"WxH": the same turns (names, groups,
        schedule) with losses built for that bucket's latent shape}; a batch that names its bucket (`"bucket"`)
        runs that bucket's step, on the one shared state."""
        names = [t.name for t in turns]
        if len(set(names)) != len(names):
            raise ValueError(f"turn names must be unique, got {names}")
        self.turns, self.txs, self.seed, self.shardings = tuple(turns), dict(txs), seed, shardings
        self.steps = {t.name: make_step(t, self.txs[t.name], ema_decay, shardings=shardings) for t in turns}
        self.bucket_steps = {}
        for b, bturns in (bucket_turns or {}).items():
            sig = [(t.name, t.groups, t.every, t.ema) for t in bturns]
            if sig != [(t.name, t.groups, t.every, t.ema) for t in turns]:
                raise ValueError(f"bucket {b}: its turns {sig} differ from the method's; only the losses may")
            self.bucket_steps[b] = {t.name: make_step(t, self.txs[t.name], ema_decay, shardings=shardings)
                                    for t in bturns}

    def init_state(self, params: Mapping) -> dict:
        """The initial state; on a mesh it is born sharded (the params are moved onto their shardings first, from
        wherever they are)."""
        if self.shardings is None:
            return init_state(params, self.turns, self.txs)
        from turbojax.distributed import put
        sh = self.shardings
        params = put(dict(params), sh.params)  # also from arrays committed to one device of a multi-host run
        return jax.jit(lambda p: init_state(p, self.turns, self.txs), in_shardings=(sh.params,),
                       out_shardings=sh.state)(params)

    def due(self, iteration: int) -> list[tuple[int, Turn]]:
        return [(i, t) for i, t in enumerate(self.turns) if iteration % t.every == 0]

    def iteration(self, state, frozen, batches: Callable[[str], dict], it: int):
        """Run the turns due at iteration `it`; `batches(turn_name)` gives each turn its batch (DMD2 uses separate
        prompt streams for the generator and the critic). Returns (state, metrics of the turns that ran)."""
        metrics = {}
        for i, turn in self.due(it):
            batch = dict(batches(turn.name))
            bucket = batch.pop("bucket", None)
            if bucket is None:
                step = self.steps[turn.name]
            elif bucket in self.bucket_steps:
                step = self.bucket_steps[bucket][turn.name]
            else:
                raise ValueError(f"batch of bucket {bucket!r}, but the engine's buckets are "
                                 f"{sorted(self.bucket_steps)}")
            state, m = step(state, frozen, batch, turn_key(self.seed, it, i))
            metrics.update(m)
        return state, metrics
