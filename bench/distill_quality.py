"""Quality table of the digits demo: the teacher, its naive 2-step Euler, and distilled 2-step students.

Each row is a sampler `sample(labels, seed) -> uint8 [N, 32, 32, 1]` (digit i asked to be class `labels[i]`, its
noise drawn from `seed + i`). For each of `--seeds` noise seeds, `--num` digits (classes cycling 0..9, so 100 per
class at the default 1,000) are generated and measured with `turbojax.digits.metrics.evaluate` against the 4,000 real
train digits: Frechet distance of the held-out-trained classifier's features (FD), conditional accuracy,
per-class diversity (1 = as varied as the data), per-class k-NN recall and precision. The table gives mean +- std
over seeds, the sampling time per 1,000 digits (the fastest seed: the first one also compiles) and, for students,
the training time per step.

Rows:
  * `real digits (floor)`: `--num` real train digits per seed (a subset of the reference itself, so its FD is the
    finite-sample floor, not a reachable target);
  * `teacher (K steps, CFG w)`: the shipped teacher, shift-3 Euler schedule, true CFG against the empty prompt;
  * `naive 2-step Euler`: the same teacher on the students' sigma list [1, 0.75, 0], same CFG;
  * students: `add_student(rows, name, sample, train_s_per_step)` (what `train.py` trains plugs in there; see
    `student_rows`). `--student NAME=DIR1,DIR2,DIR3` makes one row of several independently trained students
    (training seeds): run k samples student k mod n with noise seed k, so the row's spread covers both the
    training seed and the noise.

    python bench/distill_quality.py                       # 3 seeds x 1,000 digits per row
    python bench/distill_quality.py --num 200 --seeds 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402

from turbojax.digits import data, metrics, model as dmodel  # noqa: E402

SEED_STRIDE = 1_000_003  # noise seeds of run k start at k * stride: no digit shares its noise with another run
Sampler = Callable[[np.ndarray, int], np.ndarray]


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def add_student(rows: list, name: str, sample: Sampler, train_s_per_step: float | None = None) -> list:
    """Append a row: `sample(labels, seed)` returns uint8 digits [N, 32, 32, 1] for int labels [N]."""
    rows.append({"name": name, "sample": sample, "train_s_per_step": train_s_per_step})
    return rows


def base_rows(teacher, *, steps: int, guidance: float, real: bool = True) -> list:
    rows = []
    if real:
        images, labels = data.load_digits("train")

        def real_sample(lab, seed):
            # a seeded subset of the train digits with the asked classes (the FD floor; see the module doc)
            rng = np.random.default_rng(seed)
            out = np.empty((len(lab),) + images.shape[1:], np.uint8)
            for c in np.unique(lab):
                pos = np.flatnonzero(lab == c)
                pool = np.flatnonzero(labels == c)
                out[pos] = images[rng.choice(pool, len(pos), replace=len(pos) > len(pool))]
            return out

        rows.append({"name": "real digits (floor)", "sample": real_sample, "train_s_per_step": None})
    rows.append({"name": f"teacher ({steps} steps, CFG {guidance:g})", "train_s_per_step": None,
                 "sample": lambda lab, seed: dmodel.generate(teacher, lab, seed, dmodel.teacher_sigmas(steps),
                                                             guidance)})
    rows.append({"name": f"naive 2-step Euler (CFG {guidance:g})", "train_s_per_step": None,
                 "sample": lambda lab, seed: dmodel.generate(teacher, lab, seed, dmodel.STUDENT_SIGMAS, guidance)})
    return rows


def student_rows(teacher, students: dict | None = None) -> list:
    """One row per student `{name: folder or [folders]}` (several folders: training seeds, see the module doc);
    default: every shipped student (turbojax/digits/assets/students)."""
    from turbojax.digits import cli
    if students is None:
        students = {name: cli.STUDENTS / name for name in cli.shipped()}
    rows = []
    for name, folders in students.items():
        folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
        loaded = [cli.load_student(teacher, f) for f in folders]
        samplers = [s for s, _, _ in loaded]
        per_step = [t for _, _, t in loaded if t is not None]

        def sample(lab, seed, samplers=samplers):
            return samplers[(seed // SEED_STRIDE) % len(samplers)](lab, seed)
        add_student(rows, name if len(folders) == 1 else f"{name} ({len(folders)} training seeds)", sample,
                    float(np.mean(per_step)) if per_step else None)
    return rows


def measure(row: dict, *, num: int, seeds: int) -> dict:
    labels = np.arange(num) % data.NUM_CLASSES
    runs, times = [], []
    for k in range(seeds):
        t0 = time.perf_counter()
        images = np.asarray(row["sample"](labels, k * SEED_STRIDE))
        times.append(time.perf_counter() - t0)
        if images.dtype != np.uint8 or images.shape != (num, data.IMAGE_SIZE, data.IMAGE_SIZE, 1):
            raise ValueError(f"row {row['name']!r}: sample() returned {images.dtype} {images.shape}, expected uint8 "
                             f"{(num, data.IMAGE_SIZE, data.IMAGE_SIZE, 1)}")
        runs.append(metrics.evaluate(images, labels))
    out = {"name": row["name"], "num": num, "seeds": seeds, "runs": runs,
           "sample_s_per_1k": float(np.min(times)) * 1000 / num, "train_s_per_step": row["train_s_per_step"]}
    for key in ("fd", "accuracy", "diversity", "recall", "precision"):
        vals = np.array([r[key] for r in runs])
        out[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return out


def table(results: list) -> str:
    head = ("| sampler | FD | accuracy % | diversity | recall | precision | sample s / 1k | train s / step |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        def pm(key, scale=1.0, digits=2):
            return f"{r[key]['mean'] * scale:.{digits}f} ± {r[key]['std'] * scale:.{digits}f}"
        train = "" if r["train_s_per_step"] is None else f"{r['train_s_per_step']:.3f}"
        lines.append(f"| {r['name']} | {pm('fd')} | {pm('accuracy', 100, 1)} | {pm('diversity', 1, 3)} | "
                     f"{pm('recall', 1, 3)} | {pm('precision', 1, 3)} | {r['sample_s_per_1k']:.2f} | {train} |")
    return "\n".join(lines)


def run(rows: list, *, num: int, seeds: int, out=print) -> list:
    results = []
    for row in rows:
        results.append(measure(row, num=num, seeds=seeds))
        r = results[-1]
        out(f"{r['name']}: FD {r['fd']['mean']:.2f} ± {r['fd']['std']:.2f}, accuracy {100 * r['accuracy']['mean']:.1f}%")
    return results


def main(argv=None, extra_rows: list | None = None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=1000, help="digits per seed (classes cycle 0..9)")
    p.add_argument("--seeds", type=int, default=3, help="noise seeds (runs) per row")
    p.add_argument("--teacher", default=None, help="teacher export folder (default: the shipped one)")
    p.add_argument("--teacher-steps", type=int, default=dmodel.TEACHER_STEPS)
    p.add_argument("--guidance", type=float, default=dmodel.TEACHER_GUIDANCE)
    p.add_argument("--no-real", action="store_true", help="leave out the real-digits floor row")
    p.add_argument("--json", default=None, help="also write the results (per-seed runs included) to this file")
    p.add_argument("--student", action="append", default=[], metavar="NAME=DIR[,DIR...]",
                   help="a student trained by train.py (its workdir), or several (training seeds: one row); "
                        "repeatable. Default: the shipped students")
    a = p.parse_args(argv)
    if a.num < 2 * data.NUM_CLASSES:
        fail(f"--num must be at least {2 * data.NUM_CLASSES} (two digits per class), got {a.num}")
    if a.seeds < 1:
        fail(f"--seeds must be at least 1, got {a.seeds}")
    if a.teacher_steps < 1:
        fail(f"--teacher-steps must be at least 1, got {a.teacher_steps}")
    if a.teacher is not None and not (Path(a.teacher) / "turbojax.json").is_file():
        fail(f"--teacher {a.teacher} is not a turbojax export (no turbojax.json)")
    if a.json is not None and Path(a.json).is_dir():
        fail(f"--json {a.json} is a folder")
    teacher = dmodel.load_teacher(a.teacher)
    rows = base_rows(teacher, steps=a.teacher_steps, guidance=a.guidance, real=not a.no_real)
    students = None
    if a.student:
        students = {}
        for spec in a.student:
            name, eq, folders = spec.partition("=")
            folders = [Path(f) for f in folders.split(",")]
            bad = [f for f in folders if not any((f / n).is_file() for n in ("sampler.json", "arcflow.json"))]
            if not eq or not name or bad:
                fail(f"--student {spec}: expected NAME=DIR[,DIR...] with each DIR a train.py workdir of a finished "
                     f"run" + (f" ({bad[0]} is not)" if eq and name and bad else ""))
            if name in students:
                fail(f"--student {spec}: a row named {name!r} is given already")
            students[name] = folders
    rows += student_rows(teacher, students) + list(extra_rows or [])
    results = run(rows, num=a.num, seeds=a.seeds, out=lambda s: print(s, file=sys.stderr, flush=True))
    print(table(results))
    if a.json:
        from turbojax.convert.atomic import commit_file
        text = json.dumps({"num": a.num, "seeds": a.seeds, "results": results}, indent=2) + "\n"
        commit_file(Path(a.json), lambda f: f.write(text.encode()))
    return results


if __name__ == "__main__":
    main()
