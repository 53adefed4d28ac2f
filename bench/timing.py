"""Best-of timing shared by the benches (`gemm_floor.py`, `vae_floor.py`, `train_step.py`): two untimed calls
(compile, warm caches), then the fastest of `iters` runs. The best run is the figure least disturbed by other work
on a shared host."""
from __future__ import annotations

import time


def best_ms(fn, iters: int) -> float:
    """Fastest of `iters` timed calls of `fn` (which must block until its result is ready), in milliseconds."""
    fn()
    fn()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3
