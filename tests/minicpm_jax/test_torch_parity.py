"""The ``format="llama"`` export loaded by vanilla ``transformers.LlamaForCausalLM`` (PyTorch CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.config import load_config
from minicpm_jax.interop import save_hf_checkpoint
from minicpm_jax.model import create_model

torch = pytest.importorskip("torch", reason="install the test extra: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.torch


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("tiny-minicpm4", []),  # tied, short factors, GQA 2
        ("tiny-minicpm4-longrope", []),  # max_pos > original: long factors + mscale, untied
        ("tiny-minicpm4", ["model.num_key_value_heads=4"]),  # MHA
    ],
)
def test_llama_export_matches_in_pytorch(preset, overrides, tmp_path):
    cfg = load_config(preset, overrides).model
    model = create_model(cfg, seed=11, dtype=jnp.float32)
    save_hf_checkpoint(model, cfg, tmp_path / "llama", format="llama", dtype="float32")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    hf.eval()
    # shorter than original_max_position_embeddings: transformers would pick short factors by length
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
