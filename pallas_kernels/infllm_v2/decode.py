"""Decode: a fixed-size, jit-friendly cache and one-token attention step (spec §4 step 6, §8.4).

The cache holds K, V (and the selection keys when they differ, e.g. pre-RoPE), the compressed
caches K1 / K2 with their fill counts, and pending-key buffers. Every row of the batch has its own
length (prompts of different lengths are right-padded: row b's token at position p sits at slot p,
slots >= ``length[b]`` hold garbage that is never read). Per row: below ``dense_len`` nothing is
compressed. When the row's length first reaches ``dense_len`` K1 / K2 are built in full from all
its cached keys; afterwards each new key is appended to the pending buffers and, whenever a buffer
holds a full window (32 / 128 keys), its mean becomes the next K1 / K2 entry and the first stride
(16 / 64 keys) is dropped. One decoded token equals the last row of the prefill.

The per-row branches are chosen with scalar ``lax.cond`` s on ``all`` / ``any`` of the per-row
predicates: when every row is dense (or every row sparse) only that attention path runs, and the
O(capacity) build runs only in a step where some row reaches ``dense_len``. Only a batch whose rows
disagree computes both attention paths and picks per row.

Split GQA groups (a device holding some query heads of one group, ``kv_heads`` and ``group_sum`` of
``decode_step``): the device updates the whole cache, all KV heads, as every other device does, and
attends and selects with its own query heads over its KV heads only; the selection's per-group score
sums are completed across devices by ``group_sum`` (``selection``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .compress import mean_pool
from .config import InfLLMv2Config
from .selection import attention_blocks, select_from_compressed

F32 = jnp.float32


class DecodeCache(NamedTuple):
    """Fixed-capacity decode state of one sparse layer (a pytree); counters are per row."""

    length: jax.Array  # int32 [B], tokens cached per row
    k: jax.Array  # [B, cap, Hkv, D]
    v: jax.Array  # [B, cap, Hkv, D]
    k_sel: jax.Array | None  # [B, cap, Hkv, D] selection keys, None when they are k
    k1: jax.Array  # [B, cap1, Hkv, D]
    k2: jax.Array  # [B, cap2, Hkv, D]
    n1: jax.Array  # int32 [B], filled K1 entries
    n2: jax.Array  # int32 [B]
    buf1: jax.Array  # [B, kernel_size, Hkv, D] pending keys for K1
    buf2: jax.Array  # [B, 4 * kernel_size, Hkv, D]
    buf1_len: jax.Array  # int32 [B]
    buf2_len: jax.Array  # int32 [B]
    built: jax.Array  # bool [B], compressed caches exist


_LEVELS = (("1", 1), ("2", 4))  # (tag, multiple of kernel_size / kernel_stride)


def init_cache(
    batch, capacity, kv_heads, head_dim, dtype, config: InfLLMv2Config, separate_select_keys=False
) -> DecodeCache:
    """An empty cache for up to ``capacity`` tokens per row."""
    z = lambda n: jnp.zeros((batch, n, kv_heads, head_dim), dtype)
    ks, kst = config.kernel_size, config.kernel_stride
    cap1 = max(0, (capacity - ks) // kst + 1)
    cap2 = max(0, (capacity - 4 * ks) // (4 * kst) + 1)
    i0 = lambda: jnp.zeros((batch,), jnp.int32)  # distinct buffers, so that the cache can be donated
    return DecodeCache(
        i0(),
        z(capacity),
        z(capacity),
        z(capacity) if separate_select_keys else None,
        z(cap1),
        z(cap2),
        i0(),
        i0(),
        z(ks),
        z(4 * ks),
        i0(),
        i0(),
        jnp.zeros((batch,), bool),
    )


def _count(length, size, stride):
    return jnp.maximum(0, (length - size) // stride + 1)


def _rows(mask, new, old):
    """Per-row select: mask [B] bool, new/old [B, ...]."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)


def _set_rows(buf, idx, val):
    """buf[b, idx[b]] = val[b] for every row (idx clamped to the buffer), in place.

    One row: a dynamic-update-slice (XLA would turn a one-row scatter into a select + copy of the
    whole buffer); more rows: one scatter.
    """
    idx = jnp.clip(idx, 0, buf.shape[1] - 1)
    val = val.astype(buf.dtype)
    if buf.shape[0] == 1:
        return jax.lax.dynamic_update_slice_in_dim(buf, val[:, None], idx[0], axis=1)
    # XLA GPU scatters bf16 natively (XLA CPU converts the buffer to f32 and back, a CPU-only cost).
    return buf.at[jnp.arange(buf.shape[0]), idx].set(val, mode="promise_in_bounds")


