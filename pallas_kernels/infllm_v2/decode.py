"""Decode: a fixed-size, jit-friendly cache and one-token attention step (spec §4 step 6, §8.4).

The cache holds K, V (and the selection keys when they differ, e.g. pre-RoPE), the compressed
caches K1 / K2 with their fill counts, and pending-key buffers. Below ``dense_len`` nothing is
compressed. When the length first reaches ``dense_len`` K1 / K2 are built in full from all cached
keys; afterwards each new key is appended to the pending buffers and, whenever a buffer holds a
full window (32 / 128 keys), its mean becomes the next K1 / K2 entry and the first stride
(16 / 64 keys) is dropped. One decoded token equals the last row of the prefill.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from .compress import mean_pool
from .config import InfLLMv2Config
from .selection import attention_blocks, select_from_compressed

F32 = jnp.float32


class DecodeCache(NamedTuple):
    """Fixed-capacity decode state of one sparse layer (a pytree)."""

    length: jax.Array  # int32 [], tokens cached
    k: jax.Array  # [B, cap, Hkv, D]
    v: jax.Array  # [B, cap, Hkv, D]
    k_sel: Optional[jax.Array]  # [B, cap, Hkv, D] selection keys, None when they are k
    k1: jax.Array  # [B, cap1, Hkv, D]
    k2: jax.Array  # [B, cap2, Hkv, D]
    n1: jax.Array  # int32 [], filled K1 entries
    n2: jax.Array
    buf1: jax.Array  # [B, kernel_size, Hkv, D] pending keys for K1
    buf2: jax.Array  # [B, 4 * kernel_size, Hkv, D]
    buf1_len: jax.Array
    buf2_len: jax.Array
    built: jax.Array  # bool [], compressed caches exist


def init_cache(
    batch, capacity, kv_heads, head_dim, dtype, config: InfLLMv2Config, separate_select_keys=False
) -> DecodeCache:
    """An empty cache for up to ``capacity`` tokens."""
    z = lambda n: jnp.zeros((batch, n, kv_heads, head_dim), dtype)
    ks, kst = config.kernel_size, config.kernel_stride
    cap1 = max(0, (capacity - ks) // kst + 1)
    cap2 = max(0, (capacity - 4 * ks) // (4 * kst) + 1)
    i0 = jnp.zeros((), jnp.int32)
    return DecodeCache(
        i0,
        z(capacity),
        z(capacity),
        z(capacity) if separate_select_keys else None,
        z(cap1),
        z(cap2),
        i0,
        i0,
        z(ks),
        z(4 * ks),
        i0,
        i0,
        jnp.zeros((), bool),
    )


def _count(length, size, stride):
    return jnp.maximum(0, (length - size) // stride + 1)


def _build(cache: DecodeCache, config: InfLLMv2Config) -> DecodeCache:
    """Full K1/K2 from all cached selection keys, pending buffers = keys after the last window."""
    keys = cache.k if cache.k_sel is None else cache.k_sel
    cap = keys.shape[1]
    out = {}
    for tag, size, stride in (
        ("1", config.kernel_size, config.kernel_stride),
        ("2", 4 * config.kernel_size, 4 * config.kernel_stride),
    ):
        comp = getattr(cache, "k" + tag)
        n = _count(cache.length, size, stride)
        full = mean_pool(keys, size, stride)[:, : comp.shape[1]]
        out["k" + tag] = jnp.where((jnp.arange(comp.shape[1]) < n)[None, :, None, None], full, 0)
        out["n" + tag] = n
        out["buf" + tag] = jnp.take(keys, jnp.minimum(n * stride + jnp.arange(size), cap - 1), axis=1)
        out["buf" + tag + "_len"] = cache.length - n * stride
    return cache._replace(built=jnp.ones((), bool), **out)


def _push(cache: DecodeCache, key, config: InfLLMv2Config) -> DecodeCache:
    """Appends one selection key [B, 1, Hkv, D] to the pending buffers, emitting full windows."""
    out = {}
    for tag, size, stride in (
        ("1", config.kernel_size, config.kernel_stride),
        ("2", 4 * config.kernel_size, 4 * config.kernel_stride),
    ):
        buf, blen = getattr(cache, "buf" + tag), getattr(cache, "buf" + tag + "_len")
        comp, n = getattr(cache, "k" + tag), getattr(cache, "n" + tag)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, key.astype(buf.dtype), blen, axis=1)
        blen = blen + 1
        full = blen == size
        mean = buf.astype(F32).mean(1, keepdims=True).astype(comp.dtype)
        if comp.shape[1]:
            comp = jnp.where(
                full, jax.lax.dynamic_update_slice_in_dim(comp, mean, jnp.minimum(n, comp.shape[1] - 1), axis=1), comp
            )
        out["k" + tag], out["n" + tag] = comp, n + full
        out["buf" + tag] = jnp.where(full, jnp.roll(buf, -stride, axis=1), buf)
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


def decode_step(cache: DecodeCache, q, k, v, *, config: InfLLMv2Config, q_select=None, k_select=None):
    """Appends one token (q [B,1,Hq,D], k/v [B,1,Hkv,D]) and returns (out [B,1,Hq,D], cache)."""
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    if (cache.k_sel is None) != (k_select is None):
        raise ValueError("k_select must be given exactly when the cache has separate selection keys")
    pos = cache.length
    upd = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), pos, axis=1)
    cache = cache._replace(
        k=upd(cache.k, k),
        v=upd(cache.v, v),
        length=pos + 1,
        k_sel=None if k_select is None else upd(cache.k_sel, k_select),
    )
    ksel = k if k_select is None else k_select
    dense = ~((config.dense_len <= 0) | (pos + 1 >= config.dense_len))
    cache = jax.lax.cond(
        cache.built,
        lambda c: _push(c, ksel, config),
        lambda c: jax.lax.cond(dense, lambda x: x, lambda x: _build(x, config), c),
        cache,
    )
    cap = cache.k.shape[1]
    qg = q[:, 0].reshape(b, hkv, hq // hkv, d)
    kt, vt = cache.k.swapaxes(1, 2), cache.v.swapaxes(1, 2)  # [B,Hkv,cap,D]

    def dense_out(_):
        mask = jnp.broadcast_to(jnp.arange(cap) <= pos, (b, hkv, cap))
        return _attend(qg, kt, vt, mask)

    def sparse_out(_):
        bs, nb = config.block_size, config.num_blocks(cap)
        qs = q if q_select is None else q_select
        sel = select_from_compressed(qs, cache.k1, cache.k2, cache.n1, cache.n2, pos[None], nb, config)
        blocks = attention_blocks(sel, pos[None], config, nb)[:, :, 0]  # [B,Hkv,n]
        pad = ((0, 0), (0, 0), (0, nb * bs - cap), (0, 0))
        kb = jnp.pad(kt, pad).reshape(b, hkv, nb, bs, d)
        vb = jnp.pad(vt, pad).reshape(b, hkv, nb, bs, d)
        take = jax.vmap(jax.vmap(lambda x, i: x[jnp.maximum(i, 0)].reshape(-1, d)))
        kpos = (blocks[..., None] * bs + jnp.arange(bs)).reshape(b, hkv, -1)
        mask = jnp.repeat(blocks >= 0, bs, axis=-1) & (kpos <= pos)
        return _attend(qg, take(kb, blocks), take(vb, blocks), mask)

    out = jax.lax.cond(dense, dense_out, sparse_out, None)
    return out.reshape(b, 1, hq, d).astype(q.dtype), cache


def prefill_cache(cache: DecodeCache, k, v, *, config: InfLLMv2Config, k_select=None):
    """Writes a prompt's k/v [B, T, Hkv, D] into an empty cache (build K1/K2 if T >= dense_len)."""
    t = k.shape[1]
    upd = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), 0, axis=1)
    cache = cache._replace(
        k=upd(cache.k, k),
        v=upd(cache.v, v),
        length=jnp.asarray(t, jnp.int32),
        k_sel=None if k_select is None else upd(cache.k_sel, k_select),
    )
    if config.dense_len <= 0 or t >= config.dense_len:
        cache = _build(cache, config)
    return cache
