"""The one attention entry point: `attention(q, k, v, key_mask, impl=...)`, layout `[B, S, H, D]`.

Implementations:
  * "xla"     – reference einsum path (any backend): logits and softmax in fp32 over the whole `[B, H, Sq, Sk]`
    logits tensor. Kept simple on purpose: it is what the other implementations are tested against.
  * "chunked" – same maths, computed one (batch, head) pair and one block of queries at a time, with an online
    (flash-style) softmax over key blocks when the keys exceed `kv_block`. Fastest on CPU, see below.
  * "auto"    – "chunked" on CPU, "splash" on TPU, "xla" elsewhere ("chunked" loops over (batch, head) pairs one
    at a time, which suits a 2-core CPU but would serialise an accelerator).
  * "cudnn"   – `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16 only).
  * "splash"  – the Pallas TPU splash kernel (`turbojax.nn.splash`), inside `jax.shard_map` when a mesh is set
    (batch over data x fsdp, heads over tensor); Pallas interpret mode off TPU (exact, slow: for tests).

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
import numpy as np
from jax import lax

from turbojax.nn.layers import transposed_copy

IMPLEMENTATIONS = ("xla", "chunked", "auto", "cudnn", "splash")

# "chunked" tiling defaults: keys up to KV_BLOCK are handled in one softmax step (exact per-row softmax, no
# rescaling); queries are grouped so that one fp32 logits block stays within LOGITS_BLOCK_BYTES, small enough to
# be reused from cache/heap on CPU yet large enough to keep the matmuls efficient.
KV_BLOCK = 2048
LOGITS_BLOCK_BYTES = 8 << 20
MIN_Q_BLOCK = 64
F32 = jnp.float32
NEG = jnp.finfo(F32).min  # same fill as the reference, so a fully masked row also averages all its keys


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


class _Chunking:
    """Static tiling of one `_chunked_attention` call and the per-block pieces shared by its forward and backward."""

    def __init__(self, q_shape, k_shape, v_shape, dtypes, key_mask, scale, q_block, kv_block, causal):
        self.b, self.sq, self.h, self.d = q_shape
        self.sk, self.dv = k_shape[1], v_shape[-1]
        self.dtypes, self.scale, self.causal = dtypes, scale, causal
        self.bk, self.nk = _blocks(self.sk, kv_block or KV_BLOCK)
        self.bq, self.nq = _blocks(self.sq, q_block or max(MIN_Q_BLOCK, LOGITS_BLOCK_BYTES // (4 * self.bk)))
        # fp32 inputs: scale q ([bq, D]) instead of the logits ([bq, bk]) and mask with an additive per-key bias (0
        # to keep, the reference's fill `neg` for masked keys, -inf for padding) instead of a select. XLA:CPU then
        # fuses scale, mask, max and exp into the logits GEMM, one pass less over every block (~20% faster for a
        # single 32-wide head as in the VAE). Pre-scaling is a round-off change and `s + neg` rounds to `neg` for any
        # |s| < 1e31, so results match the reference to fp32 round-off. Half-precision inputs keep the reference's
        # order (logits scaled after the product) and the select, which is faster there (measured: bf16 ~30% slower
        # with the bias). Causal masks (decoder LLMs, off the hot path) always use selects, so that a row whose keys
        # are all masked stays finite and averages its keys exactly like the reference.
        self.fused = dtypes[0] == F32 and not causal
        self.masked = key_mask is not None
        self.padded = self.nk * self.bk != self.sk

    def prepare(self, key_mask):
        """Per-call mask arrays: (bias or None, keep [B, Sk_pad], fill [Sk_pad])."""
        b, sk, nk, bk = self.b, self.sk, self.nk, self.bk
        keep = jnp.ones((b, sk), bool) if key_mask is None else key_mask.astype(bool)
        bias = None
        if self.fused and (self.masked or self.padded):
            bias = jnp.concatenate([jnp.where(keep, F32(0), NEG), jnp.full((b, nk * bk - sk), -jnp.inf, F32)], axis=1)
        keep = _pad_seq(keep, nk * bk)
        fill = jnp.where(jnp.arange(nk * bk) < sk, NEG, -jnp.inf).astype(F32)
        return bias, keep, fill

    def q_rows(self, q, bi, hi, qb):
        """Query block `[bq, D]` in the input dtype, pre-scaled on the fused path."""
        qi = _from_bits(lax.dynamic_slice(q, (bi, qb * self.bq, hi, 0), (1, self.bq, 1, self.d)).reshape(
            self.bq, self.d), self.dtypes[0])
        return qi * self.scale if self.fused else qi

    def kv_rows(self, k, v, bi, hi, start):
        ki = _from_bits(lax.dynamic_slice(k, (bi, start, hi, 0), (1, self.bk, 1, self.d)).reshape(self.bk, self.d),
                        self.dtypes[1])
        vi = _from_bits(lax.dynamic_slice(v, (bi, start, hi, 0), (1, self.bk, 1, self.dv)).reshape(
            self.bk, self.dv), self.dtypes[2])
        return ki, vi

    def scores(self, masks, qi, ki, bi, start, q_start):
        """fp32 logits `[bq, bk]` (masked) of the query block at `q_start` against the key block at `start`."""
        bias, keep, fill = masks
        s = lax.dot_general(qi, ki, (((1,), (1,)), ((), ())), preferred_element_type=F32)
        if self.fused:
            return s if bias is None else s + lax.dynamic_slice(bias, (bi, start), (1, self.bk))
        s = s * self.scale
        if self.causal:
            s = jnp.where(self.causal_keep(start, q_start), s, NEG)
        if not self.masked and not self.padded:
            return s
        # A scalar fill keeps this select fusable into the logits GEMM; the per-key fill is only for padding.
        keep_i = lax.dynamic_slice(keep, (bi, start), (1, self.bk))[0]
        fill_i = lax.dynamic_slice_in_dim(fill, start, self.bk)[None, :] if self.padded else NEG
        return jnp.where(keep_i[None, :], s, fill_i)

    def causal_keep(self, start, q_start):
        return start + jnp.arange(self.bk)[None, :] <= q_start + jnp.arange(self.bq)[:, None]

    def grad_keep(self, masks, bi, start, q_start):
        """Where a logit depends on q and k (None: everywhere). Masked logits are constants in the reference, so
        their gradient is zero even in a fully masked row, whose probabilities are uniform, not zero."""
        keep = None
        if self.masked:
            keep = lax.dynamic_slice(masks[1], (bi, start), (1, self.bk))
        if self.causal:
            c = self.causal_keep(start, q_start)
            keep = c if keep is None else keep & c
        return keep


def _chunked_forward(c: _Chunking, q, k, v, masks, stats: bool):
    """Output `[B, Sq_pad, H, Dv]` fp32 and, with `stats`, the softmax statistics `(max, 1/sum)` per query row,
    `[B, H, Sq_pad]` fp32 each (the backward recomputes the probabilities from them)."""
    b, h, nq, nk, bq, bk, dv = c.b, c.h, c.nq, c.nk, c.bq, c.bk, c.dv

    def pv(p, vi):
        return jnp.dot(p.astype(vi.dtype), vi, preferred_element_type=F32)

    def probs(s, m):
        """`exp(s - m)` in the dtype of V (what PV reads) and its fp32 row sums. For half-precision V the
        probabilities are rounded in the pass that computes them and summed after rounding: XLA:CPU otherwise writes
        them in fp32, reads them for the sum and again for a separate convert (two extra passes over every
        `[bq, bk]` block, ~1/5 of the bf16 attention). Summing the rounded values normalises the weights PV
        actually uses; the difference to summing before rounding is bf16 round-off."""
        p = jnp.exp(s - m)
        if c.dtypes[2] != F32:
            p = p.astype(c.dtypes[2])
        return p, jnp.sum(p.astype(F32), axis=-1, keepdims=True)

    def one_block(i, carry):
        out, m_all, l_all = carry
        bi, hi, qb = i // (h * nq), (i // nq) % h, i % nq
        qi = c.q_rows(q, bi, hi, qb)
        if nk == 1:  # whole key range at once: plain softmax, no rescaling
            ki, vi = c.kv_rows(k, v, bi, hi, 0)
            s = c.scores(masks, qi, ki, bi, 0, qb * bq)
            m = jnp.max(s, axis=-1, keepdims=True)
            p, l = probs(s, m)
            o = pv(p, vi) / l
        else:  # online softmax over key blocks, statistics in fp32
            def kv_step(j, carry):
                m, l, acc = carry
                ki, vi = c.kv_rows(k, v, bi, hi, j * bk)
                s = c.scores(masks, qi, ki, bi, j * bk, qb * bq)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
                corr = jnp.exp(m - m_new)
                p, l_j = probs(s, m_new)
                return m_new, l * corr + l_j, acc * corr + pv(p, vi)

            init = (jnp.full((bq, 1), NEG, F32), jnp.zeros((bq, 1), F32), jnp.zeros((bq, dv), F32))
            m, l, acc = lax.fori_loop(0, nk, kv_step, init)
            o = acc / l
        out = lax.dynamic_update_slice(out, o.reshape(1, bq, 1, dv), (bi, qb * bq, hi, 0))
        if stats:
            m_all = lax.dynamic_update_slice(m_all, m.reshape(1, 1, bq), (bi, hi, qb * bq))
            l_all = lax.dynamic_update_slice(l_all, (1 / l).reshape(1, 1, bq), (bi, hi, qb * bq))
        return out, m_all, l_all

    # The loop output stays fp32 and is rounded once at the end: XLA:CPU has no bf16 dynamic-update-slice and
    # would convert the whole bf16 buffer to fp32 and back on every step.
    st = jnp.zeros((b, h, nq * bq) if stats else (0,), F32)
    return lax.fori_loop(0, b * h * nq, one_block, (jnp.zeros((b, nq * bq, h, dv), F32), st, st))


def _chunked_backward(c: _Chunking, q, k, v, masks, out, m_all, linv_all, dout):
    """Flash-style backward: per (batch, head, query block) the probabilities are recomputed from the saved row
    statistics, one key block at a time, so no `[Sq, Sk]` tensor is stored between the passes (autodiff through
    the forward loop kept every block's logits and probabilities and moved them through the loop carries).

    With P the probabilities, dO the output cotangent and Di = rowsum(dO * O):
      dV += P^T dO,  dS = P * (dO V^T - Di),  dQ = dS K,  dK += dS^T Q   (times the logit scale for Q and K).
    Gradient products run in the input dtype with fp32 accumulation, like the forward's."""
    b, h, nq, nk, bq, bk, d, dv = c.b, c.h, c.nq, c.nk, c.bq, c.bk, c.d, c.dv
    odt = c.dtypes[2]
    dout, out = _as_bits(dout), _as_bits(out)
    kdt = c.dtypes[1]

    def rows(x, bi, hi, qb, width, dtype):
        return _from_bits(lax.dynamic_slice(x, (bi, qb * bq, hi, 0), (1, bq, 1, width)).reshape(bq, width), dtype)

    def tdot(x, y):  # x^T y, contracting the rows of both
        if x.dtype != F32 and cpu:
            # XLA:CPU runs a transposed-left half-precision product as fp32 converts + Eigen; a row-major copy of
            # x^T and a plain bf16 GEMM take ~2/3 of that time ([1088, 1088]^T x [1088, 64]: 0.88 vs 1.35 ms).
            # In fp32 the transposed product is as fast as the copy + GEMM, so it stays.
            return jnp.dot(transposed_copy(x), y, preferred_element_type=F32)
        return lax.dot_general(x, y, (((0,), (0,)), ((), ())), preferred_element_type=F32)

    cpu = current_platform() == "cpu"

    def one_block(i, carry):
        dq, dk, dvv = carry
        bi, hi, qb = i // (h * nq), (i // nq) % h, i % nq
        qi = c.q_rows(q, bi, hi, qb)
        doi = rows(dout, bi, hi, qb, dv, odt)
        di = jnp.sum(doi.astype(F32) * rows(out, bi, hi, qb, dv, odt).astype(F32), axis=-1, keepdims=True)
        mi = lax.dynamic_slice(m_all, (bi, hi, qb * bq), (1, 1, bq)).reshape(bq, 1)
        li = lax.dynamic_slice(linv_all, (bi, hi, qb * bq), (1, 1, bq)).reshape(bq, 1)

        def kv_step(j, carry):
            dqi, dk, dvv = carry
            start = j * bk
            ki, vi = c.kv_rows(k, v, bi, hi, start)
            p = jnp.exp(c.scores(masks, qi, ki, bi, start, qb * bq) - mi) * li
            dp = lax.dot_general(doi, vi, (((1,), (1,)), ((), ())), preferred_element_type=F32)
            ds = p * (dp - di)
            keep = c.grad_keep(masks, bi, start, qb * bq)
            if keep is not None:
                ds = jnp.where(keep, ds, F32(0))
            if not c.fused:  # fused: q was pre-scaled, so dS K is the gradient of the scaled q
                ds = ds * c.scale
            ds_k = ds.astype(kdt)
            dqi = dqi + jnp.dot(ds_k, ki, preferred_element_type=F32)
            at = (bi, start, hi, 0)
            dk_j = lax.dynamic_slice(dk, at, (1, bk, 1, d)) + tdot(ds_k, qi).reshape(1, bk, 1, d)
            dv_j = lax.dynamic_slice(dvv, at, (1, bk, 1, dv)) + tdot(p.astype(odt), doi).reshape(1, bk, 1, dv)
            return dqi, lax.dynamic_update_slice(dk, dk_j, at), lax.dynamic_update_slice(dvv, dv_j, at)

        dqi, dk, dvv = lax.fori_loop(0, nk, kv_step, (jnp.zeros((bq, d), F32), dk, dvv))
        if c.fused:
            dqi = dqi * c.scale
        return lax.dynamic_update_slice(dq, dqi.reshape(1, bq, 1, d), (bi, qb * bq, hi, 0)), dk, dvv

    init = (jnp.zeros((b, nq * bq, h, d), F32), jnp.zeros((b, nk * bk, h, d), F32),
            jnp.zeros((b, nk * bk, h, dv), F32))
    return lax.fori_loop(0, b * h * nq, one_block, init)


def _chunked_attention(q, k, v, key_mask, scale, q_block: int | None = None, kv_block: int | None = None,
                       causal: bool = False):
    c = _Chunking(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype), key_mask, scale, q_block, kv_block,
                  causal)
    sq, sk = c.sq, c.sk

    # Inputs stay in [B, S, H, D]: each loop step slices its (batch, head, block) straight out of them, which is
    # cheaper than transposing q, k, v and the output to head-major layout around the loop. Padded queries are
    # computed and dropped; padded keys get a -inf logit (never `neg`), so padding never enters a sum.
    def padded_bits(q, k, v):
        return (_as_bits(_pad_seq(q, c.nq * c.bq)), _as_bits(_pad_seq(k, c.nk * c.bk)),
                _as_bits(_pad_seq(v, c.nk * c.bk)))

    @jax.custom_vjp
    def attend(q, k, v, key_mask):
        out, _, _ = _chunked_forward(c, *padded_bits(q, k, v), c.prepare(key_mask), stats=False)
        return out[:, :sq].astype(c.dtypes[2])

    def attend_fwd(q, k, v, key_mask):
        out, m, linv = _chunked_forward(c, *padded_bits(q, k, v), c.prepare(key_mask), stats=True)
        out = out.astype(c.dtypes[2])
        return out[:, :sq], (q, k, v, key_mask, out, m, linv)

    def attend_bwd(res, dout):
        q, k, v, key_mask, out, m, linv = res
        dq, dk, dv = _chunked_backward(c, *padded_bits(q, k, v), c.prepare(key_mask), out, m, linv,
                                       _pad_seq(dout, c.nq * c.bq))
        mask_ct = None
        if key_mask is not None:  # never differentiated; float0 is the zero cotangent of a bool / int input
            mask_ct = (jnp.zeros_like(key_mask) if jnp.issubdtype(key_mask.dtype, jnp.inexact)
                       else np.zeros(key_mask.shape, jax.dtypes.float0))
        return (dq[:, :sq].astype(c.dtypes[0]), dk[:, :sk].astype(c.dtypes[1]), dv[:, :sk].astype(c.dtypes[2]),
                mask_ct)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend(q, k, v, key_mask)


def current_platform() -> str:
    """Where the computation being traced will run: the platform of the mesh set with `jax.set_mesh` when there is
    one (so lowering for a TPU topology from a CPU host counts as TPU), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve_impl(impl: str) -> str:
    """Map "auto" to the concrete implementation for the platform: "chunked" on CPU, "splash" on TPU, "xla"
    elsewhere."""
    if impl == "auto":
        return {"cpu": "chunked", "tpu": "splash"}.get(current_platform(), "xla")
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
    if impl == "splash":  # imported here: the Pallas TPU modules are only needed by this path
        from turbojax.nn.splash import splash_attention
        return splash_attention(q, k, v, key_mask, scale=scale, causal=causal)
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLEMENTATIONS}")
