"""Text-to-image sampling with a local diffusers pipeline folder (Qwen-Image(-2512) or Z-Image(-Turbo)).

    python sample.py --model Qwen-Image-2512 --config configs/sample_qwen_image_turbo_2step.py \\
        --lora Wuli-Qwen-Image-2512-Turbo-LoRA-2steps-V1.0-bf16.safetensors:1.0 \\
        --prompt "a red fox in fresh snow" --num-images 4 --seed 0 --out fox.png

`--out`: `.png` (also `.jpg`/`.jpeg`/`.webp`) writes one image or a grid, `.npz` writes `images` (uint8
[N, H, W, 3]) with `prompts` and `seeds`; a path without an extension, ending in `/`, or an existing folder gets
`00000.png`, `00001.png`, ... and nothing else in it is touched. A file we would write that already exists is
refused unless `--overwrite` (which replaces exactly those names). PNGs carry prompt, seed, steps, guidance, model
and LoRAs as text metadata (JPEG/WebP as JSON in EXIF ImageDescription).

Image i uses noise from seed + i, so results do not depend on `--batch-size`. `--noise FILE` (.npy/.npz) starts
from given latents instead, to compare with other implementations: the pipeline's layout (Qwen-Image packed
[N, (H/16)(W/16), 64], Z-Image [N, 16, H/8, W/8]) or the unpacked `torch.randn` layouts [N, 16, H/8, W/8],
[N, 16, 1, H/8, W/8] and [N, 1, 16, H/8, W/8], which are packed as diffusers' pipelines pack them.

Multi-host (`--coordinator-address HOST:PORT --num-processes N --process-id I`, or `--distributed-auto` on Cloud TPU
/ SLURM): every process runs the same command; the batches are dealt out round-robin over the processes (each on
its own devices), gathered to process 0, which alone writes `--out` and prints. The images equal a one-process run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np

from turbojax import noise_files

DEFAULT_CONFIGS = {"qwen_image": "configs/sample_qwen_image_base.py", "z_image": "configs/sample_z_image_turbo.py"}
REPO = Path(__file__).resolve().parent
SEED_LIMIT = 2 ** 32  # jax.random.key takes a uint32 seed; image i uses seed + i


def fail(msg: str):
    raise SystemExit(f"error: {msg}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line naming the flag instead of usage + message
        fail(message)


# ---- flag types: every numeric flag rejects zero/negative/non-finite values where they make no sense ----

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def positive_int(text: str) -> int:
    v = _int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def image_size(text: str) -> int:
    v = _int(text)
    if v <= 0 or v % 16:
        raise argparse.ArgumentTypeError(f"width and height must be positive multiples of 16, got {v}")
    return v


def seed_value(text: str) -> int:
    v = _int(text)
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32 - 1], got {v}")
    return v


def guidance_value(text: str) -> float:
    v = _float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 or 1 turn CFG off), got {v}")
    return v


def load_config(spec: str):
    """`path/to/config.py[:arg]` -> the file's `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    path = Path(path) if Path(path).is_absolute() or Path(path).exists() else REPO / path
    if not path.is_file():
        fail(f"--config: config file {spec} not found")
    sys.path.insert(0, str(REPO))
    try:
        mod_spec = importlib.util.spec_from_file_location(f"_sample_config_{path.stem}", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        return mod.get_config(arg) if arg else mod.get_config()
    except Exception as e:  # a user's config file: say which and why, in one line
        fail(f"--config {spec}: get_config() failed: {type(e).__name__}: {e}")


def check_config(cfg, spec: str, family: str) -> None:
    """The preset's values obey the same rules as the flags that override them."""
    def bad(field, why):
        fail(f"--config {spec}: {field} {why}, got {getattr(cfg, field, None)!r}")

    for field in ("family", "width", "height", "steps", "guidance", "negative_prompt", "scheduler", "sigmas",
                  "max_sequence_length", "cfg_normalization", "cfg_truncation"):
        if field not in cfg:
            fail(f"--config {spec}: missing field {field!r}")
    if cfg.family != family:
        fail(f"--config {spec} is for {cfg.family}, but --model is a {family} pipeline")
    for field in ("width", "height"):
        v = cfg[field]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 16:
            bad(field, "must be a positive multiple of 16")
    for field in ("steps", "max_sequence_length"):
        v = cfg[field]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            bad(field, "must be a positive integer")
    for field in ("guidance", "cfg_normalization", "cfg_truncation"):
        v = cfg[field]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            bad(field, "must be a finite number >= 0")
    from turbojax import schedules
    if cfg.scheduler and cfg.scheduler not in schedules.PRESETS:
        bad("scheduler", f"must be '' (the pipeline's own) or one of {sorted(schedules.PRESETS)}")


def parse_sigmas(values, source: str) -> list[float]:
    """Explicit sigmas from `--sigmas 1,0.75` (or a config's list): finite, strictly decreasing, within [0, 1]; a
    terminal 0 is appended when missing, so N values (N > 1 or ending in 0 excluded) give N steps."""
    from turbojax import schedules
    if isinstance(values, str):
        parts = [p.strip() for p in values.split(",")]
        if not values.strip() or any(not p for p in parts):
            fail(f"{source}: expected comma-separated numbers such as 1,0.75, got {values!r}")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            fail(f"{source}: expected comma-separated numbers such as 1,0.75, got {values!r}")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        fail(f"{source}: expected a list of numbers, got {values!r}")
    if not all(math.isfinite(v) for v in values):
        fail(f"{source}: sigmas must be finite, got {values}")
    try:
        return [float(s) for s in schedules.explicit_sigmas(values)]
    except ValueError as e:
        fail(f"{source}: {e}")


def parse_lora(spec: str, flag: str = "--lora") -> tuple[str, float]:
    """FILE[:SCALE]; a path that itself exists wins over splitting at the last colon."""
    if Path(spec).exists() or ":" not in spec:
        path, scale = spec, 1.0
    else:
        path, _, s = spec.rpartition(":")
        try:
            scale = float(s)
        except ValueError:
            fail(f"{flag} {spec}: scale {s!r} is not a number")
        if not math.isfinite(scale):
            fail(f"{flag} {spec}: scale must be a finite number, got {s!r}")
    if not Path(path).is_file():
        fail(f"{flag} {path}: file not found" + (" (it is a folder)" if Path(path).is_dir() else ""))
    return path, scale


def parse_lora_steps(specs: list[str], steps: int) -> list[tuple[str, float]]:
    """`--lora-step STEP:FILE[:SCALE]` (per-step adapters, e.g. a Turbo++ student): one per step 1..steps, in order."""
    by_step = {}
    for spec in specs:
        head, sep, rest = spec.partition(":")
        if not sep or not head.isdigit() or not 1 <= int(head) <= steps:
            fail(f"--lora-step {spec}: expected STEP:FILE[:SCALE] with STEP in 1..{steps} (the sampling steps)")
        if int(head) in by_step:
            fail(f"--lora-step {spec}: step {head} has a LoRA already")
        by_step[int(head)] = parse_lora(rest, "--lora-step")
    missing = [i for i in range(1, steps + 1) if i not in by_step]
    if missing:
        fail(f"--lora-step: no LoRA for step(s) {missing} of {steps}; give one per step")
    return [by_step[i] for i in range(1, steps + 1)]


def parse_blocks_steps(specs: list[str], steps: int) -> list[str]:
    """`--blocks-step STEP:FILE` (a Turbo++ student's per-step full weights): one readable safetensors file per step
    1..steps, in order (its tensors are checked against the model when it is loaded)."""
    from turbojax.convert.safetensors_io import SafetensorsError, open_safetensors
    by_step = {}
    for spec in specs:
        head, sep, rest = spec.partition(":")
        if not sep or not head.isdigit() or not 1 <= int(head) <= steps:
            fail(f"--blocks-step {spec}: expected STEP:FILE with STEP in 1..{steps} (the sampling steps)")
        if int(head) in by_step:
            fail(f"--blocks-step {spec}: step {head} has a blocks file already")
        if not Path(rest).is_file():
            fail(f"--blocks-step {rest}: file not found" + (" (it is a folder)" if Path(rest).is_dir() else ""))
        by_step[int(head)] = rest
    missing = [i for i in range(1, steps + 1) if i not in by_step]
    if missing:
        fail(f"--blocks-step: no blocks file for step(s) {missing} of {steps}; give one per step")
    for path in by_step.values():
        try:
            open_safetensors(path)
        except (SafetensorsError, OSError) as e:
            why = str(e).removeprefix(f"{path}: ")
            fail(f"--blocks-step {path}: not a readable safetensors file ({why})")
    return [by_step[i] for i in range(1, steps + 1)]


def check_lora_file(path: str, family: str, flag: str = "--lora") -> None:
    """Read the LoRA for the pipeline's family before loading the model: wrong family, pickles, non-safetensors and
    corrupt files fail here (shapes are checked against the model when it is merged)."""
    from turbojax.lora import LoraFormatError, read_lora
    try:
        read_lora(path, family=family)
    except LoraFormatError as e:
        msg = str(e)
        fail(f"{flag} {msg if msg.startswith(str(path)) else f'{path}: {msg}'}")
    except OSError as e:
        fail(f"{flag} {path}: cannot read it ({e.strerror or e})")


def read_arcflow(spec: str, family: str, channels: int | None) -> dict:
    """`--arcflow DIR`: the folder's arcflow.json, checked against the pipeline before loading anything heavy
    (the tensors are checked against the model when the student is loaded)."""
    from turbojax.distill.arcflow_heads import CONFIG_FILE, HEADS_FILE
    folder = Path(spec)
    if not folder.is_dir():
        fail(f"--arcflow {spec}: " + ("not a folder (an ArcFlow folder holds arcflow.json, heads.safetensors and "
                                      "usually lora.safetensors)" if folder.exists() else "folder not found"))
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        fail(f"--arcflow {spec}: not an ArcFlow folder (no {CONFIG_FILE}; train.py writes one with "
             "configs/*_arcflow.py)")
    try:
        settings = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        fail(f"--arcflow {cfg_path}: not a readable JSON file ({e})")
    if not isinstance(settings, dict) or settings.get("method") != "arcflow":
        fail(f"--arcflow {cfg_path}: not an ArcFlow config (method "
             f"{settings.get('method') if isinstance(settings, dict) else None!r}, expected 'arcflow')")
    if not (folder / HEADS_FILE).is_file():
        fail(f"--arcflow {spec}: {HEADS_FILE} missing")
    made_for = settings.get("family")
    if made_for is not None and made_for != family:
        fail(f"--arcflow {spec} was made for a {made_for} model, but --model is a {family} pipeline")
    if channels is not None and settings.get("channels") != channels:
        fail(f"--arcflow {spec}: heads for {settings.get('channels')} latent channels, --model has {channels}")
    return settings


def arcflow_steps(settings: dict, spec: str, steps: int | None) -> int:
    """The step count of an ArcFlow folder's sigma list (`--steps` picks among its lists)."""
    try:
        lists = {len(settings["sigmas"]) - 1} | {len(v) - 1 for v in dict(settings.get("alt_sigmas") or {}).values()}
    except (KeyError, TypeError, ValueError) as e:
        fail(f"--arcflow {spec}: arcflow.json has no readable sigma lists ({e})")
    own = len(settings["sigmas"]) - 1
    if steps is not None and steps not in lists:
        fail(f"--steps {steps}: the ArcFlow folder {spec} has sigma lists for {sorted(lists)} steps; give --sigmas "
             "for another count")
    return own if steps is None else steps


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            fail(f"--prompts-file {f}: file not found")
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            fail(f"--prompts-file {f}: not UTF-8 text")
        except OSError as e:
            fail(f"--prompts-file {f}: cannot read it ({e.strerror or e})")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            fail(f"--prompts-file {f} holds no prompts")
        prompts += lines
    if not prompts:
        fail("give --prompt or --prompts-file")
    return [p for p in prompts for _ in range(args.num_images)]


# ---- --noise (turbojax.noise_files; its errors become one `error:` line) ----

def load_noise(spec: str) -> np.ndarray:
    try:
        return noise_files.load(spec)
    except noise_files.NoiseFileError as e:
        fail(str(e))


def fit_noise(data: np.ndarray, spec: str, family: str, count: int, height: int, width: int,
              channels: int | None) -> np.ndarray:
    try:
        return noise_files.fit(data, spec, family, count, height, width, channels)
    except noise_files.NoiseFileError as e:
        fail(str(e))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers pipeline folder (or a turbojax export of one); without it, sample.py "
                                   "samples the embedded digits demo (see turbojax/digits/cli.py)")
    p.add_argument("--config", help="sampling preset, e.g. configs/sample_qwen_image_lightning.py:4 "
                                    "(default: the family's base preset)")
    p.add_argument("--prompt", action="append", help="repeatable")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--guidance", type=guidance_value, help="Qwen true_cfg_scale / Z-Image guidance_scale (>= 0)")
    p.add_argument("--sigmas", help="explicit comma-separated sigmas, e.g. 1,0.75 (a terminal 0 is appended); "
                                    "--steps, if given too, must equal their count")
    p.add_argument("--width", type=image_size, help="positive multiple of 16")
    p.add_argument("--height", type=image_size, help="positive multiple of 16")
    p.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--seed", type=seed_value, default=0, help="image i uses seed + i (< 2**32)")
    p.add_argument("--lora", action="append", default=[], help="FILE[:SCALE], repeatable")
    p.add_argument("--lora-step", action="append", default=[],
                   help="STEP:FILE[:SCALE], one per step: step STEP (1-based) runs with this LoRA (per-step students "
                        "such as Turbo++'s lora_step1/2.safetensors; see their sampler.json)")
    p.add_argument("--blocks-step", action="append", default=[],
                   help="STEP:FILE, one per step: step STEP (1-based) runs with the full weights of FILE in place "
                        "(Turbo++'s step1/2_blocks.safetensors; with or without --lora-step)")
    p.add_argument("--arcflow", metavar="DIR",
                   help="an ArcFlow student folder (arcflow.json, heads.safetensors, lora.safetensors) for --model's "
                        "family: sampled with its policy over the folder's sigma list (--steps picks another list "
                        "it holds, --sigmas any); no CFG; the preset's steps, sigmas and guidance are not used")
    p.add_argument("--noise", help=".npy/.npz initial latents for all images: the pipeline's layout or the "
                                   "unpacked [N, 16, H/8, W/8] / [N, 16, 1, H/8, W/8]")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--mesh", help="shard the pipeline over this process's devices, e.g. fsdp=-1 or "
                   "data=2,fsdp=2,tensor=2: weights by their logical axes, each batch over data x fsdp")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--tiled-decode", action="store_true", help="decode in overlapping tiles (large images)")
    p.add_argument("--out", help=".png/.jpg/.webp (one image or a grid), .npz, or a folder (digits demo default: "
                                 "digits.png)")
    d = p.add_argument_group("digits demo (no --model)")
    d.add_argument("--num", type=positive_int, help="number of digits (default 40); image i asks for class i %% 10")
    d.add_argument("--method", help="a shipped student: dmd2_gan, turbopp, pcm_dmd2_gan, dmd2, arcflow, pcm "
                        "(default: the best shipped)")
    d.add_argument("--student", help="a train.py workdir holding lora.safetensors + sampler.json")
    d.add_argument("--teacher", action="store_true", help="sample the teacher (with --steps, --guidance)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing files with exactly the names this run writes (nothing else)")
    m = p.add_argument_group("multi-host (turbojax.distributed; default: one process)")
    m.add_argument("--coordinator-address", default="", help="process 0's HOST:PORT")
    m.add_argument("--num-processes", type=positive_int, default=1)
    m.add_argument("--process-id", type=_int, default=0)
    m.add_argument("--local-device-ids", default="", help="this process's devices, e.g. 0,1")
    m.add_argument("--distributed-auto", action="store_true",
                   help="let jax detect the cluster (Cloud TPU, GKE, SLURM, Open MPI)")
    m.add_argument("--distributed-timeout", type=_float, default=300.0, help="seconds to wait for the others")
    return p


