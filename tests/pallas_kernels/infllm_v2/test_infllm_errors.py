"""Bad configurations and inputs raise a clear ValueError naming the argument."""

import pytest
import jax
import jax.numpy as jnp

from infllm_testutil import small_config
from pallas_kernels.infllm_v2 import IMPLEMENTATIONS, InfLLMv2Config, block_sparse_attention, infllm_v2_attention
from pallas_kernels.infllm_v2 import resolve_implementation


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(kernel_size=30), "kernel_size=30 must equal 2 \\* kernel_stride"),
        (dict(block_size=24, kernel_stride=16, kernel_size=32), "block_size=24 must be a multiple of kernel_stride"),
        (dict(window_size=100), "window_size=100 must be a multiple of block_size"),
        (dict(topk=0), "topk=0 must be a positive int"),
        (dict(init_blocks=4, topk=1, window_size=64), "topk=1: topk \\+ local_blocks"),
        (dict(generation="C"), "generation='C'"),
        (dict(dense_len=-5), "dense_len=-5"),
        (dict(block_size=0), "block_size=0"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        InfLLMv2Config(**kw)


def test_gen_a_topk_below_init():
    with pytest.raises(ValueError, match="topk=1 is smaller than init_blocks=2"):
        InfLLMv2Config(generation="A", topk=1, init_blocks=2)


def _qkv(t=64, hq=4, hkv=2, d=16, dtype=jnp.float32):
    return (jnp.zeros((1, t, hq, d), dtype), jnp.zeros((1, t, hkv, d), dtype), jnp.zeros((1, t, hkv, d), dtype))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda q, k, v: (jnp.zeros((1, 64, 3, 16)), k, v), "q heads \\(3\\) must be a multiple of k heads"),
        (lambda q, k, v: (q, k, v.astype(jnp.bfloat16)), "dtypes must match"),
        (lambda q, k, v: (q, k[:, :32], v[:, :32]), "must agree on batch, length and head_dim"),
        (lambda q, k, v: (q, k, v[..., :8]), "k .* and v .* must have the same shape"),
        (lambda q, k, v: (q[0], k, v), "q must be \\[B, T, H, D\\]"),
        (lambda q, k, v: (q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32)), "must be floating"),
    ],
)
def test_bad_inputs(change, match):
    with pytest.raises(ValueError, match=match):
        infllm_v2_attention(*change(*_qkv()), config=small_config())


def test_bad_optional_inputs():
    q, k, v = _qkv()
    cfg = small_config()
    with pytest.raises(ValueError, match="q_select shape"):
        infllm_v2_attention(q, k, v, config=cfg, q_select=q[:, :, :2])
    with pytest.raises(ValueError, match="k_select shape"):
        infllm_v2_attention(q, k, v, config=cfg, k_select=q)
    with pytest.raises(ValueError, match="segment_ids shape"):
        infllm_v2_attention(q, k, v, config=cfg, segment_ids=jnp.zeros((1, 63), jnp.int32))
    with pytest.raises(ValueError, match="config must be an InfLLMv2Config"):
        infllm_v2_attention(q, k, v, config=dict(topk=3))
    with pytest.raises(ValueError, match="implementation='cuda'"):
        infllm_v2_attention(q, k, v, config=cfg, implementation="cuda")
    sel = jnp.zeros((1, 2, 64, 1), jnp.int32)
    for bad in (jnp.zeros((1, 63), jnp.int32), jnp.zeros((1, 64), jnp.float32)):
        with pytest.raises(ValueError, match="segment_ids \\(shape .* must be integer \\[B, T\\] = \\[1, 64\\]"):
            block_sparse_attention(q, k, v, sel, block_size=16, segment_ids=bad, implementation="pallas_tpu")
    with pytest.raises(ValueError, match="block_idx shape"):
        block_sparse_attention(q, k, v, jnp.zeros((1, 4, 64, 1), jnp.int32), block_size=16)
    with pytest.raises(ValueError, match="block_idx dtype"):
        block_sparse_attention(q, k, v, jnp.zeros((1, 2, 64, 1)), block_size=16)


def test_segment_ids_accepted_by_every_implementation(monkeypatch):
    """Segment ids never change the choice: "auto" is xla on CPU and pallas_tpu on TPU."""
    seg = jnp.zeros((1, 64), jnp.int32)
    for impl in IMPLEMENTATIONS:
        assert resolve_implementation(impl, seg) == impl
    assert resolve_implementation("auto", seg) == resolve_implementation("auto") == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_implementation("auto", seg) == resolve_implementation("auto") == "pallas_tpu"


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_pallas_interprets_by_default_on_cpu(impl):
    """interpret=None runs the Pallas kernels in interpret mode on CPU (no hardware error)."""
    q, k, v = _qkv(t=32, d=8)
    sel = jnp.zeros((1, 2, 32, 1), jnp.int32)
    out = block_sparse_attention(q + 1.0, k, v + 2.0, sel, block_size=16, implementation=impl)
    assert jnp.allclose(out, 2.0)  # values are all 2 in the only selected block
