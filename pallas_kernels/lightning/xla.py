"""Chunked Lightning-Attention-2 in plain XLA: the default on CPU and GPU.

Per chunk of C tokens (local i, j; S = state entering the chunk):
``O = ((Q Kᵀ) ⊙ D) V + diag(λ^{i+1}) Q S`` and ``S' = λ^L S + (diag(λ^{L−1−j}) K)ᵀ V``.
The sequence is cut into segments of ``SEGMENT`` chunks, walked by one outer ``lax.scan`` that
carries the state: inside a segment everything is chunk-major ``[s, B, H, C, D]`` (about 1 MiB per
operand at the defaults, so it stays in cache), the chunk-parallel matmuls are batched over the
segment's chunks, and the recurrence ``S' = λ^L S + U`` is an inner ``lax.scan`` over them. One
pass over whole-sequence chunk-major arrays was 1.5-2.5× slower on CPU at 16K-64K tokens: its
batched matmuls and layout copies ran out of cache. The softmax-free
scale is folded into the decay factors, so q is never rescaled. Memory O(T·D + N·Dk·Dv).
The backward is chunk-wise too: it reuses the per-chunk states saved by the forward and runs the
reverse state-gradient scan ``dS = λ^L dS' + (diag(λ^{i+1}) Q)ᵀ dO``. Packed rows (``docs``) mask
every factor per batch (``chunking.batched_factors``) and cut both scans at document ends.
"""

import jax.numpy as jnp
from jax import lax

from .chunking import batched_factors, chunk_lengths, num_chunks

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST
SEGMENT = 16  # chunks per step of the outer scan: 1024 tokens at chunk 64, about 1 MiB per operand


def _ein(spec, a, b):
    return jnp.einsum(spec, a, b, precision=_HI, preferred_element_type=_F32)


def _segments(x, c, s):
    """``[B,T,H,D]`` -> fp32 ``[n_seg, B, s·c, H, D]``: segments of ``s`` chunks (zero right-padding)."""
    b, t, h, d = x.shape
    n_seg = -(-num_chunks(t, c) // s)
    x = jnp.pad(x.astype(_F32), ((0, 0), (0, n_seg * s * c - t), (0, 0), (0, 0)))
    return x.reshape(b, n_seg, s * c, h, d).swapaxes(0, 1)


def _unsegment(x, t):
    """``[n_seg, B, s·c, H, D]`` -> ``[B, T, H, D]``."""
    n_seg, b, sc, h, d = x.shape
    return x.swapaxes(0, 1).reshape(b, n_seg * sc, h, d)[:, :t]


def _to_n(x, c, transposed=False):
    """One segment ``[B, s·c, H, D]`` -> chunk-major ``[s,B,H,C,D]`` (``[s,B,H,D,C]`` if transposed)."""
    b, sc, h, d = x.shape
    x = x.reshape(b, sc // c, c, h, d)
    return x.transpose((1, 0, 3, 4, 2) if transposed else (1, 0, 3, 2, 4))


def _from_n(x):
    """Chunk-major ``[s,B,H,C,D]`` -> one segment ``[B, s·c, H, D]``."""
    s, b, h, c, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, s * c, h, d)


def _per_segment(factors, n, s):
    """Chunk-major factors ``[N|1, ...]`` -> (``[n_seg, s, ...]`` scan inputs, constants): the ones
    with a chunk axis are split into segments; padded chunks get carry 1 and zero factors, so the
    state passes them unchanged."""
    split, const = {}, {}
    for name, x in factors.items():
        if x.shape[0] == 1:
            const[name] = x
            continue
        pad = (-n) % s
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1), constant_values=1.0 if name == "lam" else 0.0)
        split[name] = x.reshape(-1, s, *x.shape[1:])
    return split, const


def _factors(log_decay, t, c, docs, scale):
    """Chunk-major factors: ``intra·scale``, ``qdec·scale``, ``kdec`` and the carry ``lam [N,1|B,H]``."""
    intra, qdec, kdec, keep = batched_factors(log_decay, t, c, docs)
    n_major = lambda x: jnp.moveaxis(x, 2, 0)
    lam = jnp.exp(jnp.asarray(chunk_lengths(t, c), _F32)[:, None] * log_decay.astype(_F32))[:, None]
    if keep is not None:
        lam = lam * keep.T[..., None]
    return n_major(intra) * scale, n_major(qdec)[..., None] * scale, n_major(kdec)[..., None], lam


