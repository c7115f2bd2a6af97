"""Pallas TPU (Mosaic) kernels for chunked Lightning attention, forward and backward.

Grid ``(B, H, N)``: batch and head are "parallel", the chunk axis is "arbitrary" (sequential), and
the fp32 ``[Dk, Dv]`` state stays resident in a VMEM scratch buffer across the chunk loop. One
grid step loads one chunk of q/k/v (``[C, D]`` tiles of a ``[B, H, T, D]`` layout; C a multiple of
the sublane tile, D the full head dim), computes ``O = ((QKᵀ) ⊙ D) V + diag(λ^{i+1}) Q S`` and
updates ``S ← λ^L S + (diag(λ^{L−1−j}) K)ᵀ V``. The per-head log-decay is scalar-prefetched into
SMEM; decay factors are built in-kernel as ``exp(g·Δ)`` with Δ ≥ 0. Matmul operands are in the
input dtype (bf16 MXU passes for bf16 inputs, full precision for fp32), accumulated in fp32;
the state and its gradient are always fp32.

The backward walks the chunks in reverse (index map ``n → N−1−n``) with the state gradient
``dS`` in VMEM, reading the per-chunk states written by the forward (``save_states=True``).

Packed rows: the per-chunk relative document index ``rel`` (``chunking.chunk_documents``, fp32)
comes in blocked like the tokens, once as a ``[C, 1]`` column and once as a ``[1, C]`` row, and
both kernels mask their factors in-kernel (``segment_factors``).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .chunking import chunk_documents, chunk_lengths, from_chunks, num_chunks, to_chunks

_F32 = jnp.float32


def _dot(a, b, ca, cb, dtype):
    """``a·b`` contracting dim ``ca`` of a with ``cb`` of b (2-D), fp32 accumulation.

    Operands go to the MXU in the input dtype: bf16/fp16 inputs use native 16-bit passes, fp32
    inputs use full fp32 precision (``HIGHEST``)."""
    hi = jnp.dtype(dtype) == jnp.float32
    return lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        (((ca,), (cb,)), ((), ())),
        precision=lax.Precision.HIGHEST if hi else lax.Precision.DEFAULT,
        preferred_element_type=_F32,
    )


def chunk_factors(g, length, c):
    """In-kernel decay factors for one chunk of real length ``length`` (f32 scalar)."""
    i = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    j = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    delta = (i - j).astype(_F32)
    intra = jnp.where(delta >= 0, jnp.exp(g * jnp.maximum(delta, 0.0)), 0.0)
    pos = lax.broadcasted_iota(jnp.int32, (c, 1), 0).astype(_F32)
    qdec = jnp.exp(g * (pos + 1.0))
    kdelta = length - 1.0 - pos
    kdec = jnp.where(kdelta >= 0, jnp.exp(g * jnp.maximum(kdelta, 0.0)), 0.0)
    bdec = jnp.exp(g * jnp.full((1, 1), length, _F32))
    return intra, qdec, kdec, bdec


def segment_factors(factors, rel_col, rel_row):
    """Masks one chunk's ``(intra, qdec, kdec, bdec)`` with its documents: intra
    ``[rel_i = rel_j]``, qdec ``[rel_i = 0]``, kdec ``[rel_j = rel_last]``, bdec ``[rel_last = 0]``."""
    intra, qdec, kdec, bdec = factors
    last = jnp.max(rel_row, axis=1, keepdims=True)  # [1,1]; rel is non-decreasing
    return (
        jnp.where(rel_col == rel_row, intra, 0.0),
        jnp.where(rel_col == 0.0, qdec, 0.0),
        jnp.where(rel_col == last, kdec, 0.0),
        jnp.where(last == 0.0, bdec, 0.0),
    )


def _factors(g, length, c, seg_refs):
    factors = chunk_factors(g, length, c)
    if seg_refs:
        factors = segment_factors(factors, seg_refs[0][...], seg_refs[1][...])
    return factors


def _length(chunk, t, c):
    last = float(chunk_lengths(t, c)[-1])
    return jnp.where(chunk == num_chunks(t, c) - 1, last, float(c)).astype(_F32)


def _fwd_kernel(g_ref, q_ref, k_ref, v_ref, s0_ref, *rest, t, c, scale, save, seg):
    seg_refs, rest = rest[: 2 * seg], rest[2 * seg :]
    o_ref, sT_ref = rest[:2]
    states_ref, s_scr = rest[2:] if save else (None, rest[2])
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        s_scr[...] = s0_ref[...].astype(_F32)

    intra, qdec, kdec, bdec = _factors(g_ref[pl.program_id(1)], _length(n, t, c), c, seg_refs)
    dt = q_ref.dtype
    dot = functools.partial(_dot, dtype=dt)
    q = (q_ref[...].astype(_F32) * scale).astype(dt)
    k, v = k_ref[...], v_ref[...]
    s = s_scr[...]
    if save:
        states_ref[...] = s
    o = dot(dot(q, k, 1, 1) * intra, v, 1, 0) + qdec * dot(q, s, 1, 0)
    o_ref[...] = o.astype(o_ref.dtype)
    s_new = bdec * s + dot(k.astype(_F32) * kdec, v, 0, 0)
    s_scr[...] = s_new

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        sT_ref[...] = s_new


def _bwd_kernel(g_ref, q_ref, k_ref, v_ref, do_ref, st_ref, dsT_ref, *rest, t, c, scale, seg):
    seg_refs, (dq_ref, dk_ref, dv_ref, ds0_ref, ds_scr) = rest[: 2 * seg], rest[2 * seg :]
    n = pl.program_id(2)
    chunk = pl.num_programs(2) - 1 - n

    @pl.when(n == 0)
    def _():
        ds_scr[...] = dsT_ref[...].astype(_F32)

    intra, qdec, kdec, bdec = _factors(g_ref[pl.program_id(1)], _length(chunk, t, c), c, seg_refs)
    dt = q_ref.dtype
    dot = functools.partial(_dot, dtype=dt)
    q = (q_ref[...].astype(_F32) * scale).astype(dt)
    k, v, do = k_ref[...], v_ref[...], do_ref[...].astype(dt)
    s, ds = st_ref[...], ds_scr[...]  # state entering / grad of state leaving
    scores = dot(q, k, 1, 1) * intra
    dscores = dot(do, v, 1, 1) * intra
    dq_ref[...] = (scale * (dot(dscores, k, 1, 0) + qdec * dot(do, s, 1, 1))).astype(dq_ref.dtype)
    dk_ref[...] = (dot(dscores, q, 0, 0) + kdec * dot(v, ds, 1, 1)).astype(dk_ref.dtype)
    dv_ref[...] = (dot(scores, do, 0, 0) + kdec * dot(k, ds, 1, 0)).astype(dv_ref.dtype)
    ds_new = bdec * ds + dot(q.astype(_F32) * qdec, do, 0, 0)
    ds_scr[...] = ds_new

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = ds_new


def _seq(x, c):
    """``[B,T,H,D]`` -> ``[B,H,N·C,D]`` in the input dtype."""
    b, h, n, _, d = (y := to_chunks(x, c, x.dtype)).shape
    return y.reshape(b, h, n * c, d)


def _unseq(x, t, c):
    b, h, tp, d = x.shape
    return from_chunks(x.reshape(b, h, tp // c, c, d), t, x.dtype)


def _seg_inputs(docs, t, c, reverse=False):
    """``rel`` as ``[B,N,C,1]`` columns and ``[B,N,1,C]`` rows (fp32) with their BlockSpecs."""
    if docs is None:
        return [], []
    n = num_chunks(t, c)
    rel = chunk_documents(docs, n * c, c).astype(_F32)  # [B,N,C]
    at = (lambda ni: n - 1 - ni) if reverse else (lambda ni: ni)
    spec = lambda shape: pl.BlockSpec((None, None, *shape), lambda bi, hi, ni, g: (bi, at(ni), 0, 0))
    return [rel[..., None], rel[:, :, None, :]], [spec((c, 1)), spec((1, c))]


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def forward(
    q, k, v, log_decay, initial_state, *, scale, chunk_size=64, save_states=False, interpret=False, docs=None
):
    """Returns ``(o [B,T,H,Dv] in q.dtype, final_state fp32, chunk_states or None)``; ``docs``:
    optional ``[B,T]`` document index (``chunking.document_index``)."""
    b, t, h, dk = q.shape
    dv, c = v.shape[-1], chunk_size
    n = num_chunks(t, c)
    tile = lambda d: pl.BlockSpec((None, None, c, d), lambda bi, hi, ni, g: (bi, hi, ni, 0))
    state = pl.BlockSpec((None, None, dk, dv), lambda bi, hi, ni, g: (bi, hi, 0, 0))
    out_specs = [tile(dv), state]
    out_shape = [jax.ShapeDtypeStruct((b, h, n * c, dv), q.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), _F32)]
    if save_states:
        out_specs.append(pl.BlockSpec((None, None, None, dk, dv), lambda bi, hi, ni, g: (bi, hi, ni, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, n, dk, dv), _F32))
    seg_in, seg_specs = _seg_inputs(docs, t, c)
    kernel = functools.partial(_fwd_kernel, t=t, c=c, scale=scale, save=save_states, seg=docs is not None)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, h, n),
            in_specs=[tile(dk), tile(dk), tile(dv), state, *seg_specs],
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((dk, dv), _F32)],
        ),
        out_shape=out_shape,
        compiler_params=_params(),
        interpret=interpret,
    )(log_decay.astype(_F32), _seq(q, c), _seq(k, c), _seq(v, c), initial_state.astype(_F32), *seg_in)
    states = outs[2] if save_states else None
    return _unseq(outs[0], t, c), outs[1], states


def backward(q, k, v, log_decay, chunk_states, do, d_final, *, scale, chunk_size=64, interpret=False, docs=None):
    """Chunk-wise VJP kernel. Returns ``(dq, dk, dv)`` in the input dtypes and fp32 ``d_state``."""
    b, t, h, dk = q.shape
    dv, c = v.shape[-1], chunk_size
    n = num_chunks(t, c)
    rev = lambda bi, hi, ni, g: (bi, hi, n - 1 - ni, 0)
    tile = lambda d: pl.BlockSpec((None, None, c, d), rev)
    state = pl.BlockSpec((None, None, dk, dv), lambda bi, hi, ni, g: (bi, hi, 0, 0))
    st = pl.BlockSpec((None, None, None, dk, dv), lambda bi, hi, ni, g: (bi, hi, n - 1 - ni, 0, 0))
    seg_in, seg_specs = _seg_inputs(docs, t, c, reverse=True)
    kernel = functools.partial(_bwd_kernel, t=t, c=c, scale=scale, seg=docs is not None)
    dq, dk_, dv_, ds0 = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, h, n),
            in_specs=[tile(dk), tile(dk), tile(dv), tile(dv), st, state, *seg_specs],
            out_specs=[tile(dk), tile(dk), tile(dv), state],
            scratch_shapes=[pltpu.VMEM((dk, dv), _F32)],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((b, h, n * c, dk), q.dtype),
            jax.ShapeDtypeStruct((b, h, n * c, dk), k.dtype),
            jax.ShapeDtypeStruct((b, h, n * c, dv), v.dtype),
            jax.ShapeDtypeStruct((b, h, dk, dv), _F32),
        ],
        compiler_params=_params(),
        interpret=interpret,
    )(
        log_decay.astype(_F32),
        *(_seq(x, c) for x in (q, k, v, do)),
        chunk_states,
        d_final.astype(_F32),
        *seg_in,
    )
    return _unseq(dq, t, c), _unseq(dk_, t, c), _unseq(dv_, t, c), ds0
