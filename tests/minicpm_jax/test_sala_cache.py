"""Decode caches: prefill + one-token steps give the full forward's logits (dense, sparse across
dense_len, lightning-only, hybrid); cache shapes, sizes and misuse errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.config import load_config
from minicpm_jax.model import abstract_model, create_model
from minicpm_jax.model.cache import KVCache, LightningCache, cache_bytes
from pallas_kernels.infllm_v2 import DecodeCache

LIGHTNING_ONLY = [
    "model.mixer_types=[lightning-attn, lightning-attn, lightning-attn, lightning-attn, "
    "lightning-attn, lightning-attn, lightning-attn, lightning-attn]"
]
CASES = {  # prefill 56 tokens, decode to 76: crosses dense_len = 64 of the sparse presets
    "dense": ("tiny-minicpm4", []),
    "sparse-nope-select": ("tiny-minicpm4-sparse", ["model.sparse_config.use_nope=true"]),
    "lightning": ("tiny-sala", LIGHTNING_ONLY),  # slow: the hybrid case covers these layers too
    "hybrid": ("tiny-sala", []),
}


@functools.cache
def _model(case):
    preset, overrides = CASES[case]
    return create_model(load_config(preset, overrides).model, seed=11, dtype=jnp.float32)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "lightning" else c for c in CASES])
def test_prefill_then_decode_equals_full_forward(case):
    model = _model(case)
    cfg = model.config
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 76)))
    full = np.asarray(jax.jit(lambda x: model(x))(ids))
    cache = model.init_cache(2, 80)
    logits, cache = model.prefill(ids[:, :56], cache)
    errors = [np.abs(np.asarray(logits) - full[:, 55]).max()]
    step = jax.jit(lambda tok, c: model.decode_step(tok, c))
    for t in range(56, 76):
        logits, cache = step(ids[:, t], cache)
        errors.append(np.abs(np.asarray(logits) - full[:, t]).max())
    assert cache.length.tolist() == [76, 76]
    assert max(errors) <= 1e-4, errors


def test_cache_kinds_shapes_and_errors():
    model = _model("hybrid")
    cache = model.init_cache(3, 100)
    kinds = [type(c) for c in cache.layers]
    assert kinds == [
        DecodeCache,
        LightningCache,
        LightningCache,
        DecodeCache,
        LightningCache,
        LightningCache,
        DecodeCache,
        DecodeCache,
    ]
    assert cache.layers[1].state.shape == (3, 4, 16, 16) and cache.layers[1].state.dtype == jnp.float32
    assert cache.layers[0].k.shape == (3, 100, 2, 16) and cache.capacity == 100
    cache = cache._replace(length=jnp.full((3,), 8, jnp.int32))  # as after a prefill of 8 tokens
    with pytest.raises(ValueError, match="needs an empty cache"):
        model.step(jnp.ones((3, 4), jnp.int32), cache)
    with pytest.raises(ValueError, match="capacity 100 exceeded"):
        model.step(jnp.ones((3, 93), jnp.int32), cache)
    assert isinstance(_model("dense").init_cache(1, 16).layers[0], KVCache)
    with pytest.raises(ValueError, match="attention_impl='cuda': expected one of"):
        abstract_model(model.config, attention_impl="cuda")


def test_cache_bytes_sala_9b_vs_minicpm4_8b_are_shape_only():
    """SALA: 8 sparse layers' K/V (+ compressed keys) + 24 fixed 2 MiB fp32 states (spec/sala.md 1.8)."""
    sala, dense = load_config("minicpm-sala-9b").model, load_config("minicpm4-8b").model
    n = 32768
    s, d = cache_bytes(sala, 1, n), cache_bytes(dense, 1, n)
    kv = 8 * 2 * 2 * 128 * 2  # 8 layers, K and V, 2 heads, 128 dims, bf16 = 8 KiB/token
    assert s == pytest.approx(n * kv + 24 * 32 * 128 * 128 * 4, rel=0.1)  # + small K1/K2/buffers
    per_token = (cache_bytes(sala, 1, 2 * n) - s) / n, (cache_bytes(dense, 1, 2 * n) - d) / n
    assert per_token[0] <= per_token[1] / 4 * (1 + 1e-6)  # 8 of 32 layers keep K/V


def test_sala_9b_prefill_and_decode_trace_at_full_size():
    """Shape-only: the 9B's sparse prefill (8192 >= dense_len) and decode step trace with real shapes."""
    from flax import nnx

    model = abstract_model(load_config("minicpm-sala-9b").model)
    graphdef, state = nnx.split(model)
    cache = jax.eval_shape(lambda: model.init_cache(1, 16384))
    ids = jax.ShapeDtypeStruct((1, 8192), jnp.int32)
    logits, after = jax.eval_shape(lambda s, x, c: nnx.merge(graphdef, s).prefill(x, c), state, ids, cache)
    assert logits.shape == (1, 73448) and jax.tree.map(lambda a: a.shape, after) == jax.tree.map(
        lambda a: a.shape, cache
    )
    tok = jax.ShapeDtypeStruct((1,), jnp.int32)
    logits, _ = jax.eval_shape(lambda s, x, c: nnx.merge(graphdef, s).decode_step(x, c), state, tok, cache)
    assert logits.shape == (1, 73448)


@pytest.mark.parametrize("block", [16, 24, 200])
def test_blockwise_cache_attention_equals_masked_softmax(block):
    """Prefill chunks attend over the cache block by block (online softmax); blocks that do not divide
    the capacity overlap, and blocks past the last position are skipped."""
    from minicpm_jax.model.attention import cache_attention
    from minicpm_jax.model.dense_attention import dot_product_attention

    rng = np.random.default_rng(0)
    shapes = ((2, 12, 4, 8), (2, 70, 2, 8), (2, 70, 2, 8))
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)
    for rows in ((58, 3), (20, 3)):  # up to the last (overlapping) block; or only the first blocks
        positions = jnp.asarray([np.arange(r, r + 12) for r in rows])  # rows at different offsets
        mask = jnp.arange(70)[None, None, :] <= positions[:, :, None]
        want = dot_product_attention(q, k, v, mask)
        got = jax.jit(cache_attention, static_argnums=4)(q, k, v, positions, block)
        np.testing.assert_allclose(got, want, atol=2e-6)
