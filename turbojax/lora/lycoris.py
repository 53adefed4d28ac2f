"""Merge-only LoRA variants: LoKr, LoHa, DoRA and full-weight / bias deltas (`.diff`, `.diff_b`).

These cannot be written as one low-rank `a @ b` (LoKr, LoHa, `.diff`), or depend on the base weight (DoRA), so they
are not trainable adapters here: `read_lora` turns them into `MergeModule`s (compact factors, torch layout), the
bridge puts them in an adapter as `{"merge": {layer: MergeModule}}` entries, and `merge_params` merges them with
ComfyUI's semantics (comfy/weight_adapter/*.py, `comfy.lora.calculate_weight`), strength `s` per adapter:

  LoRA   delta = (alpha / r) * up @ down                      r = down rows; no alpha: scale 1
  LoKr   delta = scale * kron(w1, w2)                          w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, same for w2;
                                                               scale = alpha / r only when a factor is factorised
                                                               (r = inner dim of w2's factors, else of w1's), else 1
  LoHa   delta = (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b)   r = hada_w1_b rows; no alpha: scale 1
  .diff  delta = diff;  .diff_b: bias delta
  W' = W + s * delta, bias' = bias + s * diff_b
  DoRA (`dora_scale` beside any of the first three):
         C = W + delta;  n = |W| per output row if dora_scale is [out, 1] (ComfyUI takes the *base* weight's norm on
         this axis), else |C| per input column ([1, in]);  W' = W + s * (C * dora_scale / (n + eps) - W)

Adapters are merged in list order, each seeing the weight the previous ones left (DoRA is not additive), in fp32,
and cast back to the parameter dtype once.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.lora.formats import LoraFormatError, LoraModule

LORA_PARTS = ("down", "up")
LOKR_PARTS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
MERGE_PARTS = LOKR_PARTS + LOHA_PARTS + ("diff", "diff_b", "dora_scale")
_EPS = float(np.finfo(np.float32).eps)  # ComfyUI patches in fp32 and adds finfo(weight.dtype).eps to the norm


@dataclasses.dataclass(eq=False)
class MergeModule:
    """One Linear's merge-only patch as read from a file (torch layout, float32).

    `rows` selects this module's output rows when the file module is a fused projection (e.g. Z-Image's original
    `attention.qkv`): the delta, an output-axis `dora_scale` and the bias delta are sliced, nothing else changes.
    """
    kind: str | None                 # "lora" | "lokr" | "loha" | "diff" | None (bias delta only)
    factors: dict[str, np.ndarray]
    scale: float                     # the alpha / rank factor ComfyUI applies (1.0 where none applies)
    full_shape: tuple[int, int] | None  # (out, in) of the file module's weight delta, None for bias only
    dora_scale: np.ndarray | None = None  # [out, 1] (output axis) or [1, in] (input axis)
    bias: np.ndarray | None = None        # [out]
    rows: tuple[int, int] | None = None

    @property
    def dora_axis(self) -> str | None:
        if self.dora_scale is None:
            return None
        return "out" if self.dora_scale.shape[0] == self.full_shape[0] else "in"  # ComfyUI's test

    @property
    def shape(self) -> tuple[int, int] | None:
        """(out, in) of the target Linear's weight delta (None: bias delta only)."""
        if self.full_shape is None:
            return None
        return (self.rows[1] - self.rows[0] if self.rows else self.full_shape[0], self.full_shape[1])

    def _rows(self, x: np.ndarray) -> np.ndarray:
        return x[self.rows[0]:self.rows[1]] if self.rows else x

    def weight_delta(self) -> np.ndarray | None:
        """The scaled weight delta [out, in] float32 (before DoRA's rescale), None for a bias-only patch."""
        f = self.factors
        if self.kind is None:
            return None
        if self.kind == "lora":
            d = f["up"] @ f["down"]
        elif self.kind == "lokr":
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
            d = np.kron(w1, w2)
        elif self.kind == "loha":
            d = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        else:
            d = f["diff"]
        return self._rows(d * np.float32(self.scale)).astype(np.float32)

    def dora(self) -> np.ndarray | None:
        if self.dora_scale is None:
            return None
        return self._rows(self.dora_scale) if self.dora_axis == "out" else self.dora_scale

    def bias_delta(self) -> np.ndarray | None:
        return None if self.bias is None else self._rows(self.bias)

    def split(self, n: int, err) -> list["MergeModule"]:
        """The patches of the `n` modules a fused projection stands for (equal row blocks, in order)."""
        if n == 1:
            return [self]
        out = self.full_shape[0] if self.full_shape else len(self.bias)
        if out % n:
            raise err(f"fused module needs {n} equal row blocks, its delta has {out} rows")
        if self.dora_axis == "in":
            raise err("DoRA with an input-axis dora_scale [1, in] on a fused projection mixes the rows of its parts; "
                      "it cannot be split")
        k = out // n
        return [dataclasses.replace(self, rows=(i * k, (i + 1) * k)) for i in range(n)]

    def merge_kernel(self, w: jax.Array, s: float) -> jax.Array:
        """`w` (kernel layout [in, out], float32) with this patch merged at strength `s`."""
        d = self.weight_delta()
        if d is None:
            return w
        d = jnp.asarray(d.T)
        if self.dora_scale is None:
            return w + s * d
        calc = w + d
        m = jnp.asarray(self.dora().T)  # kernel layout: [1, out] (output axis) or [in, 1] (input axis)
        if self.dora_axis == "out":
            norm = jnp.linalg.norm(w, axis=0, keepdims=True)  # per output row of the torch weight, base weight
        else:
            norm = jnp.linalg.norm(calc, axis=1, keepdims=True)  # per input column of the torch weight
        calc = calc * (m / (norm + _EPS))
        return w + s * (calc - w)


