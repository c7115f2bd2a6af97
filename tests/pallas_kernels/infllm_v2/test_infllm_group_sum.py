"""Split GQA groups: selection and decode on part of each group's query heads, with ``group_sum``
completing the per-group score sums, equal the computation on all heads. The "devices" are a
``jax.vmap`` with an axis name (no mesh needed); ``group_sum`` is a collective over it."""

import jax
import jax.numpy as jnp
import numpy as np
from infllm_testutil import assert_same_selection, inputs, jitted, rel_err, small_config

from pallas_kernels.infllm_v2 import block_scores, compress_keys, decode_step, init_cache, prefill_cache, select_blocks
from pallas_kernels.infllm_v2.selection import select_from_compressed

HQ, HKV = 8, 2  # groups of 4 query heads, split in two halves of 2


def halves(x):
    """[B, T, Hkv*G, D] -> [2, B, T, Hkv*G/2, D]: half s holds heads s*G/2 .. (s+1)*G/2 - 1 of every group."""
    b, t, _, d = x.shape
    return jnp.moveaxis(x.reshape(b, t, HKV, 2, HQ // HKV // 2, d), 3, 0).reshape(2, b, t, HQ // 2, d)


def psum_halves(s):
    return jax.lax.psum(s, "half")


def test_select_blocks_split_group_equals_whole():
    cfg = small_config()
    q, k, _ = inputs(150, hq=HQ, hkv=HKV, seed=11)
    whole = jitted(select_blocks, config=cfg, chunk=48)(q, k)
    scores = jitted(block_scores, config=cfg, chunk=48)(q, k)
    split = lambda f: jax.jit(jax.vmap(lambda qh: f(qh, k, cfg, chunk=48, group_sum=psum_halves), axis_name="half"))
    sel, bs = split(select_blocks)(halves(q)), split(block_scores)(halves(q))
    for s in range(2):  # both halves get the whole group's scores and selection
        np.testing.assert_allclose(bs[s], scores, rtol=1e-5, atol=1e-6)
        assert_same_selection(sel[s][0], whole[0], np.asarray(scores[0], np.float64))
    assert (np.asarray(whole) >= 0).sum() > 0
    # Without group_sum a half selects by its own heads: the hook is what makes them agree.
    alone = jitted(select_blocks, config=cfg, chunk=48)(halves(q)[0], k)
    assert not np.array_equal(alone, whole)


def test_select_from_compressed_split_group_equals_whole():
    cfg = small_config()
    t, cap1, cap2 = 150, 40, 12  # partly filled K1 / K2 caches
    q, k, _ = inputs(t, hq=HQ, hkv=HKV, seed=12)
    k1, k2 = compress_keys(k, cfg)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    k1c, k2c = pad(k1, cap1), pad(k2, cap2)
    pos, nb = jnp.asarray([t - 1]), cfg.num_blocks(t)
    f = lambda q, gs=None: select_from_compressed(q, k1c, k2c, k1.shape[1], k2.shape[1], pos, nb, cfg, gs)
    whole = jax.jit(f)(q[:, -1:])
    split = jax.jit(jax.vmap(lambda qh: f(qh, psum_halves), axis_name="half"))(halves(q[:, -1:]))
    scores = jitted(block_scores, config=cfg)(q, k)[:, :, -1:]
    for s in range(2):
        assert_same_selection(split[s][0], whole[0], np.asarray(scores[0], np.float64))
    np.testing.assert_array_equal(whole, jitted(select_blocks, config=cfg)(q, k)[:, :, -1:])


def test_decode_split_group_equals_whole():
    """Four "devices", each with 2 query heads of one group (``kv_heads=(g, 1)``) and the whole
    replicated cache: every device's cache equals the unsplit one, the outputs put together equal
    the unsplit outputs, across dense_len (dense steps, the build, sparse steps)."""
    dense_len, prompt, steps, cap = 96, 92, 8, 120
    cfg = small_config(dense_len=dense_len)
    q, k, v, qs = inputs(prompt + steps, hq=HQ, hkv=HKV, seed=13, extra=1)
    ks = k[..., ::-1] * 0.7  # separate selection keys (use_nope)
    cache = init_cache(1, cap, HKV, k.shape[3], k.dtype, cfg, separate_select_keys=True)
    cache = jitted(prefill_cache, config=cfg)(cache, k[:, :prompt], v[:, :prompt], k_select=ks[:, :prompt])
    # Device d = 2 * g + s: half s of group g. Its group's partial sums are the pair (2g, 2g+1).
    pair_sum = lambda x: jax.lax.all_gather(x, "dev").reshape(HKV, 2, *x.shape).sum(1)[jax.lax.axis_index("dev") // 2]

    def device(cache, q, k, v, qs, ks, g):
        kw = dict(q_select=qs, k_select=ks, kv_heads=(g, 1), group_sum=pair_sum)
        return decode_step(cache, q, k, v, config=cfg, **kw)

    whole = jitted(decode_step, config=cfg)
    split = jax.jit(jax.vmap(device, in_axes=(None, 0, None, None, 0, None, 0), axis_name="dev"))

    def by_device(x):  # [B, 1, Hq, D] -> [4, B, 1, 2, D]: device d gets heads 2d, 2d + 1
        return jnp.moveaxis(x.reshape(*x.shape[:2], 4, HQ // 4, x.shape[3]), 2, 0)

    devs = jnp.arange(4) // 2
    for p in range(prompt, prompt + steps):
        sl = lambda x: x[:, p : p + 1]
        o, new = whole(cache, sl(q), sl(k), sl(v), q_select=sl(qs), k_select=sl(ks))
        o_dev, c_dev = split(cache, by_device(sl(q)), sl(k), sl(v), by_device(sl(qs)), sl(ks), devs)
        for d in range(4):
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[d], b), c_dev, new)
        o_split = jnp.moveaxis(o_dev, 0, 2).reshape(o.shape)
        assert rel_err(o_split, o) <= 1e-5, p
        cache = new
    assert bool(cache.built[0]) and cache.length.tolist() == [prompt + steps]
