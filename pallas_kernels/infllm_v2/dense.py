"""Memory-safe dense causal attention in jnp (flash-style): the path below ``dense_len``.

The GQA group is folded into the query rows (``[B, Hkv, T*G, D]``, row ``r`` at position
``r // G``), so query block ``i`` (``q_chunk`` tokens) against key block ``j`` (``kv_chunk`` keys)
is one ``[q_chunk*G, D] x [D, kv_chunk]`` matmul per KV head. Each query block walks only the key
blocks it can see (a loop whose trip count depends on ``i``) with an online softmax; only blocks
that straddle the diagonal pay for the causal mask (every block does with ``segment_ids``). The
backward (custom VJP) walks key blocks outer, visible query blocks inner, recomputing the
probabilities from the saved log-sum-exp. Memory ``O(T * chunk)`` forward and backward.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

F32 = jnp.float32


def dense_causal_attention(q, k, v, *, segment_ids=None, q_chunk=512, kv_chunk=512):
    """Exact causal softmax attention, q ``[B,T,Hq,D]``, k/v ``[B,T,Hkv,D]`` -> ``[B,T,Hq,D]``.

    Query head ``i`` uses KV head ``i // (Hq/Hkv)``; scale ``D**-0.5``; fp32 softmax statistics;
    ``segment_ids [B,T]``: tokens attend only within their segment. Output in q's dtype.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    bq, bk = min(q_chunk, t), min(kv_chunk, t)
    tp = -(-t // math.lcm(bq, bk)) * math.lcm(bq, bk)
    pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    qr = pad(q).reshape(b, tp, hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, -1, d)
    kr, vr = (pad(x).transpose(0, 2, 1, 3) for x in (k, v))
    seg = None if segment_ids is None else pad(segment_ids.astype(jnp.int32), -1)
    out = _flash(qr, kr, vr, seg, (bq, bk))
    return out.reshape(b, hkv, tp, hq // hkv, d).transpose(0, 2, 1, 3, 4).reshape(b, tp, hq, d)[:, :t]


def _block(x, i, size):
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=2)


def _put(x, y, i, size):
    return jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), i * size, axis=2)


def _scores(qi, kj, seg, i, j, blocks, masked):
    """Scaled fp32 scores ``[B,Hkv,R,bk]`` of query block ``i`` and key block ``j``; masked -> -inf."""
    (bq, bk), (r, d) = blocks, qi.shape[2:]
    s = jnp.einsum("bhrd,bhcd->bhrc", qi, kj, preferred_element_type=F32) * d**-0.5
    if not masked:
        return s
    g = r // bq
    mask = (j * bk + jnp.arange(bk) <= (i * bq + jnp.arange(r) // g)[:, None])[None, None]
    if seg is not None:
        sq = jnp.repeat(jax.lax.dynamic_slice_in_dim(seg, i * bq, bq, axis=1), g, axis=1)
        sk = jax.lax.dynamic_slice_in_dim(seg, j * bk, bk, axis=1)
        mask = mask & (sq[:, :, None] == sk[:, None, :])[:, None]
    return jnp.where(mask, s, -jnp.inf)


def _split(lo, full, hi, masked_first, all_masked):
    """Loop ranges ``[(start, stop, masked)]`` over ``[lo, hi)``: the mask is needed on one side of ``full``."""
    if all_masked:
        return [(lo, hi, True)]
    return [(lo, full, True), (full, hi, False)] if masked_first else [(lo, full, False), (full, hi, True)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, blocks):
    return _flash_fwd(q, k, v, seg, blocks)[0]


def _flash_fwd(q, k, v, seg, blocks):
    """q ``[B,Hkv,Tp*G,D]``, k/v ``[B,Hkv,Tp,D]``: output (q's dtype) and fp32 log-sum-exp per row."""
    (bq, bk), (b, h, rows, d) = blocks, q.shape
    nq = k.shape[2] // bq
    r = rows // nq

    def q_step(i, carry):
        qi = _block(q, i, r)

        def kv_step(masked):
            def step(j, state):
                m, l, acc = state
                s = _scores(qi, _block(k, j, bk), seg, i, j, blocks, masked)
                m_new = jnp.maximum(m, s.max(-1))  # m starts finite: fully masked rows stay finite
                p = jnp.exp(s - m_new[..., None])
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum("bhrc,bhcd->bhrd", p.astype(v.dtype), _block(v, j, bk), preferred_element_type=F32)
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            return step

        state = (jnp.full((b, h, r), jnp.finfo(F32).min), jnp.zeros((b, h, r), F32), jnp.zeros((b, h, r, d), F32))
        full, end = (i * bq + 1) // bk, ((i + 1) * bq + bk - 1) // bk  # blocks wholly visible / any visible
        for lo, hi, masked in _split(0, full, end, False, seg is not None):
            state = jax.lax.fori_loop(lo, hi, kv_step(masked), state)
        m, l, acc = state  # every row sees itself: l > 0
        out, lse = carry
        return _put(out, acc / l[..., None], i, r), _put(lse, m + jnp.log(l), i, r)

    out, lse = jax.lax.fori_loop(0, nq, q_step, (jnp.zeros_like(q), jnp.zeros((b, h, rows), F32)))
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(blocks, res, do):
    """Key block ``j`` outer, query blocks that see it inner: dk/dv of block j in the carry, dq in fp32."""
    q, k, v, seg, out, lse = res
    (bq, bk), (rows, d) = blocks, q.shape[2:]
    nq, nk = k.shape[2] // bq, k.shape[2] // bk
    r, scale = rows // nq, d**-0.5
    delta = jnp.sum(do.astype(F32) * out.astype(F32), axis=-1)

    def kv_step(j, carry):
        kj, vj = _block(k, j, bk), _block(v, j, bk)

        def q_step(masked):
            def step(i, state):
                dq, dk, dv = state
                qi, doi = _block(q, i, r), _block(do, i, r)
                s = _scores(qi, kj, seg, i, j, blocks, masked)
                p = jnp.exp(s - _block(lse, i, r)[..., None])
                dv += jnp.einsum("bhrc,bhrd->bhcd", p.astype(do.dtype), doi, preferred_element_type=F32)
                dp = jnp.einsum("bhrd,bhcd->bhrc", doi, vj, preferred_element_type=F32)
                ds = (p * (dp - _block(delta, i, r)[..., None])).astype(q.dtype)
                dqi = jnp.einsum("bhrc,bhcd->bhrd", ds, kj, preferred_element_type=F32) * scale
                dk += jnp.einsum("bhrc,bhrd->bhcd", ds, qi, preferred_element_type=F32) * scale
                return _put(dq, _block(dq, i, r) + dqi, i, r), dk, dv

            return step

        zeros = jnp.zeros(kj.shape, F32)
        dq, dk, dv = carry
        state = (dq, zeros, zeros)
        first, full = (j * bk) // bq, ((j + 1) * bk - 1 + bq - 1) // bq  # first seeing / first wholly seeing
        for lo, hi, masked in _split(first, jnp.minimum(full, nq), nq, True, seg is not None):
            state = jax.lax.fori_loop(lo, hi, q_step(masked), state)
        dq, dkj, dvj = state
        return dq, _put(dk, dkj, j, bk), _put(dv, dvj, j, bk)

    init = (jnp.zeros(q.shape, F32), jnp.zeros_like(k), jnp.zeros_like(v))
    dq, dk, dv = jax.lax.fori_loop(0, nk, kv_step, init)
    return dq.astype(q.dtype), dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
