"""Text-to-image sampling with a local diffusers pipeline folder (Qwen-Image(-2512) or Z-Image(-Turbo)).

    python sample.py --model Qwen-Image-2512 --config configs/sample_qwen_image_turbo_2step.py \\
        --lora Wuli-Qwen-Image-2512-Turbo-LoRA-2steps-V1.0-bf16.safetensors:1.0 \\
        --prompt "a red fox in fresh snow" --num-images 4 --seed 0 --out fox.png

`--out` ending in `.png` writes one image or a grid, `.npz` writes `images` (uint8 [N, H, W, 3]), anything else is
a folder with one PNG per image. PNGs carry prompt, seed, steps, guidance and model in their text metadata. Image i
uses noise from seed + i, so results do not depend on `--batch-size`; `--noise FILE` (.npy/.npz, the pipeline's
latent layout) starts from given latents instead, to compare with other implementations.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_CONFIGS = {"qwen_image": "configs/sample_qwen_image_base.py", "z_image": "configs/sample_z_image_turbo.py"}
REPO = Path(__file__).resolve().parent


def load_config(spec: str):
    """`path/to/config.py[:arg]` -> the file's `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    path = Path(path) if Path(path).is_absolute() or Path(path).exists() else REPO / path
    if not path.is_file():
        raise SystemExit(f"error: config file {spec} not found")
    sys.path.insert(0, str(REPO))
    mod_spec = importlib.util.spec_from_file_location(f"_sample_config_{path.stem}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def parse_lora(spec: str) -> tuple[str, float]:
    """FILE[:SCALE]; a path that itself exists wins over splitting at the last colon."""
    if Path(spec).exists() or ":" not in spec:
        path, scale = spec, 1.0
    else:
        path, _, s = spec.rpartition(":")
        try:
            scale = float(s)
        except ValueError:
            raise SystemExit(f"error: --lora {spec}: scale {s!r} is not a number") from None
    if not Path(path).is_file():
        raise SystemExit(f"error: --lora file {path} not found")
    return path, scale


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            raise SystemExit(f"error: --prompts-file {f} not found")
        lines = [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise SystemExit(f"error: --prompts-file {f} holds no prompts")
        prompts += lines
    if not prompts:
        raise SystemExit("error: give --prompt or --prompts-file")
    return [p for p in prompts for _ in range(args.num_images)]


def grid(images: np.ndarray) -> np.ndarray:
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, im in enumerate(images):
        out[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    return out


def png_info(meta: dict):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for k, v in meta.items():
        info.add_itxt(k, str(v))
    return info


def write_outputs(out: Path, images: np.ndarray, metas: list[dict]) -> None:
    """Write everything through a temporary sibling, then rename: no partial outputs on failure."""
    from PIL import Image
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npz":
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".npz")
        os.close(fd)
        np.savez(tmp, images=images, prompts=np.array([m["prompt"] for m in metas]),
                 seeds=np.array([m["seed"] for m in metas]))
        os.replace(tmp, out)
    elif out.suffix.lower() == ".png":
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
        os.close(fd)
        meta = metas[0] if len(metas) == 1 else {**metas[0], "prompt": " | ".join(m["prompt"] for m in metas),
                                                  "seed": ",".join(str(m["seed"]) for m in metas)}
        Image.fromarray(images[0] if len(images) == 1 else grid(images)).save(tmp, pnginfo=png_info(meta))
        os.replace(tmp, out)
    else:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            for i, (im, meta) in enumerate(zip(images, metas)):
                Image.fromarray(im).save(tmp / f"{i:05d}.png", pnginfo=png_info(meta))
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline folder (or a turbojax export of one)")
    p.add_argument("--config", help="sampling preset, e.g. configs/sample_qwen_image_lightning.py:4 "
                                    "(default: the family's base preset)")
    p.add_argument("--prompt", action="append", help="repeatable")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, help="Qwen true_cfg_scale / Z-Image guidance_scale")
    p.add_argument("--sigmas", help="explicit comma-separated sigmas, e.g. 1,0.75 (overrides --steps)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", action="append", default=[], help="FILE[:SCALE], repeatable")
    p.add_argument("--noise", help=".npy/.npz initial latents for all images, in the pipeline's layout")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--tiled-decode", action="store_true", help="decode in overlapping tiles (large images)")
    p.add_argument("--out", required=True, help=".png, .npz, or a folder")
    args = p.parse_args(argv)

    # ---- validate everything cheap before loading anything heavy ----
    from turbojax.pipelines import PipelineError, from_diffusers, read_model_index
    try:
        family, _ = read_model_index(Path(args.model))
    except PipelineError as e:
        raise SystemExit(f"error: {e}") from None
    cfg = load_config(args.config or DEFAULT_CONFIGS[family])
    if cfg.family != family:
        raise SystemExit(f"error: config {args.config} is for {cfg.family}, but {args.model} is a {family} pipeline")
    width, height = args.width or cfg.width, args.height or cfg.height
    if width % 16 or height % 16 or width <= 0 or height <= 0:
        raise SystemExit(f"error: --width/--height must be positive multiples of 16, got {width}x{height}")
    if args.batch_size < 1 or args.num_images < 1:
        raise SystemExit("error: --batch-size and --num-images must be >= 1")
    prompts = read_prompts(args)
    loras = [parse_lora(s) for s in args.lora]
    sigmas = [float(s) for s in args.sigmas.split(",")] if args.sigmas else list(cfg.sigmas) or None
    steps = args.steps or (len(sigmas) if sigmas else cfg.steps)
    guidance = cfg.guidance if args.guidance is None else args.guidance
    negative = cfg.negative_prompt if args.negative_prompt is None else args.negative_prompt
    noise = None
    if args.noise:
        data = np.load(args.noise)
        noise = data[data.files[0]] if hasattr(data, "files") else data
        if noise.shape[0] != len(prompts):
            raise SystemExit(f"error: --noise {args.noise} holds {noise.shape[0]} latents for {len(prompts)} images")
    out = Path(args.out)

    import jax.numpy as jnp

    from turbojax.utils import progress_bar
    pipe = from_diffusers(args.model, loras=loras, dtype=jnp.dtype(args.dtype))
    batches = [list(range(i, min(i + args.batch_size, len(prompts)))) for i in range(0, len(prompts),
                                                                                     args.batch_size)]
    images, metas = [], []
    try:
        for idx in progress_bar(batches, desc="sampling", enabled=len(batches) > 1, unit="batch"):
            if noise is not None:
                z = noise[idx]
            else:
                z = np.concatenate([np.asarray(pipe.noise(args.seed + i, 1, height, width)) for i in idx])
            images.append(pipe([prompts[i] for i in idx], negative_prompt=negative or None, steps=steps,
                               guidance=guidance, width=width, height=height, noise=z, sigmas=sigmas,
                               scheduler=cfg.scheduler or None, max_sequence_length=cfg.max_sequence_length,
                               cfg_normalization=cfg.cfg_normalization, cfg_truncation=cfg.cfg_truncation,
                               tiled_decode=True if args.tiled_decode else None))
            metas += [dict(prompt=prompts[i], seed=args.seed + i, steps=steps, guidance=guidance,
                           model=Path(args.model).name, loras=",".join(f"{Path(f).name}:{s}" for f, s in loras))
                      for i in idx]
    except PipelineError as e:
        raise SystemExit(f"error: {e}") from None
    write_outputs(out, np.concatenate(images), metas)
    print(f"wrote {out} ({len(metas)} images, {width}x{height}, {steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
