"""Memory-safe dense causal attention in jnp (flash-style): the path below ``dense_len``.

Query chunks are grouped into a few static buckets; each bucket attends to the key prefix its last
query can see, walking it in key chunks with an online softmax (``lax.scan``), so no ``T x T``
array exists. Each query chunk is rematerialised in the backward (``jax.checkpoint``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _chunk_attention(q, k, v, q0, kv_chunk, sq, sk):
    """q [B,C,Hkv,G,D] at positions q0 + arange(C) over keys k/v [B,nk*kv_chunk,Hkv,D]."""
    b, c, hkv, g, d = q.shape
    nk = k.shape[1] // kv_chunk
    qpos = q0 + jnp.arange(c)
    qf = q.astype(F32) * (1.0 / math.sqrt(d))
    kc = k.reshape(b, nk, kv_chunk, hkv, d).swapaxes(0, 1)
    vc = v.reshape(b, nk, kv_chunk, hkv, d).swapaxes(0, 1)
    xs = (jnp.arange(nk), kc, vc) + (() if sk is None else (sk.reshape(b, nk, kv_chunk).swapaxes(0, 1),))

    def step(carry, x):
        m, l, acc = carry
        s = jnp.einsum("bcghd,bkgd->bcghk", qf, x[1], preferred_element_type=F32)
        kpos = x[0] * kv_chunk + jnp.arange(kv_chunk)
        mask = (kpos[None, :] <= qpos[:, None])[None, :, None, None, :]
        if sk is not None:
            mask = mask & (sq[:, :, None, None, None] == x[3][:, None, None, None, :])
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        acc = acc * corr[..., None] + jnp.einsum("bcghk,bkgd->bcghd", p, x[2], preferred_element_type=F32)
        return (m_new, l * corr + p.sum(-1), acc), None

    init = (jnp.full((b, c, hkv, g), -jnp.inf, F32), jnp.zeros((b, c, hkv, g), F32), jnp.zeros((b, c, hkv, g, d), F32))
    (m, l, acc), _ = jax.lax.scan(step, init, xs)
    return acc / jnp.where(l > 0, l, 1.0)[..., None]


def dense_causal_attention(q, k, v, *, segment_ids=None, q_chunk=512, kv_chunk=512, n_buckets=8):
    """Exact causal softmax attention, q [B,T,Hq,D], k/v [B,T,Hkv,D]; O(T * chunk) memory."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q_chunk, kv_chunk = min(q_chunk, t), min(kv_chunk, t)
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    n_chunks = -(-t // q_chunk)
    n_buckets = max(1, min(n_buckets, n_chunks))
    edges = [round(i * n_chunks / n_buckets) for i in range(n_buckets + 1)]
    outs = []
    for c0, c1 in zip(edges[:-1], edges[1:]):
        if c0 == c1:
            continue
        lo, hi = c0 * q_chunk, min(c1 * q_chunk, t)
        kl = -(-hi // kv_chunk) * kv_chunk
        kpad = ((0, 0), (0, max(0, kl - t)), (0, 0), (0, 0))
        kk, vv = jnp.pad(k, kpad)[:, :kl], jnp.pad(v, kpad)[:, :kl]
        nc = c1 - c0
        qq = jnp.pad(qg[:, lo:hi], ((0, 0), (0, nc * q_chunk - (hi - lo))) + ((0, 0),) * 3)
        qq = qq.reshape(b, nc, q_chunk, hkv, hq // hkv, d).swapaxes(0, 1)
        sk = sq = None
        if segment_ids is not None:
            sk = jnp.pad(segment_ids, ((0, 0), (0, max(0, kl - t))), constant_values=-1)[:, :kl]
            sq = jnp.pad(segment_ids[:, lo:hi], ((0, 0), (0, nc * q_chunk - (hi - lo))), constant_values=-2)
            sq = sq.reshape(b, nc, q_chunk).swapaxes(0, 1)

        def one(x, kk=kk, vv=vv, sk=sk, lo=lo):
            return _chunk_attention(x[1], kk, vv, lo + x[0] * q_chunk, kv_chunk, None if sk is None else x[2], sk)

        xs = (jnp.arange(nc), qq) + (() if sq is None else (sq,))
        o = jax.lax.map(jax.checkpoint(one), xs)  # [nc,B,C,Hkv,G,D]
        outs.append(o.swapaxes(0, 1).reshape(b, nc * q_chunk, hq, d)[:, : hi - lo])
    return jnp.concatenate(outs, axis=1).astype(q.dtype)
