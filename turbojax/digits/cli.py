"""`python sample.py` without `--model`: the embedded digits demo.

    python sample.py                                   # PNG grid: 10 classes x 4 seeds from the best shipped student
    python sample.py --num 1000 --seed 0 --out s.npz   # `images` uint8 [N, 32, 32, 1], `labels` int [N] (i % 10)
    python sample.py --method dmd2                     # another shipped student (see --help for the names)
    python sample.py --student runs/mine               # a student trained by `train.py --workdir runs/mine`
    python sample.py --teacher --steps 40              # the teacher itself (many steps, CFG)

Image i asks for class i % 10 and starts from the noise of seed + i, so results do not depend on batching.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from turbojax.digits import data
from turbojax.digits.model import ASSETS

STUDENTS = ASSETS / "students"
# the shipped students, best first (by bench/distill_quality.py's Frechet distance); the first one present is the
# default of `python sample.py` (3 seeds x 1,000 digits; table in bench/README.md)
PREFERENCE = ("dmd2_gan", "turbopp", "pcm_dmd2_gan", "dmd2", "arcflow", "pcm")
PIPELINE_ONLY = ("config", "prompt", "prompts_file", "negative_prompt", "sigmas", "width", "height", "lora",
                 "noise", "tiled_decode")


class DigitsError(ValueError):
    pass


def _is_student(folder: Path) -> bool:
    return (folder / "sampler.json").is_file() or (folder / "arcflow.json").is_file()


def shipped() -> list[str]:
    return [m for m in PREFERENCE if _is_student(STUDENTS / m)]


def student_folder(method: str | None, student_dir: str | None) -> tuple[Path, str]:
    """(folder, display name) of the asked student: a train.py workdir, or a shipped one by name."""
    if student_dir is not None:
        folder = Path(student_dir)
        if not folder.is_dir() or not _is_student(folder):
            raise DigitsError(f"--student {student_dir}: not a train.py workdir of a finished run (no sampler.json "
                              "or arcflow.json)")
        return folder, f"--student {student_dir}"
    available = shipped()
    if method is None:
        if not available:
            raise DigitsError("no shipped digits student found; train one with `python train.py` and pass "
                              "--student out/digits_dmd2_gan, or sample the teacher with --teacher")
        method = available[0]
    if method not in available:
        raise DigitsError(f"--method {method!r}: the shipped students are {available}")
    return STUDENTS / method, method


def load_student(teacher, folder: Path, guidance: float | None = None):
    """`(sample(labels, seed) -> uint8 digits [N, 32, 32, 1], steps, train_s_per_step)` of an exported student:
    an ArcFlow folder (`arcflow.json`), a Turbo++ folder (`sampler.json` with `step_adapters`), or a single LoRA
    (`lora.safetensors` + `sampler.json`: DMD2, PCM, ...). `guidance` overrides a LoRA student's CFG."""
    folder = Path(folder)
    try:
        if (folder / "arcflow.json").is_file():
            from turbojax.distill import arcflow_heads
            sample, per_step = arcflow_heads.digits_sampler(teacher, folder)
            meta = json.loads((folder / "arcflow.json").read_text())
            return sample, len(meta.get("sigmas", [0, 0])) - 1, per_step
        side = folder / "sampler.json"
        settings = json.loads(side.read_text())
        sigmas = [float(x) for x in settings["sigmas"]]
        if "step_adapters" in settings:
            from turbojax.distill import turbopp
            sample, per_step = turbopp.digits_sampler(teacher, folder)
            return sample, len(sigmas) - 1, per_step
        g = float(settings.get("guidance", 1.0)) if guidance is None else guidance
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise DigitsError(f"{folder}: not an exported student ({e})") from None
    from turbojax import lora
    lora_file = folder / "lora.safetensors"
    if not lora_file.is_file():
        raise DigitsError(f"{folder}: {lora_file.name} not found")
    merged = lora.apply(teacher, [(lora.load(lora_file, teacher), 1.0)])

    def sample(labels, seed):
        from turbojax.digits import model
        return model.generate(merged, labels, seed=seed, sigmas=sigmas, guidance=g)
    return sample, len(sigmas) - 1, settings.get("train_s_per_step")


def run(args, fail) -> int:
    """`args` from sample.py's parser; `fail(msg)` exits with one `error:` line."""
    from turbojax import image_out

    given = [f"--{k.replace('_', '-')}" for k in PIPELINE_ONLY if getattr(args, k, None) not in (None, [], False)]
    if given:
        fail(f"{', '.join(given)} need --model (a pipeline folder); without --model sample.py samples the digits demo")
    if args.num_images != 1:
        fail("--num-images needs --model; the digits demo takes --num (total images, classes cycle 0-9)")
    num = 40 if args.num is None else args.num
    if args.seed + num - 1 >= 2 ** 32:
        fail(f"--seed {args.seed}: image i uses seed + i, and {num} images need seed + {num - 1} < 2**32")
    if args.teacher and (args.method or args.student):
        fail("--teacher samples the teacher; do not combine it with --method / --student")
    out = args.out or "digits.png"
    try:
        plan = image_out.plan_output(out, num, overwrite=args.overwrite)
    except image_out.OutputError as e:
        fail(f"--out {e}")

    from turbojax import lora
    from turbojax.digits import model

    labels = np.arange(num) % data.NUM_CLASSES
    teacher = model.load_teacher()
    if args.teacher:
        if args.sigmas is not None:
            fail("--sigmas needs --model; the teacher takes --steps")
        steps = model.TEACHER_STEPS if args.steps is None else args.steps
        guidance = model.TEACHER_GUIDANCE if args.guidance is None else args.guidance
        images = model.generate(teacher, labels, seed=args.seed, sigmas=model.teacher_sigmas(steps),
                                guidance=guidance)
        what, adapter_name = f"the teacher ({steps} steps, CFG {guidance})", "teacher"
    else:
        try:
            folder, name = student_folder(args.method, args.student)
            sample, steps, _ = load_student(teacher, folder, args.guidance)
        except (DigitsError, lora.LoraFormatError) as e:
            fail(str(e))
        if args.steps is not None and args.steps != steps:
            fail(f"--steps {args.steps}: the student {name} was distilled for {steps} steps")
        images = sample(labels, args.seed)
        what, adapter_name = f"student {name} ({steps} steps)", name
    metas = [dict(prompt=model.PROMPTS[c], seed=args.seed + i, label=int(c), model=adapter_name)
             for i, c in enumerate(labels)]
    if plan.kind == "PNG" and num > 1:  # rows = seeds, columns = the ten classes
        from turbojax.digits.training import tile
        images_out = tile(images, data.NUM_CLASSES)[None]
        metas_out = [dict(prompt="digits 0-9 by column", seed=f"{args.seed}..{args.seed + num - 1}",
                          model=adapter_name)]
    else:
        images_out, metas_out = images, metas
    try:
        written = image_out.write_output(plan, images_out, metas_out,
                                         arrays={"labels": labels.astype(np.int64)} if plan.kind == "NPZ" else None)
    except image_out.OutputError as e:
        fail(f"--out {e}")
    print(f"wrote {written[0] if len(written) == 1 else plan.path}: {num} digits from {what}")
    return 0
