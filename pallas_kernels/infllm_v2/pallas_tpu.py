"""Pallas TPU block-sparse attention (forward, dQ and dK/dV kernels) for InfLLM v2 stage 2.

Grid ``(B, Hkv, q_tile, slot)``: each query tile (one block of tokens x the G heads of a KV head)
walks the union of its tokens' selected blocks; the block ids and counts are scalar-prefetched
into SMEM and drive the K/V ``index_map`` (splash's ``data_next`` idea with a static-width list,
no dense mask). A row only uses the blocks its own token selected (mask from the selection block),
causal by position; with segment ids the tile's and the key block's ids arrive as two more blocks
(same index maps as the tile and K/V, see ``masks.py``) and keys of other segments are masked.
Online softmax state lives in VMEM scratch. dK/dV walk the transposed list (key block -> query
tiles). ``interpret=True`` runs on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import block_lists as bl
from . import masks

F32 = jnp.float32
EMPTY_LSE = 1e30  # lse of a row with no keys: exp(s - lse) == 0 in the backward
SMEM_LIST_BYTES = 128 * 1024  # SMEM budget for one call's block list


def _dot(a, b, ta=False, tb=False):
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=F32)


def _mask(sel, blk, tile, block_size, seg):
    """[Bk, Bk] mask (token, key): the token listed blk, causal, and (with seg) same segment."""
    hit = jnp.max(jnp.where(sel == blk, 1, 0), axis=1, keepdims=True) > 0  # [Bk, 1]
    t_pos = tile * block_size + jax.lax.broadcasted_iota(jnp.int32, (block_size, block_size), 0)
    k_pos = blk * block_size + jax.lax.broadcasted_iota(jnp.int32, (block_size, block_size), 1)
    segs = () if seg is None else (seg[0][...], seg[1][0:1, :])  # [Bk, 1] vs [1, Bk]
    return hit & masks.allowed(t_pos, k_pos, *segs)


def _where_rows(mask, s, other, groups):
    """Applies a per-token [Bk, Bk] mask to head-major rows s [G * Bk, Bk]."""
    rows, cols = s.shape
    s3 = s.reshape(groups, rows // groups, cols)
    return jnp.where(mask[None], s3, other).reshape(rows, cols)


def _probs(q, k, sel, blk, tile, seg, lse, groups, block_size, scale):
    s = _dot(q, k, tb=True) * scale
    return _where_rows(_mask(sel, blk, tile, block_size, seg), jnp.exp(s - lse), 0.0, groups)


def _split_refs(refs, segmented):
    """Kernel refs after the scalar prefetch: (q, k, v, sel), the segment refs or None, the rest."""
    if segmented:
        return refs[:4], refs[4:6], refs[6:]
    return refs[:4], None, refs[4:]


def _fwd_kernel(ids, cnt, off, *refs, groups, block_size, scale, segmented):
    (q_ref, k_ref, v_ref, sel_ref), seg, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split_refs(refs, segmented)
    b, g, i, w = (pl.program_id(a) for a in range(4))

    @pl.when(w == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, F32)
        l_sc[...] = jnp.zeros(l_sc.shape, F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

    @pl.when(w < cnt[b, g, i])
    def _():
        blk = ids[b, g, i, w]
        s = _dot(q_ref[...], k_ref[...], tb=True) * scale
        s = _where_rows(_mask(sel_ref[...], blk, off[0] + i, block_size, seg), s, -jnp.inf, groups)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe)
        corr = jnp.exp(m_prev - m_safe)
        l_sc[...] = corr * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = corr * acc_sc[...] + _dot(p.astype(v_ref.dtype), v_ref[...])
        m_sc[...] = m_new

    @pl.when(w == pl.num_programs(3) - 1)
    def _():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(l > 0, m_sc[...] + jnp.log(jnp.where(l > 0, l, 1.0)), EMPTY_LSE)


def _dq_kernel(ids, cnt, off, *refs, groups, block_size, scale, segmented):
    (q_ref, k_ref, v_ref, sel_ref), seg, (do_ref, lse_ref, dl_ref, dq_ref, acc_sc) = _split_refs(refs, segmented)
    b, g, i, w = (pl.program_id(a) for a in range(4))

    @pl.when(w == 0)
    def _():
        acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

    @pl.when(w < cnt[b, g, i])
    def _():
        blk, tile = ids[b, g, i, w], off[0] + i
        p = _probs(q_ref[...], k_ref[...], sel_ref[...], blk, tile, seg, lse_ref[...], groups, block_size, scale)
        ds = p * (_dot(do_ref[...], v_ref[...], tb=True) - dl_ref[...])
        acc_sc[...] += _dot(ds.astype(k_ref.dtype), k_ref[...]) * scale

    @pl.when(w == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = acc_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(ids, cnt, off, *refs, groups, block_size, scale, segmented):
    (q_ref, k_ref, v_ref, sel_ref), seg, rest = _split_refs(refs, segmented)
    do_ref, lse_ref, dl_ref, dk_ref, dv_ref, dk_sc, dv_sc = rest
    b, g, j, w = (pl.program_id(a) for a in range(4))

    @pl.when(w == 0)
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, F32)

    @pl.when(w < cnt[b, g, j])
    def _():
        q, do = q_ref[...], do_ref[...]
        blk, tile = off[0] + j, ids[b, g, j, w]
        p = _probs(q, k_ref[...], sel_ref[...], blk, tile, seg, lse_ref[...], groups, block_size, scale)
        dv_sc[...] += _dot(p.astype(do.dtype), do, ta=True)
        ds = p * (_dot(do, v_ref[...], tb=True) - dl_ref[...])
        dk_sc[...] += _dot(ds.astype(q.dtype), q, ta=True) * scale

    @pl.when(w == pl.num_programs(3) - 1)
    def _():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _specs(rows, d, block_size, n, transposed):
    """BlockSpecs on the 4-D grid: q-like tile, k/v block, selection, per-row scalar, and the
    segment ids of the tile ([Bk, 1]) and of the key block ([8, Bk]) (layouts in ``masks.py``)."""
    if transposed:  # grid (b, g, key block j, slot w): the tile comes from the list
        tile = lambda b, g, j, w, ids, cnt, off: ids[b, g, j, w]
        kblk = lambda b, g, j, w, ids, cnt, off: j
    else:  # grid (b, g, tile i, slot w): the key block comes from the list
        tile = lambda b, g, i, w, ids, cnt, off: i
        kblk = lambda b, g, i, w, ids, cnt, off: ids[b, g, i, w]
    qs = pl.BlockSpec((None, None, None, rows, d), lambda *a: (a[0], a[1], tile(*a), 0, 0))
    ks = pl.BlockSpec((None, None, block_size, d), lambda *a: (a[0], a[1], kblk(*a), 0))
    ss = pl.BlockSpec((None, None, block_size, n), lambda *a: (a[0], a[1], tile(*a), 0))
    rs = pl.BlockSpec((None, None, None, rows, 1), lambda *a: (a[0], a[1], tile(*a), 0, 0))
    qsg = pl.BlockSpec((None, None, None, block_size, 1), lambda *a: (a[0], 0, tile(*a), 0, 0))
    ksg = pl.BlockSpec((None, None, None, masks.SUBLANES, block_size), lambda *a: (a[0], 0, kblk(*a), 0, 0))
    return qs, ks, ss, rs, qsg, ksg


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, interpret):
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )


def _prepare(q, k, v, block_idx, segment_ids, block_size):
    hkv = k.shape[2]
    qt, kt, vt = bl.to_tiles(q, hkv, block_size), bl.to_kv(k, block_size), bl.to_kv(v, block_size)
    sel = bl.pad_selection(block_idx.astype(jnp.int32), block_size)
    lists = bl.tile_blocks(sel, block_size, kt.shape[2] // block_size)
    return qt, kt, vt, sel, lists, masks.tpu_segments(segment_ids, block_size)


def _group_size(b, hkv, width, smem_bytes):
    """Tiles (or key blocks) per pallas_call so that its SMEM block list stays within smem_bytes."""
    return max(1, smem_bytes // (4 * b * hkv * (width + 1)))


def _split(x, axis, size, fill=0):
    """Pads `axis` to a multiple of size and moves a new leading group axis to the front."""
    groups = -(-x.shape[axis] // size)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, groups * size - x.shape[axis])
    x = jnp.pad(x, pad, constant_values=fill)
    return jnp.moveaxis(x.reshape(x.shape[:axis] + (groups, size) + x.shape[axis + 1 :]), axis, 0)


def _merge(x, axis, n):
    """Inverse of _split (drops the padding)."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])
    return jax.lax.slice_in_dim(x, 0, n, axis=axis)


