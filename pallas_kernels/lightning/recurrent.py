"""Token-serial Lightning attention: a ``lax.scan`` of the decode step (the decode semantics).

The scan runs over chunks of ``chunk_size`` tokens; each chunk is an inner scan under
``jax.checkpoint``, so reverse-mode autodiff keeps only one state per chunk (never per token) and
recomputes the per-token states of one chunk at a time. Padded tokens leave the state unchanged.
Packed rows: the state is zeroed before the decay step at every document start.
"""

import jax
import jax.numpy as jnp
from jax import lax

from .decode import decode_step

_F32 = jnp.float32


def forward(q, k, v, log_decay, initial_state, *, scale, chunk_size=64, docs=None):
    """Returns ``(o [B,T,H,Dv] fp32, final_state [B,H,Dk,Dv] fp32)``; ``docs``: optional ``[B,T]``
    document index (``chunking.document_index``)."""
    b, t, h, _ = q.shape
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t

    def split(x):  # [B,T,H,D] -> [N,C,B,H,D]
        x = jnp.pad(x.astype(_F32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(b, n, c, h, x.shape[-1]).transpose(1, 2, 0, 3, 4)

    valid = (jnp.arange(n * c) < t).reshape(n, c)

    def token(state, xs):
        q_t, k_t, v_t, ok = xs[:4]
        if docs is not None:  # xs[4]: [B] document start
            state = jnp.where(xs[4][:, None, None, None], 0.0, state)
        o_t, new = decode_step(q_t, k_t, v_t, log_decay, state, scale)
        return jnp.where(ok, new, state), o_t

    @jax.checkpoint
    def chunk(state, xs):
        return lax.scan(token, state, xs)

    xs = (split(q), split(k), split(v), valid)
    if docs is not None:
        starts = jnp.pad(docs[:, 1:] != docs[:, :-1], ((0, 0), (1, pad)))  # [B, N·C]
        xs = xs + (starts.reshape(b, n, c).transpose(1, 2, 0),)
    final, o = lax.scan(chunk, initial_state.astype(_F32), xs)
    o = o.transpose(2, 0, 1, 3, 4).reshape(b, n * c, h, -1)[:, :t]
    return o, final
