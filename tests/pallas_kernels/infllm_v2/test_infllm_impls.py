"""Every implementation against `reference`: forward and gradients, fp32 and bf16."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from infllm_testutil import inputs, jitted, overlap, rel_err, small_config
from pallas_kernels.infllm_v2 import InfLLMv2Config, block_sparse_attention, infllm_v2_attention
from pallas_kernels.infllm_v2 import attention_blocks, select_blocks

IMPLS = ["xla", "pallas_tpu", "pallas_gpu"]


def _loss_and_grads(impl, q, k, v, sel, block_size, do):
    def loss(q, k, v):
        o = block_sparse_attention(q, k, v, sel, block_size=block_size, implementation=impl, interpret=True)
        return jnp.sum(o.astype(jnp.float32) * do), o

    (_, o), g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return o, g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gen", ["B", "A"])
def test_attention_fp32_fwd_and_grads(impl, gen):
    cfg = small_config(generation=gen, lse_approx=gen == "B")
    t = 175
    q, k, v, do = inputs(t, batch=2, extra=1, seed=11)
    sel = jitted(infllm_v2_attention, config=cfg, implementation="xla", return_selection=True)(q, k, v)[1]
    blocks = attention_blocks(sel, jnp.arange(t), cfg, cfg.num_blocks(t))
    o_r, g_r = _loss_and_grads("reference", q, k, v, blocks, cfg.block_size, do)
    o, g = _loss_and_grads(impl, q, k, v, blocks, cfg.block_size, do)
    assert rel_err(o, o_r) <= 1e-5
    for name, a, b in zip("qkv", g, g_r):
        assert rel_err(a, b) <= 1e-5, name


@pytest.mark.parametrize("impl,gen", [("xla", "B"), ("xla", "A"), ("pallas_tpu", "B"), ("pallas_gpu", "A")])
def test_end_to_end_matches_reference(impl, gen):
    """Whole pipeline (selection + attention) with selection keys, fp32, forward and gradients.

    Through the api the xla path shares the forced blocks per chunk (``shared``)."""
    cfg = small_config(generation=gen)
    q, k, v, qs, do = inputs(143, extra=2, seed=2)
    ks = k * 0.5 + 0.1

    def run(i):
        def loss(q, k, v):
            o, sel = infllm_v2_attention(
                q, k, v, config=cfg, implementation=i, interpret=True, return_selection=True, q_select=qs, k_select=ks
            )
            return jnp.sum(o * do), (o, sel)

        return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)

    (_, (o_r, sel_r)), g_r = run("reference")
    (_, (o, sel)), g = run(impl)
    np.testing.assert_array_equal(sel, sel_r)
    assert rel_err(o, o_r) <= 1e-5
    for a, b in zip(g, g_r):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gen", ["B", "A"])
def test_bf16(impl, gen):
    """bf16 inputs vs the fp32 reference on the same (bf16-rounded) values.

    Selections must overlap >= 99%. Outputs are compared end to end for gen B (identical selection
    here); a row whose selection differs has a legitimately different output, so outputs and
    gradients are also compared with the same block lists (both generations)."""
    cfg = small_config(generation=gen)
    t = 207
    q, k, v, do = inputs(t, extra=1, seed=4, dtype=jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o_r, sel_r = jitted(infllm_v2_attention, config=cfg, implementation="reference", return_selection=True)(*f32)
    o, sel = jitted(infllm_v2_attention, config=cfg, implementation=impl, interpret=True, return_selection=True)(
        q, k, v
    )
    assert o.dtype == jnp.bfloat16
    assert overlap(sel, sel_r) >= 0.99
    if gen == "B":
        assert rel_err(o.astype(jnp.float32), o_r) <= 2e-2
    blocks = attention_blocks(sel, jnp.arange(t), cfg, cfg.num_blocks(t))
    o_b, g = _loss_and_grads(impl, q, k, v, blocks, cfg.block_size, do)
    o_s, g_r = _loss_and_grads("reference", *f32, blocks, cfg.block_size, do)
    assert rel_err(o_b.astype(jnp.float32), o_s) <= 2e-2
    for a, b in zip(g, g_r):
        assert a.dtype == jnp.bfloat16 and rel_err(a.astype(jnp.float32), b) <= 2e-2


def test_segment_ids_xla():
    """Packed rows: no attention across segments; the xla path matches the reference mask."""
    cfg = small_config()
    t = 160
    q, k, v, do = inputs(t, extra=1, seed=8)
    seg = jnp.asarray(np.repeat([[0, 1, 2]], [70, 50, 40], axis=1).reshape(1, t), jnp.int32)
    sel = jitted(select_blocks, config=cfg)(q, k, segment_ids=seg)
    run = lambda impl: jax.jit(
        jax.value_and_grad(
            lambda q, k, v: jnp.sum(
                block_sparse_attention(q, k, v, sel, block_size=16, segment_ids=seg, implementation=impl) * do
            ),
            (0, 1, 2),
        )
    )(q, k, v)
    (l_r, g_r), (l_x, g_x) = run("reference"), run("xla")
    assert abs(float(l_x - l_r)) <= 1e-4 * abs(float(l_r))
    for a, b in zip(g_x, g_r):
        assert rel_err(a, b) <= 1e-5
    # The first token of segment 1 only sees itself: output == its value row.
    o = block_sparse_attention(q, k, v, sel, block_size=16, segment_ids=seg, implementation="xla")
    np.testing.assert_allclose(o[0, 70, :2], jnp.broadcast_to(v[0, 70, 0], (2, 16)), rtol=1e-5)


def test_full_size_parameters():
    """The spec's kernel/block sizes (32/16/64) with a smaller window and top-k, T % 64 != 0."""
    cfg = InfLLMv2Config(window_size=256, topk=6, dense_len=-1)
    q, k, v = inputs(1500, hq=4, hkv=1, d=32, seed=9)
    o_r, sel_r = jitted(infllm_v2_attention, config=cfg, implementation="reference", return_selection=True)(q, k, v)
    for impl in IMPLS:
        o, sel = jitted(infllm_v2_attention, config=cfg, implementation=impl, interpret=True, return_selection=True)(
            q, k, v
        )
        np.testing.assert_array_equal(sel, sel_r)
        assert rel_err(o, o_r) <= 1e-5, impl
    assert sel_r.shape[-1] == 6 + 4


def test_pallas_tpu_grouped_calls():
    """A tiny SMEM budget splits tiles / key blocks over several pallas_calls: same results."""
    from pallas_kernels.infllm_v2 import pallas_tpu

    cfg = small_config()
    t = 120
    q, k, v, do = inputs(t, extra=1, seed=13)
    sel = jitted(select_blocks, config=cfg)(q, k)

    def run(smem_bytes):
        def loss(q, k, v):
            o = pallas_tpu.block_sparse_attention(q, k, v, sel, block_size=16, interpret=True, smem_bytes=smem_bytes)
            return jnp.sum(o * do)

        return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)

    (l1, g1), (l2, g2) = run(1 << 20), run(3 * 4 * 2 * 9)  # 1 group vs groups of 3 tiles / blocks
    assert abs(float(l1 - l2)) <= 1e-5 * abs(float(l1))
    for a, b in zip(g1, g2):
        assert rel_err(a, b) <= 1e-6
