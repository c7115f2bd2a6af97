"""causal_attention: every CPU-runnable implementation against the plain reference (forward and
gradient, fp32 and bf16, GQA, packed rows, T not a multiple of the block), TPU/CUDA lowering, errors,
and memory that grows linearly in T (compile-only memory analysis). The reference itself (GQA
folded into the query rows), and the KV-cache attention built on the same fold, against a per-head
NumPy version with K/V repeated explicitly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from minicpm_jax.model.attention import cache_attention
from minicpm_jax.model.dense_attention import (
    causal_attention,
    causal_mask,
    dot_product_attention,
    fold_groups,
    unfold_groups,
)

B, T, HQ, HKV, D = 2, 200, 6, 2, 16  # GQA groups of 3; T = 3 blocks of 64 + 8
SEGMENTS = np.array([[1] * 37 + [2] * 100 + [3] * 63, [5] * 150 + [0] * 50], np.int32)  # packed, then padding
CPU_IMPLS = {
    "blockwise": {"implementation": "blockwise", "block_size": 64},
    "splash": {"implementation": "splash", "interpret": True},
    "cudnn_packed": {"implementation": "cudnn"},  # with segment ids: the documented blockwise fallback
}


def _inputs(dtype, t=T):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, t, HQ, D), dtype)
    k = jax.random.normal(ks[1], (B, t, HKV, D), dtype)
    v = jax.random.normal(ks[2], (B, t, HKV, D), dtype)
    w = jax.random.normal(ks[3], (B, t, HQ, D), jnp.float32)  # cotangent weights: loss = sum(w * out)
    return q, k, v, w


def _value_and_grads(kwargs, q, k, v, w, segment_ids):
    """``(out, dq, dk, dv)`` of ``loss = sum(w * out)``, one jit."""

    def run(q, k, v, w, segment_ids):
        loss = lambda q, k, v: jnp.sum(w * causal_attention(q, k, v, segment_ids, **kwargs).astype(jnp.float32))
        return (causal_attention(q, k, v, segment_ids, **kwargs), *jax.grad(loss, argnums=(0, 1, 2))(q, k, v))

    return jax.jit(run)(q, k, v, w, segment_ids)


CASES = [(name, seg) for name in ("blockwise", "splash") for seg in (False, True)] + [("cudnn_packed", True)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name,segments", CASES, ids=[f"{n}-{'packed' if s else 'one_doc'}" for n, s in CASES])
def test_matches_reference(name, segments, dtype):
    q, k, v, w = _inputs(dtype)
    seg = jnp.asarray(SEGMENTS) if segments else None
    # the ground truth: the reference in fp32 on the same (possibly bf16-rounded) inputs
    ref = _value_and_grads({"implementation": "reference"}, *(x.astype(jnp.float32) for x in (q, k, v)), w, seg)
    got = _value_and_grads(CPU_IMPLS[name], q, k, v, w, seg)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for what, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert g.dtype == dtype, what
        scale = float(jnp.abs(r).max())
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=tol * scale, rtol=tol, err_msg=what)


def _numpy_attention(q, k, v, mask):
    """float64, one query head at a time: head ``i`` against KV head ``i // G`` (K/V repeated)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.asarray(mask)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


def _gqa_inputs(kv_heads, t, s, hq=4, d=8):
    rng = np.random.default_rng(kv_heads)
    q = rng.standard_normal((2, t, hq, d), np.float32)
    k, v = (rng.standard_normal((2, s, kv_heads, d), np.float32) for _ in range(2))
    return q, k, v


def test_fold_groups_row_order():
    """Query head ``h*G + g`` at position ``t`` is row ``t*G + g`` of KV head ``h``; unfold inverts."""
    q = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 6, 3)), jnp.float32)
    folded = fold_groups(q, 2)
    assert folded.shape == (2, 2, 15, 3)
    for t, h, g in ((0, 0, 0), (4, 1, 2), (2, 0, 1), (3, 1, 0)):
        np.testing.assert_array_equal(folded[:, h, t * 3 + g], q[:, t, h * 3 + g])
    np.testing.assert_array_equal(unfold_groups(folded, 5), q)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["gqa1", "gqa2", "gqa4"])
def test_folded_attention_matches_per_head_numpy(kv_heads):
    """``dot_product_attention`` and the reference ``causal_attention`` (causal mask with packed
    segments and padding), and ``cache_attention`` (rows at different cache offsets, several key
    blocks, the last one overlapping), all equal the per-head NumPy attention in fp32."""
    t = 24
    q, k, v = _gqa_inputs(kv_heads, t, t)
    seg = np.array([[1] * 5 + [2] * 12 + [3] * 7, [4] * 18 + [0] * 6], np.int32)
    idx = np.arange(t)
    mask = (idx[:, None] >= idx[None, :]) & (seg[:, :, None] == seg[:, None, :])
    want = _numpy_attention(q, k, v, mask)
    np.testing.assert_array_equal(causal_mask(jnp.asarray(seg), 2, t), mask)
    got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    ref = causal_attention(*map(jnp.asarray, (q, k, v, seg)), implementation="reference")
    np.testing.assert_allclose(ref, want, atol=1e-6, rtol=1e-6)

    q, k, v = _gqa_inputs(kv_heads, 6, 40)
    positions = np.stack([np.arange(30, 36), np.arange(3, 9)])  # row 0 reaches the last (overlapping) block
    want = _numpy_attention(q, k, v, np.arange(40)[None, None, :] <= positions[:, :, None])
    for block in (16, 40):
        got = cache_attention(*map(jnp.asarray, (q, k, v, positions)), block)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6, err_msg=f"block {block}")


