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
# default of `python sample.py`
PREFERENCE = ("dmd2_gan", "dmd2", "pcm_dmd2_gan", "pcm", "turbopp")
PIPELINE_ONLY = ("config", "prompt", "prompts_file", "negative_prompt", "sigmas", "width", "height", "lora",
                 "noise", "tiled_decode")


class DigitsError(ValueError):
    pass


def shipped() -> list[str]:
    return [m for m in PREFERENCE if (STUDENTS / m / "lora.safetensors").is_file()]


def student_files(method: str | None, student_dir: str | None) -> tuple[Path, dict, str]:
    """(LoRA file, sampler settings, name) of the asked student."""
    if student_dir is not None:
        folder = Path(student_dir)
        name = f"--student {student_dir}"
    else:
        available = shipped()
        if method is None:
            if not available:
                raise DigitsError("no shipped digits student found; train one with `python train.py` and pass "
                                  "--student out/digits_dmd2_gan, or sample the teacher with --teacher")
            method = available[0]
        if method not in available:
            raise DigitsError(f"--method {method!r}: the shipped students are {available}")
        folder, name = STUDENTS / method, method
    lora_file, side = folder / "lora.safetensors", folder / "sampler.json"
    for f in (lora_file, side):
        if not f.is_file():
            raise DigitsError(f"{name}: {f} not found (a train.py workdir holds lora.safetensors and sampler.json)")
    try:
        settings = json.loads(side.read_text())
        sigmas = [float(s) for s in settings["sigmas"]]
        guidance = float(settings.get("guidance", 1.0))
    except (ValueError, KeyError, TypeError) as e:
        raise DigitsError(f"{side}: not a sampler settings file ({e})") from None
    return lora_file, {"sigmas": sigmas, "guidance": guidance}, name


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
            lora_file, settings, name = student_files(args.method, args.student)
            adapter = lora.load(lora_file, teacher)
        except (DigitsError, lora.LoraFormatError) as e:
            fail(str(e))
        if args.steps is not None and args.steps != len(settings["sigmas"]) - 1:
            fail(f"--steps {args.steps}: the student {name} was distilled for {len(settings['sigmas']) - 1} steps")
        guidance = settings["guidance"] if args.guidance is None else args.guidance
        images = model.generate(teacher, labels, seed=args.seed, sigmas=settings["sigmas"], guidance=guidance,
                                adapters=adapter)
        what, adapter_name = f"student {name} ({len(settings['sigmas']) - 1} steps)", name
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
