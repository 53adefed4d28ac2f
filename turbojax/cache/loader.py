"""Training batches read from the caches with grain, deterministic from (seed, stream, step).

Same contract as `turbojax.data.batches.PromptBatches` (`batch(stream, step)` -> `ctx`, `mask`, `neg_ctx`,
`neg_mask`, `real`, `prompt`), so the engine and the checkpoints do not change: the iterator state is the step
number already in the checkpoint, and a resumed run reads exactly the batches of a straight run.

Order. Prompts are grouped in length buckets (Qwen-Image: lengths rounded up to `bucket` tokens, the rest masked;
Z-Image: exact lengths, because its caption pads are learned, attended tokens and padding would change its output).
An epoch of a stream is a fixed number of batches: each bucket shuffled (seeded by seed, stream, epoch) and cut into
batches of `batch_size` (the last one filled up with random members of its bucket), so every prompt is seen once per
epoch and every batch has one caption length. Which batch comes at a step is grain's `IndexSampler` (a seeded
shuffle of the epoch's batches, reshuffled every epoch); epoch = step // batches per epoch.

Aspect-ratio buckets (`data.buckets`): the reals come from per-bucket caches; the bucket of a batch is drawn from
(seed, stream, step) in proportion to the bucket's reals (`turbojax.data.buckets.pick`), the batch says which
(`bucket`: "WxH") and its `real` rows come from that bucket's pools. The prompts do not depend on the bucket.

Each host reads only its slice of every global batch (`process_index`, `process_count`): rows
`[h * B/H, (h+1) * B/H)`. The prompt embeddings are read through a grain `MapDataset` over the memory-mapped shards.

Z-Image's negative prompt: the teacher's CFG runs prompts and negatives in one batched pass, so a batch is as long
as its longer side; a negative longer than the bucket pads the prompts of that batch (as the start-up path does).
"""
from __future__ import annotations

import functools
import zlib
from pathlib import Path

import numpy as np

from turbojax.cache.records import LatentRecords, TextRecords