# ----------------------------------------------------------------------------------------------------------------
# reading (called by formats.read_lora with one module's keys)

def is_merge_only(parts: Mapping[str, str]) -> bool:
    """Whether a module's keys need a merge-only patch rather than a plain `LoraModule`."""
    return any(p in parts for p in MERGE_PARTS)


def build(module: str, parts: Mapping[str, str], tensors: Mapping[str, np.ndarray], path) -> MergeModule:
    """A `MergeModule` from one file module's keys ({part: key}); every inconsistency names a key."""
    def err(key, msg):
        return LoraFormatError(f"{path}: key {key!r}: {msg}")

    def get(part, ndim=2):
        a = np.asarray(tensors[parts[part]], dtype=np.float32)
        if a.ndim != ndim:
            raise err(parts[part], f"expected a {ndim}-D tensor for a Linear layer, got shape {list(a.shape)}")
        return a

    groups = {"lora": LORA_PARTS, "lokr": LOKR_PARTS, "loha": LOHA_PARTS, "diff": ("diff",)}
    first = {k: next(parts[p] for p in ps if p in parts) for k, ps in groups.items() if any(p in parts for p in ps)}
    kinds = list(first)
    any_key = next(iter(parts.values()))
    if len(kinds) > 1:
        raise err(first[kinds[1]], f"module {module!r} is both {kinds[0]} (key {first[kinds[0]]!r}) and {kinds[1]}; "
                                   "one weight patch per module")
    kind = kinds[0] if kinds else None
    alpha = None
    if "alpha" in parts:
        a = np.asarray(tensors[parts["alpha"]], dtype=np.float64)
        if a.size != 1:
            raise err(parts["alpha"], f"expected a scalar alpha, got shape {list(a.shape)}")
        alpha = float(a.reshape(-1)[0])
        if not np.isfinite(alpha):
            raise err(parts["alpha"], f"alpha must be finite, got {alpha}")
        if kind in (None, "diff"):
            raise err(parts["alpha"], f"module {module!r} has an alpha but no LoRA / LoKr / LoHa weights")

    factors: dict[str, np.ndarray] = {}
    scale = 1.0
    shape = None
    if kind == "lora":
        missing = [p for p in LORA_PARTS if p not in parts]
        if missing:
            raise err(any_key, f"module {module!r} has no {' / '.join(missing)} weight")
        down, up = get("down"), get("up")
        if down.shape[0] == 0 or up.shape[1] != down.shape[0]:
            raise err(parts["up"], f"expected shape [out, {down.shape[0]}] to match down {list(down.shape)}, "
                                   f"got {list(up.shape)}")
        factors = {"down": down, "up": up}
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        shape = (up.shape[0], down.shape[1])
    elif kind == "lokr":
        ws, rank = [], None
        for i in (1, 2):
            full, fa, fb = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
            if full in parts:
                if fa in parts or fb in parts:
                    raise err(parts[full], f"LoKr module {module!r} has both {full} and {fa}/{fb}")
                factors[full] = get(full)
                ws.append(factors[full].shape)
            elif fa in parts and fb in parts:
                a, b = get(fa), get(fb)
                if a.shape[1] != b.shape[0] or a.shape[1] == 0:
                    raise err(parts[fb], f"LoKr factors {list(a.shape)} @ {list(b.shape)} do not chain")
                factors[fa], factors[fb] = a, b
                ws.append((a.shape[0], b.shape[1]))
                rank = b.shape[0]  # ComfyUI: w2's rank wins when both factors are factorised
            else:
                raise err(any_key, f"LoKr module {module!r} has no {full} (or {fa} + {fb})")
        if alpha is not None and rank is not None:
            scale = alpha / rank  # both factors full: LoKr applies no alpha (ComfyUI, LyCORIS, diffusers agree)
        shape = (ws[0][0] * ws[1][0], ws[0][1] * ws[1][1])
    elif kind == "loha":
        missing = [p for p in LOHA_PARTS if p not in parts]
        if missing:
            raise err(any_key, f"LoHa module {module!r} has no {' / '.join(missing)}")
        factors = {p: get(p) for p in LOHA_PARTS}
        shapes = []
        for i in (1, 2):
            a, b = factors[f"hada_w{i}_a"], factors[f"hada_w{i}_b"]
            if a.shape[1] != b.shape[0] or a.shape[1] == 0:
                raise err(parts[f"hada_w{i}_b"], f"LoHa factors {list(a.shape)} @ {list(b.shape)} do not chain")
            shapes.append((a.shape[0], b.shape[1]))
        if shapes[0] != shapes[1]:
            raise err(parts["hada_w2_a"], f"LoHa products have shapes {list(shapes[0])} and {list(shapes[1])}")
        if alpha is not None:
            scale = alpha / factors["hada_w1_b"].shape[0]
        shape = shapes[0]
    elif kind == "diff":
        factors = {"diff": get("diff")}
        shape = tuple(factors["diff"].shape)

    dora = None
    if "dora_scale" in parts:
        if kind in (None, "diff"):
            raise err(parts["dora_scale"], f"DoRA scale of module {module!r} has no LoRA / LoKr / LoHa weights")
        dora = get("dora_scale")
        if tuple(dora.shape) not in ((shape[0], 1), (1, shape[1])):
            raise err(parts["dora_scale"], f"DoRA scale must be [out, 1] = [{shape[0]}, 1] or [1, in] = "
                                           f"[1, {shape[1]}], got {list(dora.shape)}")
    bias = None
    if "diff_b" in parts:
        bias = get("diff_b", ndim=1)
        if shape is not None and bias.shape[0] != shape[0]:
            raise err(parts["diff_b"], f"bias delta has {bias.shape[0]} entries, the weight delta {shape[0]} rows")
    return MergeModule(kind, factors, float(scale), shape, dora, bias)


