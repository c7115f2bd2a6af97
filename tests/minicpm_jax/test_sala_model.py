"""MiniCPM-SALA hybrid and sparse MiniCPM4: layers and whole forward vs the float64 NumPy reference
(below and above dense_len), full-budget sparse == dense, all-"minicpm4" hybrid == dense bit for bit,
sharded == unsharded, packed rows (every mixer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from minicpm_numpy_ref import read_checkpoint
from sala_numpy_ref import forward, lightning_layer, softmax_layer

from minicpm_jax.config import MeshConfig, load_config
from minicpm_jax.interop import save_hf_checkpoint
from minicpm_jax.model import abstract_model, create_model
from minicpm_jax.sharding import make_mesh

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def sala(tmp_path_factory):
    """Tiny SALA (fp32), its exported state dict and config.json dict."""
    cfg = load_config("tiny-sala").model
    model = create_model(cfg, seed=5, dtype=jnp.float32)
    path = tmp_path_factory.mktemp("sala") / "ck"
    save_hf_checkpoint(model, cfg, path, dtype="float32")
    return (cfg, model, *read_checkpoint(path))


def _layer_io(model, P, hf, layer, t):
    x = RNG.normal(size=(1, t, hf["hidden_size"])).astype(np.float32)
    pos = jnp.arange(t)[None]
    ours = np.asarray(model.model.layers[layer].self_attn(jnp.asarray(x), pos, None)[0][0])
    p = lambda name: P[f"model.layers.{layer}.self_attn.{name}"].astype(np.float64)
    return ours, p, x[0].astype(np.float64)


@pytest.mark.parametrize("t", [50, 130])
def test_lightning_layer_matches_numpy(sala, t):
    cfg, model, P, hf = sala
    assert cfg.layer_mixers[1] == "lightning-attn"
    ours, p, x = _layer_io(model, P, hf, 1, t)
    np.testing.assert_allclose(ours, lightning_layer(p, hf, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("t", [40, 130])  # dense (< dense_len 64) and InfLLM v2 (8+ blocks, 6 selected)
def test_gated_nope_sparse_layer_matches_numpy(sala, t):
    cfg, model, P, hf = sala
    assert cfg.layer_mixers[0] == "minicpm4" and not cfg.attn_use_rope and cfg.attn_use_output_gate
    ours, p, x = _layer_io(model, P, hf, 0, t)
    np.testing.assert_allclose(ours, softmax_layer(p, hf, x), rtol=0, atol=1e-5)
    dense = softmax_layer(p, {**hf, "sparse_config": None}, x)
    assert (np.abs(ours - dense).max() > 1e-3) == (t >= 64)  # the sparse path really drops blocks


@pytest.mark.parametrize("t", [48, 112])
def test_sala_forward_matches_numpy(sala, t):
    cfg, model, P, hf = sala
    ids = RNG.integers(0, cfg.vocab_size, size=t)
    ours = np.asarray(model(jnp.asarray(ids)[None]))[0]
    np.testing.assert_allclose(ours, forward(P, hf, ids), rtol=0, atol=1e-4)


@pytest.mark.slow  # use_nope selection is also covered by test_sala_cache (decode == forward)
def test_sparse_minicpm4_with_nope_selection_matches_numpy(tmp_path):
    """RoPE attention whose block selection uses the pre-RoPE q/k (use_nope), above dense_len."""
    cfg = load_config("tiny-minicpm4-sparse", ["model.sparse_config.use_nope=true"]).model
    model = create_model(cfg, seed=2, dtype=jnp.float32)
    save_hf_checkpoint(model, cfg, tmp_path / "ck", dtype="float32")
    P, hf = read_checkpoint(tmp_path / "ck")
    assert hf["sparse_config"]["use_nope"] is True
    ids = RNG.integers(0, cfg.vocab_size, size=100)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids)[None]))[0], forward(P, hf, ids), rtol=0, atol=1e-4)


def test_sparse_with_full_budget_equals_dense():
    """topk covering every block, always sparse (dense_len 0): the InfLLM v2 path equals dense attention."""
    full = ["model.sparse_config.topk=16", "model.sparse_config.dense_len=0"]
    sparse = create_model(load_config("tiny-minicpm4-sparse", full).model, seed=4, dtype=jnp.float32)
    dense = create_model(load_config("tiny-minicpm4").model, seed=4, dtype=jnp.float32)
    ids = jnp.asarray(RNG.integers(0, 512, size=(2, 96)))
    np.testing.assert_allclose(np.asarray(sparse(ids)), np.asarray(dense(ids)), rtol=0, atol=1e-5)


def test_all_minicpm4_hybrid_equals_dense_bit_for_bit():
    base = load_config("tiny-minicpm4").model
    hybrid = base.model_copy(update={"model_type": "minicpm_sala", "mixer_types": ("minicpm4",) * 2})
    ids = jnp.asarray(RNG.integers(0, 512, size=(2, 40)))
    a = create_model(base, seed=6, dtype=jnp.float32)(ids)
    b = create_model(hybrid, seed=6, dtype=jnp.float32)(ids)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_hybrid_forward_equals_unsharded(sala):
    cfg, unsharded = sala[:2]
    ids = jnp.asarray(RNG.integers(0, cfg.vocab_size, size=(4, 80)))  # above dense_len: sparse path
    ref = np.asarray(jax.jit(lambda x: unsharded(x))(ids))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = create_model(cfg, mesh=mesh, seed=5, dtype=jnp.float32)
    assert len(model.model.layers[1].self_attn.q_proj.kernel[...].sharding.device_set) == 8
    with jax.set_mesh(mesh):
        out = np.asarray(jax.jit(lambda x: model(x))(ids))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_packed_rows_equal_documents_alone(sala):
    """Packed documents stay apart in sparse MiniCPM4 above dense_len and in the SALA hybrid
    (InfLLM v2 and Lightning layers, per-document RoPE positions): each equals its own forward."""
    cfg = load_config("tiny-minicpm4-sparse", ["model.sparse_config.dense_len=0"]).model
    a, b = RNG.integers(0, 512, 70), RNG.integers(0, 512, 50)
    packed = jnp.asarray(np.concatenate([a, b]))[None]
    seg = jnp.asarray([0] * 70 + [1] * 50)[None]
    pos = jnp.asarray(list(range(70)) + list(range(50)))[None]
    for model, atol in ((create_model(cfg, seed=3, dtype=jnp.float32), 1e-5), (sala[1], 1e-4)):
        run = jax.jit(lambda ids, p=None, s=None, m=model: m(ids, positions=p, segment_ids=s)[0])
        out = np.asarray(run(packed, pos, seg))
        np.testing.assert_allclose(out[:70], np.asarray(run(jnp.asarray(a)[None])), atol=atol)
        np.testing.assert_allclose(out[70:], np.asarray(run(jnp.asarray(b)[None])), atol=atol)
        assert np.abs(out[70:] - np.asarray(run(packed))[70:]).max() > 1e-2  # unpacked would leak


@pytest.mark.slow  # ~45 s on 2 shared cores
def test_gradients_of_default_kernels_match_reference_kernels(sala):
    """Training path above dense_len: grads through InfLLM v2 (xla) and Lightning (xla) == reference kernels."""
    from flax import nnx

    cfg, model = sala[:2]
    ids = jnp.asarray(RNG.integers(0, cfg.vocab_size, size=(1, 80)))

    def grads(m):
        def loss(m):
            return jnp.mean(jax.nn.log_softmax(m(ids))[0, jnp.arange(79), ids[0, 1:]])

        return jax.tree.leaves(nnx.grad(loss)(m))

    graphdef, state = nnx.split(model)
    ref_graph = nnx.split(
        abstract_model(cfg, dtype=jnp.float32, attention_impl="reference", lightning_impl="reference")
    )[0]
    ref_model = nnx.merge(ref_graph, state)
    assert ref_model.model.layers[1].self_attn.implementation == "reference"
    for a, b in zip(grads(model), grads(ref_model), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * max(1.0, float(jnp.abs(b).max())))
