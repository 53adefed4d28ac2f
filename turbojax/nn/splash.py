"""`impl="splash"`: the Pallas TPU splash-attention kernel behind `attention()`, inside `jax.shard_map` on a mesh.

Layout in and out is `[B, S, H, D]`, like every other implementation in `turbojax.nn.attention`. The kernel takes one
batch element in head-major layout (`q [H, Lq, D]`, `k/v [Hkv, Lk, D]`), so each shard transposes, pads and runs the
kernel under `vmap` over its local batch. What the kernel does not do, we do around it:

  * scaling: the kernel computes `softmax(q k^T)` unscaled, so q is multiplied by `scale` (1/sqrt(D) by default);
  * padded keys: through `SegmentIds` (every query id 1, key id 1 where `key_mask` is set, 0 on padding). A query
    never gets an id that no key could have, so the kernel's mask blocks stay the static ones we built;
  * lengths that are not block multiples: queries are padded (id 1, rows sliced off afterwards) and keys are padded
    with id 0, so padding never enters a softmax;
  * rows with no visible key (a batch row whose `key_mask` is all False, or a causal row that sees only padding):
    the kernel returns finite but arbitrary values there, the reference averages all values uniformly (every logit
    is the same fill). Those rows are replaced by that average, so all implementations agree everywhere,
    gradients included (the replaced rows send no cotangent into the kernel);
  * grouped-query attention (fewer kv heads than query heads, e.g. Qwen2.5's text encoder): passed to the kernel
    as is; its MHA path reads kv head `h // (H / Hkv)` for query head h, the same grouping as `jnp.repeat`.

On a mesh (`jax.set_mesh`, see `turbojax.sharding`), the whole computation runs inside `jax.shard_map`: batch over
the mesh axes the logical "batch" rule gives (data x fsdp, when they divide B), heads over "tensor" (when it divides
the head count), sequence and head_dim unsharded; the kernel needs whole sequences. Without a mesh the vmapped
kernel is called directly.

Platform: on TPU (including ahead-of-time lowering for a TPU topology from a CPU host, which is why the mesh's
platform is asked, not `jax.default_backend()`) the Mosaic kernel is compiled; anywhere else it runs in Pallas
interpret mode, which is exact but slow (a few seconds for tiny shapes): it exists so the CPU tests check the
numerics of the very kernel that runs on TPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _sm
from jax.sharding import PartitionSpec

from turbojax.sharding import DEFAULT_RULES, MESH_AXES, logical_to_spec

LANES = 128  # TPU vector lane width: the kernel requires every block size to be a multiple of it
# Default block (queries and keys, forward and both backward kernels): MaxText's default (`sa_block_*: 512` in its
# base.yml). Bigger tiles amortise the kernel's per-grid-step overhead and re-read k/v fewer times; 512 keeps the
# fp32 logits tile at 1 MiB. Capped to the lane-rounded sequence length so short sequences (text encoders, a few
# hundred tokens) are not padded up to 512. Not tuned on hardware here (no TPU): override with `block=`. Compiled
# for v5e (Qwen-Image 1024x1024: 4352 tokens padded to 4608, 24 heads of 128, bf16, forward + backward, one
# sample per chip) it needs 163 MiB of temporaries per chip, against 2.6 GiB for impl="xla".
BLOCK = 512


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_size(length: int, block: int | None = None) -> int:
    """Block size for a sequence of `length` tokens: `block` (default BLOCK) capped to the length rounded up to
    a multiple of LANES."""
    block = BLOCK if block is None else block
    if block <= 0 or block % LANES:
        raise ValueError(f"splash attention block size must be a positive multiple of {LANES}, got {block}")
    return min(block, _round_up(max(length, 1), LANES))


def _kernel(heads: int, lq: int, lk: int, bq: int, bk: int, causal: bool, interpret: bool):
    """The splash kernel for one batch element with `heads` query heads and padded lengths `lq`, `lk`."""
    mask = _sm.CausalMask((lq, lk)) if causal else _sm.FullMask((lq, lk))
    sizes = _sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                           block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    return _sk.make_splash_mha(_sm.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                               q_seq_shards=1, interpret=interpret)


def _pad_len(x, n):
    """Zero-pad axis 1 of x to length n."""
    return x if x.shape[1] == n else jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _local(q, k, v, key_mask, *, scale, causal, block, interpret):
    """Splash attention on local arrays (one shard, or everything without a mesh). `key_mask` [B, Sk] or None."""
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    bq, bk = block_size(sq, block), block_size(sk, block)
    lq, lk = _round_up(sq, bq), _round_up(sk, bk)

    # Scale in fp32 and round once to the input dtype (the kernel multiplies q and k as given).
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    to_heads = lambda x, n: jnp.swapaxes(_pad_len(x, n), 1, 2)  # [B, S, H, D] -> [B, H, L, D]
    qh, kh, vh = to_heads(qs, lq), to_heads(k, lk), to_heads(v, lk)

    if key_mask is None and lk == sk:
        seg = None  # nothing to hide: skip the per-logit id comparison in the kernel
    else:
        valid = jnp.ones((b, sk), jnp.int32) if key_mask is None else key_mask.astype(bool).astype(jnp.int32)
        seg = _sk.SegmentIds(q=jnp.ones((b, lq), jnp.int32), kv=_pad_len(valid, lk))
    kern = _kernel(h, lq, lk, bq, bk, causal, interpret)
    if seg is None:
        out = jax.vmap(lambda q_, k_, v_: kern(q_, k_, v_))(qh, kh, vh)
    else:
        out = jax.vmap(lambda q_, k_, v_, s_: kern(q_, k_, v_, segment_ids=s_))(qh, kh, vh, seg)
    out = jnp.swapaxes(out, 1, 2)[:, :sq].astype(v.dtype)  # [B, Sq, H, Dv]

    if key_mask is not None:
        out = _fill_blind_rows(out, v, key_mask, causal)
    return out


def _fill_blind_rows(out, v, key_mask, causal):
    """Rows that see no valid key get the reference's uniform average of all values (see the module docstring)."""
    b, sq, h, _ = out.shape
    sk = v.shape[1]
    seen = jnp.cumsum(key_mask.astype(bool).astype(jnp.int32), axis=1)  # [B, Sk] valid keys at or before j
    if causal:  # query i sees keys 0..min(i, Sk-1) (top-left aligned, like the reference)
        blind = seen[:, jnp.minimum(jnp.arange(sq), sk - 1)] == 0  # [B, Sq]
    else:
        blind = jnp.broadcast_to(seen[:, -1:] == 0, (b, sq))
    mean = jnp.mean(v.astype(jnp.float32), axis=1, keepdims=True).astype(out.dtype)  # [B, 1, Hkv, Dv]
    mean = jnp.repeat(mean, h // v.shape[2], axis=2)
    return jnp.where(blind[:, :, None, None], mean, out)


def _check(q, k, v, key_mask):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"splash attention takes [B, S, H, D] q, k, v; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"splash attention needs k and v of equal [B, S, H], q and k of equal batch and head_dim; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"splash attention needs the query heads ({q.shape[2]}) to be a multiple of the key/value "
                         f"heads ({k.shape[2]}) for grouped-query attention")
    if key_mask is not None and tuple(key_mask.shape) != (k.shape[0], k.shape[1]):
        raise ValueError(f"splash attention key_mask must be [B, S_k] = {tuple(k.shape[:2])}, got "
                         f"{tuple(key_mask.shape)}")


