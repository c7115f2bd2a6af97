"""Every implementation against ``reference``: forward, final state and VJP grads (q, k, v, S₀)."""

import jax.numpy as jnp
import pytest

from lightning_helpers import forward_and_grads, inputs, rel_err

# (T, chunk_size): T = 1, 17, 64, 200, 1000 with full, partial-last and single-partial chunks.
CASES = [(1, 16), (17, 16), (64, 64), (200, 32), (200, 64), (1000, 64)]
IMPLS = ["recurrent", "xla", "pallas_tpu"]  # pallas_gpu (bf16/fp16 only) is tested below


def _check(impl, t, chunk, dtype, tol, **shape):
    q, k, v, s0 = inputs(t, dtype=dtype, **shape)
    (o, st), grads = forward_and_grads(impl, q, k, v, s0, chunk_size=chunk)
    # Ground truth: the fp32 reference on the (possibly bf16-rounded) inputs.
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (o_r, st_r), grads_r = forward_and_grads("reference", *f32, s0)
    assert o.dtype == dtype and st.dtype == jnp.float32
    assert grads[0].dtype == dtype and grads[3].dtype == jnp.float32
    errs = {"o": rel_err(o, o_r), "state": rel_err(st, st_r)}
    errs.update({n: rel_err(g, gr) for n, g, gr in zip(("dq", "dk", "dv", "ds0"), grads, grads_r)})
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"{impl} T={t} C={chunk} {dtype.__name__}: errors above {tol}: {bad}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t,chunk", CASES)
def test_fp32_matches_reference(impl, t, chunk):
    _check(impl, t, chunk, jnp.float32, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t,chunk", [(17, 16), (200, 64)])
def test_bf16_matches_reference(impl, t, chunk):
    _check(impl, t, chunk, jnp.bfloat16, 2e-2)


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_all_32_sala_heads(impl):
    """All 32 SALA decay slopes at once (head 0's inter-chunk term underflows to 0)."""
    from lightning_helpers import SALA_SLOPES

    q, k, v, s0 = inputs(150, b=1, h=32, dk=8, dv=8)
    ld = -jnp.asarray(SALA_SLOPES)
    (o, st), grads = forward_and_grads(impl, q, k, v, s0, log_decay=ld, chunk_size=64)
    (o_r, st_r), grads_r = forward_and_grads("reference", q, k, v, s0, log_decay=ld)
    assert rel_err(o, o_r) <= 1e-5 and rel_err(st, st_r) <= 1e-5
    assert max(rel_err(g, gr) for g, gr in zip(grads, grads_r)) <= 1e-5


@pytest.mark.parametrize("t", [1, 17, 64, 200, 1000])
def test_pallas_gpu_bf16_matches_reference(t):
    """Mosaic GPU kernels (interpret mode): bf16 WGMMA operands, 64-wide heads, C = 64."""
    _check("pallas_gpu", t, 64, jnp.bfloat16, 2e-2, b=1, h=4, dk=64, dv=64)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_pallas_gpu_sala_head_dim(dtype):
    """D = 128 (SALA's Lightning head dim), 16-bit q/k/v with an fp32 initial state and fp32
    state gradient; fp32 inputs are refused (see ``test_pallas_gpu_limits``)."""
    _check("pallas_gpu", 150, 64, dtype, 2e-2, b=1, dk=128, dv=128)


def test_xla_many_chunk_groups():
    """N = 38 chunks: three 16-chunk segments of the outer scan, the last one padded."""
    _check("xla", 600, 16, jnp.float32, 1e-5)
