"""Checkpoint conversion CLI.

    python -m turbojax.convert to-jax   SRC DST   # diffusers component folder -> turbojax Orbax export
    python -m turbojax.convert to-torch SRC DST   # turbojax Orbax export -> diffusers component folder

SRC may also be a whole pipeline folder (model_index.json): its transformer, text encoder and VAE are converted and
the tokenizer, scheduler and model_index.json copied, so `turbojax.pipelines.from_diffusers(DST)` loads the result.

Both directions stream tensor by tensor (peak memory near one tensor or one checkpoint part), show a progress
bar, check every key strictly, and write DST atomically (nothing is left half-written on error).
"""
from __future__ import annotations

import argparse
import sys


def _return_freed_buffers_to_os() -> None:
    """glibc serves mid-sized buffers from the heap once big ones were freed (dynamic mmap threshold), so a
    tensor-by-tensor conversion would keep the freed memory of earlier tensors. A fixed 1 MiB threshold makes every
    tensor buffer its own mapping, returned on free. Process-wide, hence done here in the CLI and not the library."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m turbojax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-jax", help="diffusers component folder -> turbojax Orbax export")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--no-scan", action="store_true", help="store blocks one by one instead of stacked (scanned)")
    a.add_argument("--part-size-mb", type=int, default=256, help="max size of one Orbax checkpoint part (bounds peak host memory)")
    b = sub.add_parser("to-torch", help="turbojax Orbax export -> diffusers component folder")
    b.add_argument("src")
    b.add_argument("dst")
    for s in (a, b):
        s.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"],
                       help="cast tensors (default: keep the stored dtypes; only 'keep' round-trips byte-exactly)")
        s.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        s.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    _return_freed_buffers_to_os()
    from turbojax.convert.folders import convert_pipeline, is_pipeline, to_jax, to_torch
    try:
        if is_pipeline(args.src):
            kw = dict(scan_layers=not args.no_scan, max_part_bytes=args.part_size_mb << 20) \
                if args.cmd == "to-jax" else {}
            convert_pipeline(args.src, args.dst, args.cmd, dtype=args.dtype, overwrite=args.overwrite,
                             progress=not args.no_progress, **kw)
        elif args.cmd == "to-jax":
            to_jax(args.src, args.dst, scan_layers=not args.no_scan, dtype=args.dtype, overwrite=args.overwrite,
                   max_part_bytes=args.part_size_mb << 20, progress=not args.no_progress)
        else:
            to_torch(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
