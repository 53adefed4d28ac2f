"""Data-loader benchmark: records/s of `turbojax.cache.CacheBatches` against the distillation step it feeds.

Writes a synthetic cache (random values, the real on-disk format: pad-free bf16 text shards, fp32 teacher latents)
with the shapes of one of two configs, then times `batch(stream, step)` over fresh steps (each a new grain-sampled
batch: embeddings read from the memory-mapped shards, padded to the batch's bucket, teacher latents gathered):

  medium  bench/distill_step.py's Qwen-Image: text width 512, 64 text tokens, 1024 image tokens x 64 channels
  real    Qwen-Image-2512 at 1024^2: text width 3584, prompt lengths 20..512, 4096 image tokens x 64 channels

A DMD2 + GAN iteration reads one critic batch and, every `ttur_ratio`-th iteration, one generator batch. The step
time to compare with is the medium config's generator + critic turns from bench/distill_step.py (run here unless
`--step-ms` gives it). The page cache is warm (the cache was just written): a cold disk adds its read time.

Run:  python bench/data_loader.py [--shape medium|real] [--batch 4] [--prompts 1024] [--step-ms 6300]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from turbojax.cache import store  # noqa: E402
from turbojax.cache.loader import CacheBatches  # noqa: E402

SHAPES = {"medium": dict(dim=512, lens=(64, 64), tokens=1024), "real": dict(dim=3584, lens=(20, 512), tokens=4096)}


def write_cache(root: Path, shape: str, prompts: int, teacher: int, shard: int) -> tuple[Path, Path]:
    import ml_dtypes
    s = SHAPES[shape]
    rng = np.random.default_rng(0)
    lens = rng.integers(s["lens"][0], s["lens"][1] + 1, prompts).astype(np.int32)

    def text_shard(table, i):
        if table == "negative":
            return {"emb": rng.standard_normal((8, s["dim"])).astype(ml_dtypes.bfloat16),
                    "len": np.asarray([8], np.int32)}, {"records": 1}
        lo, hi = i * shard, min((i + 1) * shard, prompts)
        emb = rng.standard_normal((int(lens[lo:hi].sum()), s["dim"]), np.float32).astype(ml_dtypes.bfloat16)
        return {"emb": emb, "len": lens[lo:hi], "neg": np.zeros(hi - lo, np.int32)}, {"records": hi - lo}

    def teacher_shard(_, i):
        lo, hi = i * shard, min((i + 1) * shard, teacher)
        return {"latent": rng.standard_normal((hi - lo, s["tokens"], 64), np.float32),
                "prompt": np.arange(lo, hi, dtype=np.int32) % prompts}, {"records": hi - lo}

    text = root / "text"
    store.build(text, "text", {"family": "qwen_image", "bench": shape}, {"prompt": -(-prompts // shard), "negative": 1},
                text_shard, progress=lambda m: None)
    tdir = root / "teacher"
    store.build(tdir, "teacher", {"bench": shape}, {"teacher": -(-teacher // shard)}, teacher_shard,
                progress=lambda m: None)
    return text, tdir


def step_ms_from_distill_step(iters: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "step.json"
        subprocess.run([sys.executable, str(HERE / "distill_step.py"), "--iters", str(iters), "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        turns = json.loads(out.read_text())["turns"]
    return 1e3 * (turns["generator"]["best_s"] + turns["critic"]["best_s"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--teacher", type=int, default=256)
    p.add_argument("--shard", type=int, default=256)
    p.add_argument("--steps", type=int, default=200, help="batches timed")
    p.add_argument("--ttur", type=int, default=5)
    p.add_argument("--step-ms", type=float, help="the engine's generator + critic step time (skips distill_step.py)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        text, teacher = write_cache(Path(d), a.shape, a.prompts, a.teacher, a.shard)
        write_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(d).rglob("*.safetensors")) / 2 ** 20
        t0 = time.perf_counter()
        b = CacheBatches(text, batch_size=a.batch, seed=0, teacher_folder=teacher, bucket=64)
        open_s = time.perf_counter() - t0
        b.batch("critic", 0)
        ts = []
        for s in range(1, a.steps + 1):
            t0 = time.perf_counter()
            b.batch("critic", s)
            ts.append(time.perf_counter() - t0)
    ts = np.asarray(ts)
    per_batch = float(np.median(ts))
    per_iter = per_batch * (1 + 1 / a.ttur)
    res = {"shape": a.shape, "batch": a.batch, "cache_mib": size, "write_s": write_s, "open_s": open_s,
           "batch_ms_median": 1e3 * per_batch, "batch_ms_p95": 1e3 * float(np.quantile(ts, 0.95)),
           "records_per_s": a.batch / per_batch, "loader_ms_per_iteration": 1e3 * per_iter}
    step_ms = a.step_ms if a.step_ms is not None else step_ms_from_distill_step(2)
    res["engine_step_ms"] = step_ms
    res["loader_share_of_step"] = 1e3 * per_iter / step_ms
    print(f"{a.shape} shapes, batch {a.batch}: cache {size:.0f} MiB written in {write_s:.1f} s, opened in "
          f"{open_s * 1e3:.0f} ms")
    print(f"loader: {res['batch_ms_median']:.2f} ms per batch (p95 {res['batch_ms_p95']:.2f}), "
          f"{res['records_per_s']:.0f} records/s; {res['loader_ms_per_iteration']:.2f} ms per DMD2 iteration "
          f"(ttur {a.ttur}) vs the medium engine step {step_ms:.0f} ms = {100 * res['loader_share_of_step']:.2f} %")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
