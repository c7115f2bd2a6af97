"""Reference implementation: a direct jnp port of the spec's NumPy reference (§5), dense masks.

Slow and obvious (materialises ``[B, Hkv, T, T]``-sized masks and scores): the ground truth the
other implementations are tested against. Differentiable through plain autodiff.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .config import InfLLMv2Config

HIGHEST = jax.lax.Precision.HIGHEST


def compress(k, ks, kst):
    """Mean over full windows [j*kst, j*kst + ks): [B, T, H, D] -> [B, n, H, D]."""
    t = k.shape[1]
    n = (t - ks) // kst + 1 if t >= ks else 0
    idx = jnp.arange(n)[:, None] * kst + jnp.arange(ks)[None, :]
    return k.astype(jnp.float32)[:, idx].mean(2).astype(k.dtype)


def stage1_scores(q, k1, k2, ks, kst, lse_approx=True):
    """S [B, Hkv, T, n1]: softmax of q.K1 normalised by the K1 (or K2) lse, summed over the group."""
    b, t, hq, d = q.shape
    hkv = k1.shape[2]
    qf = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d) / math.sqrt(d)
    pos = jnp.arange(t)[:, None]
    s1 = jnp.einsum("btghd,bjgd->bgthj", qf, k1.astype(jnp.float32), precision=HIGHEST)
    v1 = (jnp.arange(k1.shape[1]) * kst + ks - 1)[None, :] <= pos  # [T, n1]
    if lse_approx:
        s_l = jnp.einsum("btghd,bjgd->bgthj", qf, k2.astype(jnp.float32), precision=HIGHEST)
        m = (jnp.arange(k2.shape[1]) * 4 * kst + 4 * ks - 1)[None, :] <= pos
    else:
        s_l, m = s1, v1
    m = m[None, None, :, None, :]
    lse = jax.nn.logsumexp(jnp.where(m, s_l, -jnp.inf), axis=-1, keepdims=True)
    has = jnp.isfinite(lse)
    p = jnp.where(v1[None, None, :, None, :] & has, jnp.exp(s1 - jnp.where(has, lse, 0.0)), 0.0)
    return jnp.nan_to_num(p, nan=0.0, posinf=0.0).sum(3)


def block_scores(s, t, block, kst, init, local, gen="B"):
    """Max-pool (kernel block/kst + 1, stride block/kst, padding 1) and forced blocks."""
    n1 = s.shape[-1]
    nb = -(-t // block)
    st = block // kst
    j, blk = jnp.arange(n1)[None, :], jnp.arange(nb)[:, None]
    member = (j >= blk * st - 1) & (j < blk * st + st)  # [nb, n1]
    out = jnp.max(jnp.where(member, s[..., None, :], -jnp.inf), axis=-1)  # [B, Hkv, T, nb]
    qb = (jnp.arange(t) // block)[:, None]
    bb = jnp.arange(nb)[None, :]
    if gen == "B":
        out = jnp.where((bb >= qb - local) & (bb <= qb), jnp.inf, out)
    else:
        out = jnp.where((bb > qb - local) & (bb <= qb), -jnp.inf, out)
    return jnp.where(bb < init, jnp.inf, out)


def select(bs, t, block, n_sel, gen="B"):
    """Top-k (lower index first on ties), sorted, future blocks -> -1."""
    kk = min(n_sel, bs.shape[-1])
    idx = jnp.sort(jax.lax.top_k(bs, kk)[1], axis=-1)
    qb = (jnp.arange(t) // block)[None, None, :, None]
    return jnp.where(idx > qb if gen == "B" else idx >= qb, -1, idx).astype(jnp.int32)


def key_mask(block_idx, t, block, segment_ids=None):
    """[B, Hkv, T, T] bool: key block listed for the query, causal, same segment."""
    nb = -(-t // block)
    listed = (block_idx[..., None] == jnp.arange(nb)).any(-2)  # [B, Hkv, T, nb]
    keys = jnp.arange(t)
    mask = listed[..., keys // block] & (keys[None, :] <= keys[:, None])
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


def block_sparse_attention(q, k, v, block_idx, *, block_size, segment_ids=None):
    """Softmax attention over the tokens of the listed blocks (causal); empty rows give 0."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    mask = key_mask(block_idx, t, block_size, segment_ids)[:, :, None]  # [B,Hkv,1,T,T]
    qf = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
    s = jnp.einsum("btghd,bsgd->bghts", qf, k.astype(jnp.float32), precision=HIGHEST)
    s = jnp.where(mask, s / math.sqrt(d), -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = p.sum(-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bghts,bsgd->btghd", p, v.astype(jnp.float32), precision=HIGHEST)
    return o.reshape(b, t, hq, d).astype(q.dtype)


def dense_attention(q, k, v, *, segment_ids=None):
    """Exact dense causal attention (every block listed)."""
    t = q.shape[1]
    full = jnp.zeros((q.shape[0], k.shape[2], t, 1), jnp.int32)
    return block_sparse_attention(q, k, v, full, block_size=t, segment_ids=segment_ids)


def select_blocks(q, k, config: InfLLMv2Config):
    """Selection of the prefill (spec §4 steps 1-4), fully materialised."""
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    t, c = q.shape[1], config
    k1, k2 = compress(k, c.kernel_size, c.kernel_stride), compress(k, 4 * c.kernel_size, 4 * c.kernel_stride)
    s = stage1_scores(q, k1, k2, c.kernel_size, c.kernel_stride, c.use_lse_approx)
    bs = block_scores(s, t, c.block_size, c.kernel_stride, c.init_blocks, c.local_blocks, c.generation)
    return select(bs, t, c.block_size, c.num_selected, c.generation)