def _scan(u, lam, init, reverse=False):
    """``x_{n+1} = lam_n·x_n + u_n``: returns (the carries entering each step ``[N,B,H,Dk,Dv]``, the last)."""

    def step(x, xs):
        un, ln = xs
        return ln[..., None, None] * x + un, x

    last, xs = lax.scan(step, init.astype(_F32), (u, lam), reverse=reverse)
    return xs, last


def _layout(log_decay, t, c, docs, scale):
    """``(s, split, const)`` shared by the forward and the backward: chunks per segment and the
    decay factors (``_factors``) as per-segment scan inputs / constants (``_per_segment``)."""
    intra, qdec, kdec, lam = _factors(log_decay, t, c, docs, scale)
    n = num_chunks(t, c)
    s = min(SEGMENT, n)
    return (s, *_per_segment(dict(intra=intra, qdec=qdec, kdec=kdec, lam=lam), n, s))


def forward(q, k, v, log_decay, initial_state, *, scale, chunk_size=64, save_states=False, docs=None):
    """Returns ``(o [B,T,H,Dv] fp32, final_state, chunk_states [n_seg,s,B,H,Dk,Dv] or None)``.

    ``chunk_states[i, j]`` is the state entering chunk ``i·s + j`` (input to the backward);
    ``docs`` is an optional ``[B,T]`` document index (``chunking.document_index``).
    """
    t, c = q.shape[1], chunk_size
    s, split, const = _layout(log_decay, t, c, docs, scale)

    def step(state, xs):
        f = {**const, **xs[3]}
        qc, vc, kt = _to_n(xs[0], c), _to_n(xs[2], c), _to_n(xs[1], c, transposed=True)
        u = _ein("nbhdc,nbhcv->nbhdv", kt * jnp.swapaxes(f["kdec"], -1, -2), vc)
        states, last = _scan(u, f["lam"], state)
        scores = _ein("nbhcd,nbhde->nbhce", qc, kt) * f["intra"]
        o = _ein("nbhce,nbhev->nbhcv", scores, vc) + f["qdec"] * _ein("nbhcd,nbhdv->nbhcv", qc, states)
        return last, (_from_n(o), states if save_states else None)

    xs = tuple(_segments(x, c, s) for x in (q, k, v)) + (split,)
    final, (o, states) = lax.scan(step, initial_state.astype(_F32), xs)
    return _unsegment(o, t), final, states


def backward(q, k, v, log_decay, chunk_states, do, d_final, *, scale, chunk_size=64, docs=None):
    """Chunk-wise VJP, one segment at a time from the last. Returns fp32 ``(dq, dk, dv, d_initial_state)``."""
    t, c = q.shape[1], chunk_size
    s, split, const = _layout(log_decay, t, c, docs, scale)

    def step(d_leave, xs):
        f = {**const, **xs[5]}
        qc, kc, vc, doc = (_to_n(x, c) for x in xs[:4])
        w = _ein("nbhcd,nbhcv->nbhdv", qc * f["qdec"], doc)  # dS contribution of O_inter
        # dS_enter[n] = λ^{L_n}·dS_leave[n] + W_n, from the last chunk back: the carries are dS_leave.
        d_after, d_enter = _scan(w, f["lam"], d_leave, reverse=True)
        scores = _ein("nbhcd,nbhed->nbhce", qc, kc) * f["intra"]
        dscores = _ein("nbhcv,nbhev->nbhce", doc, vc) * f["intra"]
        states = xs[4]
        dq = _ein("nbhce,nbhed->nbhcd", dscores, kc) + f["qdec"] * _ein("nbhcv,nbhdv->nbhcd", doc, states)
        dk = _ein("nbhce,nbhcd->nbhed", dscores, qc) + f["kdec"] * _ein("nbhcv,nbhdv->nbhcd", vc, d_after)
        dv = _ein("nbhce,nbhcv->nbhev", scores, doc) + f["kdec"] * _ein("nbhcd,nbhdv->nbhcv", kc, d_after)
        return d_enter, tuple(_from_n(x) for x in (dq, dk, dv))

    xs = tuple(_segments(x, c, s) for x in (q, k, v, do)) + (chunk_states, split)
    d_init, grads = lax.scan(step, d_final.astype(_F32), xs, reverse=True)
    return tuple(_unsegment(g, t) for g in grads) + (d_init,)
