"""Pallas GPU block-sparse attention (Triton backend of Pallas) for InfLLM v2 stage 2.

One program per (batch, KV head, query token) — the CUDA kernel's tile of 1 token x G heads (G
must be >= 16 on a real GPU for ``tl.dot``, as in the CUDA kernel). It loops over the token's
listed blocks (compacted in the wrapper, count read in-kernel), loads each K/V block by a dynamic
slice of the resident K/V of its KV head and keeps an online softmax in registers. With segment
ids the padded row of ids is resident too: the program reads its token's id and each listed
block's ids by dynamic slice and masks keys of other segments (``masks.py``). The backward
recomputes probabilities from the saved lse, accumulates dq per token and adds dK/dV of each
listed block with ``atomic_add`` (the transpose of the selection without building it).

Why not Mosaic GPU (the default ``pallas_call`` lowering on GPU in jax 0.10.2): it has no scalar
prefetch ("Scalar prefetch not supported in Mosaic GPU lowering") and requires GMEM blocks to
have trivial index maps, so data-dependent K/V blocks need manual ``plgpu.copy_gmem_to_smem`` +
barriers; it has no ``dot_general`` lowering (matmuls must be ``plgpu.wgmma`` on swizzled SMEM);
and neither ``copy_gmem_to_smem`` (no discharge rule) nor ``wgmma`` runs in interpret mode, so a
Mosaic GPU kernel could not be tested on CPU. The Triton backend (deprecated upstream from JAX
0.11) runs in interpret mode and lowers for ``cuda``; ``jax.export`` needs
``DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")`` to serialise it. The XLA path stays
the GPU default (``implementation="auto"``); this kernel is opt-in and untested on hardware.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from . import masks

F32 = jnp.float32
EMPTY_LSE = 1e30


def _pow2(n):
    return 1 << max(0, (n - 1).bit_length())


def _block(ids_ref, k_ref, v_ref, seg_ref, w, block_size):
    """Start, K, V and (with segment ids) the segment ids of the w-th listed block."""
    start = ids_ref[w] * block_size
    rows = pl.ds(start, block_size)
    kseg = None if seg_ref is None else seg_ref[rows]
    return start, k_ref[rows, :], v_ref[rows, :], kseg


def _scores(q, k, start, t, qseg, kseg, block_size, scale):
    s = pl.dot(q, k, trans_b=True).astype(F32) * scale
    kpos = start + jnp.arange(block_size)
    segs = () if qseg is None else (qseg, kseg[None, :])
    return jnp.where(masks.allowed(t, kpos[None, :], *segs), s, -jnp.inf)


def _fwd_kernel(q_ref, k_ref, v_ref, ids_ref, *refs, block_size, scale, segmented):
    seg_ref, o_ref, lse_ref = refs if segmented else (None,) + refs
    t = pl.program_id(2)
    q = q_ref[...]
    qseg = None if seg_ref is None else seg_ref[t]
    count = jnp.sum((ids_ref[...] >= 0).astype(jnp.int32))

    def body(w, carry):
        m, l, acc = carry
        start, k, v, kseg = _block(ids_ref, k_ref, v_ref, seg_ref, w, block_size)
        s = _scores(q, k, start, t, qseg, kseg, block_size, scale)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        corr = jnp.exp(m - m_safe)
        acc = acc * corr[:, None] + pl.dot(p.astype(v.dtype), v).astype(F32)
        return m_new, l * corr + jnp.sum(p, axis=1), acc

    g, d = q.shape
    init = (jnp.full((g,), -jnp.inf, F32), jnp.zeros((g,), F32), jnp.zeros((g, d), F32))
    m, l, acc = jax.lax.fori_loop(0, count, body, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), EMPTY_LSE)


def _bwd_kernel(q_ref, k_ref, v_ref, ids_ref, *refs, block_size, scale, segmented):
    seg_ref, *refs = refs if segmented else (None,) + refs
    do_ref, lse_ref, dl_ref, _, _, dq_ref, dk_ref, dv_ref = refs  # dk/dv inputs alias dk_ref / dv_ref (zeros)
    t = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], dl_ref[...]
    qseg = None if seg_ref is None else seg_ref[t]
    count = jnp.sum((ids_ref[...] >= 0).astype(jnp.int32))

    def body(w, dq):
        start, k, v, kseg = _block(ids_ref, k_ref, v_ref, seg_ref, w, block_size)
        p = jnp.exp(_scores(q, k, start, t, qseg, kseg, block_size, scale) - lse[:, None])
        ds = p * (pl.dot(do, v, trans_b=True).astype(F32) - delta[:, None])
        rows = (pl.ds(start, block_size), slice(None))
        pltriton.atomic_add(dk_ref, rows, pl.dot(ds.astype(q.dtype), q, trans_a=True).astype(F32) * scale)
        pltriton.atomic_add(dv_ref, rows, pl.dot(p.astype(do.dtype), do, trans_a=True).astype(F32))
        return dq + pl.dot(ds.astype(k.dtype), k).astype(F32) * scale

    dq = jax.lax.fori_loop(0, count, body, jnp.zeros(q.shape, F32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _layouts(q, k, v, block_idx, segment_ids, block_size):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    tp = -(-t // block_size) * block_size
    qg = q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4)  # [B,Hkv,T,G,D]
    kv = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))).swapaxes(1, 2)
    n = block_idx.shape[-1]
    big = jnp.iinfo(jnp.int32).max
    ids = jnp.sort(jnp.where(block_idx >= 0, block_idx, big).astype(jnp.int32), axis=-1)
    ids = jnp.pad(
        jnp.where(ids == big, -1, ids), ((0, 0),) * 3 + ((0, _pow2(n) - n),), constant_values=-1
    )  # valid ids first
    return qg, kv(k), kv(v), ids, masks.segment_row(segment_ids, tp)


def _specs(g, d, tp, n, seg):
    """BlockSpecs: token tile, resident K/V, the token's ids, per-row scalars, [segment row]."""
    tok = pl.BlockSpec((None, None, None, g, d), lambda b, h, t: (b, h, t, 0, 0))
    kv = pl.BlockSpec((None, None, tp, d), lambda b, h, t: (b, h, 0, 0))
    ids = pl.BlockSpec((None, None, None, n), lambda b, h, t: (b, h, t, 0))
    row = pl.BlockSpec((None, None, None, g), lambda b, h, t: (b, h, t, 0))
    segs = [pl.BlockSpec((None, tp), lambda b, h, t: (b, 0))] if seg is not None else []
    return tok, kv, ids, row, segs


