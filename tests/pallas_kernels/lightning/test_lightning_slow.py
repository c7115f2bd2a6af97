"""Slow checks (``pytest -m slow``): the TPU interpreter with race detection, and a long sequence."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from lightning_helpers import LOG_DECAY, _vjp_fn, forward_and_grads, inputs, rel_err


@pytest.mark.slow
def test_pallas_tpu_under_tpu_interpreter():
    """Simulated TPU memory: races, out-of-bounds reads and uninitialised (NaN) memory are caught."""
    params = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan")
    q, k, v, s0 = inputs(100, b=1, h=2, dk=16, dv=16)
    ld = LOG_DECAY[:2]
    fn = _vjp_fn("pallas_tpu", 16, params, tuple(np.asarray(ld).tolist()))
    do, ds = jnp.ones_like(v), jnp.ones_like(s0)
    (o, st), grads = fn(q, k, v, s0, do, ds)
    ref = _vjp_fn("reference", 16, None, tuple(np.asarray(ld).tolist()))
    (o_r, st_r), grads_r = ref(q, k, v, s0, do, ds)
    assert rel_err(o, o_r) <= 1e-5 and rel_err(st, st_r) <= 1e-5
    assert max(rel_err(a, b) for a, b in zip(grads, grads_r)) <= 1e-5


@pytest.mark.slow
def test_xla_long_sequence_matches_recurrent():
    q, k, v, s0 = inputs(8192, b=1, h=4, dk=32, dv=32)
    (o, st), grads = forward_and_grads("xla", q, k, v, s0)
    (o_r, st_r), grads_r = forward_and_grads("recurrent", q, k, v, s0)
    assert rel_err(o, o_r) <= 1e-5 and rel_err(st, st_r) <= 1e-5
    assert max(rel_err(a, b) for a, b in zip(grads, grads_r)) <= 1e-5


@pytest.mark.slow
def test_pallas_tpu_segments_under_tpu_interpreter():
    """Packed rows (T=50, C=16, three layouts) under the simulated-TPU interpreter vs ``reference``."""
    from test_lightning_segments import LAYOUT_64

    params = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan")
    q, k, v, s0 = inputs(50, b=3, h=2, dk=16, dv=16)
    ld = tuple(np.asarray(LOG_DECAY[:2]).tolist())
    seg = jnp.asarray(LAYOUT_64[:, :50])
    do, ds = jnp.ones_like(v), jnp.ones_like(s0)
    (o, st), grads = _vjp_fn("pallas_tpu", 16, params, ld, True)(q, k, v, s0, do, ds, seg)
    (o_r, st_r), grads_r = _vjp_fn("reference", 16, None, ld, True)(q, k, v, s0, do, ds, seg)
    assert rel_err(o, o_r) <= 1e-5 and rel_err(st, st_r) <= 1e-5
    assert max(rel_err(a, b) for a, b in zip(grads, grads_r)) <= 1e-5
