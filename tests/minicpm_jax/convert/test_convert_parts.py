"""Conversion parts: HALO weight transfer, the stage-1 and stage-2 losses, the layer-selection rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minicpm_jax.config import MeshConfig, load_config
from minicpm_jax.convert.losses import alignment_loss, kl_loss
from minicpm_jax.convert.pipeline import lightning_patterns
from minicpm_jax.convert.select import choose_mixer_types, selection_scores, softmax_budget
from minicpm_jax.convert.transfer import LIGHTNING, SOFTMAX, transfer
from minicpm_jax.model import create_model
from minicpm_jax.sharding import make_mesh
from minicpm_jax.train.loss import chunked_kl
from minicpm_jax.train.state import create_trainer

S, L = SOFTMAX, LIGHTNING
IDS = jnp.asarray(np.random.default_rng(0).integers(3, 500, (2, 24)), jnp.int32)


def _teacher(layers=4, seed=1, mesh=None):
    cfg = load_config("tiny-minicpm4", [f"model.num_hidden_layers={layers}"]).model
    return create_model(cfg, seed=seed, dtype=jnp.float32, mesh=mesh)


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_transfer_copies_projections_and_expands_kv():
    teacher = _teacher()
    cfg, hybrid = transfer(teacher, [S, L, L, S], seed=3)
    t, h = _params(teacher)["model"]["layers"], _params(hybrid)["model"]["layers"]
    group = cfg.num_attention_heads // teacher.config.num_key_value_heads  # 2
    for i in (1, 2):
        ta, ha = t[i]["self_attn"], h[i]["self_attn"]
        np.testing.assert_array_equal(ha["q_proj"]["kernel"], ta["q_proj"]["kernel"])
        np.testing.assert_array_equal(ha["o_proj"]["kernel"], ta["o_proj"]["kernel"])
        for name in ("k_proj", "v_proj"):
            for head in range(cfg.lightning_nh):  # Lightning head j starts from KV head j // group
                np.testing.assert_array_equal(ha[name]["kernel"][:, head], ta[name]["kernel"][:, head // group])
        for name in ("q_norm", "k_norm", "o_norm"):
            np.testing.assert_array_equal(ha[name]["weight"], 1.0)
        bound = cfg.hidden_size**-0.5
        z = ha["z_proj"]["kernel"]
        assert np.abs(z).max() <= bound and z.std() == pytest.approx(bound / np.sqrt(3), rel=0.1)
    for i in (0, 3):  # retained softmax layers: copied, NoPE, fresh o_gate ~ N(0, initializer_range)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            np.testing.assert_array_equal(h[i]["self_attn"][name]["kernel"], t[i]["self_attn"][name]["kernel"])
        assert h[i]["self_attn"]["o_gate"]["kernel"].std() == pytest.approx(cfg.initializer_range, rel=0.1)
    for i in range(4):
        for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
            jax.tree.map(np.testing.assert_array_equal, h[i][name], t[i][name])
    assert cfg.mixer_types == (S, L, L, S) and not cfg.attn_use_rope and cfg.attn_use_output_gate
    assert cfg.lightning_nkv == cfg.lightning_nh == teacher.config.num_attention_heads


def test_all_softmax_transfer_reproduces_the_teacher():
    teacher = _teacher()
    ref = np.asarray(teacher(IDS))
    _, same = transfer(teacher, [S] * 4, nope=False, output_gate=False)
    np.testing.assert_array_equal(np.asarray(same(IDS)), ref)
    _, nope = transfer(teacher, [S] * 4, nope=True, output_gate=False)  # NoPE alone changes the function
    assert np.abs(np.asarray(nope(IDS)) - ref).max() > 1e-3


def test_transfer_on_a_sharded_teacher_keeps_the_hybrid_sharding():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    teacher = _teacher(mesh=mesh)
    cfg, hybrid = transfer(teacher, [S, L, L, S])
    reference = create_model(cfg, mesh=mesh, dtype=jnp.float32)
    got = jax.tree.map(lambda x: x.sharding, nnx.to_pure_dict(nnx.state(hybrid, nnx.Param)))
    want = jax.tree.map(lambda x: x.sharding, nnx.to_pure_dict(nnx.state(reference, nnx.Param)))
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
    single = transfer(_teacher(), [S, L, L, S])[1]
    np.testing.assert_allclose(np.asarray(hybrid(IDS)), np.asarray(single(IDS)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_alignment_trains_only_lightning_mixers_and_lowers_each_layer_mse(packed):
    teacher = _teacher()
    before_teacher = _params(teacher)
    cfg, student = transfer(teacher, [S, L, L, S])
    run = load_config("tiny-minicpm4", ["dtype=float32", "optimizer.warmup_steps=0", "optimizer.learning_rate=0.01"])
    run = run.model_copy(update={"model": cfg})
    mesh = make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    trainer = create_trainer(
        run, mesh, alignment_loss, student, frozen={"teacher": teacher}, trainable=lightning_patterns(cfg)
    )
    before = _params(trainer.model())
    rng = np.random.default_rng(0)
    batch = {"input_ids": np.asarray(rng.integers(3, 500, (4, 32)), np.int32)}
    batch["targets"], batch["loss_mask"] = batch["input_ids"], np.ones((4, 32), np.float32)
    if packed:  # two documents per row, positions restart at each
        batch["segment_ids"] = np.repeat(np.array([[1] * 20 + [2] * 12]), 4, 0).astype(np.int32)
        batch["positions"] = np.repeat(np.array([list(range(20)) + list(range(12))]), 4, 0).astype(np.int32)
    first = trainer.step(batch)["aux"]
    for _ in range(15):
        last = trainer.step(batch)["aux"]
    for key in ("mse_1", "mse_2"):
        assert float(last[key]) < 0.7 * float(first[key]), (key, float(first[key]), float(last[key]))
    assert "mse_0" not in last and "mse_3" not in last
    after = _params(trainer.model())
    jax.tree.map(np.testing.assert_array_equal, _params(teacher), before_teacher)
    for i in range(4):
        layer_before, layer_after = before["model"]["layers"][i], after["model"]["layers"][i]
        changed = not np.array_equal(
            layer_before["self_attn"]["q_proj"]["kernel"], layer_after["self_attn"]["q_proj"]["kernel"]
        )
        assert changed == (i in (1, 2))
        jax.tree.map(np.testing.assert_array_equal, layer_before["mlp"], layer_after["mlp"])
    np.testing.assert_array_equal(before["model"]["embed_tokens"]["weight"], after["model"]["embed_tokens"]["weight"])


def _np_kl(logits_t, logits_s, mask):
    def log_softmax(x):
        x = x.astype(np.float64)
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    lp, lq = log_softmax(logits_t), log_softmax(logits_s)
    return float(((np.exp(lp) * (lp - lq)).sum(-1) * mask).sum())


def test_kl_matches_numpy_and_its_gradient_matches_finite_differences():
    teacher = _teacher(layers=2, seed=1)
    student = _teacher(layers=2, seed=2)
    rng = np.random.default_rng(1)
    h_t = jnp.asarray(rng.normal(size=(2, 6, 64)), jnp.float32)
    h_s = jnp.asarray(rng.normal(size=(2, 6, 64)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 6)) < 0.7, jnp.float32)
    kl, weight = chunked_kl(student, h_s, teacher, h_t, mask, chunk_size=4)  # 2 tokens per row per chunk
    ref = _np_kl(np.asarray(teacher.logits(h_t)), np.asarray(student.logits(h_s)), np.asarray(mask))
    assert float(kl) == pytest.approx(ref, rel=1e-5) and float(weight) == float(mask.sum())
    grad = jax.grad(lambda h: chunked_kl(student, h, teacher, h_t, mask, 4)[0])(h_s)
    eps = 1e-2
    for b, t, d in [(0, 0, 3), (1, 2, 10), (0, 5, 63)]:
        e = np.zeros(h_s.shape, np.float32)
        e[b, t, d] = eps
        up = _np_kl(np.asarray(teacher.logits(h_t)), np.asarray(student.logits(h_s + e)), np.asarray(mask))
        down = _np_kl(np.asarray(teacher.logits(h_t)), np.asarray(student.logits(h_s - e)), np.asarray(mask))
        assert float(grad[b, t, d]) == pytest.approx((up - down) / (2 * eps), rel=2e-2, abs=1e-5)
    batch = {"input_ids": IDS, "loss_mask": jnp.ones(IDS.shape)}
    self_kl, _ = kl_loss(teacher, {"teacher": teacher}, batch)  # a model against itself: zero
    assert abs(float(self_kl)) < 1e-4


def test_selection_score_formula_and_forced_layers():
    cs, rt = [0.50, 0.40, 0.55, 0.55], [0.9, 0.3, 0.6, 0.95]
    scores = selection_scores(cs, rt)
    want = [min(50, (0.95 - r) / (0.55 - c + 1e-10)) for c, r in zip(cs, rt)]
    assert scores == pytest.approx(want) and scores[2] == 50  # zero CS drop, big RT drop: capped
    # 6 layers, 3 softmax: first and last forced, then the best-scored candidate (layer 3)
    assert choose_mixer_types(6, [1, 2, 3, 4], scores, 3) == (S, L, L, S, L, S)
    assert softmax_budget(12, 0.25, True) == 3
    with pytest.raises(ValueError, match="rounds to 0 softmax"):
        softmax_budget(4, 0.1, False)
    with pytest.raises(ValueError, match="keep_first_last forces 2"):
        softmax_budget(8, 0.125, True)
