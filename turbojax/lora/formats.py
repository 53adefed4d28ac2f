"""LoRA file I/O (safetensors only, pure numpy): every released key layout in, diffusers or ComfyUI layout out.

Canonical in-memory form: `LoraWeights` = {diffusers module name: LoraModule(down [r, in], up [out, r], alpha)},
float32, with weight delta `(alpha / r) * up @ down` in torch layout [out, in]. Layouts read (mixed in one file is
fine as long as every module is complete):

  diffusers / PEFT  `[transformer.|base_model.model.]<m>.lora_A.weight` / `.lora_B.weight`; alpha from the
                    `lora_adapter_metadata` header (peft LoraConfig JSON) resolved as peft does, else alpha = r
  lightx2v / ComfyUI `[model.]diffusion_model.<m>.lora_down.weight` / `.lora_up.weight` [+ `.alpha`], also the
                    lora_A/lora_B spelling under `diffusion_model.`; no `.alpha` -> alpha = r
  kohya-style       `<prefix><m with dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`, prefix
                    `lora_unet_` (kohya, musubi), `lora_unet__` (VideoX-Fun), `lycoris_` (LyCORIS, SimpleTuner),
                    `lora_transformer_` (ai-toolkit before its key conversion)
  DiffSynth         `<m>.lora_A.default.weight` / `.lora_B.default.weight` (peft adapter name kept), alpha = r

Merge-only variants under any of those prefixes (`lycoris.py` holds their maths, ComfyUI's semantics): LoKr
(`.lokr_w1` / `.lokr_w2` or their `_a` / `_b` factors), LoHa (`.hada_w1_a/b`, `.hada_w2_a/b`), DoRA (`.dora_scale`
beside a LoRA, LoKr or LoHa), full-weight and bias deltas (`.diff`, `.diff_b`). Those modules come back as
`lycoris.MergeModule`s instead of `LoraModule`s; they can be merged but not trained or saved.

Reading is strict: anything that would be silently dropped or mis-scaled by a lenient loader is an error.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import uuid
from typing import Collection, Mapping

import numpy as np

from turbojax.convert.atomic import apply_umask
from turbojax.lora.families import LoraFamily, get_family

METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header key for the peft LoraConfig JSON
_PEFT_DEFAULT_R = 8  # LoraConfig() defaults, used by diffusers when the metadata leaves a field out
_PEFT_DEFAULT_ALPHA = 8


class LoraFormatError(ValueError):
    """A LoRA file (or in-memory LoRA) that cannot be read or written faithfully."""


@dataclasses.dataclass
class LoraModule:
    down: np.ndarray  # [r, in]  (peft lora_A, kohya lora_down)
    up: np.ndarray    # [out, r] (peft lora_B, kohya lora_up)
    alpha: float

    def __post_init__(self):
        self.down = np.ascontiguousarray(self.down, dtype=np.float32)
        self.up = np.ascontiguousarray(self.up, dtype=np.float32)
        self.alpha = float(self.alpha)
        if self.down.ndim != 2 or self.up.ndim != 2 or self.down.shape[0] != self.up.shape[1] \
                or self.down.shape[0] == 0:
            raise LoraFormatError(f"LoRA down {self.down.shape} / up {self.up.shape} are not [r, in] / [out, r]")
        if not math.isfinite(self.alpha):
            raise LoraFormatError(f"LoRA alpha must be finite, got {self.alpha}")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> np.ndarray:
        """Weight delta `(alpha / r) * up @ down`, [out, in] float32."""
        return (self.up @ self.down) * np.float32(self.scale)


LoraWeights = dict[str, LoraModule]  # keyed by diffusers module name


# ----------------------------------------------------------------------------------------------------------------
# reading

# (suffix, part); longest first so ".lora_A.default.weight" wins over ".weight"-style prefixes of it
_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".alpha", "alpha"), (".dora_scale", "dora_scale"), (".diff_b", "diff_b"), (".diff", "diff"),
    *((f".{p}", p) for p in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2",
                             "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
)
# flattened-name prefixes (module dots as underscores); "lora_unet__" first: VideoX-Fun joins an empty root name
_FLAT_PREFIXES = ("lora_unet__", "lora_unet_", "lycoris_", "lora_transformer_")
_UNSUPPORTED = (("lora_magnitude_vector", "PEFT DoRA (lora_magnitude_vector; ComfyUI-style dora_scale is read)"),
                (".lokr_t1", "LoKr Tucker (conv-only) factor"), (".lokr_t2", "LoKr Tucker (conv-only) factor"),
                (".hada_t1", "LoHa Tucker (conv-only) factor"), (".hada_t2", "LoHa Tucker (conv-only) factor"),
                (".lora_mid.weight", "LoCon Tucker (conv-only) factor"))
LAYOUTS = ("diffusers/PEFT lora_A/B, ComfyUI/lightx2v diffusion_model.*, kohya lora_unet_*, VideoX-Fun lora_unet__*, "
           "LyCORIS lycoris_*, DiffSynth *.default; LoRA, LoKr, LoHa, DoRA dora_scale, .diff/.diff_b")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _parse_key(key: str, fam: LoraFamily, path) -> tuple[str, str]:
    """`key` -> (dotted module name as the file spells it, part: "down" | "up" | "alpha" | a merge-only part)."""
    for marker, what in _UNSUPPORTED:
        if marker in key:
            raise LoraFormatError(f"{path}: key {key!r} belongs to a {what}, which is not supported")
    rest = key.removeprefix("base_model.model.")  # PEFT's save_pretrained wrapper
    for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer."):
        if rest.startswith(prefix):
            rest = rest[len(prefix):]
            break
    for suffix, part in _SUFFIXES:
        if rest.endswith(suffix):
            base = rest[: -len(suffix)]
            break
    else:
        raise LoraFormatError(f"{path}: key {key!r} is not a LoRA tensor in any layout read here ({LAYOUTS})")
    for prefix in _FLAT_PREFIXES:
        if base.startswith(prefix):
            dotted = fam.unflatten_kohya(base[len(prefix):])
            if dotted is None:
                raise LoraFormatError(f"{path}: key {key!r}: flattened module {base!r} is not a {fam.name} LoRA "
                                      "target")
            return dotted, part
    return base, part


def _load_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    p = os.fspath(path)
    if p.lower().endswith(_PICKLE_SUFFIXES):
        raise LoraFormatError(f"{p}: only .safetensors LoRA files are accepted (pickled checkpoints are never "
                              "unpickled); convert it to safetensors first")
    if not os.path.isfile(p):
        raise LoraFormatError(f"{p}: not a file (pass the .safetensors file itself)")
    from safetensors import safe_open  # local: keeps `import turbojax.lora` light
    try:
        with safe_open(p, framework="np") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt/pickled files
        raise LoraFormatError(f"{p}: not a readable safetensors file ({type(e).__name__}: {e}); only safetensors "
                              "LoRA files are accepted") from e
    return tensors, header


def _adapter_config(header: Mapping[str, str], path) -> dict | None:
    """The transformer's peft LoraConfig kwargs from diffusers' `lora_adapter_metadata` header, if any."""
    raw = header.get(METADATA_KEY)
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraFormatError(f"{path}: header {METADATA_KEY!r} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise LoraFormatError(f"{path}: header {METADATA_KEY!r} is not a JSON object")
    # diffusers prefixes every field with the component name ("transformer.r"); a bare peft config is accepted too
    ours = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
    if ours:
        return ours
    return cfg if ("r" in cfg or "lora_alpha" in cfg) else None


def _pattern_key(patterns, name: str, path) -> str:
    """peft's `get_pattern_key`: the first pattern that matches `name` as a dotted-suffix regex, else `name`."""
    for pat in patterns:
        try:
            if re.match(rf"(.*\.)?({pat})$", name):
                return pat
        except re.error as e:
            raise LoraFormatError(f"{path}: {METADATA_KEY} pattern {pat!r} is not a valid regex: {e}") from e
    return name


