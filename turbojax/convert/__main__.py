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
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from turbojax.utils import return_freed_buffers_to_os


@contextmanager
def _signals_unwind():
    """SIGTERM (what `timeout`, job schedulers and `kill` send) unwinds like Ctrl-C, through the cleanup of the
    temp folders; a rename already under way finishes first. A second SIGTERM during cleanup is ignored; a second
    Ctrl-C stops at once (the next run into the same DST removes what is left). The previous handlers come back
    at the end (main() is also called in-process, e.g. by tests)."""
    from turbojax.convert import atomic

    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        atomic.raise_interrupted(signum, frame)

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig, old in saved.items():
        if old in (signal.SIG_DFL, signal.default_int_handler):  # leave a parent's deliberate choice alone
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        atomic._pending.clear()  # one held back as the output was completed: this run is over anyway


def _same_or_inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _check_paths(args) -> str | None:
    """The message for a mistake in SRC / DST / flags that shows before any work starts, or None."""
    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        return f"SRC {src}: no such folder"
    if not src.is_dir():
        what = "a turbojax export" if args.cmd == "to-torch" else "a diffusers component or pipeline folder"
        return f"SRC {src} is a file; expected {what}"
    rs, rd = src.resolve(), dst.resolve()
    if _same_or_inside(rd, rs):
        return f"DST {dst} is {'SRC' if rd == rs else 'inside SRC ' + str(src)}; write the output elsewhere"
    if _same_or_inside(rs, rd):
        return f"DST {dst} contains SRC {src}; replacing DST would delete SRC"
    if dst.exists() and not dst.is_dir():
        return f"DST {dst} exists and is not a folder; refusing to replace it"
    blocker = next((p for p in dst.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"DST {dst}: {blocker} is a file, not a folder"
    if args.cmd == "to-jax" and args.part_size_mb < 1:
        return f"--part-size-mb must be >= 1, got {args.part_size_mb}"
    from turbojax.checkpoint import META_FILE
    exported = (src / META_FILE).is_file() or ((src / "model_index.json").is_file() and any(
        (c / META_FILE).is_file() for c in src.iterdir() if c.is_dir()))
    if args.cmd == "to-jax" and exported:
        return f"SRC {src} is a turbojax export already; convert it back with to-torch"
    if args.cmd == "to-torch" and not (src / META_FILE).is_file() and (src / "config.json").is_file():
        return f"SRC {src} is a diffusers folder, not a turbojax export; convert it with to-jax"
    return None


def _convert(args) -> None:
    from turbojax.convert.folders import convert_pipeline, is_pipeline, to_jax, to_torch
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

    return_freed_buffers_to_os()  # host memory near one tensor (see its docstring)
    from turbojax.convert.atomic import DestinationExists
    try:
        problem = _check_paths(args)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        with _signals_unwind():
            _convert(args)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"error: interrupted by {signal.Signals(signum).name}; DST {args.dst} left as it was (temporary "
              "files removed)", file=sys.stderr)
        return 128 + signum
    except DestinationExists as e:
        print(f"error: DST {e.path} already exists and is not empty; pass --overwrite to replace it",
              file=sys.stderr)
        return 2
    except (ValueError, NotImplementedError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    except OSError as e:  # missing, unreadable or unwritable files, full disk: name the file and the reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