def _grouped(fn, size, n, split_args, full_args):
    """lax.map of fn(offset[1], group_slices, full_args) over groups of `size` along axis 2."""
    groups = -(-n // size)
    xs = [_split(a, 2, size * r, fill) for a, r, fill in split_args]
    offs = jnp.arange(groups, dtype=jnp.int32)[:, None] * size
    return jax.lax.map(lambda x: fn(x[0], x[1:], full_args), [offs] + xs)


def _forward(qt, kt, vt, sel, lists, segs, block_size, interpret, smem_bytes):
    b, hkv, nt, rows, d = qt.shape
    seg = segs is not None
    kw = dict(groups=rows // block_size, block_size=block_size, scale=1.0 / math.sqrt(d), segmented=seg)
    (ids, cnt), _ = lists
    width = ids.shape[-1]
    size = min(nt, _group_size(b, hkv, width, smem_bytes))
    qs, ks, ss, rs, qsg, ksg = _specs(rows, d, block_size, sel.shape[-1], False)
    scratch = [
        pltpu.MemorySpace.VMEM((rows, 1), F32),
        pltpu.MemorySpace.VMEM((rows, 1), F32),
        pltpu.MemorySpace.VMEM((rows, d), F32),
    ]

    def one(off, split, full):
        ids_g, cnt_g, q_g, sel_g, *qseg = split
        k_all, v_all, *kseg = full
        return _call(
            functools.partial(_fwd_kernel, **kw),
            (b, hkv, size, width),
            [qs, ks, ks, ss] + ([qsg, ksg] if seg else []),
            [qs, rs],
            [jax.ShapeDtypeStruct(q_g.shape, q_g.dtype), jax.ShapeDtypeStruct(q_g.shape[:-1] + (1,), F32)],
            scratch,
            interpret,
        )(ids_g, cnt_g, off, q_g, k_all, v_all, sel_g, *qseg, *kseg)

    split = [(ids, 1, 0), (cnt, 1, 0), (qt, 1, 0), (sel, block_size, -1)] + ([(segs[0], 1, masks.Q_PAD)] if seg else [])
    o, lse = _grouped(one, size, nt, split, [kt, vt] + ([segs[1]] if seg else []))
    return _merge(o, 2, nt), _merge(lse, 2, nt)


def _backward(qt, kt, vt, sel, lists, segs, ot, lse, dot_, block_size, interpret, smem_bytes):
    b, hkv, nt, rows, d = qt.shape
    nb = kt.shape[2] // block_size
    seg = segs is not None
    qseg, kseg = ([segs[0]], [segs[1]]) if seg else ([], [])
    kw = dict(groups=rows // block_size, block_size=block_size, scale=1.0 / math.sqrt(d), segmented=seg)
    (ids, cnt), (tids, tcnt) = lists
    delta = jnp.sum(dot_.astype(F32) * ot.astype(F32), axis=-1, keepdims=True)
    n = sel.shape[-1]

    qs, ks, ss, rs, qsg, ksg = _specs(rows, d, block_size, n, False)
    seg_specs = [qsg, ksg] if seg else []
    size = min(nt, _group_size(b, hkv, ids.shape[-1], smem_bytes))

    def dq_one(off, split, full):
        ids_g, cnt_g, q_g, sel_g, do_g, lse_g, dl_g, *qseg_g = split
        k_all, v_all, *kseg_all = full
        return _call(
            functools.partial(_dq_kernel, **kw),
            (b, hkv, size, ids.shape[-1]),
            [qs, ks, ks, ss] + seg_specs + [qs, rs, rs],
            qs,
            jax.ShapeDtypeStruct(q_g.shape, q_g.dtype),
            [pltpu.MemorySpace.VMEM((rows, d), F32)],
            interpret,
        )(ids_g, cnt_g, off, q_g, k_all, v_all, sel_g, *qseg_g, *kseg_all, do_g, lse_g, dl_g)

    tiles = [(ids, 1, 0), (cnt, 1, 0), (qt, 1, 0), (sel, block_size, -1), (dot_, 1, 0), (lse, 1, 0), (delta, 1, 0)]
    tiles += [(x, 1, masks.Q_PAD) for x in qseg]
    dq = _merge(_grouped(dq_one, size, nt, tiles, [kt, vt] + kseg), 2, nt)

    qs, ks, ss, rs, qsg, ksg = _specs(rows, d, block_size, n, True)
    seg_specs = [qsg, ksg] if seg else []
    size = min(nb, _group_size(b, hkv, tids.shape[-1], smem_bytes))

    def dkv_one(off, split, full):
        ids_g, cnt_g, k_g, v_g, *kseg_g = split
        q_all, sel_all, do_all, lse_all, dl_all, *qseg_all = full
        kv_shape = jax.ShapeDtypeStruct(k_g.shape, k_g.dtype)
        return _call(
            functools.partial(_dkv_kernel, **kw),
            (b, hkv, size, tids.shape[-1]),
            [qs, ks, ks, ss] + seg_specs + [qs, rs, rs],
            [ks, ks],
            [kv_shape, kv_shape],
            [pltpu.MemorySpace.VMEM((block_size, d), F32)] * 2,
            interpret,
        )(ids_g, cnt_g, off, q_all, k_g, v_g, sel_all, *qseg_all, *kseg_g, do_all, lse_all, dl_all)

    blocks = [(tids, 1, 0), (tcnt, 1, 0), (kt, block_size, 0), (vt, block_size, 0)]
    blocks += [(x, 1, masks.K_PAD) for x in kseg]
    dk, dv = _grouped(dkv_one, size, nb, blocks, [qt, sel, dot_, lse, delta] + qseg)
    return dq, _merge(dk, 2, nb * block_size), _merge(dv, 2, nb * block_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, block_idx, segment_ids, block_size, interpret, smem_bytes):
    qt, kt, vt, sel, lists, segs = _prepare(q, k, v, block_idx, segment_ids, block_size)
    ot, _ = _forward(qt, kt, vt, sel, lists, segs, block_size, interpret, smem_bytes)
    return bl.from_tiles(ot, q.shape[1], q.shape[2], block_size)


def _attention_fwd(q, k, v, block_idx, segment_ids, block_size, interpret, smem_bytes):
    qt, kt, vt, sel, lists, segs = _prepare(q, k, v, block_idx, segment_ids, block_size)
    ot, lse = _forward(qt, kt, vt, sel, lists, segs, block_size, interpret, smem_bytes)
    o = bl.from_tiles(ot, q.shape[1], q.shape[2], block_size)
    return o, (qt, kt, vt, sel, lists, segs, ot, lse)


def _attention_bwd(block_size, interpret, smem_bytes, res, do):
    qt, kt, vt, sel, lists, segs, ot, lse = res
    t, hq = do.shape[1], do.shape[2]
    dot_ = bl.to_tiles(do, kt.shape[1], block_size)
    dq, dk, dv = _backward(qt, kt, vt, sel, lists, segs, ot, lse, dot_, block_size, interpret, smem_bytes)
    return (bl.from_tiles(dq, t, hq, block_size), bl.from_kv(dk, t), bl.from_kv(dv, t), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(
    q, k, v, block_idx, *, block_size, segment_ids=None, interpret=False, smem_bytes=SMEM_LIST_BYTES
):
    """Pallas TPU version of ``xla.block_sparse_attention`` (same arguments and semantics).

    ``segment_ids`` int [B, T] (packed rows): a key is used only by queries of its segment.
    Query tiles (and, in the dK/dV pass, key blocks) are processed in groups, one ``pallas_call``
    per group under ``lax.map``, so that each call's scalar-prefetched block list fits in
    ``smem_bytes`` of SMEM.
    """
    block_idx = jax.lax.stop_gradient(block_idx)
    return _attention(q, k, v, block_idx, segment_ids, block_size, interpret, smem_bytes)