def _alpha_from_config(cfg: dict, name: str, rank: int, path) -> float:
    """Effective alpha (our `(alpha / r)` convention) that peft gives module `name` under LoraConfig `cfg`."""
    if cfg.get("use_dora"):
        raise LoraFormatError(f"{path}: {METADATA_KEY} has use_dora=true; DoRA/LoKr/LoHa are not supported")
    r_pat = cfg.get("rank_pattern") or {}
    a_pat = cfg.get("alpha_pattern") or {}
    r = r_pat.get(_pattern_key(r_pat, name, path), cfg.get("r", _PEFT_DEFAULT_R))
    alpha = a_pat.get(_pattern_key(a_pat, name, path), cfg.get("lora_alpha", _PEFT_DEFAULT_ALPHA))
    # peft builds the layer at the config's rank: a different stored rank fails to load in diffusers
    if int(r) != rank:
        raise LoraFormatError(f"{path}: module {name!r} has rank {rank} but {METADATA_KEY} gives r={r} "
                              "(diffusers cannot load this file either)")
    if cfg.get("use_rslora"):
        return float(alpha) * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r) = (alpha * sqrt(r)) / r
    return float(alpha)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_lora(path, family: str | LoraFamily = "qwen_image",
              module_shapes: Mapping[str, tuple[int, int]] | None = None,
              biased_modules: Collection[str] | None = None) -> LoraWeights:
    """Read a LoRA `.safetensors` file in any supported layout into {diffusers module: LoraModule | MergeModule}.

    `module_shapes` ({module: (out, in)}, e.g. from the target model) additionally checks that every module exists
    in that model and that down is [r, in] and up [out, r] (merge-only patches: that their delta is [out, in]);
    `biased_modules` (the Linears that have a bias) that every `.diff_b` has a bias to go to. Raises
    LoraFormatError on anything unexpected. Merge-only modules (LoKr, LoHa, DoRA, .diff/.diff_b) come back as
    `lycoris.MergeModule`s.
    """
    from turbojax.lora import lycoris  # lycoris imports this module: import it late
    fam = get_family(family)
    tensors, header = _load_safetensors(path)
    if not tensors:
        raise LoraFormatError(f"{path}: file holds no tensors")
    cfg = _adapter_config(header, path)

    groups: dict[str, dict[str, str]] = collections.defaultdict(dict)  # file module -> part -> key
    for key in tensors:
        module, part = _parse_key(key, fam, path)
        if part in groups[module]:
            raise LoraFormatError(f"{path}: keys {groups[module][part]!r} and {key!r} both give the {part} "
                                  f"of module {module!r}")
        groups[module][part] = key

    out: dict[str, LoraModule] = {}
    source: dict[str, str] = {}
    for module, parts in groups.items():
        if lycoris.is_merge_only(parts):
            _read_merge_module(module, parts, tensors, fam, path, module_shapes, biased_modules, out, source)
            continue
        if "down" not in parts or "up" not in parts:
            have = parts.get("down") or parts.get("up") or parts.get("alpha")
            missing = [p for p in ("down", "up") if p not in parts]
            raise LoraFormatError(f"{path}: key {have!r}: module {module!r} has no {' / '.join(missing)} weight")
        targets = fam.resolve(module)
        if targets is None:
            raise LoraFormatError(f"{path}: key {parts['down']!r}: {module!r} is not a {fam.name} LoRA target module")
        down = np.asarray(tensors[parts["down"]], dtype=np.float32)
        up = np.asarray(tensors[parts["up"]], dtype=np.float32)
        if down.ndim != 2 or up.ndim != 2:
            raise LoraFormatError(f"{path}: key {parts['down']!r}: expected 2-D down [r, in] and up [out, r], got "
                                  f"{down.shape} and {up.shape}")
        rank = down.shape[0]
        if rank == 0 or up.shape[1] != rank:
            raise LoraFormatError(f"{path}: key {parts['up']!r}: expected shape [out, {rank}] to match down "
                                  f"{down.shape}, got {up.shape}")
        if up.shape[0] % len(targets):
            raise LoraFormatError(f"{path}: key {parts['up']!r}: fused module {module!r} needs {len(targets)} equal "
                                  f"row blocks, got {up.shape[0]} rows")
        alpha_t = None
        if "alpha" in parts:
            a = np.asarray(tensors[parts["alpha"]], dtype=np.float64)
            if a.size != 1:
                raise LoraFormatError(f"{path}: key {parts['alpha']!r}: expected a scalar alpha, got shape {a.shape}")
            if cfg is not None:
                # diffusers would fold this alpha into the weights *and* apply the header's scale: ambiguous intent
                raise LoraFormatError(f"{path}: key {parts['alpha']!r}: file has both per-module alpha tensors and "
                                      f"a {METADATA_KEY} header; refusing to guess which scale is meant")
            alpha_t = float(a.reshape(-1)[0])

        for name, up_rows in zip(targets, np.split(up, len(targets), axis=0)):
            if name in out:
                raise LoraFormatError(f"{path}: key {parts['down']!r}: module {name!r} is also given by "
                                      f"{source[name]!r}")
            if module_shapes is not None:
                if name not in module_shapes:
                    raise LoraFormatError(f"{path}: key {parts['down']!r}: module {name!r} does not exist in the "
                                          "target model")
                o, i = module_shapes[name]
                for k, arr, want in ((parts["down"], down, (rank, i)), (parts["up"], up_rows, (o, rank))):
                    if tuple(arr.shape) != want:
                        raise LoraFormatError(f"{path}: key {k!r}: expected shape {list(want)} for module "
                                              f"{name!r} (weight [out={o}, in={i}]), got {list(arr.shape)}")
            if alpha_t is not None:
                alpha = alpha_t
            elif cfg is not None:
                alpha = _alpha_from_config(cfg, name, rank, path)
            else:
                alpha = float(rank)  # diffusers/peft convention without alpha data: scale 1
            out[name] = LoraModule(down.copy() if len(targets) > 1 else down, up_rows, alpha)
            source[name] = parts["down"]
    return {k: out[k] for k in sorted(out, key=_natural_key)}


