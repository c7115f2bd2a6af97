"""The whole hybrid model with the Pallas kernels, from this CPU host, with no ``interpret`` argument.

``interpret=None`` (what the model passes) is decided when the program is lowered
(``jax.lax.platform_dependent``): ``jax.export(..., platforms=["cuda"|"tpu"])`` of the model's
forward + backward lowers the compiled kernels of both mixers (InfLLM v2 sparse attention above
``dense_len`` and Lightning attention), while running the same model on CPU interprets them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minicpm_jax.config import load_config
from minicpm_jax.config.loading import read_model_preset
from minicpm_jax.model import abstract_model, create_model

T = 80  # above dense_len (64): the sparse layer takes the InfLLM v2 block-sparse path
TRITON = "__gpu$xla.gpu.triton"  # InfLLM v2 pallas_gpu (Triton backend)
MARKERS = {  # platform, Lightning kernel, InfLLM v2 kernel
    "pallas_gpu": ("cuda", "mosaic_gpu_v2", TRITON),
    "pallas_tpu": ("tpu", "tpu_custom_call", "tpu_custom_call"),
}


def tiny_hybrid():
    """tiny-sala cut to one InfLLM v2 sparse layer + one Lightning layer; Lightning head dim 64
    (the GPU kernel's smallest WGMMA tile)."""
    raw = read_model_preset("tiny-sala")
    raw.update(num_hidden_layers=2, mixer_types=["minicpm4", "lightning-attn"], lightning_head_dim=64)
    return load_config(raw).model


def model_with(cfg, state, impl):
    graphdef = nnx.split(abstract_model(cfg, dtype=jnp.bfloat16, attention_impl=impl, lightning_impl=impl))[0]
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def hybrid():
    cfg = tiny_hybrid()
    assert T >= cfg.sparse_config.dense_len > 0
    state = nnx.split(create_model(cfg, seed=0, dtype=jnp.bfloat16))[1]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, T)), jnp.int32)
    return cfg, state, ids


def loss_and_grad(graphdef, treedef):
    """``(loss, gradient leaves)`` of next-token cross-entropy from the parameter leaves (plain
    arrays in and out, so the exported function serialises)."""

    def f(leaves, ids):
        def loss(leaves):
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            logits = model(ids).astype(jnp.float32)
            return -jnp.mean(jax.nn.log_softmax(logits)[0, jnp.arange(T - 1), ids[0, 1:]])

        return jax.value_and_grad(loss)(leaves)

    return f


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_whole_model_exports_compiled_kernels(hybrid, impl):
    """Forward + backward of the model exports for CUDA / TPU from CPU with both Pallas kernels."""
    cfg, state, ids = hybrid
    model = model_with(cfg, state, impl)
    assert [layer.self_attn.implementation for layer in model.model.layers] == [impl, impl]
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    platform, lightning_marker, infllm_marker = MARKERS[impl]
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)] if impl == "pallas_gpu" else []
    fn = jax.jit(loss_and_grad(graphdef, treedef))
    exported = jax.export.export(fn, platforms=[platform], disabled_checks=checks)(leaves, ids)
    text = exported.mlir_module()
    assert exported.platforms == (platform,)
    if impl == "pallas_gpu":
        assert text.count(f"@{TRITON}(") == 2  # InfLLM v2: forward (Triton) + backward
        assert text.count(f"@{lightning_marker}(") == 4  # Lightning: forward + 3 backward kernels (Mosaic GPU)
    else:  # Mosaic TPU: Lightning forward + backward, InfLLM v2 forward + dq + dkv
        assert text.count(f"@{infllm_marker}(") == 5
    assert len(exported.serialize()) > 0


def test_pallas_gpu_model_on_cpu_interprets_and_equals_xla(hybrid):
    """Same weights, no interpret argument: the pallas_gpu model runs on CPU (interpreted) and its
    logits and loss equal the xla model's at bf16 tolerance."""
    cfg, state, ids = hybrid
    logits = {impl: model_with(cfg, state, impl)(ids).astype(jnp.float32) for impl in ("pallas_gpu", "xla")}
    scale = float(jnp.abs(logits["xla"]).max())
    np.testing.assert_allclose(np.asarray(logits["pallas_gpu"]), np.asarray(logits["xla"]), rtol=0, atol=3e-2 * scale)
    leaves, treedef = jax.tree.flatten(state)
    (loss, grads), (xla_loss, xla_grads) = (
        jax.jit(loss_and_grad(nnx.split(model_with(cfg, state, impl))[0], treedef))(leaves, ids)
        for impl in ("pallas_gpu", "xla")
    )
    np.testing.assert_allclose(float(loss), float(xla_loss), rtol=1e-3)
    for a, b in zip(grads, xla_grads, strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=5e-2 * max(1e-3, float(jnp.abs(b).max()))
        )
