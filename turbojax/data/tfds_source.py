"""Prompts from a prepared TFDS dataset: `data.prompts = "tfds:NAME[:VERSION][:SPLIT]"` (split default `train`,
slices such as `train[:1000]` allowed), read from the local `data.tfds_dir` through `tfds.data_source` (array_record
random access; TensorFlow is never imported). `data.tfds_key` names the text feature (default: `prompt`, else
`caption`); an optional `negative_prompt` text feature is used when present.

Nothing is ever downloaded: a real download without network hangs for minutes in retries, so a dataset that is not
already prepared under `data.tfds_dir` is an error before tfds is asked for it. tensorflow-datasets is imported only
here, and only when a `tfds:` source is used.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

PREFIX = "tfds:"
DEFAULT_KEYS = ("prompt", "caption")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def is_tfds(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse(spec: str) -> tuple[str, str | None, str]:
    """"tfds:NAME[:VERSION][:SPLIT]" -> (name, version or None, split). The split may itself hold ':' (slices)."""
    from turbojax.data.prompts import PromptFileError
    name, _, rest = spec[len(PREFIX):].partition(":")
    version = None
    head, _, tail = rest.partition(":")
    if _VERSION.match(head):
        version, rest = head, tail
    if not name.strip() or not re.fullmatch(r"[A-Za-z0-9_]+(/[A-Za-z0-9_.\-]+)?", name):
        raise PromptFileError(f"{spec}: give a TFDS dataset as tfds:NAME[:VERSION][:SPLIT] (NAME like my_prompts "
                              f"or my_prompts/config)")
    return name, version, rest or "train"


def _import_tfds():
    from turbojax.data.prompts import PromptFileError
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # importlib-resources missing shows up here too
        raise PromptFileError(f"tfds: sources need tensorflow-datasets and importlib-resources "
                              f"(pip install -r requirements.txt): {e}") from None
    return tfds


def _prepared_dir(spec: str, name: str, version: str | None, data_dir) -> Path:
    """The prepared version folder, or an error naming the data_dir (checked without tfds: never a download)."""
    from turbojax.data.prompts import PromptFileError
    if not data_dir:
        raise PromptFileError(f"{spec}: set --config.data.tfds_dir to the local folder that holds the prepared "
                              f"dataset (nothing is downloaded)")
    base = Path(data_dir) / name
    versions = sorted(p for p in base.glob("*") if (p / "dataset_info.json").is_file()) if base.is_dir() else []
    if version is not None:
        versions = [p for p in versions if p.name == version]
    if not versions:
        what = f"{name} {version}" if version else name
        raise PromptFileError(f"{spec}: dataset {what} is not prepared in --config.data.tfds_dir {data_dir} "
                              f"(no {name}/<version>/dataset_info.json; nothing is downloaded)")
    return max(versions, key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")))


def _source(spec: str, data_dir):
    """(tfds data source, name, split, version folder)."""
    from turbojax.data.prompts import PromptFileError
    name, version, split = parse(spec)
    folder = _prepared_dir(spec, name, version, data_dir)
    tfds = _import_tfds()
    try:
        ds = tfds.data_source(f"{name}:{folder.name}", split=split, data_dir=str(data_dir), download=False)
    except Exception as e:  # unknown split, a tfrecord-prepared dataset, unreadable metadata: one line, no trace
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PromptFileError(f"{spec}: {msg}") from None
    return ds, name, split, folder


def _text_key(spec: str, ds, key: str) -> str:
    from turbojax.data.prompts import PromptFileError
    feats = list(ds.dataset_info.features.keys()) if hasattr(ds.dataset_info.features, "keys") else []
    if key:
        if key not in feats:
            raise PromptFileError(f"{spec}: --config.data.tfds_key {key!r} is not a feature of the dataset "
                                  f"(features: {', '.join(feats) or 'none'})")
        return key
    for k in DEFAULT_KEYS:
        if k in feats:
            return k
    raise PromptFileError(f"{spec}: no 'prompt' or 'caption' feature; set --config.data.tfds_key to the text "
                          f"feature (features: {', '.join(feats) or 'none'})")


def _text(value) -> str | None:
    """A record's text value as str, or None when it is not text (numbers, arrays of several values)."""
    if hasattr(value, "ndim") and getattr(value, "ndim", 0) == 0 and hasattr(value, "item"):
        value = value.item()  # 0-d numpy (Tensor(dtype=string) features)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value if isinstance(value, str) else None


def read_tfds_prompts(spec: str, data_dir, key: str = ""):
    from turbojax.data.prompts import PromptFileError, Prompts
    ds, name, split, _ = _source(spec, data_dir)
    key = _text_key(spec, ds, key)
    has_neg = key != "negative_prompt" and "negative_prompt" in ds.dataset_info.features.keys()
    prompts, negatives, seen = [], [], set()
    blank = dup = 0
    for i in range(len(ds)):
        rec = ds[i]
        where = f"{spec}: split {split} record {i}"
        if not isinstance(rec, dict) or key not in rec:
            raise PromptFileError(f"{where}: no {key!r} feature")
        try:
            prompt = _text(rec[key])
            neg = _text(rec["negative_prompt"]) if has_neg else None
        except UnicodeDecodeError as e:
            raise PromptFileError(f"{where}: {key!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if prompt is None:
            # np_dtype: the feature's `dtype` property would import TensorFlow
            kind = getattr(ds.dataset_info.features[key], "np_dtype", None) or type(rec[key]).__name__
            raise PromptFileError(f"{where}: {key!r} is not text ({kind})")
        if has_neg and neg is None:
            raise PromptFileError(f"{where}: 'negative_prompt' is not text")
        prompt = prompt.strip()
        if not prompt:
            blank += 1
            continue
        if prompt in seen:
            dup += 1
            continue
        seen.add(prompt)
        prompts.append(prompt)
        negatives.append(neg or None)  # an empty negative: the config's negative prompt
    if not prompts:
        raise PromptFileError(f"{spec}: split {split} holds no prompts ({len(ds)} records, {blank} blank)")
    return Prompts(prompts, negatives, blank, dup, ())


def fingerprint(spec: str, data_dir, key: str = "") -> str:
    """What the text cache is keyed on: name, version, split, record count, text key and the bytes of the split's
    files (a re-prepared dataset with other prompts changes the key even at the same version and count)."""
    ds, name, split, folder = _source(spec, data_dir)
    key = _text_key(spec, ds, key)
    info = ds.dataset_info.splits[split]
    h = hashlib.sha256()
    for f in sorted(str(p) for p in info.filepaths):
        h.update(Path(f).name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return f"tfds:{name}:{folder.name}:{split}:{len(ds)} records:key {key}:{h.hexdigest()}"
