"""diffusers component folder <-> turbojax Orbax export, streamed leaf by leaf.

`to_jax` keeps what it needs to write the original files back byte for byte: the config.json text, the shard
layout (which key lives in which file), each file's safetensors metadata and the index JSON text. `to_torch`
reproduces them when the tensors still match; otherwise (e.g. a trained or re-typed checkpoint) it writes the
standard diffusers layout.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from turbojax.checkpoint import iter_parts, read_meta, write_params
from turbojax.convert.atomic import copy_file, copy_tree
from turbojax.convert.params import ConversionError, check_keys, flat_params, model_leaves, source_reader
from turbojax.convert.safetensors_io import (atomic_output_dir, open_safetensors, write_index_json,
                                             write_safetensors)
from turbojax.utils import progress_bar

PASSTHROUGH_DIR = "files"  # non-weight files of the source folder, copied back by to-torch
EXTRA_FILE = "extra.safetensors"  # tensors of the source checkpoint that the model does not use
MAX_SHARD_BYTES = 10 * 1000**3  # diffusers' default max_shard_size="10GB"
_DTYPES = {"keep": None, "float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


def _dtype(name):
    if name not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    d = _DTYPES[name]
    return None if d is None else np.dtype(d) if d != "bfloat16" else np.dtype(__import__("ml_dtypes").bfloat16)


def to_jax(src, dst, *, scan_layers: bool = True, dtype: str = "keep", overwrite: bool = False,
           max_part_bytes: int = 256 << 20, progress: bool = True) -> Path:
    """Convert a diffusers component folder into a turbojax Orbax export at `dst` (atomically)."""
    from turbojax.models import abstract_model
    from turbojax.models.registry import config_to_dict, read_component_config

    src, dst = Path(src), Path(dst)
    fam, cfg, config_text = read_component_config(src)
    reader = open_safetensors(src, weights_name=fam.weights_name)
    sources = fam.source_names(reader.keys())
    get, available = source_reader(sources, reader.get, reader.shape)
    model = abstract_model(fam, cfg, scan_layers=scan_layers)
    params = flat_params(model)
    leaves = model_leaves(model, fam)
    check_keys(leaves, params, available, str(src))
    out_dtype = _dtype(dtype)

    specs, by_path = {}, {}
    for leaf in leaves:
        dtypes = {np.dtype(reader.dtype(sources[k].key)) for k in leaf.torch_keys}
        if len(dtypes) > 1 and out_dtype is None:
            raise ConversionError(f"{src}: the layers of {leaf.torch_keys[0]} mix dtypes {sorted(map(str, dtypes))}; "
                                  "pass --dtype to convert them to one")
        specs[leaf.jax_path] = (tuple(params[leaf.jax_path].shape), out_dtype or dtypes.pop())
        by_path[leaf.jax_path] = leaf

    def produce(path):
        arr = by_path[path].to_jax([get(k) for k in by_path[path].torch_keys])
        return arr if arr.dtype == specs[path][1] else arr.astype(np.float32).astype(specs[path][1])

    # Remember the source layout so to-torch can write the files back as they were: which stored key each tensor
    # came from, in which file, and the tensors the model does not use (e.g. a text encoder's vision tower), kept
    # verbatim in `extra.safetensors`. Fused tensors (original Z-Image qkv) cannot be restored: diffusers' layout.
    source, extras = None, []
    if all(sv.parts == 1 for sv in sources.values()):
        used = {sv.key: name for name, sv in sources.items()}
        extras = [k for k in reader.keys() if k not in used]
        source = {"files": {f: {"keys": list(keys), "metadata": (reader.files[f] if hasattr(reader, "files")
                                                                  else reader).metadata} for f, keys in reader.layout.items()},
                  "names": used,
                  "index_name": Path(reader.index_path).name if getattr(reader, "index_path", None) else None,
                  "index_text": getattr(reader, "index_text", None)}
    meta = {"family": fam.name, "config": config_to_dict(fam, cfg), "config_json": config_text,
            "scan_layers": scan_layers, "source": source}
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        write_params(Path(tmp), specs, produce, meta, max_part_bytes=max_part_bytes,
                     progress=lambda it: progress_bar(it, desc="to-jax", enabled=progress, unit="part"))
        if extras:
            write_safetensors(Path(tmp) / EXTRA_FILE, [reader.spec(k) for k in extras])
        # other files of the component (e.g. transformers' generation_config.json) travel along unchanged; other
        # weights beside the model's (a LoRA, an fp16 variant and its index) are not part of it
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name != "config.json" and not f.name.startswith(".") \
                    and not f.name.endswith((".safetensors", ".safetensors.index.json")):
                (Path(tmp) / PASSTHROUGH_DIR).mkdir(exist_ok=True)
                copy_file(f, Path(tmp) / PASSTHROUGH_DIR / f.name)
    return dst


def _default_layout(sizes: dict[str, int], weights_name: str) -> dict[str, list[str]]:
    """diffusers' save_pretrained layout: one file, or greedy 10 GB shards named -0000i-of-0000n."""
    shards, current, size = [], [], 0
    for k in sorted(sizes):
        if current and size + sizes[k] > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(k)
        size += sizes[k]
    shards.append(current)
    if len(shards) == 1:
        return {weights_name: shards[0]}
    n = len(shards)
    stem = weights_name[: -len(".safetensors")]
    return {f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors": s for i, s in enumerate(shards)}


def _spilled(path: Path, shape, dtype) -> np.ndarray:
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=tuple(shape))


