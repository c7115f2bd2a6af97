"""Layouts and block lists shared by the Pallas kernels.

A query tile is one KV block of ``block_size`` tokens times the ``G`` query heads of a KV head,
stored head-major (row ``h * block_size + t``). Each tile walks the union of the blocks its tokens
selected (``tile_blocks``, static width ``min(nb, block_size * n_sel)``); per-row masks come from
the selection itself. The backward walks the transposed lists (key block -> query tiles).
Padded list entries repeat the last valid id, so the kernels re-use the resident block (no DMA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_tiles(q, hkv, block_size):
    """[B, T, Hq, D] -> [B, Hkv, nt, G * block_size, D] (T padded to nt * block_size)."""
    b, t, hq, d = q.shape
    nt = -(-t // block_size)
    q = jnp.pad(q, ((0, 0), (0, nt * block_size - t), (0, 0), (0, 0)))
    q = q.reshape(b, nt, block_size, hkv, hq // hkv, d).transpose(0, 3, 1, 4, 2, 5)
    return q.reshape(b, hkv, nt, -1, d)


def from_tiles(x, t, hq, block_size):
    """Inverse of to_tiles."""
    b, hkv, nt, _, d = x.shape
    x = x.reshape(b, hkv, nt, hq // hkv, block_size, d).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, nt * block_size, hq, d)[:, :t]


def to_kv(k, block_size):
    """[B, T, Hkv, D] -> [B, Hkv, nb * block_size, D]."""
    nb = -(-k.shape[1] // block_size)
    return jnp.pad(k, ((0, 0), (0, nb * block_size - k.shape[1]), (0, 0), (0, 0))).swapaxes(1, 2)


def from_kv(x, t):
    return x.swapaxes(1, 2)[:, :t]


def pad_selection(block_idx, block_size):
    """[B, Hkv, T, n] -> [B, Hkv, nt * block_size, n], padded rows select nothing (-1)."""
    t = block_idx.shape[2]
    nt = -(-t // block_size)
    return jnp.pad(block_idx, ((0, 0), (0, 0), (0, nt * block_size - t), (0, 0)), constant_values=-1)


def _compact(member, width):
    """member [..., N] bool -> (ids [..., width] int32 sorted, count [...]); pads repeat the last."""
    n = member.shape[-1]
    ids = jnp.sort(jnp.where(member, jnp.arange(n, dtype=jnp.int32), n), axis=-1)[..., :width]
    count = member.sum(-1).astype(jnp.int32)
    last = jnp.take_along_axis(ids, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    last = jnp.where(count[..., None] > 0, last, 0)
    return jnp.where(ids < n, ids, last).astype(jnp.int32), count


def tile_blocks(sel_padded, block_size, nb):
    """Union lists: (ids [B,Hkv,nt,W], count [B,Hkv,nt]) and transposed (ids [B,Hkv,nb,nt], count)."""
    b, hkv, tp, n = sel_padded.shape
    nt = tp // block_size
    tile = jnp.broadcast_to((jnp.arange(tp) // block_size)[None, None, :, None], sel_padded.shape)
    tgt = jnp.where(sel_padded >= 0, sel_padded, nb)
    bi = jnp.arange(b)[:, None, None, None]
    gi = jnp.arange(hkv)[None, :, None, None]
    member = jnp.zeros((b, hkv, nt, nb + 1), bool).at[bi, gi, tile, tgt].set(True)[..., :nb]
    member = jax.lax.stop_gradient(member)
    fwd = _compact(member, min(nb, block_size * n))
    bwd = _compact(member.swapaxes(2, 3), nt)
    return fwd, bwd
