"""Packed rows (``segment_ids``): every implementation equals running each document alone.

Ground truth: the fp32 ``reference`` *without* segment ids, one batch row per document, holding
that document's tokens at their positions and zeros elsewhere (zero keys/values add nothing to the
state, and causality keeps later tokens out), with the initial state only in the row of each
packed row's first document and the final-state cotangent only in the row of its last document.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_helpers import LOG_DECAY, cotangents, forward_and_grads, inputs, rel_err
from pallas_kernels.lightning import lightning_attention


def _row(runs):
    return np.concatenate([np.full(n, i, np.int32) for i, n in runs])


# T = 64 (chunk 16 edges at 16, 32, 48). Row 0: boundary exactly at a chunk edge (16), three
# short documents inside one chunk (16–22), one crossing an edge (31–51), padding at the end.
# Row 1: boundaries inside chunks; id 7 repeats non-contiguously (two documents). Row 2: one
# document (its final state carries the initial state).
LAYOUT_64 = np.stack(
    [
        _row([(1, 5), (2, 11), (3, 3), (4, 2), (5, 1), (6, 9), (7, 20), (0, 13)]),
        _row([(7, 24), (8, 16), (7, 24)]),
        _row([(3, 64)]),
    ]
)
# T = 150 for pallas_gpu (chunk 64, front-padded by 42: chunk edges at tokens 22 and 86).
LAYOUT_150 = np.stack(
    [
        _row([(1, 22), (2, 5), (3, 3), (4, 1), (5, 30), (6, 40), (0, 49)]),
        _row([(7, 60), (8, 26), (7, 64)]),
        _row([(3, 150)]),
    ]
)


def _documents(seg):
    """``[(row, start, end), ...]`` of every document (maximal run of one id)."""
    docs = []
    for b, row in enumerate(np.asarray(seg)):
        cuts = [0, *np.flatnonzero(row[1:] != row[:-1]) + 1, len(row)]
        docs += [(b, a, e) for a, e in zip(cuts[:-1], cuts[1:])]
    return docs


def per_document_truth(q, k, v, s0, do, ds, seg):
    """``((o, final), (dq, dk, dv, ds0))`` from reference calls on isolated documents."""
    docs = _documents(seg)
    t = q.shape[1]

    def isolate(x):  # one row per document, zeros outside it
        inside = lambda a, e: ((np.arange(t) >= a) & (np.arange(t) < e))[:, None, None]
        return jnp.stack([jnp.where(inside(a, e), x[b], 0) for b, a, e in docs])

    first = [a == 0 for _, a, _ in docs]
    last = [e == t for _, _, e in docs]
    zero = jnp.zeros_like(s0[0])
    s0_d = jnp.stack([s0[b] if f else zero for (b, _, _), f in zip(docs, first)])
    ds_d = jnp.stack([ds[b] if f else zero for (b, _, _), f in zip(docs, last)])
    f32 = (x.astype(jnp.float32) for x in (q, k, v))
    (o_d, fin_d), grads_d = forward_and_grads("reference", *map(isolate, f32), s0_d, ct=(isolate(do), ds_d))

    def gather(x_d):  # scatter each document's slice back into the packed layout
        out = np.zeros((len(seg), *x_d.shape[1:]), np.float32)
        for i, (b, a, e) in enumerate(docs):
            out[b, a:e] = x_d[i, a:e]
        return out

    pick = lambda x_d, flags: np.stack([x_d[i] for i, f in enumerate(flags) if f])  # one per row
    o, grads = gather(o_d), [gather(g) for g in grads_d[:3]]
    return (o, pick(fin_d, last)), (*grads, pick(grads_d[3], first))


def _check(impl, dtype, chunk, layout, tol, **shape):
    b, t = layout.shape
    q, k, v, s0 = inputs(t, b=b, dtype=dtype, **shape)
    do, ds = cotangents(v, s0)
    seg = jnp.asarray(layout)
    (o, st), grads = forward_and_grads(impl, q, k, v, s0, chunk_size=chunk, segment_ids=seg, ct=(do, ds))
    (o_r, st_r), grads_r = per_document_truth(q, k, v, s0, do, ds, layout)
    assert o.dtype == dtype and st.dtype == jnp.float32 and grads[0].dtype == dtype
    errs = {"o": rel_err(o, o_r), "state": rel_err(st, st_r)}
    errs.update({n: rel_err(g, gr) for n, g, gr in zip(("dq", "dk", "dv", "ds0"), grads, grads_r)})
    bad = {n: e for n, e in errs.items() if not e <= tol}
    print(f"{impl} C={chunk} {jnp.dtype(dtype).name}: {errs}")  # shown with pytest -s
    assert not bad, f"{impl} C={chunk} {jnp.dtype(dtype).name}: errors above {tol}: {bad} (all: {errs})"


@pytest.mark.parametrize(
    "impl,chunk",
    [("reference", 16), ("recurrent", 16), ("xla", 16), ("xla", 3), ("pallas_tpu", 16)],
    ids=["reference", "recurrent", "xla", "xla-C3", "pallas_tpu"],
)
def test_fp32_packed_equals_per_document(impl, chunk):
    """C = 3 for xla: partial last chunk and two 16-chunk segments of the outer scan (the last one padded)."""
    _check(impl, jnp.float32, chunk, LAYOUT_64, 1e-5)


@pytest.mark.parametrize("impl", ["recurrent", "xla", "pallas_tpu"])
def test_bf16_packed_equals_per_document(impl):
    _check(impl, jnp.bfloat16, 16, LAYOUT_64, 2e-2)


@pytest.mark.parametrize(
    "dtype,d", [(jnp.bfloat16, 64), (jnp.float16, 64), (jnp.bfloat16, 128)], ids=["bf16", "fp16", "bf16-D128"]
)
def test_pallas_gpu_packed_equals_per_document(dtype, d):
    """Mosaic GPU kernels in interpret mode (16-bit only, C = 64), three chunks; D = 128 is SALA's
    head dim (the state update runs in two 64-row slices)."""
    _check("pallas_gpu", dtype, 64, LAYOUT_150, 2e-2, dk=d, dv=d)


def test_single_document_equals_no_segment_ids():
    """One id per row (any value) is today's computation, initial and final state included."""
    q, k, v, s0 = inputs(40)
    seg = jnp.full((2, 40), 5, jnp.int32)
    kw = dict(return_final_state=True, implementation="xla", chunk_size=16)
    run = jax.jit(lambda s0, seg=None: lightning_attention(q, k, v, LOG_DECAY, initial_state=s0, segment_ids=seg, **kw))
    (o, st), (o_n, st_n) = run(s0, seg), run(s0)
    assert rel_err(o, o_n) <= 1e-6 and rel_err(st, st_n) <= 1e-6


@pytest.mark.parametrize(
    "seg,match",
    [
        (np.zeros((2,), np.int32), r"segment_ids must have shape \[B, T\] = \(2, 8\)"),
        (np.zeros((2, 9), np.int32), r"segment_ids must have shape \[B, T\]"),
        (np.zeros((2, 8), np.float32), "segment_ids must have an integer dtype"),
        (np.zeros((2, 8), bool), "segment_ids must have an integer dtype"),
    ],
)
def test_bad_segment_ids(seg, match):
    q, k, v, _ = inputs(8)
    with pytest.raises(ValueError, match=match):
        lightning_attention(q, k, v, LOG_DECAY, segment_ids=jnp.asarray(seg))
