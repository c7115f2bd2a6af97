"""Packed rows (segment ids) in the Pallas kernels (interpret mode) vs the reference mask.

``block_sparse_attention`` with ``segment_ids`` for ``pallas_tpu`` and ``pallas_gpu``: forward and
gradients w.r.t. q, k, v against ``reference.block_sparse_attention`` (fp32 tight, bf16 loose), on
layouts that put segment boundaries inside blocks and on block edges, a padding segment (0) at
the end, rows of one batch with different layouts, and queries whose listed keys all lie in other
segments (output 0, zero dq, finite gradients). Block lists are random causal subsets (a row need
not list its own block), so empty rows occur. Then the whole sparse path of
``infllm_v2_attention`` with segment ids against the xla implementation.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from infllm_testutil import inputs, rel_err, small_config
from pallas_kernels.infllm_v2 import block_sparse_attention, infllm_v2_attention

T, BS, N = 96, 16, 3  # 6 blocks of 16, up to 3 listed blocks per token
PALLAS = ["pallas_tpu", "pallas_gpu"]


def _row(*runs):
    """Segment row from (segment id, length) runs."""
    return np.concatenate([np.full(n, s) for s, n in runs])


LAYOUTS = {
    "inside": [_row((1, 40), (2, 30), (3, 26))],  # boundaries at 40 and 70: inside blocks
    "edge": [_row((1, 32), (2, 48), (3, 16))],  # boundaries at 32 and 80: on block edges
    "pad_end": [_row((4, 50), (5, 27), (0, 19))],  # a padding segment 0 at the end
    "batch": [_row((1, 40), (2, 56)), _row((3, 16), (4, 64), (0, 16))],  # rows with different layouts
}
FOREIGN = [_row((1, 40), (2, 56))]  # tokens 40..47 and 50 list only blocks 0/1 (segment 1)
FOREIGN_ROWS = [*range(40, 48), 50]


def _blocks(batch, hkv, seed):
    """Random causal block lists [B, Hkv, T, N]: own block with p=0.7 plus up to 2 earlier blocks."""
    rng = np.random.default_rng(seed)
    out = np.full((batch, hkv, T, N), -1, np.int32)
    for idx in np.ndindex(batch, hkv, T):
        qb = idx[2] // BS
        ids = {qb} if rng.random() < 0.7 else set()
        ids |= set(rng.choice(qb + 1, size=min(qb + 1, rng.integers(0, N)), replace=False).tolist()) - {qb}
        ids = sorted(ids)[:N]
        out[idx][: len(ids)] = ids
    return out


def _case(name, seed=0):
    seg = np.stack(FOREIGN if name == "foreign" else LAYOUTS[name]).astype(np.int32)
    blocks = _blocks(seg.shape[0], 2, seed)
    if name == "foreign":
        blocks[:, :, FOREIGN_ROWS] = -1
        blocks[:, :, FOREIGN_ROWS, 0] = 0
        blocks[:, :, 40:48, 1] = 1
    return jnp.asarray(seg), jnp.asarray(blocks)


def _run(impl, q, k, v, blocks, seg, do):
    def loss(q, k, v):
        o = block_sparse_attention(q, k, v, blocks, block_size=BS, segment_ids=seg, implementation=impl, interpret=True)
        return jnp.sum(o.astype(jnp.float32) * do), o

    (_, o), g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return o, g


def _errors(o, g, o_r, g_r):
    return [rel_err(x.astype(jnp.float32), y) for x, y in zip((o, *g), (o_r, *g_r))]


@pytest.mark.parametrize("case", [*LAYOUTS, "foreign"])
@pytest.mark.parametrize("impl", PALLAS)
def test_segments_fp32(impl, case):
    seg, blocks = _case(case, seed=len(case))
    q, k, v, do = inputs(T, batch=seg.shape[0], extra=1, seed=21)
    o_r, g_r = _run("reference", q, k, v, blocks, seg, do)
    o, g = _run(impl, q, k, v, blocks, seg, do)
    errs = _errors(o, g, o_r, g_r)
    assert max(errs) <= 1e-5, dict(zip("oqkv", errs))
    assert all(bool(jnp.isfinite(x).all()) for x in (o, *g))
    if case == "foreign":  # every listed key is in another segment: no output, no dq
        np.testing.assert_array_equal(o[0, FOREIGN_ROWS], 0.0)
        np.testing.assert_array_equal(g[0][0, FOREIGN_ROWS], 0.0)
        np.testing.assert_array_equal(o_r[0, FOREIGN_ROWS], 0.0)


@pytest.mark.parametrize("impl", PALLAS)
def test_segments_bf16(impl):
    """bf16 inputs vs the fp32 reference on the same values; every layout in one batch."""
    rows = [r for name in LAYOUTS for r in LAYOUTS[name][:1]] + FOREIGN
    seg = jnp.asarray(np.stack(rows).astype(np.int32))
    blocks = jnp.asarray(_blocks(seg.shape[0], 2, seed=5))
    q, k, v, do = inputs(T, batch=seg.shape[0], extra=1, seed=22, dtype=jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o_r, g_r = _run("reference", *f32, blocks, seg, do)
    o, g = _run(impl, q, k, v, blocks, seg, do)
    assert o.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in g)
    errs = _errors(o, g, o_r, g_r)
    assert max(errs) <= 2e-2, dict(zip("oqkv", errs))


@pytest.mark.parametrize("impl", PALLAS)
def test_infllm_v2_attention_segments_match_xla(impl):
    """The sparse path (selection + attention) with segment ids: Pallas kernel == xla."""
    cfg = small_config()
    t = 128
    q, k, v, do = inputs(t, batch=2, extra=1, seed=23)
    seg = jnp.asarray(np.stack([_row((1, 45), (2, 64), (0, 19)), _row((3, 32), (4, 96))]).astype(np.int32))

    def run(i):
        def loss(q, k, v):
            o = infllm_v2_attention(q, k, v, config=cfg, segment_ids=seg, implementation=i, interpret=True)
            return jnp.sum(o * do), o

        return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)

    (_, o_x), g_x = run("xla")
    (_, o), g = run(impl)
    errs = _errors(o, g, o_x, g_x)
    assert max(errs) <= 1e-5, dict(zip("oqkv", errs))
