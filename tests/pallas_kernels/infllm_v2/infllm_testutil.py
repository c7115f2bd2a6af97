"""Shared helpers for the InfLLM v2 tests: small configs, random inputs, comparisons."""

import numpy as np
import jax
import jax.numpy as jnp

from pallas_kernels.infllm_v2 import InfLLMv2Config

# The spec's parameters scaled down by 4 (kernel 8 / stride 4 / block 16), small window and top-k
# so that top-k selection (not only forced blocks) is exercised at T of a few hundred.
SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=3, dense_len=-1)


def small_config(**kw):
    return InfLLMv2Config(**{**SMALL, **kw})


def numpy_kwargs(cfg):
    return dict(
        kernel_size=cfg.kernel_size,
        kernel_stride=cfg.kernel_stride,
        block_size=cfg.block_size,
        init_blocks=cfg.init_blocks,
        window_size=cfg.window_size,
        topk=cfg.topk,
        dense_len=cfg.dense_len,
        gen=cfg.generation,
        lse_approx=cfg.lse_approx,
    )


def inputs(t, hq=4, hkv=2, d=16, batch=1, seed=0, dtype=jnp.float32, extra=0):
    keys = jax.random.split(jax.random.key(seed), 3 + extra)
    q = jax.random.normal(keys[0], (batch, t, hq, d), jnp.float32)
    k = jax.random.normal(keys[1], (batch, t, hkv, d), jnp.float32)
    v = jax.random.normal(keys[2], (batch, t, hkv, d), jnp.float32)
    more = [jax.random.normal(kk, q.shape, jnp.float32) for kk in keys[3:]]
    return [x.astype(dtype) for x in (q, k, v)] + more


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def assert_same_selection(sel, sel_ref, scores_ref, rtol=1e-5):
    """Equal selections, except that a differing block must tie in score with the one it replaced.

    sel, sel_ref [Hkv, T, n]; scores_ref [Hkv, T, nb] (block scores of the reference).
    """
    sel, sel_ref = np.asarray(sel), np.asarray(sel_ref)
    assert sel.shape == sel_ref.shape, (sel.shape, sel_ref.shape)
    bad = np.argwhere((sel != sel_ref).any(-1))
    for g, i in bad:
        a = set(sel[g, i][sel[g, i] >= 0].tolist())
        b = set(sel_ref[g, i][sel_ref[g, i] >= 0].tolist())
        assert len(a) == len(b), (g, i, a, b)
        sa = sorted(scores_ref[g, i, sorted(a - b)])
        sb = sorted(scores_ref[g, i, sorted(b - a)])
        np.testing.assert_allclose(sa, sb, rtol=rtol, err_msg=f"row {(g, i)}: {a ^ b} do not tie")


def overlap(sel, sel_ref):
    """Fraction of reference-selected (valid) blocks also selected (per row, averaged)."""
    sel, sel_ref = np.asarray(sel), np.asarray(sel_ref)
    hit = (sel_ref[..., :, None] == sel[..., None, :]).any(-1) & (sel_ref >= 0)
    return float(hit.sum() / max((sel_ref >= 0).sum(), 1))


def jitted(fn, **static):
    """jax.jit of fn with keyword arguments fixed (eager dispatch is much slower on CPU)."""
    import functools

    return jax.jit(functools.partial(fn, **static))
