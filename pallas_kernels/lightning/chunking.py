"""Chunk layout and decay factors shared by the chunked implementations (XLA and Pallas).

Sequences are right-padded with zeros to ``N = ceil(T/C)`` chunks. Zero keys/values add nothing
to the state; the last chunk's real length ``L`` sets its key decay ``λ^{L−1−j}`` and block decay
``λ^L``, so the final state is exact for any T. All factors are ``exp(g·Δ)`` with Δ ≥ 0.
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

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


def chunk_scan(u, lengths, log_decay, init, group=16):
    """Linear recurrence over chunks ``x_{n+1} = λ^{len_n}·x_n + u_n`` with ``x_0 = init``.

    ``u`` is ``[B,H,N,Dk,Dv]``, ``lengths`` ``[N]`` (tokens per step, float), λ = exp(log_decay)
    per head. Returns ``(xs [B,H,N,Dk,Dv] = x_0..x_{N−1}, x_N)``. Two-level: inside groups of
    ``group`` chunks the contributions come from one batched matmul with a decay matrix
    ``exp(g·Δ)`` (Δ = tokens in between ≥ 0); only ``N/group`` sequential steps remain.
    """
    b, h, n = u.shape[:3]
    ng = -(-n // group)
    pad = ng * group - n
    u = jnp.pad(u, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))
    lens = jnp.pad(jnp.asarray(lengths, _F32), (0, pad)).reshape(ng, group)  # padded: identity
    g = log_decay.astype(_F32)[:, None, None]
    ends = jnp.cumsum(lens, axis=1)  # tokens up to end of step i
    starts = ends - lens  # tokens before step j
    delta = starts[:, :, None] - ends[:, None, :]  # [NG, j, i]
    within = jnp.where(delta >= 0, jnp.exp(g[..., None] * jnp.maximum(delta, 0.0)), 0.0)
    to_end = jnp.exp(g * (ends[:, -1:] - ends))  # [H, NG, G]
    enter = jnp.exp(g * starts)  # [H, NG, G]
    total = jnp.exp(g[:, :, 0] * ends[None, :, -1])  # [H, NG]
    ug = u.reshape(b, h, ng, group, *u.shape[3:])
    hi = dict(precision=lax.Precision.HIGHEST, preferred_element_type=_F32)
    local = jnp.einsum("hgji,bhgidv->bhgjdv", within, ug, **hi)
    exits = jnp.einsum("hgi,bhgidv->bhgdv", to_end, ug, **hi)

    def step(x, xs):
        e, t = xs
        return t[None, :, None, None] * x + e, x

    last, entering = lax.scan(step, init.astype(_F32), (jnp.moveaxis(exits, 2, 0), jnp.moveaxis(total, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 2)  # [B,H,NG,Dk,Dv]
    xs = enter[None, :, :, :, None, None] * entering[:, :, :, None] + local
    return xs.reshape(b, h, ng * group, *u.shape[3:])[:, :, :n], last
