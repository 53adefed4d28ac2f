"""Prompt files: one prompt per line (`.txt`), or JSON Lines (`.jsonl`: `{"prompt": ..., "negative_prompt": ...,
"image": ...}`; `image` a real image of the prompt, relative to the file's folder, for the latents cache).

Blank lines are skipped and repeated prompts kept once (the first occurrence); a line that is not valid JSON, or a
record without a non-empty string `prompt`, is an error naming the file and the line number. `tfds:NAME[:SPLIT]`
reads a prepared TFDS dataset instead (see `tfds_source`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path


class PromptFileError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Prompts:
    prompts: list[str]
    negatives: list[str | None]  # per prompt, None: the config's negative prompt
    skipped_blank: int = 0
    skipped_duplicate: int = 0
    images: tuple = ()  # per prompt, the JSONL `image` path or None (empty for .txt files)


def read_prompts(path, *, tfds_dir="", tfds_key="") -> Prompts:
    if isinstance(path, str) and path.startswith("tfds:"):  # tfds imported only for such sources
        from turbojax.data.tfds_source import read_tfds_prompts
        return read_tfds_prompts(path, tfds_dir, tfds_key)
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    prompts, negatives, images, seen = [], [], [], set()
    blank = dup = 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            blank += 1
            continue
        neg = image = None
        if jsonl:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise PromptFileError(f"{path}:{n}: a record needs a non-empty string \"prompt\"")
            prompt = rec["prompt"].strip()
            neg = rec.get("negative_prompt")
            if neg is not None and not isinstance(neg, str):
                raise PromptFileError(f"{path}:{n}: \"negative_prompt\" must be a string")
            image = rec.get("image")
            if image is not None and (not isinstance(image, str) or not image.strip()):
                raise PromptFileError(f"{path}:{n}: \"image\" must be a non-empty path string")
        else:
            prompt = line.strip()
        if prompt in seen:
            dup += 1
            continue
        seen.add(prompt)
        prompts.append(prompt)
        negatives.append(neg)
        images.append(image)
    if not prompts:
        raise PromptFileError(f"{path}: holds no prompts")
    return Prompts(prompts, negatives, blank, dup, tuple(images) if jsonl else ())


def read_config_prompts(data) -> Prompts:
    """`read_prompts` of a config's `data` block (`prompts`, and `tfds_dir` / `tfds_key` for `tfds:` sources)."""
    return read_prompts(data.prompts, tfds_dir=data.get("tfds_dir", ""), tfds_key=data.get("tfds_key", ""))


def prompts_fingerprint(data) -> str:
    """The text cache's key of the prompt source: the file's sha256, or a TFDS dataset's name, version, split,
    record count and file hash."""
    if isinstance(data.prompts, str) and data.prompts.startswith("tfds:"):
        from turbojax.data.tfds_source import fingerprint
        return fingerprint(data.prompts, data.get("tfds_dir", ""), data.get("tfds_key", ""))
    import hashlib
    return hashlib.sha256(Path(data.prompts).read_bytes()).hexdigest()