def _build(cache: DecodeCache, rows, config: InfLLMv2Config) -> DecodeCache:
    """For rows (bool [B]): full K1/K2 from the row's first length[b] selection keys, pending
    buffers = its keys after the last window; other rows are returned unchanged. O(capacity)."""
    keys = cache.k if cache.k_sel is None else cache.k_sel
    cap = keys.shape[1]
    out = {}
    for tag, m in _LEVELS:
        size, stride = m * config.kernel_size, m * config.kernel_stride
        comp = getattr(cache, "k" + tag)
        n = _count(cache.length, size, stride)  # [B]
        full = mean_pool(keys, size, stride)[:, : comp.shape[1]]
        full = jnp.where((jnp.arange(comp.shape[1])[None, :] < n[:, None])[:, :, None, None], full, 0)
        idx = jnp.minimum(n[:, None] * stride + jnp.arange(size)[None, :], cap - 1)  # [B, size]
        buf = jnp.take_along_axis(keys, idx[:, :, None, None], axis=1)
        out["k" + tag] = _rows(rows, full.astype(comp.dtype), comp)
        out["n" + tag] = jnp.where(rows, n, getattr(cache, "n" + tag))
        old = getattr(cache, "buf" + tag)
        out["buf" + tag] = _rows(rows, buf.astype(old.dtype), old)
        out["buf" + tag + "_len"] = jnp.where(rows, cache.length - n * stride, getattr(cache, "buf" + tag + "_len"))
    return cache._replace(built=cache.built | rows, **out)


def _push(cache: DecodeCache, key, active, config: InfLLMv2Config) -> DecodeCache:
    """Appends one selection key [B, 1, Hkv, D] to the pending buffers of the active rows (bool [B]),
    emitting full windows. O(window) per row: the K1/K2 caches are written at one slot."""
    rb = jnp.arange(key.shape[0])
    out = {}
    for tag, m in _LEVELS:
        size, stride = m * config.kernel_size, m * config.kernel_stride
        buf, blen = getattr(cache, "buf" + tag), getattr(cache, "buf" + tag + "_len")
        comp, n = getattr(cache, "k" + tag), getattr(cache, "n" + tag)
        slot = jnp.minimum(blen, size - 1)
        buf = _set_rows(buf, slot, _rows(active, key[:, 0].astype(buf.dtype), buf[rb, slot]))
        blen = blen + active
        full = active & (blen == size)
        if comp.shape[1]:
            mean = buf.astype(F32).mean(1).astype(comp.dtype)
            at = jnp.minimum(n, comp.shape[1] - 1)
            comp = _set_rows(comp, at, _rows(full, mean, comp[rb, at]))
        out["k" + tag], out["n" + tag] = comp, n + full
        out["buf" + tag] = _rows(full, jnp.roll(buf, -stride, axis=1), buf)
        out["buf" + tag + "_len"] = jnp.where(full, blen - stride, blen)
    return cache._replace(**out)


