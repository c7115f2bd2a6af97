"""Learning-rate schedules, muP LR multipliers and the weight-decay mask."""

import math

import pytest
from flax import nnx

from minicpm_jax.config import OptimizerConfig, load_config
from minicpm_jax.model import abstract_model
from minicpm_jax.train.optimizer import learning_rate_schedule, lr_multipliers, weight_decay_mask


def _lr(step, **kw):
    cfg = OptimizerConfig(learning_rate=0.01, warmup_steps=10, decay_steps=40, min_lr_ratio=0.05, **kw)
    return float(learning_rate_schedule(cfg, 100)(step))


def test_wsd_exponential_values():
    assert _lr(0) == 0.0 and _lr(5) == pytest.approx(0.005)  # warmup eta * s / W
    assert _lr(10) == pytest.approx(0.01) and _lr(59) == pytest.approx(0.01) and _lr(60) == pytest.approx(0.01)
    half_life = 40 * math.log(2) / math.log(1 / 0.05)  # spec's half-life form
    for s in (61, 70, 85, 100):
        assert _lr(s) == pytest.approx(0.01 * 0.5 ** ((s - 60) / half_life), rel=1e-5)
    assert _lr(100) == pytest.approx(0.0005, rel=1e-5)


def test_wsd_linear_cosine_constant_values():
    assert _lr(80, schedule="wsd_linear") == pytest.approx(0.01 * (1 - 0.95 * 0.5))
    assert _lr(100, schedule="wsd_linear") == pytest.approx(0.0005)
    p = (55 - 10) / 90
    assert _lr(55, schedule="cosine") == pytest.approx(
        0.01 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))), rel=1e-5
    )
    assert _lr(100, schedule="cosine") == pytest.approx(0.0005, rel=1e-4)
    assert _lr(99, schedule="constant") == pytest.approx(0.01)
    with pytest.raises(ValueError, match="exceed train.steps"):
        learning_rate_schedule(OptimizerConfig(warmup_steps=60, decay_steps=50), 100)


def _params(preset):
    cfg = load_config(preset).model
    return cfg, nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))


def test_mup_multipliers_per_parameter():
    cfg, params = _params("tiny-minicpm4-longrope")  # hidden 64, dim_model_base 16: matrices x 1/4
    mult = lr_multipliers(params, cfg, OptimizerConfig())
    layer = mult["model"]["layers"][0]
    assert layer["self_attn"]["q_proj"]["kernel"] == 0.25 and layer["mlp"]["down_proj"]["kernel"] == 0.25
    assert layer["input_layernorm"]["weight"] == 1.0 and mult["model"]["norm"]["weight"] == 1.0
    assert mult["model"]["embed_tokens"]["weight"] == 1.0 and mult["lm_head"]["kernel"] == 1.0
    both = lr_multipliers(params, cfg, OptimizerConfig(mup_embeddings=True))
    assert both["model"]["embed_tokens"]["weight"] == 0.25 and both["lm_head"]["kernel"] == 0.25
    off = lr_multipliers(params, cfg, OptimizerConfig(mup=False))
    assert off["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"] == 1.0


def test_weight_decay_mask():
    _, params = _params("tiny-minicpm4-longrope")
    mask = weight_decay_mask(params, OptimizerConfig())
    layer = mask["model"]["layers"][1]
    assert layer["self_attn"]["o_proj"]["kernel"] and layer["mlp"]["up_proj"]["kernel"]
    assert not layer["post_attention_layernorm"]["weight"] and not mask["model"]["norm"]["weight"]
    assert not mask["model"]["embed_tokens"]["weight"] and not mask["lm_head"]["kernel"]
    everything = weight_decay_mask(params, OptimizerConfig(decay_norms=True, decay_embeddings=True))
    assert everything["model"]["norm"]["weight"] and everything["lm_head"]["kernel"]
