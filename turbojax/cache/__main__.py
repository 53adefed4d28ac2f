"""`python -m turbojax.cache {text,latents,teacher,all} --config FILE [--config.KEY VALUE ...]`

Builds the caches of a training config (the same code train.py runs when a cache is missing), into
`--config.data.cache_dir` (default `./caches`). A rerun after a kill resumes; a complete cache is left as it is;
changed inputs (encoder weights, template, max length, dtype, prompt file, VAE, images, sampler settings) build a
new folder beside the old one, which is named and never deleted.
"""
from __future__ import annotations

import sys
from pathlib import Path

from turbojax.training import UserError, run_cli
from turbojax.training import config as config_lib

KINDS = {"text": ("text",), "latents": ("latents",), "teacher": ("teacher",), "all": None}
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "qwen_image_dmd2_gan.py"


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in KINDS:
        raise UserError(f"first argument: one of {', '.join(KINDS)} (the cache to build); got "
                        f"{argv[0] if argv else 'nothing'!r}")
    which, rest = argv[0], argv[1:]
    cfg, _ = config_lib.parse_args(rest, default_config=DEFAULT_CONFIG, prog=f"python -m turbojax.cache {which}",
                                   search_dirs=[Path.cwd(), DEFAULT_CONFIG.parents[1]])
    config_lib.validate(cfg)
    from turbojax.cache import build, store
    from turbojax.data.prompts import PromptFileError
    if not cfg.init_from:
        raise UserError("--config.init_from: give the teacher's diffusers pipeline folder")
    if not cfg.data.prompts:
        raise UserError("--config.data.prompts: give a prompt file (.txt, one per line, or .jsonl)")
    kinds = KINDS[which] or build.needed(cfg)
    root = Path(cfg.data.cache_dir or "caches")
    try:
        folders = build.ensure(cfg, root, kinds, progress=lambda m: print(m, flush=True))
    except PromptFileError as e:
        raise UserError(f"--config.data.prompts {e}") from None
    except (store.CacheError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    except ValueError as e:
        raise UserError(f"--config.init_from {cfg.init_from}: {e}") from None
    for k, folder in folders.items():  # with aspect-ratio buckets: one latents / teacher cache per bucket
        if k.split("@")[0] in kinds:
            print(f"{k}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
