"""Chunk layout, decay factors and packed-row (segment) masks shared by the implementations.

Sequences are right-padded with zeros to ``N = ceil(T/C)`` chunks. Zero keys/values add nothing
to the state; the last chunk's real length ``L`` sets its key decay ``λ^{L−1−j}`` and block decay
``λ^L``, so the final state is exact for any T. All factors are ``exp(g·Δ)`` with Δ ≥ 0.

Packed rows: segment ids become a document index ``d = cumsum(seg_t ≠ seg_{t−1})`` (``d_0 = 0``).
Per chunk n with ``rel = d − d_prev(n)`` (``d_prev(n)``: document of the last token of chunk
n−1, of token 0 for n = 0) the factors are masked as: intra ``[rel_i = rel_j]``, query inter
``[rel_i = 0]`` (the entering state belongs to the query's document), key decay
``[rel_j = rel_last]`` (the leaving state holds only the last document) and chunk carry
``keep = [rel_last = 0]``.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32


def num_chunks(t: int, chunk_size: int) -> int:
    return -(-t // chunk_size)


def to_chunks(x, chunk_size, dtype=_F32):
    """``[B,T,H,D]`` -> ``[B,H,N,C,D]`` (zero right-padding, cast to ``dtype``)."""
    b, t, h, d = x.shape
    n = num_chunks(t, chunk_size)
    x = jnp.pad(x.astype(dtype), ((0, 0), (0, n * chunk_size - t), (0, 0), (0, 0)))
    return x.reshape(b, n, chunk_size, h, d).transpose(0, 3, 1, 2, 4)


def from_chunks(x, t, dtype):
    """``[B,H,N,C,D]`` -> ``[B,T,H,D]`` (drops padding, casts to ``dtype``)."""
    b, h, n, c, d = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(b, n * c, h, d)[:, :t].astype(dtype)


def chunk_lengths(t: int, chunk_size: int) -> np.ndarray:
    """Real length of every chunk (all ``C`` except possibly the last)."""
    n = num_chunks(t, chunk_size)
    lengths = np.full((n,), chunk_size, np.int32)
    lengths[-1] = t - (n - 1) * chunk_size
    return lengths


def decay_factors(log_decay, t: int, chunk_size: int):
    """Per-head decay factors for the chunked form.

    Returns ``intra [H,C,C]`` (λ^{i−j}, i ≥ j, else 0), ``qdec [H,C]`` (λ^{i+1}) and
    ``kdec [H,N,C]`` (λ^{L_n−1−j}, 0 for padded keys).
    """
    g = log_decay.astype(_F32)
    c = chunk_size
    lengths = jnp.asarray(chunk_lengths(t, c), _F32)  # [N]
    i = jnp.arange(c, dtype=_F32)
    delta = i[:, None] - i[None, :]
    intra = jnp.where(delta >= 0, jnp.exp(g[:, None, None] * jnp.maximum(delta, 0.0)), 0.0)
    qdec = jnp.exp(g[:, None] * (i + 1.0))
    kdelta = lengths[:, None] - 1.0 - i[None, :]  # [N,C]
    kdec = jnp.where(kdelta >= 0, jnp.exp(g[:, None, None] * jnp.maximum(kdelta, 0.0)), 0.0)
    return intra, qdec, kdec


def document_index(segment_ids):
    """``[B,T]`` integer segment ids -> int32 document index (0 at t = 0, +1 at every change)."""
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = jnp.concatenate([jnp.zeros((segment_ids.shape[0], 1), bool), starts], axis=1)
    return jnp.cumsum(starts, axis=1, dtype=jnp.int32)


def chunk_documents(docs, total, chunk_size, front=False):
    """Doc index ``[B,T]`` -> per-chunk relative index ``rel [B,N,C]`` (``d − d_prev(n)``, ≥ 0).

    The sequence is padded to ``total = N·C`` tokens by repeating its edge document (right
    padding joins the last document, front padding the first), so padded (zero) tokens never
    split a chunk's documents.
    """
    b, t = docs.shape
    pad = (total - t, 0) if front else (0, total - t)
    dc = jnp.pad(docs, ((0, 0), pad), mode="edge").reshape(b, total // chunk_size, chunk_size)
    prev = jnp.concatenate([dc[:, :1, 0], dc[:, :-1, -1]], axis=1)  # [B,N]
    return dc - prev[:, :, None]


class SegmentMasks(NamedTuple):
    """Boolean masks of one packed batch in chunk layout (see the module docstring)."""

    same: jnp.ndarray  # [B,N,C,C] rel_i = rel_j
    qmask: jnp.ndarray  # [B,N,C] rel_i = 0
    kmask: jnp.ndarray  # [B,N,C] rel_j = rel_last
    keep: jnp.ndarray  # [B,N] rel_last = 0


def segment_masks(rel):
    """``rel [B,N,C]`` (from ``chunk_documents``) -> ``SegmentMasks``."""
    last = rel[..., -1:]
    return SegmentMasks(rel[..., :, None] == rel[..., None, :], rel == 0, rel == last, last[..., 0] == 0)


def document_bounds(rel):
    """First and last local index of each token's document inside its chunk (int32 ``[B,N,C]``)."""
    start = jnp.sum(rel[..., None, :] < rel[..., :, None], axis=-1, dtype=jnp.int32)
    end = jnp.sum(rel[..., None, :] <= rel[..., :, None], axis=-1, dtype=jnp.int32) - 1
    return start, end


def batched_factors(log_decay, t: int, chunk_size: int, docs=None):
    """``decay_factors`` shaped to broadcast against ``[B,H,N,C,·]`` chunk tensors, masked per
    batch when ``docs`` (document index ``[B,T]``) is given.

    Returns ``intra [1|B,H,1|N,C,C]``, ``qdec [1|B,H,1|N,C]``, ``kdec [1|B,H,N,C]`` and the chunk
    carry flags ``keep`` (``None`` without docs, else bool ``[B,N]``: the state crosses chunk n's end).
    """
    intra, qdec, kdec = decay_factors(log_decay, t, chunk_size)
    intra, qdec, kdec = intra[None, :, None], qdec[None, :, None], kdec[None]
    if docs is None:
        return intra, qdec, kdec, None
    n = num_chunks(t, chunk_size)
    m = segment_masks(chunk_documents(docs, n * chunk_size, chunk_size))
    mask = lambda keep, x: jnp.where(keep[:, None], x, 0.0)
    return mask(m.same, intra), mask(m.qmask, qdec), mask(m.kmask, kdec), m.keep