def _specs(mesh, q, k):
    """shard_map specs (q/k/v/out, key_mask) from the logical rules (batch over data x fsdp, heads over tensor)
    and whether the kv heads must be repeated first."""
    if not set(MESH_AXES) <= set(mesh.axis_names):
        raise ValueError(f"splash attention needs a mesh with axes {MESH_AXES} (turbojax.sharding.make_mesh); "
                         f"the current mesh has {tuple(mesh.axis_names)}")
    batch, _, heads, _ = logical_to_spec(("batch", "length", "heads", "head_dim"), q.shape, mesh, DEFAULT_RULES)
    # Grouped-query attention whose kv heads do not split like the query heads: repeat the kv heads to one per
    # query head first, so each shard holds the kv heads its query heads read. (Unsharded heads need no repeat.)
    shards = 1 if heads is None else mesh.shape[heads]
    repeat_kv = k.shape[2] % shards != 0
    q_spec = PartitionSpec(batch, None, heads, None)
    return q_spec, PartitionSpec(batch, None), repeat_kv


def platform() -> str:
    """Where the kernel will run: the current mesh's platform when one is set (so AOT lowering for TPU from a CPU
    host picks the TPU kernel), else JAX's default backend."""
    from turbojax.nn.attention import current_platform
    return current_platform()


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None, *,
                     scale: float | None = None, causal: bool = False, block: int | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """Attention over `[B, S, H, D]` with the splash kernel; same contract as `attention(impl="xla")`.

    `key_mask` [B, S_k] (True/nonzero = attend), `causal` top-left aligned, `k`/`v` may have fewer heads than `q`
    (grouped-query attention). `block` overrides BLOCK (a multiple of 128). `interpret` defaults to "not on TPU".
    """
    _check(q, k, v, key_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    block_size(1, block)  # validate before tracing anything
    interpret = platform() != "tpu" if interpret is None else interpret
    kw = dict(scale=scale, causal=causal, block=block, interpret=interpret)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _local(q, k, v, key_mask, **kw)
    manual = set(mesh.manual_axes)
    if manual:
        if manual == set(mesh.axis_names):  # already inside a shard_map over the whole mesh: arrays are local
            return _local(q, k, v, key_mask, **kw)
        raise ValueError(f"splash attention inside a shard_map over only some mesh axes ({sorted(manual)} of "
                         f"{tuple(mesh.axis_names)}) is not supported; map over all axes or none")
    q_spec, mask_spec, repeat_kv = _specs(mesh, q, k)
    kv_spec = q_spec
    if repeat_kv:
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    if key_mask is None:
        fn = jax.shard_map(lambda q_, k_, v_: _local(q_, k_, v_, None, **kw), mesh=mesh,
                           in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)
        return fn(q, k, v)
    fn = jax.shard_map(lambda q_, k_, v_, m_: _local(q_, k_, v_, m_, **kw), mesh=mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, mask_spec), out_specs=q_spec, check_vma=False)
    return fn(q, k, v, key_mask)
