"""Sample latents with a Qwen-Image transformer (text encoder and VAE arrive with the pipeline work).

    python sample.py --model qwen_image_tiny --out latents.npz                         # embedded tiny model
    python sample.py --model /path/Qwen-Image/transformer --embeds prompt.npz \\
        --lora lightning.safetensors:1.0 --sigmas 1,0.75,0 --out latents.npz

`--embeds` is an .npz with `encoder_hidden_states [B, L, D]` and optionally `encoder_hidden_states_mask [B, L]`
(e.g. saved from diffusers' `pipe.encode_prompt`); `--noise` an .npz/.npy with initial packed latents
`[B, (H/16)(W/16), 64]` to make runs comparable with other implementations.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def parse_lora(spec: str):
    path, _, scale = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "1")
    return (path, float(scale))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen_image_tiny", help="diffusers transformer folder, turbojax export, or "
                   "a preset name (random weights)")
    p.add_argument("--embeds", help=".npz with encoder_hidden_states (and encoder_hidden_states_mask)")
    p.add_argument("--noise", help=".npy/.npz initial packed latents")
    p.add_argument("--lora", action="append", default=[], help="FILE[:SCALE], repeatable")
    p.add_argument("--sigmas", default="1,0.75,0", help="comma-separated sigma schedule ending in 0")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", required=True, help="output .npz (key `latents`, packed [B, N, C])")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from turbojax import models
    from turbojax.sampling import euler_sample

    if args.width % 16 or args.height % 16:
        p.error(f"--width/--height must be multiples of 16, got {args.width}x{args.height}")
    sigmas = [float(s) for s in args.sigmas.split(",")]
    dtype = jnp.dtype(args.dtype)
    if Path(args.model).exists():
        model = models.from_diffusers(args.model, dtype=dtype, loras=[parse_lora(s) for s in args.lora])
    else:
        model = models.apply_loras(models.create(args.model, seed=args.seed, param_dtype=dtype),
                                   [parse_lora(s) for s in args.lora])
    cfg = model.config
    h, w = args.height // 16, args.width // 16
    rng = np.random.default_rng(args.seed)
    if args.embeds:
        data = np.load(args.embeds)
        ctx = data["encoder_hidden_states"]
        mask = data["encoder_hidden_states_mask"] if "encoder_hidden_states_mask" in data else None
    else:
        ctx = rng.standard_normal((args.num_images, 16, cfg.joint_attention_dim)).astype(np.float32)
        mask = None
    if args.noise:
        noise = np.load(args.noise)
        noise = noise[noise.files[0]] if hasattr(noise, "files") else noise
    else:
        noise = jax.random.normal(jax.random.key(args.seed), (ctx.shape[0], h * w, cfg.in_channels), jnp.float32)
    latents = euler_sample(model, noise, ctx, mask, sigmas, img_shapes=((1, h, w),))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, latents=np.asarray(latents, np.float32))
    print(f"wrote {out} ({latents.shape[0]} samples, {len(sigmas) - 1} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
