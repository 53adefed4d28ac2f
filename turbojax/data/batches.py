"""Training batches for distillation from in-memory arrays, deterministic from (seed, stream, step).

The engine asks for a batch of a stream ("generator", "critic": DMD2 draws separate prompts for its two turns) at
a step; the answer depends only on (seed, stream, step), so the position of the iterator is the step number stored
in the checkpoint, and a resumed run reads exactly the batches the straight run read. The caches of the data issue
(text embeddings, image latents, teacher samples on disk, read with grain) implement the same `batch(stream, step)`.

A batch is a dict of arrays: `ctx [B, L, D]`, `mask [B, L]`, optional `neg_ctx` / `neg_mask` (the negative prompt
for the teacher's CFG), `real` (the discriminator's reals: per sample, a real-image latent of the same prompt with
probability `real_mix`, else a teacher sample of it) and `prompt` (the prompt index).

On a multi-host run each host reads only its rows of the global batch: with `process_index` h of `process_count` H
(`turbojax.distributed.host_rows` gives them for the mesh) `batch` returns rows [h * B/H, (h+1) * B/H) of exactly the
global batch a single process would draw (every random choice is made for the whole batch, only the host's rows are
gathered), so the data order does not depend on the number of hosts.
"""
from __future__ import annotations

import zlib
from typing import Mapping

import numpy as np

STREAMS = ("generator", "critic", "sample")


class PromptBatches:
    def __init__(self, ctx: np.ndarray, mask: np.ndarray, *, batch_size: int, seed: int = 0,
                 neg_ctx: np.ndarray | None = None, neg_mask: np.ndarray | None = None,
                 reals: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None, real_mix: float = 0.0,
                 process_index: int = 0, process_count: int = 1):
        """`ctx [P, L, D]` / `mask [P, L]`: one row per prompt. `neg_ctx [1 or P, L, D]`. `reals` maps a pool
        name ("real", "teacher") to (latents [M, ...], prompt index [M]); `real_mix` is the share of "real".
        `process_index` / `process_count`: this host's rows of every global batch (see the module docstring)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(ctx) == 0:
            raise ValueError("no prompts to train on")
        if not 0.0 <= real_mix <= 1.0:
            raise ValueError(f"real_mix must lie in [0, 1], got {real_mix}")
        self.ctx, self.mask = np.asarray(ctx, np.float32), np.asarray(mask, np.float32)
        self.neg_ctx = None if neg_ctx is None else np.asarray(neg_ctx, np.float32)
        self.neg_mask = None if neg_mask is None else np.asarray(neg_mask, np.float32)
        if self.neg_ctx is not None:
            if self.neg_mask is None:
                self.neg_mask = np.ones(self.neg_ctx.shape[:2], np.float32)
            # one length for prompts and negatives, so the teacher's CFG runs both halves in one batched pass
            n = max(self.ctx.shape[1], self.neg_ctx.shape[1])
            self.ctx, self.mask = _pad_len(self.ctx, n), _pad_len(self.mask, n)
            self.neg_ctx, self.neg_mask = _pad_len(self.neg_ctx, n), _pad_len(self.neg_mask, n)
        self.batch_size, self.seed, self.real_mix = int(batch_size), int(seed), float(real_mix)
        self.set_host(process_index, process_count)
        self.pools = {}
        for name, (lat, ids) in (reals or {}).items():
            lat, ids = np.asarray(lat, np.float32), np.asarray(ids, np.int64)
            if len(lat) != len(ids):
                raise ValueError(f"pool {name}: {len(lat)} latents but {len(ids)} prompt indices")
            if len(lat):
                self.pools[name] = (lat, {int(p): np.flatnonzero(ids == p) for p in np.unique(ids)})
        if self.pools:
            want = [n for n, share in (("real", self.real_mix), ("teacher", 1.0 - self.real_mix)) if share > 0]
            missing = [n for n in want if n not in self.pools]
            if missing:
                raise ValueError(f"the discriminator's reals need the pool(s) {missing} (real_mix={real_mix})")

    def set_host(self, process_index: int, process_count: int) -> "PromptBatches":
        """Read rows [process_index * B/process_count, ...) of every global batch from now on (train.py sets it
        from the mesh after the batches are built)."""
        h, n = int(process_index), int(process_count)
        if n < 1 or not 0 <= h < n or self.batch_size % n:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of the {n} hosts (host {h})")
        k = self.batch_size // n
        self.rows = slice(h * k, (h + 1) * k)
        return self

    @property
    def num_prompts(self) -> int:
        return len(self.ctx)

    def _rng(self, stream: str, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(stream.encode()), int(step)])

    def _real(self, rng, prompt: int) -> tuple[str, int]:
        """(pool, sample index) of one row's real; draws from `rng` for every row, so the stream of choices (and
        the rows of every host) is the single-process one."""
        name = "real" if ("real" in self.pools and rng.random() < self.real_mix) or "teacher" not in self.pools \
            else "teacher"
        lat, by_prompt = self.pools[name]
        idx = by_prompt.get(prompt)
        if idx is None:  # no sample of this prompt in the pool: any sample
            idx = np.arange(len(lat))
        return name, int(rng.choice(idx))

    def batch(self, stream: str, step: int) -> dict[str, np.ndarray]:
        """This host's rows (all rows on one host) of the global batch of `stream` at `step`."""
        rng = self._rng(stream, step)
        all_ids = rng.integers(0, self.num_prompts, self.batch_size)
        picks = [self._real(rng, int(p)) for p in all_ids] if self.pools else None
        ids = all_ids[self.rows]
        out = {"ctx": self.ctx[ids], "mask": self.mask[ids], "prompt": ids}
        if self.neg_ctx is not None:
            neg_ids = ids if len(self.neg_ctx) == len(self.ctx) else np.zeros_like(ids)
            out["neg_ctx"] = self.neg_ctx[neg_ids]
            out["neg_mask"] = self.neg_mask[neg_ids]
        if picks is not None:
            out["real"] = np.stack([self.pools[name][0][i] for name, i in picks[self.rows]])
        return out


def _pad_len(x: np.ndarray, n: int) -> np.ndarray:
    """Zero-pad axis 1 to length n (padded text tokens are masked out)."""
    return x if x.shape[1] == n else np.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
