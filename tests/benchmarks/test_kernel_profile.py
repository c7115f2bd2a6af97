"""benchmarks/kernel_profile.py: the profiled stages compute what the kernels compute, and time every stage."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernel_profile import (
    SPARSE_STAGES,
    infllm_sparse_stages,
    lightning_stage_fns,
    lightning_stages,
    sparse_stage_fns,
)
from pallas_kernels.infllm_v2 import InfLLMv2Config, infllm_v2_attention
from pallas_kernels.lightning import alibi_slopes, lightning_attention
from pallas_kernels.lightning import xla as lightning_xla

CFG = InfLLMv2Config(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=4, dense_len=-1)


def _qkv(t, hq, hkv, d=16):
    ks = jax.random.split(jax.random.key(t), 3)
    return (jax.random.normal(ks[0], (1, t, hq, d)), *(jax.random.normal(kk, (1, t, hkv, d)) for kk in ks[1:]))


def test_lightning_stages_compose_to_the_kernel():
    q, k, v = _qkv(200, 2, 2)
    log_decay = -jnp.asarray(alibi_slopes(2))
    stages = lightning_stage_fns(q, k, v, log_decay, chunk=32)
    fn, args = stages["P V + Q S outputs"]
    got = lightning_xla._from_n(fn(*args))[:, : q.shape[1]]  # T=200 at chunk 32 is one segment
    want = lightning_attention(q, k, v, log_decay, implementation="reference")
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    prof = lightning_stages(q, k, v, log_decay, chunk=32, repeats=1)
    assert set(prof["stages_s"]) == set(stages) and all(s > 0 for s in prof["stages_s"].values())
    assert prof["batched_matmul"]["shape"] == [7 * 2, 32, 16, 16]
    assert prof["matmul_floor_s"] > 0 and prof["forward_s"] > 0


def test_sparse_stages_compute_the_gathered_part():
    q, k, v = _qkv(160, 4, 2)
    fns, args, q0 = sparse_stage_fns(q, k, v, CFG, chunk=16)
    assert 0 < q0 < q.shape[1]  # a real gathered part past the dense prefix
    o = fns["full"](*args)  # [nc, B, Hkv, C, G, D]
    got = o.transpose(1, 0, 3, 2, 4, 5).reshape(1, -1, 4, 16)[:, : q.shape[1] - q0]
    want = infllm_v2_attention(q, k, v, config=CFG, implementation="reference")[:, q0:]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    prof = infllm_sparse_stages(q, k, v, CFG, repeats=1)
    assert prof["queries"] == q.shape[1] - q0
    assert list(prof["cumulative_s"]) == list(SPARSE_STAGES)
    assert math.isclose(sum(prof["stages_s"].values()), prof["cumulative_s"]["full"])
