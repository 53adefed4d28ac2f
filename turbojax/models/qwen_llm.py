"""Qwen decoder-only LLMs used as text encoders, as functional Flax NNX modules.

One implementation covers both text encoders of the supported pipelines (shared docs `architectures.md` §4):
  * Qwen2.5-VL-7B-Instruct's language model (Qwen-Image `text_encoder/`, transformers
    `Qwen2_5_VLForConditionalGeneration`; text-only path, the vision tower is not built);
  * Qwen3-4B (Z-Image `text_encoder/`, transformers `Qwen3Model` / `Qwen3ForCausalLM`).
They differ only in configuration: Qwen2.5-VL has q/k/v biases and no q/k norm, Qwen3 has a per-head q/k RMSNorm
and no biases; both use grouped-query attention, SwiGLU MLPs and pre-norm residual blocks.

Pitfalls this file gets right on purpose:
  * RoPE rotates *half-split* channels (`x[:D/2]`, `x[D/2:]`, transformers' `rotate_half`), unlike the diffusion
    transformers' adjacent pairs. Qwen2.5-VL's mRoPE gives each of its `mrope_section` frequency bands the
    temporal/height/width position; for text all three positions are equal, so it *is* standard RoPE;
  * positions are `0..S-1` over the padded sequence, whatever the attention mask says: that is what transformers
    5.x does for text-only input of both models (no `image_grid_thw`, so Qwen2.5-VL skips `get_rope_index`).
    With right padding (the tokenizers' default) padding never shifts positions; see `turbojax.text`;
  * attention is causal *and* masks padded keys; queries of padded rows produce values nobody should use;
  * `hidden_states` follow transformers' `output_hidden_states`: entry 0 is the embeddings, entry i the output of
    decoder layer i-1, and the last entry (num_layers) is the output *after* the final norm (= last_hidden_state).

Layers are stacked along a leading `layers` axis and run with `lax.scan` when `scan_layers=True`; requested
intermediate hidden states are written into a small carried buffer, so no per-layer outputs are materialised.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.nn.attention import attention
from turbojax.nn.blocks import make_blocks
from turbojax.nn.layers import Linear, RMSNorm, SwiGLU
from turbojax.nn.remat import remat_policy


@dataclasses.dataclass(frozen=True)
class QwenLLMConfig:
    """Architecture of a Qwen decoder (field names follow transformers where one exists).

    `attention_bias` covers the q/k/v projections, `o_proj_bias` the output projection (Qwen2.5-VL: True/False;
    Qwen3's single `attention_bias` flag sets both). `mrope_section` is Qwen2.5-VL's split of the `head_dim / 2`
    rotary frequencies between (temporal, height, width) positions; it only matters for vision tokens.
    """
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    attention_bias: bool = True
    o_proj_bias: bool = False
    qk_norm: bool = False
    mrope_section: tuple[int, ...] | None = None

    def validate(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.mrope_section is not None and sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}")
        return self


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLTextConfig(QwenLLMConfig):
    """Qwen2.5-VL's language model; defaults are Qwen2.5-VL-7B-Instruct (the Qwen-Image text encoder)."""
    mrope_section: tuple[int, ...] | None = (16, 24, 24)


@dataclasses.dataclass(frozen=True)
class Qwen3TextConfig(QwenLLMConfig):
    """Qwen3 dense decoder; defaults are Qwen3-4B (the Z-Image text encoder)."""
    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    o_proj_bias: bool = False
    qk_norm: bool = True


QWEN2_5_VL_7B = Qwen2_5_VLTextConfig()
QWEN3_4B = Qwen3TextConfig()
QWEN2_5_VL_TINY = Qwen2_5_VLTextConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       mrope_section=(2, 1, 1))
# head_dim * heads != hidden_size on purpose (as in Qwen3-4B: 32 x 128 = 4096 vs 2560)
QWEN3_TINY = Qwen3TextConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16)


# --------------------------------------------------------------------------------------------------------------
# transformers config.json -> config
# --------------------------------------------------------------------------------------------------------------

class LLMConfigError(ValueError):
    pass


# transformers' class defaults, used for keys a config.json omits (so an omitted key means what it means there)
_HF_DEFAULTS = {
    "qwen2_5_vl": dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1000000.0),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                  head_dim=128),
}
_MODEL_TYPES = {"qwen2_5_vl": ("qwen2_5_vl", "qwen2_5_vl_text"), "qwen3": ("qwen3",)}


