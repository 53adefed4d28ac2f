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
from turbojax.convert.params import (ConversionError, check_keys, flat_params, is_verbatim, model_leaves,
                                     source_reader)
from turbojax.convert.safetensors_io import (atomic_output_dir, open_safetensors, write_index_json,
                                             write_safetensors)
from turbojax.utils import progress_bar

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
MAX_SHARD_BYTES = 10 * 1000**3  # diffusers' default max_shard_size="10GB"
_DTYPES = {"keep": None, "float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


def _dtype(name):
    if name not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    d = _DTYPES[name]
    return None if d is None else np.dtype(d) if d != "bfloat16" else np.dtype(__import__("ml_dtypes").bfloat16)


def to_jax(src, dst, *, scan_layers: bool = True, dtype: str = "keep", overwrite: bool = False,
           max_part_bytes: int = 1 << 30, progress: bool = True) -> Path:
    """Convert a diffusers component folder into a turbojax Orbax export at `dst` (atomically)."""
    from turbojax.models import abstract_model
    from turbojax.models.registry import config_to_dict, read_component_config

    src, dst = Path(src), Path(dst)
    fam, cfg, config_text = read_component_config(src)
    reader = open_safetensors(src)
    sources = fam.source_names(reader.keys())
    get, available = source_reader(sources, reader.get, reader.shape)
    name0 = next(iter(sources), "")
    prefix = sources[name0].key[: len(sources[name0].key) - len(name0)] if sources else ""
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

    source = None
    # renamed, split or dropped tensors cannot be written back as they were: to-torch then writes diffusers' layout
    if dtype == "keep" and is_verbatim(sources) and len(sources) == len(reader.keys()):
        files = {}
        for fname, keys in reader.layout.items():
            files[fname] = {"keys": list(keys), "metadata": open_safetensors(src / fname).metadata}
        source = {"key_prefix": prefix, "files": files,
                  "index_name": Path(reader.index_path).name if getattr(reader, "index_path", None) else None,
                  "index_text": getattr(reader, "index_text", None)}
    meta = {"family": fam.name, "config": config_to_dict(fam, cfg), "config_json": config_text,
            "scan_layers": scan_layers, "source": source}
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        write_params(Path(tmp), specs, produce, meta, max_part_bytes=max_part_bytes,
                     progress=lambda it: progress_bar(it, desc="to-jax", enabled=progress, unit="part"))
    return dst


def _default_layout(sizes: dict[str, int]) -> dict[str, list[str]]:
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
        return {WEIGHTS_NAME: shards[0]}
    n = len(shards)
    stem = WEIGHTS_NAME[: -len(".safetensors")]
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
        if source and dtype == "keep" and sorted(k for f in source["files"].values() for k in f["keys"]) == sorted(
                source["key_prefix"] + k for k in expected):
            layout = {f: [k[len(source["key_prefix"]):] for k in info["keys"]] for f, info in source["files"].items()}
            file_meta = {f: info["metadata"] for f, info in source["files"].items()}
            prefix, index_name, index_text = source["key_prefix"], source["index_name"], source["index_text"]
        else:
            layout = _default_layout({k: int(np.prod(shapes[k])) * dtypes[k].itemsize for k in expected})
            file_meta = {f: {"format": "pt"} for f in layout}
            prefix, index_name, index_text = "", None, None
            if len(layout) > 1:
                index_name = INDEX_NAME
                total = sum(int(np.prod(shapes[k])) * dtypes[k].itemsize for k in expected)
                index = {"metadata": {"total_size": total},
                         "weight_map": {k: f for f, ks in layout.items() for k in ks}}
                index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"

        for fname, keys in progress_bar(list(layout.items()), desc="writing", enabled=progress, unit="file"):
            write_safetensors(tmp / fname, [(prefix + k, shapes[k], dtypes[k], (lambda k=k: _spilled(scratch / k,
                                                                                            shapes[k], dtypes[k])))
                                             for k in keys], metadata=file_meta[fname])
        shutil.rmtree(scratch)
        if index_text is not None:
            write_index_json(tmp / index_name, index_text)
        config_text = meta.get("config_json") if dtype == "keep" else None
        if config_text is None:
            from turbojax.models.registry import config_to_dict
            config_text = json.dumps(config_to_dict(fam, cfg), indent=2, sort_keys=True) + "\n"
        (tmp / "config.json").write_bytes(config_text.encode("utf-8"))
    return dst
