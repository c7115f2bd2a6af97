"""``scan_layers``: runs of one mixer kind as ``lax.scan`` give the layer loop's logits, gradients,
mixer io and decode results (fp32), on dense, sparse (InfLLM v2) and hybrid (SALA) tiny models, with
packed rows; parameter paths and checkpoints do not depend on the option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minicpm_jax.ckpt import load_model, save_model
from minicpm_jax.config import MeshConfig, load_config
from minicpm_jax.model import abstract_model, create_model, param_axes
from minicpm_jax.sharding import make_mesh

# (preset, overrides, T, remat): dense with a run of 3 layers; sparse above dense_len (64) so blocks
# are dropped; SALA's tiny pattern S L L S L L S S = runs of 1, 2, 1, 2, 2.
MODELS = {
    "dense": ("tiny-minicpm4", ["model.num_hidden_layers=3"], 24, "none"),
    "sparse": ("tiny-minicpm4-sparse", [], 80, "dots_saveable"),
    "hybrid": ("tiny-sala", [], 48, "full"),
}


def _pair(name):
    preset, overrides, t, _ = MODELS[name]
    cfg = load_config(preset, overrides).model
    loop = create_model(cfg, seed=3, dtype=jnp.float32)
    scanned_def = nnx.split(abstract_model(cfg, dtype=jnp.float32, scan_layers=True))[0]
    scanned = nnx.merge(scanned_def, nnx.state(loop))
    return cfg, loop, scanned, t


def _batch(cfg, t):
    """Two packed rows: two documents (split mid-chunk), and one document."""
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, t)))
    cut = t // 2 - 3
    seg = np.ones((2, t), np.int32)
    seg[0, cut:] = 2
    pos = np.stack([np.r_[np.arange(cut), np.arange(t - cut)], np.arange(t)])
    return ids, jnp.asarray(pos), jnp.asarray(seg)


def _loss_and_grads(model, ids, pos, seg, remat):
    graphdef, state = nnx.split(model)
    cot = jax.random.normal(jax.random.PRNGKey(1), (*ids.shape, model.config.vocab_size))

    @jax.jit
    def f(state):
        m = nnx.merge(graphdef, state)
        logits = m.logits(m.hidden_states(ids, pos, seg, remat=remat))
        return jnp.sum(logits * cot), logits

    (_, logits), grads = jax.value_and_grad(f, has_aux=True)(state)
    return logits, grads


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_grads_equal_layer_loop(name):
    cfg, loop, scanned, t = _pair(name)
    ids, pos, seg = _batch(cfg, t)
    remat = MODELS[name][3]
    logits, grads = _loss_and_grads(loop, ids, pos, seg, "none")
    s_logits, s_grads = _loss_and_grads(scanned, ids, pos, seg, remat)
    np.testing.assert_allclose(s_logits, logits, rtol=1e-5, atol=1e-5)
    for (path, g), (_, sg) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(s_grads), strict=True):
        scale = float(jnp.max(jnp.abs(g[...]))) + 1e-12
        err = float(jnp.max(jnp.abs(sg[...] - g[...]))) / scale
        assert err < 1e-5, f"{name} remat={remat} {'.'.join(map(str, path))}: relative error {err}"


def test_sharded_scan_equals_unsharded_loop():
    """8 devices (data 2, fsdp 2, tensor 2): the stacked states keep the per-layer shardings."""
    cfg, loop, _, t = _pair("hybrid")
    ids, pos, seg = _batch(cfg, t)
    ref = jax.jit(lambda m: m(ids, pos, seg))(loop)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = create_model(cfg, mesh=mesh, seed=3, dtype=jnp.float32, scan_layers=True)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda m: m(ids, pos, seg))(model)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_mixer_io_equals_layer_loop():
    cfg, loop, scanned, _ = _pair("hybrid")
    ids, pos, seg = _batch(cfg, 40)
    io = jax.jit(lambda m: m.mixer_io(ids, pos, seg))
    for (u, h), (su, sh) in zip(io(loop), io(scanned), strict=True):
        np.testing.assert_allclose(su, u, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(sh, h, rtol=1e-6, atol=1e-6)


def test_decode_with_scan_layers_equals_layer_loop():
    """Cached calls run the layer loop whatever ``scan_layers`` says; prefill + decode still work."""
    cfg, loop, scanned, _ = _pair("hybrid")
    ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12)))

    @jax.jit
    def run(model):
        first, cache = model.prefill(ids[:, :-1], model.init_cache(2, 80))
        return first, model.decode_step(ids[:, -1], cache)[0]

    outs = [run(loop), run(scanned)]
    full = jax.jit(lambda m: m(ids))(loop)
    for got in outs:
        np.testing.assert_allclose(got[0], full[:, -2], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1], full[:, -1], rtol=1e-5, atol=1e-5)


def test_checkpoint_restores_into_either_form(tmp_path):
    cfg, loop, scanned, _ = _pair("hybrid")
    assert param_axes(scanned) == param_axes(loop)  # same paths: model.layers.<i>....
    assert "model.layers.7.mlp.down_proj.kernel" in param_axes(scanned)
    save_model(scanned, cfg, tmp_path / "ck")
    ids = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 20)))
    want = jax.jit(lambda m: m(ids))(loop)
    for scan in (False, True):
        _, restored = load_model(tmp_path / "ck", dtype=jnp.float32, scan_layers=scan)
        assert restored.scan_layers is scan
        np.testing.assert_allclose(jax.jit(lambda m: m(ids))(restored), want, rtol=1e-5, atol=1e-5)


def test_train_config_option_reaches_the_train_step():
    """``train.scan_layers`` (with remat): two optimizer steps match the layer loop's."""
    from train_testutil import one_device, random_batch, tiny_cfg

    from minicpm_jax.train.loop import pretrain_loss
    from minicpm_jax.train.state import create_trainer

    results = []
    for scan in (False, True):
        cfg = tiny_cfg("model.num_hidden_layers=3", "train.remat=full", f"train.scan_layers={str(scan).lower()}")
        trainer = create_trainer(cfg, one_device(), pretrain_loss(cfg))
        assert trainer.model().scan_layers is scan
        losses = [float(trainer.step(random_batch(seed=s))["loss"]) for s in range(2)]
        results.append((losses, jax.tree.map(np.asarray, trainer.state["params"])))
    (loop_losses, loop_params), (scan_losses, scan_params) = results
    np.testing.assert_allclose(scan_losses, loop_losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(loop_params), jax.tree.leaves(scan_params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-5)  # Adam's g/sqrt(v) near g = 0