def _attend(q, k, v, mask):
    """q [B,Hkv,G,D], k/v [B,Hkv,n,D], mask [B,Hkv,n] -> [B,Hkv,G,D] (0 when nothing visible)."""
    s = jnp.einsum("bghd,bgnd->bghn", q.astype(F32), k.astype(F32)) / math.sqrt(q.shape[-1])
    s = jnp.where(mask[:, :, None], s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = p.sum(-1, keepdims=True)
    return jnp.einsum("bghn,bgnd->bghd", p / jnp.where(l > 0, l, 1.0), v.astype(F32))


def _dense_rows(qg, kt, vt, pos):
    """Causal attention of each row's query at pos [B] over slots 0..pos[b]."""
    b, hkv, cap, _ = kt.shape
    mask = jnp.broadcast_to((jnp.arange(cap)[None, :] <= pos[:, None])[:, None], (b, hkv, cap))
    return _attend(qg, kt, vt, mask)


def _sparse_row(qg, qs, k1, k2, n1, n2, pos, k, v, heads, config: InfLLMv2Config, group_sum=None):
    """One row (no batch axis): qg [h,G,D], qs [h*G,D], K1/K2 caches of the h KV heads ``heads [h]``
    (int) of k/v [cap,Hkv,D], pos scalar.

    The selected blocks are gathered straight from the [cap, Hkv, D] cache (no transposed copy).
    """
    cap, h = k.shape[0], heads.shape[0]
    bs, nb = config.block_size, config.num_blocks(cap)
    sel = select_from_compressed(qs[None, None], k1[None], k2[None], n1, n2, pos[None], nb, config, group_sum)
    blocks = attention_blocks(sel, pos[None], config, nb)[0, :, 0]  # [h, n]
    kpos = (blocks[..., None] * bs + jnp.arange(bs)).reshape(h, -1)  # [h, n * bs]
    mask = jnp.repeat(blocks >= 0, bs, axis=-1) & (kpos <= pos)
    idx = (jnp.clip(kpos, 0, cap - 1), heads[:, None])
    return _attend(qg[None], k[idx][None], v[idx][None], mask[None])[0]


def decode_step(
    cache: DecodeCache,
    q,
    k,
    v,
    *,
    config: InfLLMv2Config,
    q_select=None,
    k_select=None,
    kv_heads=None,
    group_sum=None,
):
    """Appends one token per row (q [B,1,Hq,D], k/v [B,1,Hkv,D]) and returns (out [B,1,Hq,D], cache).

    Row b's token has position ``cache.length[b]`` and is written at that slot. Row b attends densely
    iff ``length[b] + 1 < dense_len`` (and dense_len > 0), else block-sparsely; its output equals
    what the row alone (batch 1) would give.

    ``kv_heads=(start, n)`` (``start`` may be traced): q / q_select hold only the query heads of the
    cache's KV heads ``start .. start + n - 1`` (Hq a multiple of n); k/v still carry all Hkv heads and
    the whole cache is updated, while the attention and the selection use those n KV heads. Default:
    all. ``group_sum``: completes the selection's per-group score sums when q holds only part of each
    group (``selection``). Both hooks serve a device holding part of one GQA group.
    """
    b, _, hq, d = q.shape
    if (cache.k_sel is None) != (k_select is None):
        raise ValueError("k_select must be given exactly when the cache has separate selection keys")
    start, hkv = (0, k.shape[2]) if kv_heads is None else kv_heads
    if hq % hkv:
        raise ValueError(f"q has {hq} heads, not a multiple of the {hkv} KV heads it uses (kv_heads)")
    heads = start + jnp.arange(hkv)
    own = (lambda x: x) if kv_heads is None else (lambda x: jax.lax.dynamic_slice_in_dim(x, start, hkv, axis=2))
    pos = cache.length  # [B]
    upd = lambda buf, x: _set_rows(buf, pos, x[:, 0])
    was_built = cache.built
    cache = cache._replace(
        k=upd(cache.k, k),
        v=upd(cache.v, v),
        length=pos + 1,
        k_sel=None if k_select is None else upd(cache.k_sel, k_select),
    )
    ksel = k if k_select is None else k_select
    dense = jnp.broadcast_to(config.dense_len > 0, (b,)) & (pos + 1 < config.dense_len)  # [B]
    cache = _push(cache, ksel, was_built, config)
    build = ~was_built & ~dense
    cache = jax.lax.cond(jnp.any(build), lambda c: _build(c, build, config), lambda c: c, cache)

    qg = q[:, 0].reshape(b, hkv, hq // hkv, d)
    qs = (q if q_select is None else q_select)[:, 0]

    # A dense row sits below dense_len, so the dense path only reads the first dense_len slots.
    nd = cache.k.shape[1] if config.dense_len <= 0 else min(cache.k.shape[1], config.dense_len)

    def dense_out(_):
        return _dense_rows(qg, own(cache.k[:, :nd]).swapaxes(1, 2), own(cache.v[:, :nd]).swapaxes(1, 2), pos)

    def sparse_out(_):
        row = lambda *a: _sparse_row(*a, heads, config=config, group_sum=group_sum)
        k1, k2 = own(cache.k1), own(cache.k2)
        return jax.vmap(row)(qg, qs, k1, k2, cache.n1, cache.n2, pos, cache.k, cache.v)

    def mixed_out(_):
        return _rows(dense, dense_out(None), sparse_out(None))

    out = jax.lax.cond(
        jnp.all(dense),
        dense_out,
        lambda _: jax.lax.cond(jnp.any(dense), mixed_out, sparse_out, None),
        None,
    )
    return out.reshape(b, 1, hq, d).astype(q.dtype), cache


def prefill_cache(cache: DecodeCache, k, v, *, config: InfLLMv2Config, k_select=None, lengths=None):
    """Writes a prompt's k/v [B, T, Hkv, D] at slots 0..T-1 of an empty cache.

    ``lengths`` int [B] (may be traced; each <= T; default T) is the number of real tokens per row: keys at
    slots >= lengths[b] are ignored (later decode steps overwrite them). Rows with
    ``lengths[b] >= dense_len`` (any row when dense_len <= 0) get K1/K2 built from their keys.
    """
    b, t = k.shape[:2]
    upd = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), 0, axis=1)
    if lengths is None:
        lengths = jnp.full((b,), t, jnp.int32)
    lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (b,))
    cache = cache._replace(
        k=upd(cache.k, k),
        v=upd(cache.v, v),
        length=lengths,
        k_sel=None if k_select is None else upd(cache.k_sel, k_select),
    )
    if config.dense_len <= 0:
        return _build(cache, jnp.ones((b,), bool), config)
    if t < config.dense_len:  # lengths <= T: no row can be long enough
        return cache
    rows = lengths >= config.dense_len
    return jax.lax.cond(jnp.any(rows), lambda c: _build(c, rows, config), lambda c: c, cache)
