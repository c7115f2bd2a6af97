"""Key masks shared by the Pallas kernels: causal and same segment, built in-kernel.

A query at position ``q_pos`` may use a key at ``k_pos`` of a listed block iff
``k_pos <= q_pos`` and, with packed rows, ``segment_ids[q] == segment_ids[k]`` — the semantics of
``reference.key_mask``. The kernels get segment ids as extra blocked inputs laid out here:

- TPU (``tpu_segments``): a query-tile block ``[block_size, 1]`` (one id per token of the tile,
  broadcast along lanes in-kernel) and a key-block block ``[8, block_size]`` (the ids along lanes,
  repeated over 8 sublanes as splash attention does; row 0 is used). Both follow the index maps
  of the query tile and of the K/V block, so they are fetched with them.
- GPU (``segment_row``): the padded row ``[B, T_pad]``; a program reads its token's id and the
  listed key block's ids by dynamic slice.

Padded queries get -2 and padded keys -1, so padding never matches a real segment (padded queries
select nothing and padded keys are beyond every real query anyway).
"""

from __future__ import annotations

import jax.numpy as jnp

Q_PAD, K_PAD = -2, -1
SUBLANES = 8


def allowed(q_pos, k_pos, q_seg=None, k_seg=None):
    """Bool mask, broadcasting ``q_*`` against ``k_*``: causal, and same segment when given."""
    ok = k_pos <= q_pos
    if q_seg is not None:
        ok = ok & (q_seg == k_seg)
    return ok


def _pad(segment_ids, length, fill):
    return jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, length - segment_ids.shape[1])), constant_values=fill)


def tpu_segments(segment_ids, block_size):
    """[B, T] -> (q [B, 1, nt, Bk, 1], kv [B, 1, nb, 8, Bk]) int32, or None without segment ids.

    The size-1 axis 1 stands where the kernels' tensors have their KV-head axis, so the tile /
    block axis is axis 2 as for every other blocked input (the TPU wrapper groups along it).
    """
    if segment_ids is None:
        return None
    b, t = segment_ids.shape
    n = -(-t // block_size)
    tp = n * block_size
    q = _pad(segment_ids, tp, Q_PAD).reshape(b, 1, n, block_size, 1)
    kv = _pad(segment_ids, tp, K_PAD).reshape(b, 1, n, 1, block_size)
    return q, jnp.broadcast_to(kv, (b, 1, n, SUBLANES, block_size))


def segment_row(segment_ids, length):
    """[B, T] -> [B, length] int32 (keys past T get K_PAD), or None without segment ids."""
    return None if segment_ids is None else _pad(segment_ids, length, K_PAD)
