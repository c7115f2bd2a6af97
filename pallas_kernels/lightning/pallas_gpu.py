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

Limits (checked with clear errors): inputs bf16/fp16 only (WGMMA operands; fp32 inputs would
run as TF32 and miss fp32 parity — use ``xla``), ``chunk_size == 64`` (one warpgroup's M), head
dims multiples of 64 up to 128. **Verification status:** the Mosaic GPU path is checked by
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

from .chunking import num_chunks

_F32 = jnp.float32
CHUNK = 64


def check_tiling(chunk_size, dtype, head_dims):
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(
            f"implementation='pallas_gpu' takes bfloat16/float16 inputs (WGMMA "
            f"operands), got {dtype}; use implementation='xla' for float32"
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


def _fwd_kernel(q, qd, k, kd, v, intra, bvec, o_ref, st_ref, s32, s16, *, ops, last):
    """``o = ((Q Kᵀ) ⊙ D) V + (Q·λ^{i+1}) S``; ``S ← λ^C S + (K·λ^{C−1−j})ᵀ V``."""
    first = pl.program_id(1) == 0
    _init(ops, first, s16)
    p = (ops.mm([(q, k, False, True)]) * ops.load(intra)).astype(q.dtype)
    o = ops.mm([(p, v, False, False), (qd, s16, False, False)])  # s16 = state entering the chunk
    o_ref[...] = o.astype(o_ref.dtype)
    _state_step(ops, first, s32, s16, bvec, kd, v)

    row = pl.program_id(0)

    @pl.when(pl.program_id(1) == last)
    def _():
        ops.to_gmem(s32, st_ref, row)


def _dq_kernel(k, kd, v, do, dod, intra, bvec, dq_ref, s32, s16, *, ops, last):
    """``dq = ((dO Vᵀ) ⊙ D) K + (dO·λ^{i+1}) Sᵀ``, recomputing S in chunk order."""
    del last
    first = pl.program_id(1) == 0
    _init(ops, first, s16)
    ds = (ops.mm([(do, v, False, True)]) * ops.load(intra)).astype(k.dtype)
    dq_ref[...] = ops.mm([(ds, k, False, False), (dod, s16, False, True)]).astype(dq_ref.dtype)
    _state_step(ops, first, s32, s16, bvec, kd, v)


def _dkv_kernel(x, a, b, xd, qd, intra_t, bvec, out_ref, s32, s16, *, ops, last, for_dk):
    """Reverse chunk order, ``s32`` = dS (grad of the state leaving the chunk).

    dk: ``x, a, b, xd = v, dO, Q, V·λ^{C−1−j}``: ``dk = ((V dOᵀ) ⊙ Dᵀ) Q + xd·dSᵀ``;
    dv: ``x, a, b, xd = K, Q, dO, K·λ^{C−1−j}``: ``dv = ((K Qᵀ) ⊙ Dᵀ) dO + xd·dS``;
    then ``dS ← λ^C dS + (Q·λ^{i+1})ᵀ dO``.
    """
    del last
    first = pl.program_id(1) == 0
    _init(ops, first, s16)
    sc = (ops.mm([(x, a, False, True)]) * ops.load(intra_t)).astype(x.dtype)
    out_ref[...] = ops.mm([(sc, b, False, False), (xd, s16, False, for_dk)]).astype(out_ref.dtype)
    _state_step(ops, first, s32, s16, bvec, qd, a if for_dk else b)


def _call(kernel, ins, extra, out_dim, state_dims, *, h, reverse=False, interpret, **kw):
    """Runs ``kernel`` over grid (B·H, N) on ``[B·H, N·C, D]`` tiles (optionally reversed)."""
    ops = _Ops(interpret)
    bh, tp, _ = ins[0].shape
    n, dt = tp // CHUNK, ins[0].dtype
    idx = (lambda i, j: (i, n - 1 - j, 0)) if reverse else (lambda i, j: (i, j, 0))
    tile = lambda d: plgpu.BlockSpec((None, CHUNK, d), idx, transforms=ops.transforms(dt))
    per_head = lambda e: plgpu.BlockSpec(
        (None, *e.shape[1:]),
        lambda i, j: (i % h,) + (0,) * (e.ndim - 1),
        transforms=ops.transforms(_F32) if e.ndim == 3 else (),
    )
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
        functools.partial(kernel, ops=ops, last=n - 1, **kw),
        grid=(bh, n),
        in_specs=[tile(x.shape[-1]) for x in ins] + [per_head(e) for e in extra],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(dimension_semantics=("parallel", "sequential")),
    )(*ins, *extra)


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

    def pack(self, x, dtype, rows=None):
        x = jnp.pad(x.astype(_F32), ((0, 0), (self.n * CHUNK - self.t, 0), (0, 0), (0, 0)))
        x = x.transpose(0, 2, 1, 3)  # [B,H,Tp,D]
        if rows is not None:  # [H,C] per chunk row
            x = x * jnp.tile(rows, (1, self.n))[None, :, :, None]
        return x.reshape(self.b * self.h, self.n * CHUNK, -1).astype(dtype)

    def unpack(self, x):
        x = x.reshape(self.b, self.h, self.n * CHUNK, -1)[:, :, self.n * CHUNK - self.t :]
        return x.transpose(0, 2, 1, 3).astype(_F32)


def forward(q, k, v, log_decay, initial_state, *, scale, chunk_size=CHUNK, save_states=False, interpret=False):
    """Returns ``(o [B,T,H,Dv] fp32, final_state fp32, residual)``.

    The backward recomputes the chunk states in-kernel, so the only residual it needs besides
    q, k, v is the initial state (returned in the ``chunk_states`` slot when ``save_states``).
    """
    del chunk_size
    b, t, h, dk = q.shape
    dt, lay = q.dtype, _Layout(b, t, h)
    intra, qdec, kdec, bdec, qdec_t, _ = _factors(log_decay, t)
    qs = q.astype(_F32) * scale
    ins = [lay.pack(qs, dt), lay.pack(qs, dt, qdec), lay.pack(k, dt), lay.pack(k, dt, kdec), lay.pack(v, dt)]
    bvec = jnp.broadcast_to(bdec[:, None], (h, dk))
    o, st = _call(_fwd_kernel, ins, [intra, bvec], v.shape[-1], (dk, v.shape[-1]), h=h, interpret=interpret)
    s0 = initial_state.astype(_F32)
    o = lay.unpack(o) + jnp.einsum("bthd,bhdv->bthv", qs * qdec_t.T[None, :, :, None], s0)
    final = st.reshape(b, h, dk, -1) + jnp.exp(log_decay.astype(_F32) * t)[None, :, None, None] * s0
    return o, final, (s0 if save_states else None)


def backward(q, k, v, log_decay, chunk_states, do, d_final, *, scale, chunk_size=CHUNK, interpret=False):
    """VJP via the dq / dk / dv kernels; ``chunk_states`` is the initial state saved by
    ``forward``. Returns fp32 ``(dq, dk, dv, d_initial_state)``."""
    del chunk_size
    b, t, h, dk = q.shape
    dv_dim, dt, lay = v.shape[-1], q.dtype, _Layout(b, t, h)
    intra, qdec, kdec, bdec, qdec_t, kdec_t = _factors(log_decay, t)
    intra_t = jnp.swapaxes(intra, 1, 2)
    qs = q.astype(_F32) * scale
    qp, qd = lay.pack(qs, dt), lay.pack(qs, dt, qdec)
    kp, kd = lay.pack(k, dt), lay.pack(k, dt, kdec)
    vp, vd = lay.pack(v, dt), lay.pack(v, dt, kdec)
    dop, dod = lay.pack(do, dt), lay.pack(do, dt, qdec)
    state, bvec = (dk, dv_dim), jnp.broadcast_to(bdec[:, None], (h, dk))
    run = functools.partial(_call, h=h, interpret=interpret)
    dq = run(_dq_kernel, [kp, kd, vp, dop, dod], [intra, bvec], dk, state)[0]
    dk_ = run(_dkv_kernel, [vp, dop, qp, vd, qd], [intra_t, bvec], dk, state, reverse=True, for_dk=True)[0]
    dv_ = run(_dkv_kernel, [kp, qp, dop, kd, qd], [intra_t, bvec], dv_dim, state, reverse=True, for_dk=False)[0]
    # Initial-state and final-state-cotangent terms (the kernels start from zero S / dS).
    s0 = chunk_states.astype(_F32)
    do32, ds_t = do.astype(_F32), d_final.astype(_F32)
    qrow, krow = qdec_t.T[None, :, :, None], kdec_t.T[None, :, :, None]
    dq = scale * (lay.unpack(dq) + qrow * jnp.einsum("bthv,bhdv->bthd", do32, s0))
    dk_ = lay.unpack(dk_) + krow * jnp.einsum("bthv,bhdv->bthd", v.astype(_F32), ds_t)
    dv_ = lay.unpack(dv_) + krow * jnp.einsum("bthd,bhdv->bthv", k.astype(_F32), ds_t)
    d_s0 = jnp.einsum("bthd,bthv->bhdv", qs * qrow, do32)
    d_s0 = d_s0 + jnp.exp(log_decay.astype(_F32) * t)[None, :, None, None] * ds_t
    return dq, dk_, dv_, d_s0
