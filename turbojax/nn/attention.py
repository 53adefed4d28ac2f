"""The one attention entry point: `attention(q, k, v, key_mask, impl=...)`, layout `[B, S, H, D]`.

Implementations:
  * "xla"     – reference einsum path (any backend): logits and softmax in fp32 over the whole `[B, H, Sq, Sk]`
    logits tensor. Kept simple on purpose: it is what the other implementations are tested against.
  * "chunked" – same maths, computed one (batch, head) pair and one block of queries at a time, with an online
    (flash-style) softmax over key blocks when the keys exceed `kv_block`. Fastest on CPU, see below.
  * "auto"    – "chunked" on CPU, "xla" elsewhere ("chunked" loops over (batch, head) pairs one at a time, which
    suits a 2-core CPU but would serialise an accelerator).
  * "cudnn"   – `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16 only).
  * "splash"  – slot for the TPU Pallas splash kernel; raises until the TPU work lands, so a config that asks for
    it fails loudly instead of silently running something else.

Why "chunked" is faster on XLA:CPU (measured on a 2-core AVX-512 host, B=1, S=1088, H=8, D=64, fp32:
reference ~50 ms, chunked ~15 ms):
  * the reference materialises fp32 logits and probabilities of `B*H*Sq*Sk` elements (38 MB here). Buffers above
    glibc's largest mmap threshold (32 MiB) are mapped fresh on every call, so each run pays a page fault per 4 KiB
    touched (~10 ms per such buffer) before any arithmetic happens; per-block buffers stay small and are reused by
    the loop;
  * XLA:CPU runs a batched dot (`bhqd,bhkd->bhqk`) noticeably slower than the same work as plain 2-D matmuls, so
    each loop step does 2-D `[bq, D] x [D, Sk]` and `[bq, Sk] x [Sk, D]` products;
  * probabilities are normalised after the PV product (divide `[bq, D]` instead of `[bq, Sk]`), which removes one
    full pass over the logits; this changes results by fp32 round-off only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("xla", "chunked", "auto", "cudnn", "splash")

# "chunked" tiling defaults: keys up to KV_BLOCK are handled in one softmax step (exact per-row softmax, no
# rescaling); queries are grouped so that one fp32 logits block stays within LOGITS_BLOCK_BYTES, small enough to
# be reused from cache/heap on CPU yet large enough to keep the matmuls efficient.
KV_BLOCK = 2048
LOGITS_BLOCK_BYTES = 8 << 20
MIN_Q_BLOCK = 64


def _xla_attention(q, k, v, key_mask, scale, causal=False):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    if causal:  # query i sees keys j <= i (top-left aligned, like torch's is_causal)
        tri = jnp.arange(k.shape[1])[None, :] <= jnp.arange(q.shape[1])[:, None]
        logits = jnp.where(tri[None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _blocks(n: int, block: int) -> tuple[int, int]:
    """(block size, number of blocks) covering n with near-equal blocks and at most count-1 padding."""
    count = -(-n // block)
    return -(-n // count), count


def _pad_seq(x, n):
    """Zero-pad axis 1 (the sequence axis) of x to length n."""
    return x if x.shape[1] == n else jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _as_bits(x):
    """bf16/fp16 -> same-width unsigned ints. XLA:CPU upcasts half-precision dynamic slices to fp32 and then hoists
    that convert of the whole loop-invariant array out of the loop (a full fp32 copy per call); integer slices are
    taken as they are."""
    return lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _from_bits(x, dtype):
    return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _chunked_attention(q, k, v, key_mask, scale, q_block: int | None = None, kv_block: int | None = None,
                       causal: bool = False):
    b, sq, h, d = q.shape
    sk, dv = k.shape[1], v.shape[-1]
    f32 = jnp.float32
    neg = jnp.finfo(f32).min  # same fill as the reference, so a fully masked row also averages all its keys
    bk, nk = _blocks(sk, kv_block or KV_BLOCK)
    bq, nq = _blocks(sq, q_block or max(MIN_Q_BLOCK, LOGITS_BLOCK_BYTES // (4 * bk)))

    # Inputs stay in [B, S, H, D]: each loop step slices its (batch, head, block) straight out of them, which is
    # cheaper than transposing q, k, v and the output to head-major layout around the loop. Padded queries are
    # computed and dropped; padded keys get a -inf logit (never `neg`), so padding never enters a sum.
    q, k, v = _pad_seq(q, nq * bq), _pad_seq(k, nk * bk), _pad_seq(v, nk * bk)
    in_dtypes = q.dtype, k.dtype, v.dtype
    q, k, v = _as_bits(q), _as_bits(k), _as_bits(v)
    # fp32 inputs: scale q ([bq, D]) instead of the logits ([bq, bk]) and mask with an additive per-key bias (0 to
    # keep, the reference's fill `neg` for masked keys, -inf for padding) instead of a select. XLA:CPU then fuses
    # scale, mask, max and exp into the logits GEMM, one pass less over every block (~20% faster for a single
    # 32-wide head as in the VAE). Pre-scaling is a round-off change and `s + neg` rounds to `neg` for any
    # |s| < 1e31, so results match the reference to fp32 round-off. Half-precision inputs keep the reference's order
    # (logits scaled after the product) and the select, which is faster there (measured: bf16 ~30% slower with the
    # bias). Causal masks (decoder LLMs, off the hot path) always use selects, so that a row whose keys are all
    # masked stays finite and averages its keys exactly like the reference.
    fused = in_dtypes[0] == f32 and not causal
    keep = jnp.ones((b, sk), bool) if key_mask is None else key_mask.astype(bool)
    padded = nk * bk != sk
    bias = None
    if fused and (key_mask is not None or padded):
        bias = jnp.concatenate([jnp.where(keep, f32(0), neg), jnp.full((b, nk * bk - sk), -jnp.inf, f32)], axis=1)
    keep = _pad_seq(keep, nk * bk)
    fill = jnp.where(jnp.arange(nk * bk) < sk, neg, -jnp.inf).astype(f32)

    def scores_and_values(bi, hi, qi, start, q_start):
        """fp32 logits `[bq, bk]` (masked) of the query block at `q_start` against the key block at `start`."""
        ki = _from_bits(lax.dynamic_slice(k, (bi, start, hi, 0), (1, bk, 1, d)).reshape(bk, d), in_dtypes[1])
        vi = _from_bits(lax.dynamic_slice(v, (bi, start, hi, 0), (1, bk, 1, dv)).reshape(bk, dv), in_dtypes[2])
        s = lax.dot_general(qi, ki, (((1,), (1,)), ((), ())), preferred_element_type=f32)
        if fused:
            return (s if bias is None else s + lax.dynamic_slice(bias, (bi, start), (1, bk))), vi
        s = s * scale
        if causal:
            s = jnp.where(start + jnp.arange(bk)[None, :] <= q_start + jnp.arange(bq)[:, None], s, neg)
        if key_mask is None and not padded:
            return s, vi
        # A scalar fill keeps this select fusable into the logits GEMM; the per-key fill is only for padding.
        keep_i = lax.dynamic_slice(keep, (bi, start), (1, bk))[0]
        fill_i = lax.dynamic_slice_in_dim(fill, start, bk)[None, :] if padded else neg
        return jnp.where(keep_i[None, :], s, fill_i), vi

    def pv(p, vi):
        return jnp.dot(p.astype(vi.dtype), vi, preferred_element_type=f32)

    def one_block(i, out):
        bi, hi, qb = i // (h * nq), (i // nq) % h, i % nq
        qi = _from_bits(lax.dynamic_slice(q, (bi, qb * bq, hi, 0), (1, bq, 1, d)).reshape(bq, d), in_dtypes[0])
        if fused:
            qi = qi * scale
        if nk == 1:  # whole key range at once: plain softmax, no rescaling
            s, vi = scores_and_values(bi, hi, qi, 0, qb * bq)
            p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
            o = pv(p, vi) / jnp.sum(p, axis=-1, keepdims=True)
        else:  # online softmax over key blocks, statistics in fp32
            def kv_step(j, carry):
                m, l, acc = carry
                s, vi = scores_and_values(bi, hi, qi, j * bk, qb * bq)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
                corr = jnp.exp(m - m_new)
                p = jnp.exp(s - m_new)
                return m_new, l * corr + jnp.sum(p, axis=-1, keepdims=True), acc * corr + pv(p, vi)

            init = (jnp.full((bq, 1), neg, f32), jnp.zeros((bq, 1), f32), jnp.zeros((bq, dv), f32))
            _, l, acc = lax.fori_loop(0, nk, kv_step, init)
            o = acc / l
        return lax.dynamic_update_slice(out, o.reshape(1, bq, 1, dv), (bi, qb * bq, hi, 0))

    # The loop output stays fp32 and is rounded once at the end: XLA:CPU has no bf16 dynamic-update-slice and
    # would convert the whole bf16 buffer to fp32 and back on every step.
    out = lax.fori_loop(0, b * h * nq, one_block, jnp.zeros((b, nq * bq, h, dv), f32))
    return out[:, :sq].astype(in_dtypes[2])


def resolve_impl(impl: str) -> str:
    """Map "auto" to the concrete implementation for the default backend."""
    if impl == "auto":
        return "chunked" if jax.default_backend() == "cpu" else "xla"
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None, *,
              impl: str = "xla", scale: float | None = None, causal: bool = False) -> jax.Array:
    """Multi-head attention over `[B, S, H, D]` tensors; `key_mask` is `[B, S_k]` bool (True = attend).

    `causal=True` additionally lets query i attend only keys j <= i (decoder LLMs; top-left aligned).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = resolve_impl(impl)
    if impl == "xla":
        return _xla_attention(q, k, v, key_mask, scale, causal)
    if impl == "chunked":
        return _chunked_attention(q, k, v, key_mask, scale, causal=causal)
    if impl == "cudnn":
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                            implementation="cudnn")
    if impl == "splash":
        raise NotImplementedError("attention impl 'splash' (TPU Pallas) is a reserved slot and not available yet; "
                                  "use 'xla', 'chunked' or 'cudnn'")
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLEMENTATIONS}")