def test_packed_documents_are_independent():
    """A packed row equals its documents attended one by one."""
    q, k, v, _ = _inputs(jnp.float32)
    seg = jnp.asarray(SEGMENTS)
    out = causal_attention(q, k, v, seg, implementation="blockwise", block_size=64)
    for lo, hi in ((0, 37), (37, 137), (137, 200)):
        alone = causal_attention(q[:1, lo:hi], k[:1, lo:hi], v[:1, lo:hi], implementation="reference")
        np.testing.assert_allclose(out[:1, lo:hi], alone, atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_is_blockwise():
    q, k, v, _ = _inputs(jnp.float32)
    seg = jnp.asarray(SEGMENTS)
    np.testing.assert_array_equal(
        causal_attention(q, k, v, seg), causal_attention(q, k, v, seg, implementation="blockwise")
    )


def test_bad_implementation_name():
    q, k, v, _ = _inputs(jnp.float32, t=8)
    with pytest.raises(ValueError, match=r"implementation='flash'.*'reference', 'blockwise', 'cudnn', 'splash'"):
        causal_attention(q, k, v, implementation="flash")


# ---- lowering for real hardware (MiniCPM4-0.5B head shapes) --------------------------------------

LB, LT, LHQ, LHKV, LD = 1, 4096, 16, 2, 64


def _lowering_avals(dtype=jnp.bfloat16):
    q = jax.ShapeDtypeStruct((LB, LT, LHQ, LD), dtype)
    kv = jax.ShapeDtypeStruct((LB, LT, LHKV, LD), dtype)
    return q, kv, kv, jax.ShapeDtypeStruct((LB, LT), jnp.int32)


def _fwd_bwd(implementation, segments):
    def fwd(q, k, v, seg):
        return causal_attention(q, k, v, seg if segments else None, implementation=implementation)

    def bwd(q, k, v, seg, do):
        return jax.vjp(lambda q, k, v: fwd(q, k, v, seg), q, k, v)[1](do)

    return fwd, bwd


@pytest.mark.lowering
@pytest.mark.parametrize("segments", [False, True])
def test_splash_lowers_for_tpu(segments):
    fwd, bwd = _fwd_bwd("splash", segments)
    avals = _lowering_avals()
    e = export.export(jax.jit(fwd), platforms=["tpu"])(*avals)
    assert e.mlir_module().count("tpu_custom_call") == 1
    assert e.out_avals[0].shape == avals[0].shape
    e = export.export(jax.jit(bwd), platforms=["tpu"])(*avals, avals[0])
    assert e.mlir_module().count("tpu_custom_call") == 3  # forward (residuals), dq, dkv
    assert [a.shape for a in e.out_avals] == [a.shape for a in avals[:3]]
    assert len(e.serialize()) > 0


@pytest.mark.lowering
def test_blockwise_lowers_for_cuda():
    """The GPU path of packed rows (cuDNN has no segment ids) is the XLA blockwise one."""
    _fwd, bwd = _fwd_bwd("cudnn", segments=True)
    avals = _lowering_avals()
    e = export.export(jax.jit(bwd), platforms=["cuda"])(*avals, avals[0])
    assert "cudnn" not in e.mlir_module()
    assert [a.shape for a in e.out_avals] == [a.shape for a in avals[:3]]


# ---- memory: linear in T for blockwise, quadratic for reference ----------------------------------


def _attention_temp_bytes(implementation, t):
    """Temp bytes of the compiled forward + backward of one tiny attention call (compile only)."""
    q = jax.ShapeDtypeStruct((1, t, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def loss(q, k, v, seg):
        return causal_attention(q, k, v, seg, implementation=implementation, block_size=128).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return step.lower(q, kv, kv, seg).compile().memory_analysis().temp_size_in_bytes


def test_memory_grows_linearly():
    """Growth per doubling of T: doubles for blockwise (a + bT), quadruples for reference (+ cT^2)."""
    for implementation, lo, hi in (("blockwise", 1.7, 2.3), ("reference", 3.4, 8.0)):
        m1, m2, m3 = (_attention_temp_bytes(implementation, t) for t in (512, 1024, 2048))
        assert lo <= (m3 - m2) / (m2 - m1) <= hi, (implementation, m1, m2, m3)


def test_tiny_model_train_step_memory_grows_linearly():
    """The whole tiny-MiniCPM4 train step (forward, backward, AdamW) as the model runs it on CPU
    (``auto``: blockwise dense attention), compile only, batch 1: its temp memory grows by the same
    amount per added token."""
    from minicpm_jax.config import MeshConfig, load_config
    from minicpm_jax.train.plan import plan_train_memory

    overrides = ["dtype=float32", "model.max_position_embeddings=8192", "train.loss_chunk_size=256"]
    cfg = load_config("tiny-minicpm4", overrides)
    m1, m2, m3 = (plan_train_memory(cfg, [MeshConfig(fsdp=1)], [1], t)[0].temp_bytes for t in (2048, 4096, 8192))
    assert 1.7 <= (m3 - m2) / (m2 - m1) <= 2.3, (m1, m2, m3)
