"""Pallas Mosaic GPU kernels (Hopper WGMMA) for chunked Lightning attention, forward + backward.

Mosaic GPU is the default ``pallas_call`` lowering on GPU in JAX 0.10 (Triton is deprecated).
Grid ``(B·H, N)``: the head axis is "parallel" (one CTA = one warpgroup), the chunk axis is
"sequential" and Pallas pipelines the chunk tiles GMEM→SMEM with TMA. Matmuls are ``plgpu.wgmma``
on bf16/fp16 SMEM tiles (128-byte swizzle) with fp32 accumulators; the fp32 state lives in SMEM
scratch across the chunk loop (plus a 16-bit copy that feeds the ``Q·S`` WGMMA).

To keep every chunk full and every decay a per-head constant, sequences are **front**-padded to
``N·C`` tokens and the kernels start from a zero state; the initial state and the final-state
cotangent enter through cheap fp32 XLA terms (``λ^{t+1} q_t S₀``, ``λ^T S₀``,
``λ^{T−1−t} v_t dS_Tᵀ``, ...). Row decays are folded into extra operands in XLA
(``q·λ^{i+1}``, ``k·λ^{C−1−j}``, ...), all as ``exp(g·Δ)`` with Δ ≥ 0.

Four kernels: forward (o, final state), and a backward split in three so each fits the 227 KiB
of SMEM at D = 128 (each uses 209 KiB, single-buffered) — dq (forward order, recomputes S), dk
and dv (reverse order, accumulate dS).

Packed rows (``docs``): the per-token document masks of the row decays are folded into the same
XLA operands (``q·λ^{i+1}·[rel_i = 0]``, ``k·λ^{C−1−j}·[rel_j = rel_last]``), the chunk carry
``λ^C·[rel_last = 0]`` becomes a per-(row, chunk) vector in place of the per-head ``bvec``, and
the intra-chunk mask is built in-kernel from one per-row bound: query row i keeps keys
``j ≥ start_i`` (first index of its document in the chunk), key row j (transposed kernels)
keeps queries ``i ≤ end_j``. Front padding joins the first document.

Limits (checked with clear errors): inputs bf16/fp16 only, ``chunk_size == 64`` (one
warpgroup's M), head dims multiples of 64 up to 128. fp32 inputs are refused rather than rounded:
WGMMA reads fp32 operands as TF32 (10-bit mantissa, so no fp32 parity), and fp32 tiles would not
fit SMEM at D = 128; exact fp32 would need 3-pass bf16 splitting of every operand (3× the WGMMAs,
2× the tiles). Callers with fp32 activations cast q, k, v to bf16 (the state and the
accumulation stay fp32) or use ``xla``. **Verification status:** the Mosaic GPU path is checked by
``jax.export(..., platforms=["cuda"])`` lowering at SALA's shape; numerics are checked on CPU in
interpret mode, where WGMMA, layout casts and SMEM swizzles (which have no interpreter rules in
JAX 0.10) are replaced by ``lax.dot_general`` on the same tiles with the same bf16 operand
rounding. The kernels have not yet been run on a GPU; ``auto`` therefore picks ``xla`` on GPU.
``pl.pallas_call`` for Mosaic GPU is deprecated in JAX 0.10 in favour of ``plgpu.kernel``.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .chunking import chunk_documents, document_bounds, num_chunks, segment_masks

_F32 = jnp.float32
CHUNK = 64


def check_tiling(chunk_size, dtype, head_dims):
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(
            f"implementation='pallas_gpu' takes bfloat16/float16 inputs (WGMMA "
            f"operands; the state and accumulation stay float32), got {dtype}: cast q, k, v "
            "to bfloat16, or use implementation='xla' for float32 parity"
        )
    if chunk_size != CHUNK:
        raise ValueError(f"chunk_size for pallas_gpu must be {CHUNK} (one warpgroup's WGMMA M), got {chunk_size}")
    if any(d % 64 or d > 128 for d in head_dims):
        raise ValueError(f"pallas_gpu needs head dims Dk, Dv in {{64, 128}}, got {head_dims}")


class _Ops:
    """Tile ops: WGMMA/layouts when compiled, ``dot_general`` on the same tiles when interpreted."""

    def __init__(self, interpret):
        self.interpret = interpret

    def transforms(self, dtype):
        if self.interpret:
            return ()
        return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))

    def load(self, ref):
        return ref[...] if self.interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA)

    def zeros(self, shape, dtype):
        z = jnp.zeros(shape, dtype)
        return z if self.interpret else plgpu.layout_cast(z, plgpu.Layout.WGMMA)

    def row_scale(self, vec_ref, shape):
        """Broadcast a per-row ``[M]`` vector to ``shape``."""
        v = vec_ref[...] if self.interpret else plgpu.load(vec_ref, (), layout=plgpu.Layout.WGMMA.reduce(1))
        return lax.broadcast_in_dim(v, shape, [0])

    def doc_mask(self, x, bound_ref, upper):
        """Zeroes ``x [M, N]`` outside the row's document: keeps columns ``j ≥ bound_i`` (or
        ``j ≤ bound_i`` when ``upper``), ``bound`` a per-row ``[M]`` fp32 ref."""
        col = lax.broadcasted_iota(jnp.int32, x.shape, 1)
        if not self.interpret:
            col = plgpu.layout_cast(col, plgpu.Layout.WGMMA)
        col, bound = col.astype(_F32), self.row_scale(bound_ref, x.shape)
        return jnp.where(col <= bound if upper else col >= bound, x, 0.0)

    def to_gmem(self, src, dst, i):
        """Copies an SMEM tile into row ``i`` of a GMEM ref."""
        if self.interpret:
            dst[i] = src[...]
        else:
            plgpu.copy_smem_to_gmem(src, dst.at[i])
            plgpu.wait_smem_to_gmem(0)

    def commit(self):
        if not self.interpret:
            plgpu.commit_smem()

    def mm(self, terms, init=None):
        """fp32 ``init + Σ op(a)·op(b)`` over ``terms = [(a, b, ta, tb), ...]`` in one accumulator.

        ``a`` is a ref or a 16-bit register tile (never transposed), ``b`` a ref.
        """
        if self.interpret:
            out = init
            for a, b, ta, tb in terms:
                av = a if isinstance(a, jax.Array) else a[...]
                d = lax.dot_general(
                    av, b[...], (((0 if ta else 1,), (1 if tb else 0,)), ((), ())), preferred_element_type=_F32
                )
                out = d if out is None else out + d
            return out
        a, b, ta, tb = terms[0]
        shape = (a.shape[1] if ta else a.shape[0], b.shape[0] if tb else b.shape[1])

        def body(acc):
            for a, b, ta, tb in terms:
                plgpu.wgmma(
                    acc, plgpu.transpose_ref(a, (1, 0)) if ta else a, plgpu.transpose_ref(b, (1, 0)) if tb else b
                )
            if init is None:
                return acc[...]

        if init is None:
            return pl.run_scoped(body, plgpu.ACC(shape, _F32))
        return pl.run_state(body)(plgpu.ACC.init(init))


def _init(ops, first, s16):
    @pl.when(first)
    def _():
        s16[...] = ops.zeros(s16.shape, s16.dtype)
        ops.commit()


def _state_step(ops, first, s32, s16, bvec, x, y):
    """``S ← λ^C·S + xᵀ y`` on the fp32 SMEM state ``s32`` (and its 16-bit copy ``s16``), in
    64-row slices so one warpgroup holds only a ``[64, Dv]`` accumulator at a time."""

    @pl.when(first)
    def _():
        s32[...] = ops.zeros(s32.shape, _F32)

    for r in range(0, s32.shape[0], 64):
        rows = pl.ds(r, 64)
        shape = (64, s32.shape[1])
        init = ops.row_scale(bvec.at[rows], shape) * ops.load(s32.at[rows])
        s = ops.mm([(x.at[:, rows], y, True, False)], init=init)
        s32.at[rows][...] = s
        s16.at[rows][...] = s.astype(s16.dtype)
    ops.commit()


def _scores(ops, x, y, intra, bound, upper=False):
    """``(x yᵀ) ⊙ intra`` (masked to the documents when ``bound`` is given), 16-bit."""
    p = ops.mm([(x, y, False, True)]) * ops.load(intra)
    if bound is not None:
        p = ops.doc_mask(p, bound, upper)
    return p.astype(x.dtype)


def _fwd_kernel(q, qd, k, kd, v, intra, bvec, *rest, ops, last, seg):
    """``o = ((Q Kᵀ) ⊙ D) V + (Q·λ^{i+1}) S``; ``S ← λ^C S + (K·λ^{C−1−j})ᵀ V``."""
    bound, (o_ref, st_ref, s32, s16) = (rest[0], rest[1:]) if seg else (None, rest)
    first = pl.program_id(1) == 0
    _init(ops, first, s16)
    p = _scores(ops, q, k, intra, bound)
    o = ops.mm([(p, v, False, False), (qd, s16, False, False)])  # s16 = state entering the chunk
    o_ref[...] = o.astype(o_ref.dtype)
    _state_step(ops, first, s32, s16, bvec, kd, v)

    row = pl.program_id(0)

    @pl.when(pl.program_id(1) == last)
    def _():
        ops.to_gmem(s32, st_ref, row)


def _dq_kernel(k, kd, v, do, dod, intra, bvec, *rest, ops, last, seg):
    """``dq = ((dO Vᵀ) ⊙ D) K + (dO·λ^{i+1}) Sᵀ``, recomputing S in chunk order."""
    del last
    bound, (dq_ref, s32, s16) = (rest[0], rest[1:]) if seg else (None, rest)
    first = pl.program_id(1) == 0
    _init(ops, first, s16)
    ds = _scores(ops, do, v, intra, bound)
    dq_ref[...] = ops.mm([(ds, k, False, False), (dod, s16, False, True)]).astype(dq_ref.dtype)
    _state_step(ops, first, s32, s16, bvec, kd, v)


def _dkv_kernel(x, a, b, xd, qd, intra_t, bvec, *rest, ops, last, for_dk, seg):
    """Reverse chunk order, ``s32`` = dS (grad of the state leaving the chunk).

    dk: ``x, a, b, xd = v, dO, Q, V·λ^{C−1−j}``: ``dk = ((V dOᵀ) ⊙ Dᵀ) Q + xd·dSᵀ``;
    dv: ``x, a, b, xd = K, Q, dO, K·λ^{C−1−j}``: ``dv = ((K Qᵀ) ⊙ Dᵀ) dO + xd·dS``;
    then ``dS ← λ^C dS + (Q·λ^{i+1})ᵀ dO``.
    """
    del last
    bound, (out_ref, s32, s16) = (rest[0], rest[1:]) if seg else (None, rest)
    first = pl.program_id(1) == 0
    _init(ops, first, s16)
    sc = _scores(ops, x, a, intra_t, bound, upper=True)
    out_ref[...] = ops.mm([(sc, b, False, False), (xd, s16, False, for_dk)]).astype(out_ref.dtype)
    _state_step(ops, first, s32, s16, bvec, qd, a if for_dk else b)


def _call(kernel, ins, extra, out_dim, state_dims, *, h, reverse=False, interpret, seg=(), **kw):
    """Runs ``kernel`` over grid (B·H, N) on ``[B·H, N·C, D]`` tiles (optionally reversed).

    ``extra``: per-head arrays ``[H, ...]``; ``seg``: per-chunk row vectors ``[B·H or B, N, X]``
    (batch-indexed when the first dim is B), passed after ``extra``.
    """
    ops = _Ops(interpret)
    bh, tp, _ = ins[0].shape
    n, dt = tp // CHUNK, ins[0].dtype
    at = (lambda j: n - 1 - j) if reverse else (lambda j: j)
    idx = lambda i, j: (i, at(j), 0)
    tile = lambda d: plgpu.BlockSpec((None, CHUNK, d), idx, transforms=ops.transforms(dt))
    per_head = lambda e: plgpu.BlockSpec(
        (None, *e.shape[1:]),
        lambda i, j: (i % h,) + (0,) * (e.ndim - 1),
        transforms=ops.transforms(_F32) if e.ndim == 3 else (),
    )

    def per_chunk(e):
        div = bh // e.shape[0]  # 1 for [B·H, ...], H for [B, ...]
        return plgpu.BlockSpec((None, None, e.shape[-1]), lambda i, j: (i // div, at(j), 0))

    out_specs = [tile(out_dim)]
    out_shape = [jax.ShapeDtypeStruct((bh, tp, out_dim), dt)]
    if kernel is _fwd_kernel:
        out_specs.append(pl.BlockSpec(memory_space=plgpu.GMEM))
        out_shape.append(jax.ShapeDtypeStruct((bh, *state_dims), _F32))
    scratch = [
        plgpu.SMEM(state_dims, _F32, transforms=ops.transforms(_F32)),
        plgpu.SMEM(state_dims, dt, transforms=ops.transforms(dt)),
    ]
    return pl.pallas_call(
        functools.partial(kernel, ops=ops, last=n - 1, seg=bool(seg), **kw),
        grid=(bh, n),
        in_specs=[tile(x.shape[-1]) for x in ins] + [per_head(e) for e in extra] + [per_chunk(e) for e in seg],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(dimension_semantics=("parallel", "sequential")),
    )(*ins, *extra, *seg)


def _factors(log_decay, t):
    """Per-head ``intra [H,C,C]``, ``qdec [H,C]``, ``kdec [H,C]``, ``bvec [H,C]`` (λ^C rows)."""
    g = log_decay.astype(_F32)
    i = jnp.arange(CHUNK, dtype=_F32)
    delta = i[:, None] - i[None, :]
    intra = jnp.where(delta >= 0, jnp.exp(g[:, None, None] * jnp.maximum(delta, 0.0)), 0.0)
    qdec = jnp.exp(g[:, None] * (i + 1.0))
    kdec = jnp.exp(g[:, None] * (CHUNK - 1.0 - i))
    pos = jnp.arange(t, dtype=_F32)
    return (
        intra,
        qdec,
        kdec,
        jnp.exp(g * CHUNK),
        jnp.exp(g[:, None] * (pos + 1.0)),
        jnp.exp(g[:, None] * (t - 1.0 - pos)),
    )


class _Layout:
    """``[B,T,H,D]`` <-> front-padded ``[B·H, N·C, D]`` and per-position row decays."""

    def __init__(self, b, t, h):
        self.b, self.t, self.h, self.n = b, t, h, num_chunks(t, CHUNK)

    def pack(self, x, dtype, rows=None, mask=None):
        x = jnp.pad(x.astype(_F32), ((0, 0), (self.n * CHUNK - self.t, 0), (0, 0), (0, 0)))
        x = x.transpose(0, 2, 1, 3)  # [B,H,Tp,D]
        if rows is not None:  # [H,C] per chunk row
            x = x * jnp.tile(rows, (1, self.n))[None, :, :, None]
        if mask is not None:  # [B,Tp] per token (packed rows)
            x = jnp.where(mask[:, None, :, None], x, 0.0)
        return x.reshape(self.b * self.h, self.n * CHUNK, -1).astype(dtype)

    def unpack(self, x):
        x = x.reshape(self.b, self.h, self.n * CHUNK, -1)[:, :, self.n * CHUNK - self.t :]
        return x.transpose(0, 2, 1, 3).astype(_F32)


class _Segments:
    """Packed-row data in the front-padded chunk layout (see the module docstring)."""

    def __init__(self, docs, lay, bdec, dk):
        rel = chunk_documents(docs, lay.n * CHUNK, CHUNK, front=True)  # [B,N,C]
        m = segment_masks(rel)
        self.qmask, self.kmask = (x.reshape(lay.b, -1) for x in (m.qmask, m.kmask))  # [B,Tp]
        keep = jnp.where(m.keep[:, None, :, None], bdec[None, :, None, None], 0.0)  # [B,H,N,1]
        self.bvec = jnp.broadcast_to(keep, (lay.b, lay.h, lay.n, dk)).reshape(lay.b * lay.h, lay.n, dk)
        self.start, self.end = (x.astype(_F32) for x in document_bounds(rel))  # [B,N,C]
        # XLA initial/final-state terms: S₀ reaches only the first document (d = 0), dS_T only the last.
        self.first = (docs == 0)[:, :, None, None]  # [B,T,1,1]
        self.last = (docs == docs[:, -1:])[:, :, None, None]
        self.single = self.first[:, -1:, :, :]  # [B,1,1,1]: the row is one document


def _state_terms(log_decay, t, s, segs):
    """``λ^T·S`` (the state carried from the start to the end), zero for a multi-document row."""
    carried = jnp.exp(log_decay.astype(_F32) * t)[None, :, None, None] * s
    return carried if segs is None else jnp.where(segs.single, carried, 0.0)


def forward(
    q, k, v, log_decay, initial_state, *, scale, chunk_size=CHUNK, save_states=False, interpret=False, docs=None
):
    """Returns ``(o [B,T,H,Dv] fp32, final_state fp32, residual)``; ``docs``: optional ``[B,T]``
    document index (``chunking.document_index``).

    The backward recomputes the chunk states in-kernel, so the only residual it needs besides
    q, k, v is the initial state (returned in the ``chunk_states`` slot when ``save_states``).
    """
    del chunk_size
    b, t, h, dk = q.shape
    dt, lay = q.dtype, _Layout(b, t, h)
    intra, qdec, kdec, bdec, qdec_t, _ = _factors(log_decay, t)
    segs = None if docs is None else _Segments(docs, lay, bdec, dk)
    qm, km = (None, None) if segs is None else (segs.qmask, segs.kmask)
    qs = q.astype(_F32) * scale
    ins = [lay.pack(qs, dt), lay.pack(qs, dt, qdec, qm), lay.pack(k, dt), lay.pack(k, dt, kdec, km), lay.pack(v, dt)]
    if segs is None:
        extra, seg = [intra, jnp.broadcast_to(bdec[:, None], (h, dk))], ()
    else:
        extra, seg = [intra], (segs.bvec, segs.start)
    run = functools.partial(_call, h=h, interpret=interpret, seg=seg)
    o, st = run(_fwd_kernel, ins, extra, v.shape[-1], (dk, v.shape[-1]))
    s0 = initial_state.astype(_F32)
    qrow = qdec_t.T[None, :, :, None]
    if segs is not None:
        qrow = jnp.where(segs.first, qrow, 0.0)
    o = lay.unpack(o) + jnp.einsum("bthd,bhdv->bthv", qs * qrow, s0)
    final = st.reshape(b, h, dk, -1) + _state_terms(log_decay, t, s0, segs)
    return o, final, (s0 if save_states else None)


def backward(q, k, v, log_decay, chunk_states, do, d_final, *, scale, chunk_size=CHUNK, interpret=False, docs=None):
    """VJP via the dq / dk / dv kernels; ``chunk_states`` is the initial state saved by
    ``forward``. Returns fp32 ``(dq, dk, dv, d_initial_state)``."""
    del chunk_size
    b, t, h, dk = q.shape
    dv_dim, dt, lay = v.shape[-1], q.dtype, _Layout(b, t, h)
    intra, qdec, kdec, bdec, qdec_t, kdec_t = _factors(log_decay, t)
    segs = None if docs is None else _Segments(docs, lay, bdec, dk)
    qm, km = (None, None) if segs is None else (segs.qmask, segs.kmask)
    intra_t = jnp.swapaxes(intra, 1, 2)
    qs = q.astype(_F32) * scale
    qp, qd = lay.pack(qs, dt), lay.pack(qs, dt, qdec, qm)
    kp, kd = lay.pack(k, dt), lay.pack(k, dt, kdec, km)
    vp, vd = lay.pack(v, dt), lay.pack(v, dt, kdec, km)
    dop, dod = lay.pack(do, dt), lay.pack(do, dt, qdec, qm)
    state = (dk, dv_dim)
    run = functools.partial(_call, h=h, interpret=interpret)
    if segs is None:
        bvec = [jnp.broadcast_to(bdec[:, None], (h, dk))]
        fwd_seg = rev_seg = ()
    else:
        bvec, fwd_seg, rev_seg = [], (segs.bvec, segs.start), (segs.bvec, segs.end)
    dq = run(_dq_kernel, [kp, kd, vp, dop, dod], [intra, *bvec], dk, state, seg=fwd_seg)[0]
    rev = functools.partial(run, _dkv_kernel, extra=[intra_t, *bvec], state_dims=state, reverse=True, seg=rev_seg)
    dk_ = rev([vp, dop, qp, vd, qd], out_dim=dk, for_dk=True)[0]
    dv_ = rev([kp, qp, dop, kd, qd], out_dim=dv_dim, for_dk=False)[0]
    # Initial-state and final-state-cotangent terms (the kernels start from zero S / dS).
    s0 = chunk_states.astype(_F32)
    do32, ds_t = do.astype(_F32), d_final.astype(_F32)
    qrow, krow = qdec_t.T[None, :, :, None], kdec_t.T[None, :, :, None]
    if segs is not None:
        qrow, krow = jnp.where(segs.first, qrow, 0.0), jnp.where(segs.last, krow, 0.0)
    dq = scale * (lay.unpack(dq) + qrow * jnp.einsum("bthv,bhdv->bthd", do32, s0))
    dk_ = lay.unpack(dk_) + krow * jnp.einsum("bthv,bhdv->bthd", v.astype(_F32), ds_t)
    dv_ = lay.unpack(dv_) + krow * jnp.einsum("bthd,bhdv->bthv", k.astype(_F32), ds_t)
    d_s0 = jnp.einsum("bthd,bthv->bhdv", qs * qrow, do32) + _state_terms(log_decay, t, ds_t, segs)
    return dq, dk_, dv_, d_s0
