"""Block selection (spec §4 steps 2-4): stage-1 scores fused with the max-pool, then top-k.

Queries are processed in chunks so that at most ``[B, Hkv, chunk, n1]`` stage-1 scores and
``[B, Hkv, T, nb]`` block scores ever exist (never ``T x T``). Causal waste is cut by splitting
the query chunks into a few static buckets, each scored only against the compressed keys its last
query can see. Selection carries no gradient.

``group_sum`` (every entry point, default none): a function applied to the fp32 per-group sum of the
stage-1 scores ``[B, Hkv, C, m1]`` before the max-pool. When the query heads of a GQA group are split
over devices, each device scores its own heads and ``group_sum`` adds the partial sums of the devices
that share the group (e.g. ``minicpm_jax.model.partition.Partition.group_sum``), so the selection
equals the one of the whole group without moving q.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from .compress import compress_keys, num_compressed
from .config import InfLLMv2Config

NEG_INF = float("-inf")


def _window_segments(segment_ids, size, stride, n):
    """Segment id of each compressed window, -2 when the window spans two segments."""
    first = segment_ids[:, 0 : n * stride : stride]
    last = segment_ids[:, size - 1 : size - 1 + n * stride : stride]
    return jnp.where(first == last, first, -2)


def _visible(n, size, stride, pos, n_valid, seg_q, seg_k):
    """[B|1, C, n] mask: window j ends at or before the query, is filled, and is in its segment."""
    j = jnp.arange(n)
    vis = ((j * stride + size - 1)[None, :] <= pos[:, None]) & (j < n_valid)[None, :]
    vis = vis[None]
    if seg_q is not None:
        vis = vis & (seg_k[:, None, :] == seg_q[:, :, None])
    return vis


def _masked_lse(s, vis):
    """logsumexp over the last axis restricted to vis; -inf for rows with nothing visible."""
    s = jnp.where(vis, s, NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return jnp.log(jnp.sum(jnp.exp(s - m), axis=-1)) + m[..., 0]


def _chunk_block_scores(q, pos, k1, k2, n1_valid, n2_valid, n_exist, seg_q, seg1, seg2, cfg, n1, nb, group_sum=None):
    """Block scores [B, Hkv, C, nb] (fp32) for a query chunk q [B, C, Hq, D] at positions pos [C].

    ``group_sum`` (if given) maps the group sum of q's heads to that of the whole group (module doc).

    k1/k2 may be a prefix of the n1 existing K1 entries (the rest are invisible, score 0) or a
    fixed-size cache whose first n1_valid / n2_valid entries are filled; entries >= n_exist do not
    exist (-inf in the max-pool), existing but uncomputed ones are invisible (0).
    """
    b, c, hq, d = q.shape
    hkv = k1.shape[2]
    ks, kst = cfg.kernel_size, cfg.kernel_stride
    qg = q.astype(jnp.float32).reshape(b, c, hkv, hq // hkv, d) * (1.0 / math.sqrt(d))
    dot = functools.partial(jnp.einsum, "bcghd,bjgd->bgchj", precision=jax.lax.Precision.HIGHEST)
    s1 = dot(qg, k1.astype(jnp.float32))  # [B, Hkv, C, G, m1]
    vis1 = _visible(k1.shape[1], ks, kst, pos, n1_valid, seg_q, seg1)[:, None, :, None, :]
    if cfg.use_lse_approx:
        s2 = dot(qg, k2.astype(jnp.float32))
        vis2 = _visible(k2.shape[1], 4 * ks, 4 * kst, pos, n2_valid, seg_q, seg2)[:, None, :, None, :]
        lse = _masked_lse(s2, vis2)
    else:
        lse = _masked_lse(s1, vis1)
    ok = vis1 & jnp.isfinite(lse)[..., None]
    p = jnp.where(ok, jnp.exp(s1 - jnp.where(ok, lse[..., None], 0.0)), 0.0)
    s = jnp.sum(p, axis=3)  # fp32 group sum [B, Hkv, C, m1] (of q's heads: partial if group_sum)
    if group_sum is not None:
        s = group_sum(s)
    s = jnp.nan_to_num(s, nan=0.0, posinf=0.0)
    # Max-pool (kernel st+1, stride st, padding 1): block b covers entries [st*b-1, st*b+st).
    st = cfg.pool_stride
    s = jnp.pad(s, ((0, 0),) * 3 + ((0, n1 - s.shape[-1]),))
    s = jnp.where(jnp.arange(n1) < n_exist, s, NEG_INF)
    lead = jnp.full(s.shape[:-1] + (1,), NEG_INF, s.dtype)
    tail = jnp.full(s.shape[:-1] + (st * nb - s.shape[-1],), NEG_INF, s.dtype)
    sp = jnp.concatenate([lead, s, tail], axis=-1)  # index = entry + 1
    own = jnp.max(sp[..., : st * nb].reshape(s.shape[:-1] + (nb, st)), axis=-1)
    nxt = jnp.concatenate([sp[..., st::st], lead], axis=-1)[..., :nb]
    score = jnp.maximum(own, nxt)
    # Forced blocks.
    blk = jnp.arange(nb)[None, :]
    qb = (pos // cfg.block_size)[:, None]
    lo = qb - cfg.local_blocks
    if cfg.generation == "B":
        score = jnp.where((blk >= lo) & (blk <= qb), jnp.inf, score)
    else:
        score = jnp.where((blk > lo) & (blk <= qb), NEG_INF, score)
    return jnp.where(blk < cfg.init_blocks, jnp.inf, score)


def _top_blocks(score, pos, cfg):
    """Top-k (ties: lower block id), sorted, future blocks -> -1. score [B, Hkv, C, nb]."""
    kk = min(cfg.num_selected, score.shape[-1])
    idx = jnp.sort(jax.lax.top_k(score, kk)[1], axis=-1)
    qb = (pos // cfg.block_size)[None, None, :, None]
    future = idx > qb if cfg.generation == "B" else idx >= qb
    return jnp.where(future, -1, idx).astype(jnp.int32)


def _buckets(t, chunk, n_buckets):
    """Static (start, stop) query ranges, each a multiple of chunk except the last."""
    n_chunks = -(-t // chunk)
    n_buckets = max(1, min(n_buckets, n_chunks))
    edges = [round(i * n_chunks / n_buckets) * chunk for i in range(n_buckets + 1)]
    return [(lo, min(hi, t)) for lo, hi in zip(edges[:-1], edges[1:]) if lo < t]


def _map_scores(q, k, config, segment_ids, chunk, n_buckets, finish, group_sum=None):
    """Runs finish(block_scores, pos) over bucketed query chunks of a prefill; concatenates on T."""
    b, t, hq, d = q.shape
    k1, k2 = compress_keys(k, config)
    n1, n2, nb = k1.shape[1], k2.shape[1], config.num_blocks(t)
    ks, kst = config.kernel_size, config.kernel_stride
    seg1 = seg2 = None
    if segment_ids is not None:
        seg1 = _window_segments(segment_ids, ks, kst, n1)
        seg2 = _window_segments(segment_ids, 4 * ks, 4 * kst, n2)
    chunk = min(chunk, t)
    outs = []
    for lo, hi in _buckets(t, chunk, n_buckets):
        m1 = num_compressed(hi, ks, kst)  # compressed keys the bucket can see
        m2 = num_compressed(hi, 4 * ks, 4 * kst)
        kb1, kb2 = k1[:, :m1], k2[:, :m2]
        sb1 = None if seg1 is None else seg1[:, :m1]
        sb2 = None if seg2 is None else seg2[:, :m2]
        nc = -(-(hi - lo) // chunk)
        pad = nc * chunk - (hi - lo)
        qc = jnp.pad(q[:, lo:hi], ((0, 0), (0, pad), (0, 0), (0, 0)))
        qc = qc.reshape(b, nc, chunk, hq, d).swapaxes(0, 1)
        pos = (lo + jnp.arange(nc * chunk)).reshape(nc, chunk)
        xs = (qc, pos)
        if segment_ids is not None:
            sq = jnp.pad(segment_ids[:, lo:hi], ((0, 0), (0, pad)), constant_values=-3)
            xs = xs + (sq.reshape(b, nc, chunk).swapaxes(0, 1),)

        def body(x, kb1=kb1, kb2=kb2, sb1=sb1, sb2=sb2, m1=m1, m2=m2):
            qq, pp = x[0], x[1]
            sq = x[2] if len(x) > 2 else None
            score = _chunk_block_scores(qq, pp, kb1, kb2, m1, m2, n1, sq, sb1, sb2, config, n1, nb, group_sum)
            return finish(score, pp)

        out = jax.lax.map(body, xs)  # [nc, B, Hkv, chunk, ...]
        out = jnp.moveaxis(out, 0, 2)
        out = out.reshape(out.shape[:2] + (nc * chunk,) + out.shape[4:])
        outs.append(out[:, :, : hi - lo])
    return jnp.concatenate(outs, axis=2)


def _check(q, k, config, segment_ids):
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q_select/k_select must be [B, T, H, D]; got {q.shape} and {k.shape}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q_select {q.shape} and k_select {k.shape} disagree on B, T or D")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q_select heads {q.shape[2]} not a multiple of k_select heads {k.shape[2]}")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids shape {segment_ids.shape} must be [B, T] = {q.shape[:2]}")


def block_scores(q, k, config: InfLLMv2Config, *, segment_ids=None, chunk=256, n_buckets=4, group_sum=None):
    """Block scores [B, Hkv, T, nb] (fp32; forced blocks +inf, gen-A local blocks -inf)."""
    _check(q, k, config, segment_ids)
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    return _map_scores(q, k, config, segment_ids, chunk, n_buckets, lambda s, p: s, group_sum)


def select_blocks(q, k, config: InfLLMv2Config, *, segment_ids=None, chunk=256, n_buckets=4, group_sum=None):
    """Selected block ids int32 [B, Hkv, T, min(num_selected, nb)], sorted, -1 = none (prefill).

    ``group_sum``: see the module doc (q may then hold only part of each group's query heads)."""
    _check(q, k, config, segment_ids)
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    finish = lambda s, p: _top_blocks(s, p, config)
    return _map_scores(q, k, config, segment_ids, chunk, n_buckets, finish, group_sum)


def select_from_compressed(q, k1, k2, n1_valid, n2_valid, pos, nb, config: InfLLMv2Config, group_sum=None):
    """Selection for queries at positions pos [C] against (possibly partly filled) K1/K2 caches
    (``group_sum``: see the module doc)."""
    q, k1, k2 = (jax.lax.stop_gradient(x) for x in (q, k1, k2))
    n1 = k1.shape[1]
    score = _chunk_block_scores(
        q, pos, k1, k2, n1_valid, n2_valid, n1_valid, None, None, None, config, n1, nb, group_sum
    )
    return _top_blocks(score, pos, config)


def attention_blocks(sel, pos, config: InfLLMv2Config, nb: int):
    """Block list the attention walks: sel itself (gen B), or sel plus the local window (gen A).

    Gen A: the window blocks [q_blk - local + 1, q_blk] are appended and removed from sel so that
    no block appears twice. pos [T] are the query positions; sel is [B, Hkv, T, n].
    """
    if config.generation == "B":
        return sel
    qb = (pos // config.block_size)[None, None, :, None]
    lo = qb - config.local_blocks + 1
    sel = jnp.where((sel >= lo) & (sel <= qb), -1, sel)
    win = qb - jnp.arange(min(config.local_blocks, nb))[::-1]
    win = jnp.broadcast_to(jnp.where(win >= 0, win, -1), sel.shape[:3] + win.shape[-1:])
    return jnp.concatenate([sel, win.astype(jnp.int32)], axis=-1)
