"""The three caches, built with the pipeline's own text encoder, VAE and sampler (jitted, batched, sharded).

    text     tables `prompt` (one record per prompt: `emb [sum L, D]` pad-free, `len [n]`, `neg [n]` the index of
             its negative) and `negative` (the distinct negative prompts). Key: text encoder + tokenizer
             fingerprints, prompt template, max length, dtype, the prompt file's bytes (a TFDS source: name, version,
             split, record count, file hash), the negative prompt.
    latents  table `real`: `latent [n, *latent_shape]` (the transformer's layout), `prompt [n]` (the JSONL record
             whose `image` it is, -1 for a folder image), `image [n]` (index in the sorted source list). Key: VAE
             fingerprint, resolution, mean or sample + seed, the image list with sizes and mtimes.
    teacher  table `teacher`: `latent [n, *latent_shape]`, `prompt [n]` (record i is prompt i mod P, noise seed
             `seed + 7919 + i`, as the start-up path). Key: transformer and scheduler fingerprints, steps, CFG,
             seed, resolution, count, dtype and the text cache's key.

With aspect-ratio buckets (`data.buckets`, see `turbojax.data.buckets`) the latents and teacher caches are one per
bucket, named `latents@WxH` / `teacher@WxH` in the folders `ensure` returns: each real image is encoded at the bucket
nearest its aspect ratio (`image` then indexes that bucket's sources), and the teacher samples split evenly over the
buckets (bucket i: ceil(n / buckets) samples of prompts 0, 1, ... with noise seeds offset by i times that count).

Prompts within a text shard are encoded sorted by length (fewer padded columns per batch) and put back in order;
every shard depends only on its record range, so a resumed build equals an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

import numpy as np

from turbojax.cache import store
from turbojax.data.prompts import prompts_fingerprint, read_config_prompts


def _template(family: str) -> str:
    from turbojax import text
    return text.QWEN_IMAGE_TEMPLATE + f"|drop {text.QWEN_IMAGE_DROP_IDX}" if family == "qwen_image" else \
        "tokenizer chat template (enable_thinking=True), hidden_states[-2]"


def family_of(folder) -> str:
    from turbojax import pipelines
    return pipelines.read_model_index(Path(folder))[0]


# ---- keys -----------------------------------------------------------------------------------------------------

def text_fields(cfg) -> dict:
    folder = Path(cfg.init_from)
    family = family_of(folder)
    return {"family": family, "text_encoder": store.folder_fingerprint(folder / "text_encoder"),
            "tokenizer": store.folder_fingerprint(folder / "tokenizer"), "template": _template(family),
            "max_sequence_length": int(cfg.data.max_sequence_length), "dtype": str(cfg.dtype),
            "prompts": prompts_fingerprint(cfg.data), "negative_prompt": str(cfg.data.negative_prompt),
            "shard_size": int(cfg.data.cache_shard_size)}


def image_sources(cfg) -> list[tuple[Path, int]]:
    """(path, prompt index or -1): the JSONL prompts' `image` fields, then the files of `data.images`."""
    from turbojax.data.images import list_images
    src = read_config_prompts(cfg.data) if cfg.data.prompts else None
    base = Path(cfg.data.prompts).parent if cfg.data.prompts else Path(".")
    out = [((base / img) if not Path(img).is_absolute() else Path(img), i)
           for i, img in enumerate(src.images if src else []) if img]
    if cfg.data.images:
        out += [(p, -1) for p in list_images(cfg.data.images)]
    return out


