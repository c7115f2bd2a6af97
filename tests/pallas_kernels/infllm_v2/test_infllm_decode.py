"""Token-by-token decode across dense_len equals the prefill (last row of each prefix); per-row lengths."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from infllm_testutil import inputs, jitted, rel_err, small_config

from pallas_kernels.infllm_v2 import (
    compress_keys,
    decode_step,
    infllm_v2_attention,
    init_cache,
    prefill_cache,
    reference,
)

T, DENSE_LEN, CAP = 170, 96, 180


def _decode(cfg, q, k, v, qs, ks, prompt=0):
    cache = init_cache(1, CAP, k.shape[2], k.shape[3], k.dtype, cfg, separate_select_keys=ks is not None)
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
            qp, kp, vp, qsp, ksp = (None if x is None else x[:, : p + 1] for x in (q, k, v, qs, ks))
            last = full(qp, kp, vp, q_select=qsp, k_select=ksp)
            assert rel_err(out[:, p - prompt], last[:, p]) <= 1e-5
    # The incremental compressed caches equal compressing all keys.
    k1, k2 = jitted(compress_keys, config=cfg)(k if ks is None else ks)
    assert cache.n1.tolist() == [k1.shape[1]] and cache.n2.tolist() == [k2.shape[1]]
    np.testing.assert_allclose(cache.k1[:, : k1.shape[1]], k1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cache.k2[:, : k2.shape[1]], k2, rtol=1e-5, atol=1e-6)
    assert cache.length.tolist() == [T]


def test_decode_cache_is_fixed_size():
    cfg = small_config(dense_len=DENSE_LEN)
    cache = init_cache(2, CAP, 2, 16, jnp.float32, cfg)
    assert cache.length.shape == cache.n1.shape == cache.buf2_len.shape == cache.built.shape == (2,)
    q, k, v = inputs(1, batch=2)
    _, new = jax.jit(lambda c, q, k, v: decode_step(c, q, k, v, config=cfg))(cache, q, k, v)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new) == jax.tree.map(lambda x: (x.shape, x.dtype), cache)


# Per-row lengths: right-padded prompts of different lengths decoded together.
# Row 0 starts dense and crosses dense_len at step 15, row 1 starts sparse, row 2 is tiny and stays
# dense, row 3 starts exactly at dense_len.
LENGTHS, STEPS = (80, 120, 5, 96), 30


def _rows_inputs(nope, seed=5):
    q, k, v, qs = inputs(max(LENGTHS) + STEPS, batch=len(LENGTHS), seed=seed, extra=1)
    ks = k[..., ::-1] * 0.7 if nope else None
    return q, k, v, (qs if nope else None), ks


@functools.cache
def _fns(cfg):
    return jitted(prefill_cache, config=cfg), jitted(decode_step, config=cfg)


def _tokens(x, lengths, steps):
    """Row b's tokens at positions lengths[b] + i, i < steps: [steps, B, 1, H, D]."""
    idx = jnp.asarray(lengths)[:, None] + jnp.arange(steps)[None, :]
    return jnp.take_along_axis(x, idx[:, :, None, None], axis=1).swapaxes(0, 1)[:, :, None]


