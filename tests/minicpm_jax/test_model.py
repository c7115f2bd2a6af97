"""Dense MiniCPM4 forward against the spec's NumPy reference, packing, muP init, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from minicpm_numpy_ref import forward, read_checkpoint

from minicpm_jax.config import load_config
from minicpm_jax.interop import save_hf_checkpoint
from minicpm_jax.model import create_model
from minicpm_jax.model.rope import rope_factors

CASES = {  # (preset, overrides): tied/untied, both LongRoPE branches, GQA ratios 1/2/4
    "short-tied-gqa2": ("tiny-minicpm4", []),
    "short-tied-gqa1": ("tiny-minicpm4", ["model.num_key_value_heads=4"]),
    "long-untied-gqa4": ("tiny-minicpm4-longrope", []),
    "long-tied-gqa2": ("tiny-minicpm4-longrope", ["model.num_key_value_heads=2", "model.tie_word_embeddings=true"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_numpy_reference(case, tmp_path):
    preset, overrides = CASES[case]
    cfg = load_config(preset, overrides).model
    model = create_model(cfg, seed=3, dtype=jnp.float32)
    save_hf_checkpoint(model, cfg, tmp_path / "ck", dtype="float32")
    P, hf_cfg = read_checkpoint(tmp_path / "ck")
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 40))
    ours = np.asarray(model(jnp.asarray(ids)))
    for b in range(2):
        ref = forward(P, hf_cfg, ids[b])
        np.testing.assert_allclose(ours[b], ref, rtol=0, atol=1e-5)


def test_longrope_choice_is_static():
    """max_pos > original selects the long factors and mscale > 1 for every input length."""
    long_cfg = load_config("tiny-minicpm4-longrope").model
    ext, mscale = rope_factors(long_cfg, long_cfg.attn_head_dim)
    np.testing.assert_array_equal(ext, np.float32(long_cfg.rope_scaling.long_factor))
    assert mscale == pytest.approx(np.sqrt(1 + np.log(4096 / 1024) / np.log(1024)))
    short_cfg = load_config("tiny-minicpm4").model
    ext, mscale = rope_factors(short_cfg, short_cfg.attn_head_dim)
    np.testing.assert_array_equal(ext, np.float32(short_cfg.rope_scaling.short_factor))
    assert mscale == 1.0


def test_packed_segments_do_not_attend_across_documents():
    cfg = load_config("tiny-minicpm4").model
    model = create_model(cfg, seed=1, dtype=jnp.float32)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, cfg.vocab_size, 7), rng.integers(0, cfg.vocab_size, 9)
    packed = jnp.asarray(np.concatenate([a, b]))[None]
    segments = jnp.asarray([0] * 7 + [1] * 9)[None]
    positions = jnp.asarray(list(range(7)) + list(range(9)))[None]
    out = np.asarray(model(packed, positions=positions, segment_ids=segments))[0]
    np.testing.assert_allclose(out[:7], np.asarray(model(jnp.asarray(a)[None]))[0], atol=1e-5)
    np.testing.assert_allclose(out[7:], np.asarray(model(jnp.asarray(b)[None]))[0], atol=1e-5)
    unpacked = np.asarray(model(packed, positions=positions))[0]
    assert np.abs(unpacked[7:] - out[7:]).max() > 1e-3  # without segments, document 2 sees document 1


def test_mup_init_statistics():
    cfg = load_config(
        "tiny-minicpm4", ["model.hidden_size=256", "model.num_attention_heads=16", "model.intermediate_size=512"]
    ).model
    model = create_model(cfg, seed=0, dtype=jnp.float32)
    expected = cfg.initializer_range / np.sqrt(cfg.hidden_size / cfg.dim_model_base)
    for w in (model.model.layers[0].mlp.gate_proj.kernel, model.model.embed_tokens.weight):
        assert np.std(np.asarray(w[...])) == pytest.approx(expected, rel=0.05)
    np.testing.assert_array_equal(np.asarray(model.model.norm.weight[...]), 1.0)


def test_bf16_compute_close_to_fp32():
    cfg = load_config("tiny-minicpm4").model
    ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 24)))
    f32 = create_model(cfg, seed=4, dtype=jnp.float32)(ids)
    bf16_model = create_model(cfg, seed=4, dtype=jnp.bfloat16)
    assert bf16_model.model.embed_tokens.weight[...].dtype == jnp.float32  # fp32 master weights
    bf16 = bf16_model(ids)
    assert bf16.dtype == jnp.float32
    assert float(jnp.abs(bf16 - f32).max()) < 0.05 * float(jnp.abs(f32).max())
    assert float(jnp.mean(jnp.argmax(bf16, -1) == jnp.argmax(f32, -1))) > 0.9


def test_model_jits():
    cfg = load_config("tiny-minicpm4").model
    model = create_model(cfg, dtype=jnp.float32)
    ids = jnp.ones((2, 8), jnp.int32)
    from flax import nnx

    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, ids), model(ids), atol=1e-5)
    assert jax.eval_shape(lambda x: model(x), ids).shape == (2, 8, cfg.vocab_size)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lm_head_logits_equal_h_times_weight(tied):
    """fp32 logits = (h / logit_divisor) @ embed.T (tied) or @ lm_head.kernel (untied)."""
    cfg = load_config("tiny-minicpm4", [f"model.tie_word_embeddings={str(tied).lower()}"]).model
    model = create_model(cfg, seed=5, dtype=jnp.float32)
    h = np.random.default_rng(5).standard_normal((2, 3, cfg.hidden_size)).astype(np.float32)
    w = model.model.embed_tokens.weight[...].T if tied else model.lm_head.kernel[...]
    want = (h.astype(np.float64) / cfg.logit_divisor) @ np.asarray(w, np.float64)
    got = model.logits(jnp.asarray(h))
    assert got.dtype == jnp.float32 and got.shape == (2, 3, cfg.vocab_size)
    np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max(), rtol=1e-5)


def test_tied_head_decode_step_has_no_transposed_embedding():
    """The compiled decode step contracts with the [V, H] embedding as stored: no [H, V] array
    (a transpose or transposed copy of it) appears anywhere in the optimised HLO."""
    from flax import nnx

    cfg = load_config("tiny-minicpm4", ["model.vocab_size=520"]).model  # V, H distinct from other dims
    model = create_model(cfg, dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1, 16)
    step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode_step(t, c)[0])
    hlo = step.lower(state, jnp.zeros((1,), jnp.int32), cache).compile().as_text()
    assert f"f32[{cfg.vocab_size},{cfg.hidden_size}]" in hlo
    assert f"[{cfg.hidden_size},{cfg.vocab_size}]" not in hlo