def latent_fields(cfg, sources, size: tuple[int, int] | None = None) -> dict:
    """`size` (width, height): an aspect-ratio bucket's resolution (default data.width x data.height)."""
    folder = Path(cfg.init_from)
    w, h = size or (int(cfg.data.width), int(cfg.data.height))
    listing = hashlib.sha256()
    for p, i in sources:
        try:
            st = p.stat()
            listing.update(f"{p.resolve()}|{i}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            listing.update(f"{p}|{i}|missing\n".encode())
    return {"family": family_of(folder), "vae": store.folder_fingerprint(folder / "vae"),
            "width": int(w), "height": int(h), "mode": str(cfg.data.latent_mode),
            "seed": int(cfg.seed) if cfg.data.latent_mode == "sample" else None, "images": listing.hexdigest(),
            "count": len(sources), "shard_size": int(cfg.data.cache_shard_size)}


def teacher_fields(cfg, text_key: str, size: tuple[int, int] | None = None, count: int | None = None,
                   seed_offset: int = 0) -> dict:
    """`size`, `count`, `seed_offset`: one aspect-ratio bucket's share of the samples (see `ensure`)."""
    folder = Path(cfg.init_from)
    w, h = size or (int(cfg.data.width), int(cfg.data.height))
    fields = {"family": family_of(folder), "transformer": store.folder_fingerprint(folder / "transformer"),
            "scheduler": store.folder_fingerprint(folder / "scheduler"), "steps": int(cfg.data.teacher_steps),
            "cfg": float(cfg.dmd.real_cfg), "seed": int(cfg.seed), "width": int(w), "height": int(h),
            "count": int(cfg.data.teacher_samples if count is None else count), "dtype": str(cfg.dtype),
            "text": text_key, "shard_size": int(cfg.data.cache_shard_size)}
    if seed_offset:
        fields["seed_offset"] = int(seed_offset)
    return fields


# ---- builders -------------------------------------------------------------------------------------------------

def _shards(n: int, size: int) -> int:
    return max(1, -(-n // size))


def _encode(pipe, texts: list[str], max_len: int, batch: int, dtype) -> list[np.ndarray]:
    """Each text's valid embedding rows `[L_i, D]` (no padding), in the order of `texts`."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list = [None] * len(texts)
    for lo in range(0, len(order), batch):
        idx = order[lo:lo + batch]
        res = pipe.encode_prompts([texts[i] for i in idx], max_len)
        if pipe.family == "qwen_image":
            e, m = np.asarray(res[0]), res[1]
            lens = [e.shape[1]] * len(idx) if m is None else np.asarray(m).sum(axis=1).tolist()
            rows = [e[j, :int(n)] for j, n in enumerate(lens)]
        else:
            rows = [np.asarray(r) for r in res]
        for i, r in zip(idx, rows):
            out[i] = r.astype(dtype)
    return out


def build_text(cfg, folder: Path, fields: dict, pipe, *, progress=print) -> dict:
    src = read_config_prompts(cfg.data)
    negs = [cfg.data.negative_prompt] + sorted({n for n in src.negatives if n is not None} -
                                               {cfg.data.negative_prompt})
    neg_id = np.asarray([0 if n is None else negs.index(n) for n in src.negatives], np.int32)
    size, max_len = int(cfg.data.cache_shard_size), int(cfg.data.max_sequence_length)
    import jax.numpy as jnp
    dtype = np.dtype(jnp.dtype(cfg.dtype))
    texts = {"prompt": src.prompts, "negative": negs}

    def make(table, i):
        lo, hi = i * size, min((i + 1) * size, len(texts[table]))
        rows = _encode(pipe, texts[table][lo:hi], max_len, int(cfg.data.encode_batch), dtype)
        arrays = {"emb": np.concatenate(rows), "len": np.asarray([len(r) for r in rows], np.int32)}
        if table == "prompt":
            arrays["neg"] = neg_id[lo:hi]
        summary = {"records": hi - lo}
        if table == "prompt" and i == 0:
            summary.update(skipped_blank=src.skipped_blank, skipped_duplicate=src.skipped_duplicate)
        return arrays, summary

    progress(f"text cache: {len(src.prompts)} prompts from {cfg.data.prompts} ({src.skipped_blank} blank and "
             f"{src.skipped_duplicate} repeated lines skipped), {len(negs)} negative prompt(s)")
    # both tables in shards of `size` records (`make` encodes records [i * size, (i + 1) * size) of shard i)
    shards = {"prompt": _shards(len(src.prompts), size), "negative": _shards(len(negs), size)}
    return store.build(folder, "text", fields, shards, make, progress=progress, desc="encoding prompts")


def latent_layout(pipe, z_nchw):
    """VAE-space NCHW latents (normalised) -> the transformer's layout of one batch."""
    from turbojax import sampling
    if pipe.family == "qwen_image":
        return np.asarray(sampling.pack_latents(z_nchw))
    return np.asarray(z_nchw)[:, :, None]


def build_latents(cfg, folder: Path, fields: dict, pipe, sources, *, progress=print) -> dict:
    """`sources`: [(path, prompt index or -1)], encoded at the resolution of `fields` (width, height)."""
    import jax
    import jax.numpy as jnp
    from turbojax.data.images import BadImage, load_image
    size, w, h = int(cfg.data.cache_shard_size), int(fields["width"]), int(fields["height"])
    batch, sample = int(cfg.data.encode_batch), cfg.data.latent_mode == "sample"
    shape = _latent_shape(pipe, h, w)

    def make(_, i):
        lo, hi = i * size, min((i + 1) * size, len(sources))
        imgs, keep, skipped = [], [], []
        for j in range(lo, hi):
            try:
                imgs.append(load_image(sources[j][0], w, h))
                keep.append(j)
            except BadImage as e:
                skipped.append(str(e))
        lat = []
        for b in range(0, len(imgs), batch):
            x = jnp.asarray(np.stack(imgs[b:b + batch]), jnp.float32) / 127.5 - 1.0
            mom = pipe.vae.encode_nhwc(x.astype(pipe.vae.dtype)).astype(jnp.float32)
            mean, logvar = jnp.split(mom, 2, axis=-1)
            z = mean
            if sample:  # one key per source index: independent of batching and of resumes
                keys = jnp.stack([jax.random.fold_in(jax.random.key(int(cfg.seed)), k) for k in keep[b:b + batch]])
                eps = jax.vmap(lambda k, m: jax.random.normal(k, m.shape, jnp.float32))(keys, mean)
                z = mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * eps
            z = pipe.vae.normalize_latents(jnp.transpose(z, (0, 3, 1, 2)), axis=1)
            lat.append(latent_layout(pipe, z).astype(np.float32))
        arrays = {"latent": np.concatenate(lat) if lat else np.zeros((0, *shape), np.float32),
                  "prompt": np.asarray([sources[j][1] for j in keep], np.int32),
                  "image": np.asarray(keep, np.int64)}
        return arrays, {"records": len(keep), "skipped": skipped}

    man = store.build(folder, "latents", fields, {"real": _shards(len(sources), size)}, make, progress=progress,
                      desc="encoding images")
    s = man["summary"]["real"]
    if s.get("skipped"):
        progress(f"latents cache: skipped {len(s['skipped'])} unreadable image(s) of {len(sources)}, e.g. "
                 f"{s['skipped'][0]}")
    return man


def _latent_shape(pipe, h: int, w: int) -> tuple:
    shape = pipe.noise_shape(1, h, w)[1:]
    return tuple(shape) if pipe.family == "qwen_image" else (shape[0], 1, *shape[1:])


def build_teacher(cfg, folder: Path, fields: dict, pipe, text_folder: Path, *, progress=print) -> dict:
    from turbojax.cache.records import TextRecords
    recs = TextRecords(text_folder)
    size, n = int(cfg.data.cache_shard_size), int(fields["count"])
    h, w, batch = int(fields["height"]), int(fields["width"]), int(cfg.data.encode_batch)
    seed = int(cfg.seed) + 7919 + int(fields.get("seed_offset", 0))
    sig = pipe.sigmas(int(cfg.data.teacher_steps), h, w)
    P = recs.num_prompts

    def cond(rows):
        if pipe.family != "qwen_image":
            return [np.asarray(r, np.float32) for r in rows]
        L = max(len(r) for r in rows)
        ctx = np.stack([np.pad(np.asarray(r, np.float32), ((0, L - len(r)), (0, 0))) for r in rows])
        mask = np.stack([np.arange(L) < len(r) for r in rows]).astype(np.int32)
        return ctx, (None if mask.all() else mask)

    def make(_, i):
        lo, hi = i * size, min((i + 1) * size, n)
        out = []
        for b in range(lo, hi, batch):
            ids = [k % P for k in range(b, min(b + batch, hi))]
            noise = np.concatenate([np.asarray(pipe.noise(seed + k, 1, h, w))
                                    for k in range(b, b + len(ids))])
            x = pipe.denoise(noise, cond([recs.prompt(p) for p in ids]), cond([recs.negative_of(p) for p in ids]),
                             sig, height=h, width=w, guidance=float(cfg.dmd.real_cfg))
            x = np.asarray(x, np.float32)
            out.append(x if pipe.family == "qwen_image" else x[:, :, None])
        return {"latent": np.concatenate(out), "prompt": np.arange(lo, hi, dtype=np.int32) % P}, {"records": hi - lo}

    progress(f"teacher cache: {n} samples at {w}x{h} ({cfg.data.teacher_steps} steps, CFG {cfg.dmd.real_cfg}) of "
             f"{P} prompts")
    return store.build(folder, "teacher", fields, {"teacher": _shards(n, size)}, make, progress=progress,
                       desc="teacher samples")


# ---- everything a run needs -----------------------------------------------------------------------------------

def cache_root(cfg, workdir=None) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    if workdir is None:
        raise store.CacheError("--config.data.cache_dir: give the folder that holds (or will hold) the caches")
    return Path(workdir) / "cache"


def check(cfg) -> None:
    """Config mistakes and an unreadable / empty prompt file, before any pipeline is loaded."""
    read_config_prompts(cfg.data)
    for k in ("cache_shard_size", "encode_batch", "cache_bucket"):
        if int(cfg.data[k]) < 1:
            raise store.CacheError(f"--config.data.{k} must be >= 1, got {cfg.data[k]}")
    if cfg.data.latent_mode not in ("mean", "sample"):
        raise store.CacheError(f"--config.data.latent_mode must be 'mean' or 'sample', got {cfg.data.latent_mode!r}")
    try:
        from turbojax.data import buckets
        buckets.from_config(cfg.data)
    except buckets.BucketError as e:
        raise store.CacheError(f"--config.{e}") from None


def bucket_sizes(cfg) -> dict[str, tuple[int, int] | None]:
    """{suffix of the cache names: (width, height)}: {"": None} (one resolution, data.width x data.height) or, with
    aspect-ratio buckets, {"@WxH": (W, H)} per bucket in the listed order."""
    from turbojax.data import buckets
    sizes = buckets.from_config(cfg.data)
    return {f"@{buckets.name(s)}": s for s in sizes} if sizes else {"": None}


def needed(cfg) -> tuple[str, ...]:
    """The caches a training run of this config reads."""
    gan = cfg.gan.weight > 0 or cfg.get("method") == "pcm"
    kinds = ["text"]
    if gan and float(cfg.gan.real_mix) < 1.0 and int(cfg.data.teacher_samples) > 0:
        kinds.append("teacher")
    if gan and float(cfg.gan.real_mix) > 0.0:
        kinds.append("latents")
    return tuple(kinds)


def ensure(cfg, root: Path, kinds=("text",), *, progress: Callable[[str], None] = print,
           load_pipe: Callable | None = None, build_missing: bool = True, poll_s: float = 10.0) -> dict[str, Path]:
    """Build the caches of `kinds` (and the text cache the teacher cache reads) that are missing or incomplete;
    return their folders. The pipeline is loaded only when something has to be built. `build_missing=False` waits
    for another process to complete them instead (the hosts of a multi-host run other than process 0)."""
    check(cfg)
    folders, todo, sources = {}, [], None
    tf = text_fields(cfg)
    folders["text"] = store.locate(root, "text", tf, progress=progress)
    todo.append(("text", tf))
    sizes = bucket_sizes(cfg)
    if "latents" in kinds:
        sources = image_sources(cfg)
        if not sources:
            raise store.CacheError("the latents cache needs real images: --config.data.images (a folder) or "
                                   "`image` fields in the JSONL prompt file")
        per_bucket = {"": sources}
        if len(sizes) > 1 or "" not in sizes:  # each image to the bucket nearest its aspect ratio
            from turbojax.data import buckets
            where = buckets.assign([p for p, _ in sources], list(sizes.values()))
            per_bucket = {sfx: [src for src, b in zip(sources, where) if b == i] for i, sfx in enumerate(sizes)}
            progress("aspect-ratio buckets of the real images: " + ", ".join(
                f"{sfx[1:]} {len(v)}" for sfx, v in per_bucket.items()))
        sources = {}
        for sfx, src in per_bucket.items():
            if not src:  # a bucket without images has no latents cache (its batches draw teacher samples)
                continue
            lf = latent_fields(cfg, src, sizes[sfx])
            folders["latents" + sfx] = store.locate(root, "latents", lf, progress=progress)
            todo.append(("latents" + sfx, lf))
            sources["latents" + sfx] = src
    if "teacher" in kinds:
        n, k = int(cfg.data.teacher_samples), len(sizes)
        for i, (sfx, size) in enumerate(sizes.items()):  # the samples split evenly over the buckets
            count = -(-n // k) if sfx else None
            thf = teacher_fields(cfg, store.key_of(tf), size, count, seed_offset=i * (count or 0))
            folders["teacher" + sfx] = store.locate(root, "teacher", thf, progress=progress)
            todo.append(("teacher" + sfx, thf))
    todo = [(k, f) for k, f in todo if not store.is_complete(folders[k])]
    if not todo:
        return folders
    if not build_missing:
        progress(f"waiting for process 0 to build the {', '.join(k for k, _ in todo)} cache(s) in {root}")
        while not all(store.is_complete(folders[k]) for k, _ in todo):
            time.sleep(poll_s)
        return folders
    pipe = (load_pipe or _load_pipe)(cfg)
    for kind, fields in todo:
        if kind == "text":
            build_text(cfg, folders[kind], fields, pipe, progress=progress)
        elif kind.startswith("latents"):
            build_latents(cfg, folders[kind], fields, pipe, sources[kind], progress=progress)
        else:
            build_teacher(cfg, folders[kind], fields, pipe, folders["text"], progress=progress)
        progress(f"{kind} cache ready in {folders[kind]}")
    return folders


def _load_pipe(cfg, mesh=None):
    import jax.numpy as jnp
    from turbojax import pipelines
    return pipelines.from_diffusers(cfg.init_from, dtype=jnp.dtype(cfg.dtype), scan_layers=cfg.scan_layers,
                                    attention_impl=cfg.attention_impl, mesh=mesh)
