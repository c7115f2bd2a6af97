"""Token-by-token decode across dense_len equals the prefill (last row of each prefix)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from infllm_testutil import inputs, jitted, rel_err, small_config
from pallas_kernels.infllm_v2 import compress_keys, decode_step, infllm_v2_attention, init_cache
from pallas_kernels.infllm_v2 import prefill_cache, reference

T, DENSE_LEN = 170, 96


def _decode(cfg, q, k, v, qs, ks, prompt=0):
    cache = init_cache(1, 180, k.shape[2], k.shape[3], k.dtype, cfg, separate_select_keys=ks is not None)
    sl = lambda x, a, b: None if x is None else x[:, a:b]
    if prompt:
        cache = jitted(prefill_cache, config=cfg)(cache, k[:, :prompt], v[:, :prompt], k_select=sl(ks, 0, prompt))
    step = jitted(decode_step, config=cfg)
    outs = []
    for p in range(prompt, T):
        o, cache = step(
            cache,
            q[:, p : p + 1],
            k[:, p : p + 1],
            v[:, p : p + 1],
            q_select=sl(qs, p, p + 1),
            k_select=sl(ks, p, p + 1),
        )
        outs.append(o)
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("gen,nope,prompt", [("B", False, 0), ("A", True, 0), ("B", True, 100)])
def test_decode_equals_prefill(gen, nope, prompt):
    cfg = small_config(generation=gen, dense_len=DENSE_LEN)
    q, k, v, qs = inputs(T, seed=21, extra=1)
    ks = k[..., ::-1] * 0.7 if nope else None
    qs = qs if nope else None
    out, cache = _decode(cfg, q, k, v, qs, ks, prompt)
    full = jitted(infllm_v2_attention, config=cfg, implementation="reference")
    sparse = full(q, k, v, q_select=qs, k_select=ks)  # T >= dense_len: all sparse
    dense = jitted(reference.dense_attention)(q, k, v)
    pos = np.arange(prompt, T)
    expect = np.where((pos + 1 < DENSE_LEN)[None, :, None, None], dense[:, prompt:], sparse[:, prompt:])
    assert rel_err(out, expect) <= 1e-5
    for p in (DENSE_LEN - 1, 131):  # explicit prefix prefills
        if p >= prompt:
            sl = lambda x: None if x is None else x[:, : p + 1]
            last = full(q[:, : p + 1], k[:, : p + 1], v[:, : p + 1], q_select=sl(qs), k_select=sl(ks))
            assert rel_err(out[:, p - prompt], last[:, p]) <= 1e-5
    # The incremental compressed caches equal compressing all keys.
    k1, k2 = jitted(compress_keys, config=cfg)(k if ks is None else ks)
    assert int(cache.n1) == k1.shape[1] and int(cache.n2) == k2.shape[1]
    np.testing.assert_allclose(cache.k1[:, : k1.shape[1]], k1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cache.k2[:, : k2.shape[1]], k2, rtol=1e-5, atol=1e-6)
    assert int(cache.length) == T


def test_decode_cache_is_fixed_size():
    cfg = small_config(dense_len=DENSE_LEN)
    cache = init_cache(2, 180, 2, 16, jnp.float32, cfg)
    q, k, v = inputs(1, batch=2)
    _, new = jax.jit(lambda c, q, k, v: decode_step(c, q, k, v, config=cfg))(cache, q, k, v)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new) == jax.tree.map(lambda x: (x.shape, x.dtype), cache)