def _text_settings(raw: dict, kind: str) -> dict:
    """The language-model keys of a transformers config: Qwen2.5-VL nests them in `text_config` (transformers
    >= 4.5x writes both that and flat copies; 5.x writes only the nested one); the nested value wins, flat keys
    fill what it lacks. `vision_config` is ignored: the vision tower is not built."""
    nested = raw.get("text_config") if kind == "qwen2_5_vl" else None
    flat = {k: v for k, v in raw.items() if k not in ("text_config", "vision_config")}
    return {**flat, **nested} if isinstance(nested, dict) else flat


def config_from_transformers(raw: dict, source: str, kind: str) -> QwenLLMConfig:
    """Build a config from a transformers `config.json` dict (`kind`: "qwen2_5_vl" or "qwen3").

    Options that would change the computation and are not implemented (sliding-window layers, scaled RoPE
    variants, partial rotary, non-SiLU activations, MoE) raise `LLMConfigError`; other bookkeeping keys
    (token ids, dropout, cache flags, dtype, ...) are ignored.
    """
    text = _text_settings(raw, kind)
    defaults = _HF_DEFAULTS[kind]

    def get(key):
        v = text.get(key)
        return defaults.get(key) if v is None else v

    model_type = raw.get("model_type")
    if model_type is not None and model_type not in _MODEL_TYPES[kind]:
        raise LLMConfigError(f"{source}: model_type {model_type!r} is not a {kind} model")
    problems = []
    if text.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={text['hidden_act']!r} (only 'silu' is implemented)")
    if text.get("use_sliding_window"):
        problems.append("use_sliding_window=true (sliding-window attention is not implemented)")
    layer_types = text.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types {sorted(set(layer_types))} (only 'full_attention' is implemented)")
    if any("expert" in k and text[k] for k in text):
        problems.append("mixture-of-experts keys (only dense Qwen models are implemented)")
    if text.get("mlp_bias"):
        problems.append("mlp_bias=true")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if isinstance(rope.get("full_attention"), dict):  # transformers 5 may nest rope parameters per layer type
        rope = rope["full_attention"]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):  # "mrope" is the old spelling of Qwen2.5-VL's default
        problems.append(f"rope type {rope_type!r} (only unscaled RoPE is implemented)")
    partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={partial}")
    if problems:
        raise LLMConfigError(f"{source}: unsupported {kind} architecture options: " + "; ".join(problems))

    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    kv = text.get("num_key_value_heads")
    kv = heads if kv is None else int(kv)  # transformers: None means plain multi-head attention
    theta = float(rope.get("rope_theta") or text.get("rope_theta") or defaults["rope_theta"])
    common = dict(vocab_size=int(get("vocab_size")), hidden_size=hidden,
                  intermediate_size=int(get("intermediate_size")), num_hidden_layers=int(get("num_hidden_layers")),
                  num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=float(get("rms_norm_eps")),
                  rope_theta=theta)
    if kind == "qwen2_5_vl":
        # Qwen2.5-VL's attention always uses hidden / heads and hard-codes biases (q/k/v yes, o no)
        head_dim = hidden // heads
        if text.get("head_dim") not in (None, head_dim):
            raise LLMConfigError(f"{source}: head_dim {text['head_dim']} != hidden_size / num_attention_heads "
                                 f"= {head_dim}; Qwen2.5-VL's attention does not support that")
        section = tuple(int(x) for x in rope.get("mrope_section", (16, 24, 24)))
        cfg = Qwen2_5_VLTextConfig(head_dim=head_dim, attention_bias=True, o_proj_bias=False, qk_norm=False,
                                   mrope_section=section, **common)
    else:
        bias = bool(text.get("attention_bias", False))
        cfg = Qwen3TextConfig(head_dim=int(text.get("head_dim") or hidden // heads), attention_bias=bias,
                              o_proj_bias=bias, qk_norm=True, mrope_section=None, **common)
    try:
        return cfg.validate()
    except ValueError as e:
        raise LLMConfigError(f"{source}: {e}") from None


# --------------------------------------------------------------------------------------------------------------
# Rotary embedding (host side: positions are 0..S-1, static per shape)
# --------------------------------------------------------------------------------------------------------------

def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """`cos, sin [S, head_dim]` in transformers' layout (the `head_dim / 2` angles repeated twice), fp32."""
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), np.arange(0, head_dim, 2, dtype=np.float32)
                                           / np.float32(head_dim), dtype=np.float32)).astype(np.float32)
    angles = np.arange(seq_len, dtype=np.float32)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x [B, S, H, D]` rotated on half-split channels: `x cos + rotate_half(x) sin`, `cos, sin [S, D]`.

    Like transformers, the tables are cast to x's dtype and the product is taken in that dtype.
    """
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos.astype(x.dtype)[None, :, None, :], sin.astype(x.dtype)[None, :, None, :]
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------

class Embed(nnx.Module):
    """Token embedding table `[vocab, hidden]` (same layout as torch's `nn.Embedding.weight`)."""

    def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, param_dtype, dtype):
        init = nnx.initializers.normal(0.02)
        self.embedding = nnx.Param(init(rngs.params(), (num, dim), param_dtype), axes=("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: QwenLLMConfig, *, rngs, param_dtype, dtype, impl: str):
        d, hd = cfg.hidden_size, cfg.head_dim
        h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.q_proj = Linear(d, h * hd, use_bias=cfg.attention_bias, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(d, kv * hd, use_bias=cfg.attention_bias, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(d, kv * hd, use_bias=cfg.attention_bias, axes=("embed", "heads"), **kw)
        self.o_proj = Linear(h * hd, d, use_bias=cfg.o_proj_bias, axes=("heads", "embed"), **kw)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's channels, before RoPE
            self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, axes=("head_dim",), **kw)
            self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, axes=("head_dim",), **kw)
        self.head_dim, self.groups, self.qk_norm, self.impl = hd, h // kv, cfg.qk_norm, impl

    def __call__(self, x, key_mask, cos, sin):
        def heads(t):
            return t.reshape(*t.shape[:-1], -1, self.head_dim)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
        if self.groups > 1:  # grouped-query attention: query head i reads kv head i // groups (transformers' repeat_kv)
            k, v = jnp.repeat(k, self.groups, axis=2), jnp.repeat(v, self.groups, axis=2)
        o = attention(q, k, v, key_mask, impl=self.impl, causal=True)
        return self.o_proj(o.reshape(*o.shape[:2], -1))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: QwenLLMConfig, *, rngs, param_dtype, dtype, impl: str):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.self_attn = SelfAttention(cfg, impl=impl, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, **kw)

    def __call__(self, h, key_mask, cos, sin):
        h = h + self.self_attn(self.input_layernorm(h), key_mask, cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class LLMOutput(NamedTuple):
    last_hidden_state: jax.Array
    # transformers' layout (num_layers + 1 entries) when hidden states were requested; unrequested entries are None
    hidden_states: tuple[jax.Array | None, ...] | None = None


class QwenLLM(nnx.Module):
    """Qwen2.5-VL language model / Qwen3 decoder. Call like transformers' base model:

        out = llm(input_ids, attention_mask, output_hidden_states=[-2])
        out.last_hidden_state   # after the final norm (= transformers' hidden_states[-1])
        out.hidden_states[-2]   # output of the second-to-last decoder layer, before any norm

    `output_hidden_states` is False, True (all num_layers + 1 states) or an index / list of indices (Python
    style, negative allowed); only requested states are kept.
    """

    def __init__(self, config: QwenLLMConfig = QWEN2_5_VL_7B, *, rngs: nnx.Rngs | None = None,
                 param_dtype=jnp.float32, dtype=jnp.float32, scan_layers: bool = True, remat: str = "none",
                 attention_impl: str = "auto"):
        cfg = config.validate()
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.dtype, self.scan_layers, self.remat = cfg, dtype, scan_layers, remat
        remat_policy(remat)  # validate the name early
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = make_blocks(lambda r: DecoderLayer(cfg, rngs=r, impl=attention_impl, **kw),
                                  cfg.num_hidden_layers, rngs, scan=scan_layers)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, **kw)

    @property
    def family(self) -> str:
        return "qwen2_5_vl_text" if isinstance(self.config, Qwen2_5_VLTextConfig) else "qwen3_text"

    # ---- pure forward on arrays (traced under jit) ----
    def forward(self, input_ids, attention_mask, selection: tuple[int, ...]):
        """(final normed hidden state, {index: hidden state} for the transformers indices in `selection`)."""
        cfg, n = self.config, self.config.num_hidden_layers
        h = self.embed_tokens(input_ids)
        cos, sin = (jnp.asarray(t) for t in rope_tables(input_ids.shape[1], cfg.head_dim, cfg.rope_theta))
        key_mask = None if attention_mask is None else attention_mask.astype(bool)
        captured = {0: h} if 0 in selection else {}
        inner = tuple(i for i in selection if 0 < i < n)
        h, mids = self._run_layers(h, (key_mask, cos, sin), inner)
        captured.update(zip(inner, mids))
        last = self.norm(h)
        if n in selection:
            captured[n] = last
        return last, captured

    def _run_layers(self, h, consts, inner: tuple[int, ...]):
        """Run all decoder layers; also return the outputs of layers `i - 1` for i in `inner`."""
        policy = remat_policy(self.remat)

        def make_step(graphdef, scanned):
            def step(layer_state, x):
                return nnx.merge(graphdef, layer_state)(x, *consts)
            return step if policy is False else jax.checkpoint(step, policy=policy, prevent_cse=not scanned)

        if not self.scan_layers:
            mids = []
            for i, layer in enumerate(self.layers):
                graphdef, state = nnx.split(layer)
                h = make_step(graphdef, False)(state, h)
                if i + 1 in inner:
                    mids.append(h)
            return h, mids

        graphdef, state = nnx.split(self.layers)
        step = make_step(graphdef, True)
        if not inner:
            h, _ = jax.lax.scan(lambda x, s: (step(s, x), None), h, state)
            return h, []
        # layer i writes its output into slot `slots[i]`; layers nobody asked for write into a spare last slot
        slots = np.full(self.config.num_hidden_layers, len(inner), np.int32)
        for j, idx in enumerate(inner):
            slots[idx - 1] = j
        buf = jnp.zeros((len(inner) + 1,) + h.shape, h.dtype)

        def body(carry, xs):
            x, b = carry
            layer_state, slot = xs
            x = step(layer_state, x)
            return (x, jax.lax.dynamic_update_index_in_dim(b, x, slot, 0)), None

        (h, buf), _ = jax.lax.scan(body, (h, buf), (state, jnp.asarray(slots)))
        return h, [buf[j] for j in range(len(inner))]

    def __call__(self, input_ids, attention_mask=None, *, output_hidden_states: bool | int | Sequence[int] = False,
                 return_dict: bool = True):
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be an integer [batch, seq] array, got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            # jnp.take would silently clamp: a tokenizer larger than the embedding table must fail loudly
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got [{ids.min()}, {ids.max()}]")
        mask = None
        if attention_mask is not None:
            mask = jnp.asarray(attention_mask)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask shape {mask.shape} must equal input_ids shape {ids.shape}")
        selection = _hidden_state_selection(output_hidden_states, self.config.num_hidden_layers)
        graphdef, state = nnx.split(self)
        last, captured = _jitted_forward(graphdef, state, jnp.asarray(ids, jnp.int32), mask, selection)
        hidden = None
        if output_hidden_states is not False and output_hidden_states is not None:  # 0 is a valid index
            hidden = tuple(captured.get(i) for i in range(self.config.num_hidden_layers + 1))
        out = LLMOutput(last, hidden)
        return out if return_dict else tuple(out)


def _hidden_state_selection(request, num_layers: int) -> tuple[int, ...]:
    """Sorted non-negative indices into the num_layers + 1 hidden states for an `output_hidden_states` value."""
    total = num_layers + 1
    if request is False or request is None:
        return ()
    if request is True:
        return tuple(range(total))
    idx = [request] if isinstance(request, (int, np.integer)) else list(request)
    out = set()
    for i in idx:
        if not -total <= int(i) < total:
            raise ValueError(f"hidden state index {i} out of range for {total} hidden states")
        out.add(int(i) % total)
    return tuple(sorted(out))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _jitted_forward(graphdef, state, input_ids, attention_mask, selection):
    return nnx.merge(graphdef, state).forward(input_ids, attention_mask, selection)
