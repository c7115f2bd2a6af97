"""The step engine: accumulation equals the full batch, sharded equals 1 device, non-finite skips."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_testutil import one_device, random_batch, tiny_cfg

from minicpm_jax.config import MeshConfig
from minicpm_jax.sharding import make_mesh
from minicpm_jax.train.loss import chunked_cross_entropy, next_token_loss
from minicpm_jax.train.state import create_trainer
from minicpm_jax.train.step import accumulate_gradients, check_batch


def _cfg(*overrides):
    return tiny_cfg("optimizer.clip_norm=null", *overrides)


def _loss(cfg):
    return functools.partial(next_token_loss, chunk_size=cfg.train.loss_chunk_size, remat=cfg.train.remat)


def _grads(trainer, batch):
    def objective(p):
        s, (w, _) = _loss(_cfg())(trainer.model(p), None, batch)
        return s / w

    return jax.grad(objective)(trainer.state["params"])


def test_chunked_cross_entropy_matches_full_logits():
    cfg = _cfg()
    trainer = create_trainer(cfg, one_device(), _loss(cfg))
    model, b = trainer.model(), random_batch(rows=2, seq=20)
    h = model.hidden_states(jnp.asarray(b["input_ids"]))
    logp = jax.nn.log_softmax(model.logits(h), -1)
    full = -jnp.sum(jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0] * b["loss_mask"])
    for chunk in (7, 16, 1024):
        total, weight = chunked_cross_entropy(model, h, jnp.asarray(b["targets"]), jnp.asarray(b["loss_mask"]), chunk)
        np.testing.assert_allclose(total, full, rtol=1e-6)
        assert weight == b["loss_mask"].sum()


@pytest.mark.parametrize("remat", ["none", "full"])
def test_accumulated_gradient_equals_full_batch(remat):
    """4 micro-batches with uneven token counts give the one-batch gradient (and the same update)."""
    cfg = _cfg(f"train.remat={remat}", "optimizer.schedule=constant")
    batch = {k: jnp.asarray(v) for k, v in random_batch().items()}
    trainer = create_trainer(cfg, one_device(), _loss(cfg))
    params = trainer.state["params"]
    reference = _grads(trainer, batch)
    for micro in (1, 4):
        grads, loss, weight, _ = jax.jit(accumulate_gradients, static_argnums=(0, 1, 6))(
            trainer.graphdef, _loss(cfg), params, {}, None, batch, micro
        )
        assert weight == batch["loss_mask"].sum()
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
            np.testing.assert_allclose(g, r, atol=1e-5)
    one = create_trainer(cfg, one_device(), _loss(cfg))
    four = create_trainer(
        _cfg(f"train.remat={remat}", "optimizer.schedule=constant", "train.micro_batches=4"), one_device(), _loss(cfg)
    )
    m1, m4 = one.step(batch), four.step(batch)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(fsdp=2, tensor=4), MeshConfig(data=2, fsdp=4)])
def test_sharded_step_equals_single_device(mesh_cfg):
    batch = random_batch()
    cfg = _cfg("train.micro_batches=2")
    out = {}
    for name, mesh in (("one", one_device()), ("many", make_mesh(mesh_cfg))):
        trainer = create_trainer(cfg, mesh, _loss(cfg))
        grads, _, _, _ = jax.jit(accumulate_gradients, static_argnums=(0, 1, 6))(
            trainer.graphdef, _loss(cfg), trainer.state["params"], {}, None, batch, 2
        )
        metrics = trainer.step(batch)
        out[name] = (grads, trainer.state, metrics)
    (g1, s1, m1), (g8, s8, m8) = out["one"], out["many"]
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # after Adam, g / sqrt(v) can turn last-bit gradient differences of tiny entries into ~lr * 1e-3
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"])):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_non_finite_loss_skips_update():
    cfg = _cfg()

    def poisoned(model, frozen, batch):
        loss_sum, aux = _loss(cfg)(model, frozen, batch)
        return loss_sum * jnp.where(batch["poison"].any(), jnp.nan, 1.0), aux

    trainer = create_trainer(cfg, one_device(), poisoned)
    batch = {**random_batch(), "poison": np.zeros((8, 16), np.int32)}
    state, metrics = trainer.train_step(trainer.state, trainer.frozen.arrays, batch)
    assert bool(metrics["finite"])
    before = jax.tree.map(np.asarray, state)
    state, metrics = trainer.train_step(state, trainer.frozen.arrays, {**batch, "poison": np.ones((8, 16), np.int32)})
    assert not bool(metrics["finite"]) and int(state["step"]) == 2
    for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(state["opt_state"])):
        np.testing.assert_array_equal(a, b)


def test_batch_shape_errors():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with pytest.raises(ValueError, match="micro-batch of 6 rows is not divisible by the data axes data x fsdp = 4"):
        check_batch(mesh, 12, 2, 64)
    with pytest.raises(ValueError, match="not divisible by train.micro_batches 5"):
        check_batch(mesh, 12, 5, 64)