def join_processes(args) -> bool:
    """jax.distributed for a multi-host run (before any JAX computation); True when several processes run."""
    from turbojax import distributed
    from turbojax.training.errors import UserError
    s = distributed.Settings(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                             process_id=args.process_id, local_device_ids=args.local_device_ids,
                             auto=args.distributed_auto, timeout_s=args.distributed_timeout)
    try:
        return distributed.initialize_from_flags(s)
    except UserError as e:
        fail(str(e))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is None and args.lora_step:
        fail("--lora-step needs --model (a pipeline folder)")
    if args.model is None and args.mesh is not None:
        fail("--mesh needs --model (a pipeline folder); the digits demo runs on one device")
    if args.model is None and args.blocks_step:
        fail("--blocks-step needs --model (a pipeline folder); a digits student folder loads with --student")
    if args.blocks_step and args.arcflow is not None:
        fail("--arcflow and --blocks-step do not combine (an ArcFlow student has one trunk LoRA and its heads)")
    if args.model is None and args.arcflow is not None:
        fail("--arcflow needs --model (a pipeline folder)")
    if args.model is None:
        if args.coordinator_address or args.num_processes > 1 or args.distributed_auto:
            fail("--num-processes / --coordinator-address / --distributed-auto need --model (the digits demo runs "
                 "on one process)")
        from turbojax.digits import cli as digits_cli
        return digits_cli.run(args, fail)
    for flag in ("num", "method", "student"):
        if getattr(args, flag) is not None:
            fail(f"--{flag} belongs to the digits demo (no --model); with --model use --num-images / --lora")
    if args.teacher:
        fail("--teacher belongs to the digits demo (no --model)")
    if args.out is None:
        fail("--out is required with --model (.png, .npz or a folder)")

    # ---- validate everything cheap before loading anything heavy ----
    from turbojax import image_out
    from turbojax.pipelines import PipelineError, read_model_index
    model = Path(args.model)
    try:
        family, _ = read_model_index(model)
    except PipelineError as e:
        fail(f"--model {e}")
    spec = args.config or DEFAULT_CONFIGS[family]
    cfg = load_config(spec)
    check_config(cfg, spec, family)
    width = cfg.width if args.width is None else args.width
    height = cfg.height if args.height is None else args.height
    arcflow = None
    if args.arcflow is not None:
        if args.lora_step:
            fail("--arcflow and --lora-step do not combine (an ArcFlow student has one trunk LoRA and its heads)")
        arcflow = read_arcflow(args.arcflow, family, noise_files.latent_channels(model, family))
        if args.guidance is not None and (args.guidance > 1.0 if family == "qwen_image" else args.guidance > 0.0):
            fail(f"--guidance {args.guidance}: an ArcFlow student samples without CFG (it learnt the teacher's "
                 "guided velocity); leave --guidance out")
    if args.sigmas is not None:
        sigmas, source = parse_sigmas(args.sigmas, "--sigmas"), f"--sigmas {args.sigmas}"
    elif arcflow is not None:
        sigmas, source = None, ""
    elif len(cfg.sigmas):
        sigmas, source = parse_sigmas(cfg.sigmas, f"--config {spec}: sigmas"), f"the sigmas of --config {spec}"
    else:
        sigmas, source = None, ""
    if sigmas is not None and args.steps is not None and args.steps != len(sigmas) - 1:
        fail(f"--steps {args.steps} does not match {source} ({len(sigmas) - 1} steps: {sigmas}); give one of them")
    if sigmas is not None:
        steps = len(sigmas) - 1
    elif arcflow is not None:
        steps = arcflow_steps(arcflow, args.arcflow, args.steps)
    else:
        steps = cfg.steps if args.steps is None else args.steps
    guidance = cfg.guidance if args.guidance is None else args.guidance
    if arcflow is not None:
        guidance = 1.0 if family == "qwen_image" else 0.0  # what the pipeline runs: no CFG
    negative = cfg.negative_prompt if args.negative_prompt is None else args.negative_prompt
    prompts = read_prompts(args)
    if args.seed + len(prompts) - 1 >= SEED_LIMIT:
        fail(f"--seed {args.seed}: image i uses seed + i, and {len(prompts)} images need seed + "
             f"{len(prompts) - 1} < 2**32; use --seed <= {SEED_LIMIT - len(prompts)}")
    try:
        plan = image_out.plan_output(args.out, len(prompts), overwrite=args.overwrite)
    except image_out.OutputError as e:
        fail(f"--out {e}")
    loras = [parse_lora(s) for s in args.lora]
    for path, _ in loras:
        check_lora_file(path, family)
    step_loras = parse_lora_steps(args.lora_step, steps) if args.lora_step else []
    for path, _ in step_loras:
        check_lora_file(path, family, "--lora-step")
    step_blocks = parse_blocks_steps(args.blocks_step, steps) if args.blocks_step else []
    multi = join_processes(args)  # before any JAX computation (a no-op for one process)
    if args.mesh is not None and multi:
        fail("--mesh: with several processes each one samples its own batches on its own devices; "
             "leave --mesh out (a mesh across hosts is for train.py)")
    from turbojax.utils import release_host_memory_early
    release_host_memory_early()
    noise = None
    if args.noise is not None:
        raw = load_noise(args.noise)
        channels = noise_files.latent_channels(model, family)
        noise = fit_noise(raw, args.noise, family, len(prompts), height, width, channels)

    import jax
    import jax.numpy as jnp

    from turbojax.pipelines import from_diffusers
    from turbojax.utils import progress_bar
    from turbojax.distill.arcflow_heads import ArcFlowFormatError
    mesh = None
    if args.mesh is not None:
        from turbojax.sharding import make_mesh, parse_mesh_sizes
        try:
            mesh = make_mesh(**parse_mesh_sizes(args.mesh), devices=jax.local_devices())
        except ValueError as e:
            fail(f"--mesh {e}")
        n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
        if args.batch_size % n_batch:
            fail(f"--batch-size {args.batch_size}: the mesh splits each batch over data x fsdp = {n_batch} "
                 "devices; give a multiple of it")
    try:
        pipe = from_diffusers(model, loras=loras, dtype=jnp.dtype(args.dtype), arcflow=args.arcflow, mesh=mesh)
        if step_loras or step_blocks:
            from turbojax.distill.turbopp import per_step_pipeline
            pipe = per_step_pipeline(pipe, step_loras, step_blocks)
    except ArcFlowFormatError as e:
        fail(f"--arcflow {e}")
    except (PipelineError, FileNotFoundError) as e:
        fail(str(e))
    except ValueError as e:  # our loaders' errors (ConfigError, SafetensorsError, ConversionError, ...)
        if type(e).__module__.startswith("turbojax"):
            fail(str(e))
        raise
    if noise is not None:  # now the latent channels are known for every kind of folder
        shape = pipe.noise_shape(1, height, width)
        noise = fit_noise(raw, args.noise, family, len(prompts), height, width,
                          shape[2] // 4 if family == "qwen_image" else shape[1])
    batches = [list(range(i, min(i + args.batch_size, len(prompts)))) for i in range(0, len(prompts),
                                                                                     args.batch_size)]
    pid, nproc = (jax.process_index(), jax.process_count()) if multi else (0, 1)
    mine = batches[pid::nproc]  # round-robin: batch j is sampled by process j % nproc
    images = []
    lora_meta = ",".join([f"{Path(f).name}:{s}" for f, s in loras]
                         + [f"step{i + 1}={Path(f).name}:{s}" for i, (f, s) in enumerate(step_loras)]
                         + [f"step{i + 1}={Path(f).name}" for i, f in enumerate(step_blocks)])
    try:
        for idx in progress_bar(mine, desc="sampling", enabled=len(batches) > 1 and pid == 0, unit="batch"):
            if noise is not None:
                z = noise[idx]
            else:
                z = np.concatenate([np.asarray(pipe.noise(args.seed + i, 1, height, width)) for i in idx])
            images.append(pipe([prompts[i] for i in idx], negative_prompt=negative or None, steps=steps,
                               guidance=None if arcflow is not None else guidance, width=width, height=height,
                               noise=z, sigmas=sigmas, scheduler=cfg.scheduler or None,
                               max_sequence_length=cfg.max_sequence_length,
                               cfg_normalization=cfg.cfg_normalization, cfg_truncation=cfg.cfg_truncation,
                               tiled_decode=True if args.tiled_decode else None))
    except PipelineError as e:
        fail(str(e))
    if multi:
        from turbojax.distributed import gather_batches
        images = gather_batches(images, batches, args.batch_size)
        if pid != 0:
            return 0  # process 0 writes
    metas = [dict(prompt=prompts[i], seed=args.seed + i, steps=steps, guidance=guidance, model=model.name,
                  loras=lora_meta, **({"noise": f"{Path(args.noise).name}[{i}]"} if noise is not None else {}),
                  **({"arcflow": Path(args.arcflow).name} if arcflow is not None else {}))
             for idx in batches for i in idx]
    try:
        written = image_out.write_output(plan, np.concatenate(images), metas)
    except image_out.OutputError as e:
        fail(f"--out {e}")
    except OSError as e:
        fail(f"--out {args.out}: cannot write ({e.strerror or e}: {e.filename or ''})")
    where = f"{plan.path} ({written[0].name}..{written[-1].name})" if plan.kind == image_out.FOLDER else plan.path
    print(f"wrote {where}: {len(metas)} images, {width}x{height}, {steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