def _read_merge_module(module, parts, tensors, fam, path, module_shapes, biased_modules, out, source) -> None:
    """One file module holding a merge-only patch -> `out[name] = MergeModule` for each module it stands for."""
    from turbojax.lora import lycoris
    key = next(iter(parts.values()))
    targets = fam.resolve(module)
    if targets is None:
        raise LoraFormatError(f"{path}: key {key!r}: {module!r} is not a {fam.name} LoRA target module")
    mod = lycoris.build(module, parts, tensors, path)
    split = mod.split(len(targets), lambda msg: LoraFormatError(f"{path}: key {key!r}: {msg}"))
    for name, m in zip(targets, split):
        if name in out:
            raise LoraFormatError(f"{path}: key {key!r}: module {name!r} is also given by {source[name]!r}")
        if module_shapes is not None:
            if name not in module_shapes:
                raise LoraFormatError(f"{path}: key {key!r}: module {name!r} does not exist in the target model")
            o, i = module_shapes[name]
            if m.shape is not None and tuple(m.shape) != (o, i):
                raise LoraFormatError(f"{path}: key {key!r}: the patch of module {name!r} is [out, in] = "
                                      f"{list(m.shape)}, the weight is [{o}, {i}]")
            b = m.bias_delta()
            if b is not None and b.shape[0] != o:
                raise LoraFormatError(f"{path}: key {parts['diff_b']!r}: expected shape [{o}] for the bias of "
                                      f"module {name!r}, got {list(b.shape)}")
        if m.bias is not None and biased_modules is not None and name not in biased_modules:
            raise LoraFormatError(f"{path}: key {parts['diff_b']!r}: module {name!r} has no bias to add it to")
        out[name] = m
        source[name] = key


