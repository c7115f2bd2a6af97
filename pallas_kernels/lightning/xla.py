"""Chunked Lightning-Attention-2 in plain XLA: the default on CPU and GPU.

Per chunk of C tokens (local i, j; S = state entering the chunk):
``O = ((Q Kᵀ) ⊙ D) V + diag(λ^{i+1}) Q S`` and ``S' = λ^L S + (diag(λ^{L−1−j}) K)ᵀ V``.
Everything lives in a chunk-major layout ``[N, B, H, C, D]``: the chunk-parallel matmuls are
batched over all chunks, and the state recurrence ``S' = λ^L S + U`` is one ``lax.scan`` over the
leading axis (N steps of a ``[B,H,Dk,Dv]`` multiply-add; no transposes around it). The softmax-free
scale is folded into the decay factors, so q is never rescaled. Memory O(T·(C + D) + N·Dk·Dv).
The backward is chunk-wise too: it reuses the per-chunk states saved by the forward and runs the
reverse state-gradient scan ``dS = λ^L dS' + (diag(λ^{i+1}) Q)ᵀ dO``. Packed rows (``docs``) mask
every factor per batch (``chunking.batched_factors``) and cut both scans at document ends.
"""

import jax.numpy as jnp
from jax import lax

from .chunking import batched_factors, chunk_lengths, num_chunks

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST


def _ein(spec, a, b):
    return jnp.einsum(spec, a, b, precision=_HI, preferred_element_type=_F32)


def _to_n(x, c, transposed=False):
    """``[B,T,H,D]`` -> fp32 ``[N,B,H,C,D]`` (``[N,B,H,D,C]`` if transposed; zero right-padding)."""
    b, t, h, d = x.shape
    n = num_chunks(t, c)
    x = jnp.pad(x.astype(_F32), ((0, 0), (0, n * c - t), (0, 0), (0, 0)))
    return x.reshape(b, n, c, h, d).transpose((1, 0, 3, 4, 2) if transposed else (1, 0, 3, 2, 4))


def _from_n(x, t):
    n, b, h, c, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, n * c, h, d)[:, :t]


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


def forward(q, k, v, log_decay, initial_state, *, scale, chunk_size=64, save_states=False, docs=None):
    """Returns ``(o [B,T,H,Dv] fp32, final_state, chunk_states [N,B,H,Dk,Dv] or None)``.

    ``chunk_states[n]`` is the state entering chunk n (input to the backward); ``docs`` is
    an optional ``[B,T]`` document index (``chunking.document_index``).
    """
    t, c = q.shape[1], chunk_size
    intra, qdec, kdec, lam = _factors(log_decay, t, c, docs, scale)
    qc, vc = _to_n(q, c), _to_n(v, c)
    kt = _to_n(k, c, transposed=True)  # [N,B,H,Dk,C]: both products below are plain A @ B
    u = _ein("nbhdc,nbhcv->nbhdv", kt * jnp.swapaxes(kdec, -1, -2), vc)
    states, final = _scan(u, lam, initial_state)
    scores = _ein("nbhcd,nbhde->nbhce", qc, kt) * intra
    o = _ein("nbhce,nbhev->nbhcv", scores, vc) + qdec * _ein("nbhcd,nbhdv->nbhcv", qc, states)
    return _from_n(o, t), final, (states if save_states else None)


def backward(q, k, v, log_decay, chunk_states, do, d_final, *, scale, chunk_size=64, docs=None):
    """Chunk-wise VJP. Returns fp32 ``(dq, dk, dv, d_initial_state)``."""
    t, c = q.shape[1], chunk_size
    intra, qdec, kd, lam = _factors(log_decay, t, c, docs, scale)
    qc, kc, vc, doc = (_to_n(x, c) for x in (q, k, v, do))
    w = _ein("nbhcd,nbhcv->nbhdv", qc * qdec, doc)  # dS contribution of O_inter
    # dS_enter[n] = λ^{L_n}·dS_leave[n] + W_n, from the last chunk back: the carries are dS_leave.
    d_after, d_init = _scan(w, lam, d_final, reverse=True)
    scores = _ein("nbhcd,nbhed->nbhce", qc, kc) * intra
    dscores = _ein("nbhcv,nbhev->nbhce", doc, vc) * intra
    dq = _ein("nbhce,nbhed->nbhcd", dscores, kc) + qdec * _ein("nbhcv,nbhdv->nbhcd", doc, chunk_states)
    dk = _ein("nbhce,nbhcd->nbhed", dscores, qc) + kd * _ein("nbhcv,nbhdv->nbhcd", vc, d_after)
    dv = _ein("nbhce,nbhcv->nbhev", scores, doc) + kd * _ein("nbhcd,nbhdv->nbhcv", kc, d_after)
    return _from_n(dq, t), _from_n(dk, t), _from_n(dv, t), d_init