def _forward(qg, kt, vt, ids, seg, block_size, interpret):
    b, hkv, t, g, d = qg.shape
    tok, kv, ids_s, row, seg_s = _specs(g, d, kt.shape[2], ids.shape[-1], seg)
    kernel = functools.partial(_fwd_kernel, block_size=block_size, scale=1.0 / math.sqrt(d), segmented=bool(seg_s))
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, t),
        in_specs=[tok, kv, kv, ids_s] + seg_s,
        out_specs=[tok, row],
        out_shape=[jax.ShapeDtypeStruct(qg.shape, qg.dtype), jax.ShapeDtypeStruct(qg.shape[:-1], F32)],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(qg, kt, vt, ids, *([] if seg is None else [seg]))


def _backward(qg, kt, vt, ids, seg, og, lse, dog, block_size, interpret):
    b, hkv, t, g, d = qg.shape
    tok, kv, ids_s, row, seg_s = _specs(g, d, kt.shape[2], ids.shape[-1], seg)
    delta = jnp.sum(dog.astype(F32) * og.astype(F32), axis=-1)
    zeros = jnp.zeros(kt.shape, F32)
    kernel = functools.partial(_bwd_kernel, block_size=block_size, scale=1.0 / math.sqrt(d), segmented=bool(seg_s))
    n_in = 9 + len(seg_s)
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, t),
        in_specs=[tok, kv, kv, ids_s] + seg_s + [tok, row, row, kv, kv],
        out_specs=[tok, kv, kv],
        out_shape=[
            jax.ShapeDtypeStruct(qg.shape, qg.dtype),
            jax.ShapeDtypeStruct(kt.shape, F32),
            jax.ShapeDtypeStruct(kt.shape, F32),
        ],
        input_output_aliases={n_in - 2: 1, n_in - 1: 2},
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(qg, kt, vt, ids, *([] if seg is None else [seg]), dog, lse, delta, zeros, zeros)


def _unlayout_q(x, shape):
    b, t, hq, d = shape
    return x.transpose(0, 2, 1, 3, 4).reshape(b, t, hq, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, block_idx, segment_ids, block_size, interpret):
    qg, kt, vt, ids, seg = _layouts(q, k, v, block_idx, segment_ids, block_size)
    return _unlayout_q(_forward(qg, kt, vt, ids, seg, block_size, interpret)[0], q.shape)


def _attention_fwd(q, k, v, block_idx, segment_ids, block_size, interpret):
    qg, kt, vt, ids, seg = _layouts(q, k, v, block_idx, segment_ids, block_size)
    og, lse = _forward(qg, kt, vt, ids, seg, block_size, interpret)
    return _unlayout_q(og, q.shape), (qg, kt, vt, ids, seg, og, lse)


def _attention_bwd(block_size, interpret, res, do):
    qg, kt, vt, ids, seg, og, lse = res
    b, t, hq, d = do.shape
    dog = do.reshape(b, t, kt.shape[1], hq // kt.shape[1], d).transpose(0, 2, 1, 3, 4)
    dq, dk, dv = _backward(qg, kt, vt, ids, seg, og, lse, dog, block_size, interpret)
    unkv = lambda x, like: x.swapaxes(1, 2)[:, :t].astype(like.dtype)
    return _unlayout_q(dq, do.shape), unkv(dk, kt), unkv(dv, vt), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(q, k, v, block_idx, *, block_size, segment_ids=None, interpret=False):
    """Pallas GPU (Triton) version of ``xla.block_sparse_attention`` (same semantics).

    ``segment_ids`` int [B, T] (packed rows): a key is used only by queries of its segment.
    """
    return _attention(q, k, v, jax.lax.stop_gradient(block_idx), segment_ids, block_size, interpret)
