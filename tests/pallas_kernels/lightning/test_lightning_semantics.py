"""Semantics: NumPy float64 recurrence vs ``reference``, ALiBi slopes, state continuation, decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_helpers import LOG_DECAY, inputs, rel_err
from pallas_kernels.lightning import alibi_slopes, lightning_attention, lightning_decode_step

# jit once per static configuration (eager calls would compile every op separately).
attend = jax.jit(
    lightning_attention, static_argnames=("scale", "return_final_state", "chunk_size", "implementation", "interpret")
)


def numpy_recurrence(q, k, v, log_decay, s0, scale):
    """The spec's recurrence in float64: S_t = exp(g)·S_{t−1} + k_tᵀ v_t; o_t = scale·q_t S_t."""
    q, k, v, s = (np.asarray(x, np.float64) for x in (q, k, v, s0))
    lam = np.exp(np.asarray(log_decay, np.float64))[None, :, None, None]
    out = np.zeros(v.shape)
    for t in range(q.shape[1]):
        s = lam * s + k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = np.einsum("bhd,bhdv->bhv", scale * q[:, t], s)
    return out, s


@pytest.mark.parametrize("t", [1, 17, 64, 200])
def test_reference_matches_float64_recurrence(t):
    q, k, v, s0 = inputs(t)
    o, st = attend(q, k, v, LOG_DECAY, initial_state=s0, return_final_state=True, implementation="reference")
    o_np, st_np = numpy_recurrence(q, k, v, LOG_DECAY, s0, q.shape[-1] ** -0.5)
    assert rel_err(o, o_np) <= 2e-6 and rel_err(st, st_np) <= 2e-6


def test_custom_scale_and_default_state():
    q, k, v, _ = inputs(33)
    o = attend(q, k, v, LOG_DECAY, scale=0.3, implementation="xla", chunk_size=16)
    o_np, _ = numpy_recurrence(q, k, v, LOG_DECAY, np.zeros((2, 4, 16, 8)), 0.3)
    assert rel_err(o, o_np) <= 1e-5


def test_alibi_slopes():
    s = alibi_slopes(32)
    np.testing.assert_allclose(s, 2.0 ** (-(np.arange(32) + 1) / 4), rtol=1e-6)
    assert s.dtype == np.float32
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -(np.arange(8) + 1.0), rtol=1e-6)
    # Non-power-of-two: slopes of 8 heads, then every other slope of 16 heads.
    s12 = alibi_slopes(12)
    np.testing.assert_allclose(s12[:8], alibi_slopes(8), rtol=1e-6)
    np.testing.assert_allclose(s12[8:], alibi_slopes(16)[0::2][:4], rtol=1e-6)
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)


@pytest.mark.parametrize(
    "impl,chunk,dtype,tol,shape",
    [
        ("xla", 16, jnp.float32, 1e-5, {}),
        ("recurrent", 16, jnp.float32, 1e-5, {}),
        ("pallas_tpu", 16, jnp.float32, 1e-5, {}),
        ("pallas_gpu", 64, jnp.bfloat16, 2e-2, dict(b=1, dk=64, dv=64)),
    ],
)
def test_state_continuation(impl, chunk, dtype, tol, shape):
    """(T1 + T2) in one call equals T2 started from the final state of T1."""
    q, k, v, s0 = inputs(45, dtype=dtype, **shape)
    kw = dict(
        return_final_state=True,
        implementation=impl,
        chunk_size=chunk,
        interpret=True if impl.startswith("pallas") else None,
    )
    o_all, st_all = attend(q, k, v, LOG_DECAY, initial_state=s0, **kw)
    o1, st1 = attend(q[:, :21], k[:, :21], v[:, :21], LOG_DECAY, initial_state=s0, **kw)
    o2, st2 = attend(q[:, 21:], k[:, 21:], v[:, 21:], LOG_DECAY, initial_state=st1, **kw)
    assert rel_err(jnp.concatenate([o1, o2], axis=1), o_all) <= tol
    assert rel_err(st2, st_all) <= tol


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_decode_steps_equal_prefill(dtype, tol):
    q, k, v, s0 = inputs(20, dtype=dtype)
    o_pre, st_pre = attend(q, k, v, LOG_DECAY, initial_state=s0, return_final_state=True, implementation="xla")
    step = jax.jit(lambda *a: lightning_decode_step(*a))
    state, outs = s0, []
    for t in range(q.shape[1]):
        o_t, state = step(q[:, t], k[:, t], v[:, t], LOG_DECAY, state)
        outs.append(o_t)
    assert outs[0].dtype == dtype and state.dtype == jnp.float32
    assert rel_err(jnp.stack(outs, axis=1), o_pre) <= tol
    assert rel_err(state, st_pre) <= 1e-5


def test_strong_decay_no_overflow():
    """Long chunk with the fastest slope: factors never form λ^{−j}, so no inf/nan."""
    q, k, v, s0 = inputs(512, b=1, h=1, dk=8, dv=8)
    ld = jnp.asarray([-20.0])
    o, st = attend(q, k, v, ld, initial_state=s0, return_final_state=True, implementation="xla", chunk_size=256)
    ref, st_r = attend(q, k, v, ld, initial_state=s0, return_final_state=True, implementation="reference")
    assert np.all(np.isfinite(np.asarray(o))) and rel_err(o, ref) <= 1e-5
    assert rel_err(st, st_r) <= 1e-5