# ----------------------------------------------------------------------------------------------------------------
# writing

_DTYPES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16,
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _resolve_dtype(dtype) -> np.dtype:
    import ml_dtypes
    d = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    d = np.dtype(ml_dtypes.bfloat16 if d == "bfloat16" else d)
    if d not in (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        raise ValueError(f"unsupported LoRA save dtype {dtype!r}; use float32, float16 or bfloat16")
    return d


def _plain(x: float):
    """JSON-friendly number: peft configs normally hold integer ranks/alphas."""
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: list) -> float:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], -v))  # deterministic on ties: the smaller value


def peft_metadata(lora: LoraWeights) -> dict:
    """peft LoraConfig kwargs reproducing our per-module scales: the most common r / alpha as defaults, the rest as
    `^`-anchored exact-name `rank_pattern` / `alpha_pattern` entries (peft treats pattern keys as suffix regexes,
    and the anchor stops "proj_out" also matching e.g. "x.proj_out")."""
    ranks = {n: m.rank for n, m in lora.items()}
    alphas = {n: m.alpha for n, m in lora.items()}
    r = _most_common(list(ranks.values()))
    a = _most_common(list(alphas.values()))
    return {
        "r": int(r),
        "lora_alpha": _plain(a),
        "target_modules": sorted(lora, key=_natural_key),
        "rank_pattern": {f"^{n}": int(v) for n, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{n}": _plain(v) for n, v in alphas.items() if v != a},
    }


def save_lora(path, lora: LoraWeights, layout: str = "diffusers", family: str | LoraFamily = "qwen_image",
              dtype=np.float32, metadata_extra: Mapping[str, str] | None = None, fold_alpha: bool = False) -> None:
    """Write `lora` atomically as a `.safetensors` file.

    layout "diffusers": `transformer.<m>.lora_A.weight` / `.lora_B.weight` + header `lora_adapter_metadata`
    (`transformer.`-prefixed LoraConfig with r, lora_alpha, target_modules, rank_pattern, alpha_pattern) so
    diffusers' `load_lora_weights` / `load_lora_adapter(..., use_safetensors=True)` reproduce our scales exactly.
    layout "comfy" (lightx2v / ComfyUI): `diffusion_model.<m>.lora_down.weight` / `.lora_up.weight` + `.alpha`
    (fp32 scalar). `dtype` (float32 / float16 / bfloat16) applies to down/up only.
    `fold_alpha`: multiply `alpha / r` into up and store alpha = r, so that loaders which ignore the alpha data
    (e.g. diffusers' model-level `load_lora_adapter(path)` without `use_safetensors=True`) still get our scale.
    """
    fam = get_family(family)
    dt = _resolve_dtype(dtype)
    if layout not in ("diffusers", "comfy"):
        raise ValueError(f"unknown LoRA layout {layout!r}; use 'diffusers' or 'comfy'")
    if not lora:
        raise LoraFormatError(f"{path}: refusing to write an empty LoRA")
    tensors: dict[str, np.ndarray] = {}
    lora_out: dict[str, LoraModule] = {}  # what the file will hold (alpha folded or not)
    for name in sorted(lora, key=_natural_key):
        mod = lora[name]
        if not isinstance(mod, LoraModule):
            raise LoraFormatError(f"{path}: module {name!r}: expected a LoraModule, got {type(mod).__name__}")
        if not fam.is_module(name):
            raise LoraFormatError(f"{path}: {name!r} is not a {fam.name} LoRA target module")
        mod = LoraModule(mod.down, mod.up, mod.alpha)  # re-validate shapes (the dataclass fields are mutable)
        if fold_alpha:
            mod = LoraModule(mod.down, mod.up * np.float32(mod.scale), mod.rank)
        lora_out[name] = mod
        down = np.ascontiguousarray(mod.down, dtype=dt)
        up = np.ascontiguousarray(mod.up, dtype=dt)
        if layout == "diffusers":
            tensors[f"transformer.{name}.lora_A.weight"] = down
            tensors[f"transformer.{name}.lora_B.weight"] = up
        else:
            tensors[f"diffusion_model.{name}.lora_down.weight"] = down
            tensors[f"diffusion_model.{name}.lora_up.weight"] = up
            tensors[f"diffusion_model.{name}.alpha"] = np.array(mod.alpha, dtype=np.float32)

    header = {"format": "pt"}
    if layout == "diffusers":
        cfg = {f"transformer.{k}": v for k, v in peft_metadata(lora_out).items()}
        header[METADATA_KEY] = json.dumps(cfg, indent=2, sort_keys=True)
    for k, v in (metadata_extra or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise LoraFormatError(f"{path}: metadata_extra must map str to str, got {k!r}: {type(v).__name__}")
        if k in header:
            raise LoraFormatError(f"{path}: metadata_extra may not override header key {k!r}")
        header[k] = v
    _atomic_save(tensors, header, path)


def _atomic_save(tensors: dict[str, np.ndarray], header: dict[str, str], path) -> None:
    """Write to a unique temp file next to `path`, then rename: readers never see a half-written LoRA."""
    from safetensors.numpy import save_file
    p = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(p)), f".{os.path.basename(p)}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, tmp, metadata=header)
        apply_umask(tmp)  # safetensors creates files 0600; ours get the usual mode
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