def _run_rows(cfg, q, k, v, qs, ks, lengths, garbage=None, steps=STEPS):
    """Prefills the right-padded prompts (pad slots filled from ``garbage``) and decodes ``steps`` tokens."""
    prefill, step = _fns(cfg)
    b, tp = k.shape[0], max(lengths)
    pad = (jnp.arange(tp)[None, :] >= jnp.asarray(lengths)[:, None])[..., None, None]
    fill = lambda x, i: None if x is None else jnp.where(pad, 0.0 if garbage is None else garbage[i], x[:, :tp])
    cache = init_cache(b, CAP, k.shape[2], k.shape[3], k.dtype, cfg, separate_select_keys=ks is not None)
    cache = prefill(cache, fill(k, 0), fill(v, 1), k_select=fill(ks, 2), lengths=jnp.asarray(lengths))
    toks = [None if x is None else _tokens(x, lengths, steps) for x in (q, k, v, qs, ks)]
    outs = []
    for i in range(steps):
        args = [None if x is None else x[i] for x in toks]
        o, cache = step(cache, *args[:3], q_select=args[3], k_select=args[4])
        outs.append(o)
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("gen,nope", [("B", False), ("A", True)])
def test_decode_per_row_lengths(gen, nope):
    cfg = small_config(generation=gen, dense_len=DENSE_LEN)
    q, k, v, qs, ks = _rows_inputs(nope)
    shape = k.shape[:1] + (max(LENGTHS),) + k.shape[2:]
    garbage = [100.0 * jax.random.normal(jax.random.key(i), shape) for i in range(3)]
    out, cache = _run_rows(cfg, q, k, v, qs, ks, LENGTHS, garbage)
    assert cache.length.tolist() == [n + STEPS for n in LENGTHS]
    assert cache.built.tolist() == [n + STEPS >= DENSE_LEN for n in LENGTHS]
    # Full-sequence references (causal: position p of the whole sequence = last row of its prefix).
    sparse = jitted(infllm_v2_attention, config=cfg, implementation="reference")(q, k, v, q_select=qs, k_select=ks)
    dense = jitted(reference.dense_attention)(q, k, v)
    k1, k2 = jitted(compress_keys, config=cfg)(k if ks is None else ks)
    for b, n in enumerate(LENGTHS):
        # Same row decoded alone (batch 1, unpadded prompt).
        alone, c1 = _run_rows(cfg, *(None if x is None else x[b : b + 1] for x in (q, k, v, qs, ks)), (n,))
        np.testing.assert_allclose(out[b : b + 1], alone, rtol=1e-6, atol=1e-6)
        for name in ("length", "n1", "n2", "buf1_len", "buf2_len", "built"):
            assert getattr(cache, name)[b] == getattr(c1, name)[0], (b, name)
        pos = np.arange(n, n + STEPS)
        expect = np.where((pos + 1 < DENSE_LEN)[:, None, None], dense[b, pos], sparse[b, pos])
        assert rel_err(out[b], expect) <= 1e-5, b
        if n + STEPS >= DENSE_LEN:  # incremental compressed caches equal compressing the row's keys
            m1, m2 = int(cache.n1[b]), int(cache.n2[b])
            assert (m1, m2) == ((n + STEPS - 8) // 4 + 1, (n + STEPS - 32) // 16 + 1)
            np.testing.assert_allclose(cache.k1[b, :m1], k1[b, :m1], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(cache.k2[b, :m2], k2[b, :m2], rtol=1e-5, atol=1e-6)


def test_decode_padding_garbage_is_ignored():
    cfg = small_config(dense_len=DENSE_LEN)
    q, k, v, qs, ks = _rows_inputs(nope=True, seed=7)
    shape = k.shape[:1] + (max(LENGTHS),) + k.shape[2:]
    garbage = [1e4 * jax.random.normal(jax.random.key(10 + i), shape) for i in range(3)]
    clean, c0 = _run_rows(cfg, q, k, v, qs, ks, LENGTHS, steps=STEPS)
    dirty, c1 = _run_rows(cfg, q, k, v, qs, ks, LENGTHS, garbage, steps=STEPS)
    np.testing.assert_array_equal(clean, dirty)
    for name in ("k1", "k2", "n1", "n2", "buf1_len", "buf2_len", "built"):
        np.testing.assert_array_equal(getattr(c0, name), getattr(c1, name), err_msg=name)


def test_decode_jit_traced_lengths():
    """Prefill with traced lengths and a jitted decode loop (lax.scan): one compile, same outputs."""
    cfg = small_config(dense_len=DENSE_LEN)
    q, k, v, qs, ks = _rows_inputs(nope=False, seed=9)
    lengths, steps, tp = jnp.asarray(LENGTHS), STEPS, max(LENGTHS)
    ref, _ = _run_rows(cfg, q, k, v, qs, ks, LENGTHS, steps=steps)
    pick = lambda x: _tokens(x, lengths, steps)

    @jax.jit
    def run(lengths, k_prompt, v_prompt, qt, kt, vt):
        cache = init_cache(k.shape[0], CAP, k.shape[2], k.shape[3], k.dtype, cfg)
        cache = prefill_cache(cache, k_prompt, v_prompt, config=cfg, lengths=lengths)
        body = lambda c, x: decode_step(c, *x, config=cfg)[::-1]
        cache, outs = jax.lax.scan(body, cache, (qt, kt, vt))
        return outs[:, :, 0].swapaxes(0, 1), cache

    pad = (jnp.arange(tp)[None, :] >= lengths[:, None])[..., None, None]
    kp, vp = jnp.where(pad, 0.0, k[:, :tp]), jnp.where(pad, 0.0, v[:, :tp])
    out, cache = run(lengths, kp, vp, pick(q), pick(k), pick(v))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert cache.length.tolist() == [n + steps for n in LENGTHS]
    assert run._cache_size() == 1
    # The step is one compiled function for every length; scalar conds pick the paths.
    step = jitted(decode_step, config=cfg)
    c = init_cache(2, CAP, 2, 16, jnp.float32, cfg)
    qq, kk, vv = inputs(1, batch=2)
    for lens in ([0, 0], [DENSE_LEN - 1, 3], [DENSE_LEN + 5, DENSE_LEN + 9]):
        c = c._replace(length=jnp.asarray(lens, jnp.int32), built=jnp.asarray([n >= DENSE_LEN for n in lens]))
        step(c, qq, kk, vv)
    assert step._cache_size() == 1
    jaxpr = jax.make_jaxpr(functools.partial(decode_step, config=cfg))(c, qq, kk, vv)
    assert sum(e.primitive.name == "cond" for e in jaxpr.jaxpr.eqns) == 2  # build, attention path