class CacheBatches:
    def __init__(self, text_folder, *, batch_size: int, seed: int = 0, teacher_folder=None, latents_folder=None,
                 real_mix: float = 0.0, bucket: int = 64, process_index: int = 0, process_count: int = 1,
                 image_buckets: dict[str, dict] | None = None):
        """`image_buckets`: aspect-ratio buckets {"WxH": {"teacher": folder, "latents": folder}} (either may be
        absent) instead of `teacher_folder` / `latents_folder`; every batch then names its bucket (`"bucket"`)."""
        import grain
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of the {process_count} hosts")
        if not 0.0 <= real_mix <= 1.0:
            raise ValueError(f"real_mix must lie in [0, 1], got {real_mix}")
        self.text = TextRecords(text_folder)
        self.family = self.text.family
        self.batch_size, self.seed, self.real_mix = int(batch_size), int(seed), float(real_mix)
        self.host, self.hosts = int(process_index), int(process_count)
        self.bucket = int(bucket) if self.family == "qwen_image" else 1
        self._emb = grain.MapDataset.source(self.text).map(lambda e: np.asarray(e, np.float32))
        lens = self.text.prompts.lengths
        # rounding never goes past the longest record: a short max_sequence_length makes one bucket, not padding
        self.longest = int(max(lens.max(), self.text.negatives.lengths.max()))
        self.bucket_of = self._round(lens)
        self.buckets = {int(b): np.flatnonzero(self.bucket_of == b) for b in np.unique(self.bucket_of)}
        self.batches_per_epoch = sum(-(-len(m) // self.batch_size) for m in self.buckets.values())
        if image_buckets is not None and (teacher_folder is not None or latents_folder is not None):
            raise ValueError("give the reals' folders per bucket (image_buckets) or once, not both")
        folders = image_buckets if image_buckets is not None else \
            {"": {"teacher": teacher_folder, "latents": latents_folder}}
        if not folders:
            raise ValueError("image_buckets: no bucket")
        self.bucket_names = [b for b in folders if b]  # [] without buckets
        self.bucket_pools = {b: self._pools(f) for b, f in folders.items()}
        want = [n for n, share in (("real", self.real_mix), ("teacher", 1.0 - self.real_mix)) if share > 0]
        have = {n for p in self.bucket_pools.values() for n in p}
        if have and any(n not in have for n in want):
            raise ValueError(f"the discriminator's reals need the pool(s) {[n for n in want if n not in have]}"
                             f" (real_mix={real_mix})")
        # a step's bucket is drawn in proportion to its reals (each real seen about equally often); buckets without
        # reals are never drawn when others have some; without any reals (no GAN) the buckets are equally likely
        sizes = [sum(len(r) for n, (r, _) in self.bucket_pools[b].items() if n in want) for b in folders]
        if not any(sizes):
            sizes = [sum(len(r) for r, _ in self.bucket_pools[b].values()) for b in folders]
        self.bucket_weights = sizes if any(sizes) else [1] * len(sizes)
        neg_max = int(self._round(self.text.negatives.lengths).max())
        self.cap_len = max(int(self.bucket_of.max()), neg_max)  # the longest batch any step can return

    @staticmethod
    def _pools(folders: dict) -> dict:
        pools = {}
        for name, kind in (("teacher", "teacher"), ("real", "latents")):
            folder = folders.get(kind)
            if folder is not None:
                recs = LatentRecords(folder, kind, "teacher" if kind == "teacher" else "real")
                if len(recs):
                    by = {int(p): np.flatnonzero(recs.prompt == p) for p in np.unique(recs.prompt) if p >= 0}
                    pools[name] = (recs, by)
        return pools

    @property
    def pools(self) -> dict:
        """The reals of the one resolution (no buckets)."""
        return self.bucket_pools.get("", {})

    def image_bucket(self, stream: str, step: int) -> str:
        """The aspect-ratio bucket ("WxH") of `stream`'s batch at `step`; "" without buckets."""
        if not self.bucket_names:
            return ""
        from turbojax.data import buckets
        return self.bucket_names[buckets.pick(self.seed, stream, step, self.bucket_weights)]

    def _round(self, lens):
        b = self.bucket
        lens = np.asarray(lens, np.int64)
        return np.minimum(-(-lens // b) * b, self.longest) if b > 1 else lens

    @property
    def num_prompts(self) -> int:
        return self.text.num_prompts

    def _stream_seed(self, stream: str) -> int:
        return (self.seed * 1_000_003 + zlib.crc32(stream.encode())) % (2 ** 31 - 1)

    @functools.lru_cache(maxsize=8)
    def _plan(self, stream: str, epoch: int) -> np.ndarray:
        """`[batches_per_epoch, batch_size]` prompt ids of one epoch, bucket by bucket (the sampler shuffles)."""
        rng = np.random.default_rng([self.seed, zlib.crc32(stream.encode()), int(epoch)])
        rows = []
        for b in sorted(self.buckets):
            m = rng.permutation(self.buckets[b])
            n = -(-len(m) // self.batch_size) * self.batch_size
            m = np.concatenate([m, rng.choice(self.buckets[b], n - len(m))])
            rows.append(m.reshape(-1, self.batch_size))
        return np.concatenate(rows)

    @functools.lru_cache(maxsize=8)
    def _sampler(self, stream: str):
        import grain.python as gp
        return gp.IndexSampler(num_records=self.batches_per_epoch, shard_options=gp.NoSharding(), shuffle=True,
                               num_epochs=None, seed=self._stream_seed(stream))

    def global_ids(self, stream: str, step: int) -> np.ndarray:
        """The prompt ids of the whole (all hosts) batch of `stream` at `step`."""
        meta = self._sampler(stream)[int(step)]
        return self._plan(stream, int(step) // self.batches_per_epoch)[meta.record_key]

    def _pad(self, rows, n: int):
        out = np.zeros((len(rows), n, self.text.dim), np.float32)
        mask = np.zeros((len(rows), n), np.float32)
        for i, r in enumerate(rows):
            out[i, :len(r)], mask[i, :len(r)] = r, 1.0
        if self.family == "z_image":  # no caption mask: every column is a caption token (see the docstring)
            mask[:] = 1.0
        return out, mask

    def _real(self, rng, prompt: int, pools: dict):
        """One row's real from the batch's bucket: the prompt's own sample when the pool has one, else any."""
        name = "real" if ("real" in pools and rng.random() < self.real_mix) or "teacher" not in pools \
            else "teacher"
        recs, by_prompt = pools[name]
        idx = by_prompt.get(prompt)
        return recs[rng.choice(idx) if idx is not None else rng.integers(len(recs))]

    def batch(self, stream: str, step: int) -> dict[str, np.ndarray]:
        """This host's rows of the global batch. Everything that shapes or draws the batch is decided from the
        global batch (its padded length from the records' lengths; one random stream per global row for the
        reals), so every host builds the same shapes and the rows equal a one-process run's."""
        all_ids = self.global_ids(stream, step)
        k = self.batch_size // self.hosts
        lo = self.host * k
        ids = all_ids[lo:lo + k]
        lens = self.text.prompts.lengths[all_ids]
        neg_lens = self.text.negatives.lengths[self.text.neg[all_ids]]
        n = int(max(self._round(lens).max(), self._round(neg_lens).max()))
        rows = [self._emb[int(p)] for p in ids]
        negs = [np.asarray(self.text.negative_of(int(p)), np.float32) for p in ids]
        out = {"prompt": ids.astype(np.int64)}
        out["ctx"], out["mask"] = self._pad(rows, n)
        out["neg_ctx"], out["neg_mask"] = self._pad(negs, n)
        bucket = self.image_bucket(stream, step)
        pools = self.bucket_pools[bucket]
        if pools:
            out["real"] = np.stack([np.asarray(self._real(np.random.default_rng(
                [self.seed, zlib.crc32(stream.encode()), int(step), 1, lo + i]), int(p), pools), np.float32)
                for i, p in enumerate(ids)])
        if bucket:
            out["bucket"] = bucket
        return out


def from_config(cfg, folders: dict[str, Path]) -> CacheBatches:
    """The batches of a run from `build.ensure`'s folders (with buckets: `latents@WxH`, `teacher@WxH`)."""
    import jax
    from turbojax.data import buckets
    sizes = buckets.from_config(cfg.data)
    per_bucket = None
    if sizes:
        per_bucket = {buckets.name(s): {k: folders.get(f"{k}@{buckets.name(s)}") for k in ("teacher", "latents")}
                      for s in sizes}
    has_latents = any(k.split("@")[0] == "latents" for k in folders)
    return CacheBatches(folders["text"], batch_size=int(cfg.batch_size), seed=int(cfg.seed),
                        teacher_folder=None if sizes else folders.get("teacher"),
                        latents_folder=None if sizes else folders.get("latents"), image_buckets=per_bucket,
                        real_mix=float(cfg.gan.real_mix) if has_latents else 0.0,
                        bucket=int(cfg.data.cache_bucket), process_index=jax.process_index(),
                        process_count=jax.process_count())
