"""Guards of a training loop: never keep training on (or save) a non-finite state; stop cleanly on SIGTERM.

    class NonFiniteError(UserError)             .step, .metric, .value; message names the step and the metric
    check_finite(metrics, step) -> None         raise NonFiniteError for the first NaN/Inf host value in `metrics`
    class MetricsBuffer                          device metrics of the steps since the last flush
        push(step, metrics)                      keep the (device) metrics of `step`: no host sync
        flush() -> list[(step, {name: float})]   ONE host transfer for all buffered steps, checked in step order:
                                                 raises NonFiniteError for the first bad step
        pending -> int                           steps buffered
    class StopSignal(signals=(SIGTERM,))         context manager: the signal sets `.requested` (and `.signame`)
                                                 instead of killing the process; previous handlers come back on exit

Loop pattern (train.py): `push` every step; `flush` only when the host needs values: at log steps, and always
before a checkpoint is saved (a checkpoint must never hold the state produced by a bad step: with metrics of step s
computed from the update that produced state s, a finite flush up to s clears state s for saving). Steps between
flushes are not synchronised, and the first bad step is still named exactly. Put the global gradient norm among the
metrics so NaN/Inf gradients are caught even when the loss is finite.
"""
from __future__ import annotations

import math
import signal
from typing import Mapping

from turbojax.training.errors import UserError


class NonFiniteError(UserError):
    """Training produced NaN/Inf: the run stops without saving that state."""

    def __init__(self, step: int, metric: str, value: float):
        self.step, self.metric, self.value = step, metric, value
        super().__init__(f"step {step}: {metric} is {value} (not finite); training stopped without saving this "
                         f"state, the last checkpoint is intact. Lower the learning rate (or fix the config) and "
                         f"rerun to resume from it")


def _scalars(metrics: Mapping[str, object]):
    for name, v in metrics.items():
        try:
            yield name, float(v)
        except (TypeError, ValueError):  # non-scalar entries (e.g. a histogram) are not checked
            continue


def check_finite(metrics: Mapping[str, object], step: int) -> None:
    """Raise NonFiniteError naming `step` and the first metric (in key order) that is NaN or Inf."""
    for name, v in _scalars(metrics):
        if not math.isfinite(v):
            raise NonFiniteError(step, name, v)


class MetricsBuffer:
    """Metrics of the steps since the last flush, held as device arrays until the host needs them."""

    def __init__(self):
        self._items: list[tuple[int, Mapping]] = []

    def push(self, step: int, metrics: Mapping) -> None:
        self._items.append((int(step), metrics))

    @property
    def pending(self) -> int:
        return len(self._items)

    def flush(self) -> list[tuple[int, dict[str, float]]]:
        """Host values of every buffered step (one transfer), checked in order; the buffer is emptied either way."""
        import jax  # only here: keeps this module importable without JAX
        items, self._items = self._items, []
        host = jax.device_get([m for _, m in items])
        out = []
        for (step, device), m in zip(items, host):
            m = dict(_scalars({k: m[k] for k in device}))  # the caller's key order (device_get sorts dict keys)
            check_finite(m, step)
            out.append((step, m))
        return out


class StopSignal:
    """`with StopSignal() as stop: ... if stop.requested: save, exit 0` - SIGTERM (what `timeout`, Slurm and
    Kubernetes send) becomes a flag the loop polls between steps instead of killing the process mid-save."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self.signame: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.requested = True
        self.signame = signal.Signals(signum).name

    def __enter__(self) -> "StopSignal":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