def as_merge(mod) -> MergeModule:
    """A plain `LoraModule` as a merge patch (for a stack that also holds merge-only layers)."""
    if isinstance(mod, MergeModule):
        return mod
    assert isinstance(mod, LoraModule), type(mod)
    return MergeModule("lora", {"down": mod.down, "up": mod.up}, mod.scale, (mod.up.shape[0], mod.down.shape[1]))


# ----------------------------------------------------------------------------------------------------------------
# merging

def has_merge_entries(adapters) -> bool:
    items = [adapters] if isinstance(adapters, dict) else [a for a, _ in adapters]
    return any("merge" in entry for adapter in items for entry in adapter.values())


def has_dora(adapters) -> bool:
    items = [adapters] if isinstance(adapters, dict) else [a for a, _ in adapters]
    return any(m.dora_scale is not None for adapter in items for entry in adapter.values() if "merge" in entry
               for m in entry["merge"].values())


def merge_params(params: nnx.State, adapters: list[tuple[dict, float]]) -> nnx.State:
    """`params` with every adapter merged in list order: plain `{"a", "b", "scale"}` entries as `W + s * a @ b`,
    `{"merge": {layer: MergeModule}}` entries with ComfyUI's rules (module docstring). fp32 throughout, one cast
    back to each parameter's dtype, sharding kept."""
    from turbojax.lora.adapters import delta as lowrank_delta

    flat = list(nnx.to_flat_state(params))
    where = {".".join(str(x) for x in p): i for i, (p, _) in enumerate(flat)}
    touched = list(dict.fromkeys(path for adapter, _ in adapters for path in adapter))
    for path in touched:
        if f"{path}.kernel" not in where:
            raise KeyError(f"adapter module {path!r} is not a Linear of this model")
        ki = where[f"{path}.kernel"]
        kernel = flat[ki][1][...]
        stacked = kernel.ndim == 3
        n = kernel.shape[0] if stacked else 1
        ws = [kernel[i].astype(jnp.float32) for i in range(n)] if stacked else [kernel.astype(jnp.float32)]
        bi = where.get(f"{path}.bias")
        bias = None if bi is None else flat[bi][1][...]
        bs, bias_touched = None, False
        if bias is not None:
            bs = [bias[i].astype(jnp.float32) for i in range(n)] if stacked else [bias.astype(jnp.float32)]
        for adapter, s in adapters:
            entry = adapter.get(path)
            if entry is None:
                continue
            s = float(s)
            if "merge" not in entry:
                d = lowrank_delta(entry)
                if tuple(d.shape) != tuple(kernel.shape):
                    raise ValueError(f"adapter {path}: delta shape {d.shape} != kernel {kernel.shape}")
                ws = [w + s * (d[i] if stacked else d) for i, w in enumerate(ws)]
                continue
            for layer, mod in entry["merge"].items():
                i = 0 if layer is None else int(layer)
                if (layer is None) == stacked or not 0 <= i < n:
                    raise ValueError(f"adapter {path}: layer {layer} does not fit kernel {kernel.shape}")
                if mod.shape is not None and tuple(reversed(mod.shape)) != tuple(ws[i].shape):
                    raise ValueError(f"adapter {path}: delta [out, in] {list(mod.shape)} != kernel {ws[i].shape}")
                ws[i] = mod.merge_kernel(ws[i], s)
                b = mod.bias_delta()
                if b is not None:
                    if bs is None:
                        raise ValueError(f"adapter {path}: bias delta for a Linear without bias")
                    bs[i] = bs[i] + s * jnp.asarray(b)
                    bias_touched = True
        new = jnp.stack(ws) if stacked else ws[0]
        flat[ki] = (flat[ki][0], flat[ki][1].replace(_like(new, kernel)))
        if bias_touched:
            new_b = jnp.stack(bs) if stacked else bs[0]
            flat[bi] = (flat[bi][0], flat[bi][1].replace(_like(new_b, bias)))
    return nnx.from_flat_state(flat)


def _like(new: jax.Array, old: jax.Array) -> jax.Array:
    """`new` in `old`'s dtype and, for a committed (e.g. sharded) array, on `old`'s sharding."""
    new = new.astype(old.dtype)
    sharding = getattr(old, "sharding", None)
    if sharding is not None and isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer):
        new = jax.device_put(new, sharding)
    return new
