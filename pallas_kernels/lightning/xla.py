"""Chunked Lightning-Attention-2 in plain XLA: the default on CPU and GPU.

Per chunk of C tokens (local i, j; S = state entering the chunk):
``O = ((Q Kᵀ) ⊙ D) V + diag(λ^{i+1}) Q S`` and ``S' = λ^L S + (diag(λ^{L−1−j}) K)ᵀ V``.
The chunk-parallel matmuls are batched over all chunks; only ``S' = λ^L S + U`` runs in a
two-level ``chunk_scan`` (N/16 sequential steps). Memory O(T·(C + D) + N·Dk·Dv). The backward is chunk-wise too: it reuses the
per-chunk states saved by the forward and runs the reverse state-gradient scan
``dS = λ^L dS' + (diag(λ^{i+1}) Q)ᵀ dO``. Packed rows (``docs``) mask every factor per batch
(``chunking.batched_factors``) and cut both scans at document ends (``keep``).
"""

import jax.numpy as jnp
from jax import lax

from .chunking import batched_factors, chunk_lengths, chunk_scan, from_chunks, to_chunks

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST


def _ein(spec, a, b):
    return jnp.einsum(spec, a, b, precision=_HI, preferred_element_type=_F32)


def forward(q, k, v, log_decay, initial_state, *, scale, chunk_size=64, save_states=False, docs=None):
    """Returns ``(o [B,T,H,Dv] fp32, final_state, chunk_states [B,H,N,Dk,Dv] or None)``.

    ``chunk_states[:, :, n]`` is the state entering chunk n (input to the backward); ``docs`` is
    an optional ``[B,T]`` document index (``chunking.document_index``).
    """
    t = q.shape[1]
    c = chunk_size
    intra, qdec, kdec, keep = batched_factors(log_decay, t, c, docs)
    qc, kc, vc = (to_chunks(x, c) for x in (q, k, v))
    qc = qc * scale
    scores = _ein("bhncd,bhned->bhnce", qc, kc) * intra
    o = _ein("bhnce,bhnev->bhncv", scores, vc)
    u = _ein("bhncd,bhncv->bhndv", kc * kdec[..., None], vc)
    states, final = chunk_scan(u, chunk_lengths(t, c), log_decay, initial_state, keep=keep)  # [B,H,N,Dk,Dv]
    o = o + _ein("bhncd,bhndv->bhncv", qc * qdec[..., None], states)
    return from_chunks(o, t, _F32), final, (states if save_states else None)


def backward(q, k, v, log_decay, chunk_states, do, d_final, *, scale, chunk_size=64, docs=None):
    """Chunk-wise VJP. Returns fp32 ``(dq, dk, dv, d_initial_state)``."""
    t = q.shape[1]
    c = chunk_size
    intra, qdec, kdec, keep = batched_factors(log_decay, t, c, docs)
    qc, kc, vc, doc = (to_chunks(x, c) for x in (q, k, v, do))
    qc = qc * scale
    qd = qc * qdec[..., None]
    kd = kdec[..., None]
    w = _ein("bhncd,bhncv->bhndv", qd, doc)  # dS contribution of O_inter
    # Reverse recurrence dS_enter[n] = λ^{L_n}·dS_leave[n] + W_n, run as a forward scan on flipped
    # chunks; its "entering" values are the gradients of the states leaving each chunk.
    rkeep = None if keep is None else jnp.flip(keep, 1)
    d_after, d_init = chunk_scan(jnp.flip(w, 2), chunk_lengths(t, c)[::-1], log_decay, d_final, keep=rkeep)
    d_after = jnp.flip(d_after, 2)
    scores = _ein("bhncd,bhned->bhnce", qc, kc) * intra
    dscores = _ein("bhncv,bhnev->bhnce", doc, vc) * intra
    dq = _ein("bhnce,bhned->bhncd", dscores, kc)
    dq = dq + qdec[..., None] * _ein("bhncv,bhndv->bhncd", doc, chunk_states)
    dk = _ein("bhnce,bhncd->bhned", dscores, qc) + kd * _ein("bhncv,bhndv->bhncd", vc, d_after)
    dv = _ein("bhnce,bhncv->bhnev", scores, doc) + kd * _ein("bhncd,bhndv->bhncv", kc, d_after)
    return (from_chunks(dq * scale, t, _F32), from_chunks(dk, t, _F32), from_chunks(dv, t, _F32), d_init)