def to_torch(src, dst, *, dtype: str = "keep", overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a turbojax Orbax export into a diffusers component folder at `dst` (atomically)."""
    from turbojax.models import abstract_model
    from turbojax.models.registry import config_from_dict, get_family

    src, dst = Path(src), Path(dst)
    meta = read_meta(src)
    fam = get_family(meta["family"])
    cfg = config_from_dict(fam, meta["config"], str(src))
    model = abstract_model(fam, cfg, scan_layers=meta["scan_layers"])
    leaves = model_leaves(model, fam)
    out_dtype = _dtype(dtype)

    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        tmp = Path(tmp)
        scratch = tmp / ".scratch"
        scratch.mkdir()
        # Phase 1: restore one part at a time and spill each torch tensor to a scratch .npy, so phase 2 can write
        # files in safetensors order without holding more than a part in memory.
        shapes, dtypes = {}, {}
        by_path = {l.jax_path: l for l in leaves}
        for part in progress_bar(iter_parts(src, meta), desc="to-torch", enabled=progress,
                                 total=len(meta["parts"]), unit="part"):
            for path, arr in part.items():
                if path not in by_path:
                    raise ConversionError(f"{src}: checkpoint leaf {'.'.join(path)} is not a parameter of "
                                          f"{fam.name}")
                for key, t in zip(by_path[path].torch_keys, by_path[path].to_torch(np.asarray(arr))):
                    if out_dtype is not None and t.dtype != out_dtype:
                        t = t.astype(np.float32).astype(out_dtype)
                    np.ascontiguousarray(t).tofile(scratch / key)  # raw bytes: keeps bf16/fp8 intact
                    shapes[key], dtypes[key] = t.shape, t.dtype
            del part
        expected = {k for l in leaves for k in l.torch_keys}
        if set(shapes) != expected:
            raise ConversionError(f"{src}: checkpoint misses tensors {sorted(expected - set(shapes))[:10]}")

        source = meta.get("source")
        extra = open_safetensors(src / EXTRA_FILE) if (src / EXTRA_FILE).is_file() else None

        def tensor(stored_key):
            """(shape, dtype, producer) of a tensor to write under its stored name."""
            name = source["names"].get(stored_key) if source else stored_key
            if name is not None:
                return shapes[name], dtypes[name], (lambda: _spilled(scratch / name, shapes[name], dtypes[name]))
            if extra is None or stored_key not in extra:
                raise ConversionError(f"{src}: {EXTRA_FILE} lacks the source tensor {stored_key}")
            sh, dt, _ = extra.spec(stored_key)[1:]
            if out_dtype is None or not (dt.kind == "f" or dt.name == "bfloat16"):
                return sh, dt, (lambda: extra.get(stored_key))
            return sh, out_dtype, (lambda: extra.get(stored_key).astype(np.float32).astype(out_dtype))

        if source:
            layout = {f: info["keys"] for f, info in source["files"].items()}
            file_meta = {f: info["metadata"] for f, info in source["files"].items()}
            index_name, index_text = source["index_name"], source["index_text"]
        else:
            layout = _default_layout({k: int(np.prod(shapes[k])) * dtypes[k].itemsize for k in expected},
                                     fam.weights_name)
            file_meta = {f: {"format": "pt"} for f in layout}
            index_name, index_text = None, None
            if len(layout) > 1:
                index_name = fam.weights_name + ".index.json"
                total = sum(int(np.prod(shapes[k])) * dtypes[k].itemsize for k in expected)
                index = {"metadata": {"total_size": total},
                         "weight_map": {k: f for f, ks in layout.items() for k in ks}}
                index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"

        for fname, keys in progress_bar(list(layout.items()), desc="writing", enabled=progress, unit="file"):
            write_safetensors(tmp / fname, [(k, *tensor(k)) for k in keys], metadata=file_meta[fname])
        shutil.rmtree(scratch)
        if index_text is not None:
            write_index_json(tmp / index_name, index_text)
        config_text = meta.get("config_json")
        if config_text is None:
            from turbojax.models.registry import config_to_dict
            config_text = json.dumps(config_to_dict(fam, cfg), indent=2, sort_keys=True) + "\n"
        (tmp / "config.json").write_bytes(config_text.encode("utf-8"))
        if (src / PASSTHROUGH_DIR).is_dir():
            for f in sorted((src / PASSTHROUGH_DIR).iterdir()):
                copy_file(f, tmp / f.name)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# Whole pipeline folders: convert the model components, copy the rest (tokenizer/, scheduler/, model_index.json)
# ---------------------------------------------------------------------------------------------------------------

def is_pipeline(folder) -> bool:
    return (Path(folder) / "model_index.json").is_file()


def convert_pipeline(src, dst, direction: str, *, overwrite: bool = False, progress: bool = True, **kw) -> Path:
    """`to_jax` / `to_torch` applied to every component folder holding weights; everything else copied as is."""
    from turbojax.checkpoint import META_FILE
    src, dst = Path(src), Path(dst)

    def is_model(item: Path) -> bool:
        return item.is_dir() and ((item / META_FILE).is_file() if direction == "to-torch"
                                  else (item / "config.json").is_file() and any(item.glob("*.safetensors")))

    items = [item for item in sorted(src.iterdir()) if not item.name.startswith(".")]
    if not any(is_model(item) for item in items):  # else the "conversion" would only copy the folder
        what = "turbojax export (turbojax.json)" if direction == "to-torch" else "model (config.json + .safetensors)"
        raise ConversionError(f"{src}: no component folder holds a {what}; nothing to convert with {direction}")
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        tmp = Path(tmp)
        for item in items:
            if is_model(item):
                fn = to_jax if direction == "to-jax" else to_torch
                fn(item, tmp / item.name, progress=progress, **kw)
            elif item.is_dir():
                copy_tree(item, tmp / item.name)
            else:
                copy_file(item, tmp / item.name)
    return dst
