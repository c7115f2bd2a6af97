"""Full budget equals dense causal attention; the dense_len switch is exact."""

import numpy as np
import pytest
import jax.numpy as jnp

import infllm_numpy_ref as npref
from infllm_testutil import inputs, jitted, rel_err, small_config
from pallas_kernels.infllm_v2 import dense_causal_attention, infllm_v2_attention, reference


@pytest.mark.parametrize(
    "impl,gen", [(i, g) for i in ("reference", "xla", "pallas_tpu") for g in "BA"] + [("pallas_gpu", "B")]
)
def test_full_budget_equals_dense(impl, gen):
    t = 150  # 10 blocks of 16
    cfg = small_config(topk=12, generation=gen)  # topk >= number of blocks
    q, k, v = inputs(t, seed=1)
    out, sel = jitted(infllm_v2_attention, config=cfg, implementation=impl, interpret=True, return_selection=True)(
        q, k, v
    )
    dense = jitted(reference.dense_attention)(q, k, v)
    qb = np.arange(t) // 16
    expect = np.where(np.arange(sel.shape[-1])[None] <= qb[:, None], np.arange(sel.shape[-1]), -1)
    if gen == "B":
        np.testing.assert_array_equal(np.asarray(sel)[0, 0], expect)
    assert rel_err(out, dense) <= 1e-5


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas_tpu"])
def test_dense_len_switch(impl):
    cfg = small_config(dense_len=128)
    q, k, v = inputs(128, seed=6)
    f = jitted(infllm_v2_attention, config=cfg, implementation=impl, interpret=True, return_selection=True)
    below, sel_below = f(q[:, :127], k[:, :127], v[:, :127])  # 127 < dense_len: dense
    assert sel_below is None
    np.testing.assert_allclose(
        below, jitted(reference.dense_attention)(q[:, :127], k[:, :127], v[:, :127]), rtol=1e-5, atol=1e-6
    )
    at, sel_at = f(q, k, v)  # 128 == dense_len: sparse
    sparse = jitted(infllm_v2_attention, config=small_config(), implementation="reference")(q, k, v)
    np.testing.assert_allclose(at, sparse, rtol=1e-5, atol=1e-6)
    assert sel_at is not None and rel_err(at[:, 100:127], below[:, 100:]) > 1e-3  # really sparse


def test_dense_matches_numpy_and_chunks():
    """The flash-style jnp dense path equals the spec's dense path (odd T, query and key blocks of different sizes)."""
    q, k, v = inputs(203, hq=4, hkv=1, d=8, seed=2)
    o_np, _ = npref.infllmv2_attention(
        *(np.asarray(x[0], np.float64) for x in (q, k, v)), block_size=16, dense_len=10_000
    )
    o = jitted(dense_causal_attention, q_chunk=32, kv_chunk=16)(q, k, v)
    assert rel_err(o[0], o_np) <= 1e-5
    seg = jnp.asarray((np.arange(203) >= 90).astype(np.int32))[None]
    o_s = jitted(dense_causal_attention, q_chunk=32, kv_chunk=16)(q, k, v, segment_ids=seg)
    o_r = jitted(reference.dense_attention)(q, k, v, segment_ids=seg)
    assert rel_err(o_s, o_r) <= 1e-5
