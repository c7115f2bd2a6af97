"""Perplexity (incl. the sliding window) equals transformers ``LlamaForCausalLM`` on the Llama-layout export."""

import math

import jax.numpy as jnp
import pytest

from minicpm_jax.config import load_config
from minicpm_jax.eval import EvalContext, run_task
from minicpm_jax.eval.loading import byte_tokenizer
from minicpm_jax.interop import save_hf_checkpoint
from minicpm_jax.model import create_model

torch = pytest.importorskip("torch", reason="install the test extra: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.torch

TEXT = "passkey 25954. the sun is warm. passkey? 25954 | 89-63: 89-60=29, 29-3=26 copy: qmxra -> qmxra"


def test_perplexity_matches_transformers(tmp_path):
    cfg = load_config("tiny-minicpm4").model
    model, tok = create_model(cfg, seed=5, dtype=jnp.float32), byte_tokenizer()
    save_hf_checkpoint(model, cfg, tmp_path / "llama", format="llama", dtype="float32")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    (tmp_path / "t.txt").write_text(TEXT)
    ids = torch.tensor([tok.encode(TEXT, add_bos=True)])
    for max_length, stride in [(ids.shape[1], ids.shape[1]), (32, 12)]:
        nll, count, prev_end = 0.0, 0, 0  # the strided-perplexity loop of the transformers docs
        for begin in range(0, ids.shape[1], stride):
            end = min(begin + max_length, ids.shape[1])
            trg = end - prev_end
            window = ids[:, begin:end]
            labels = window.clone()
            labels[:, :-trg] = -100
            with torch.no_grad():
                loss = hf(window, labels=labels).loss.item()
            scored = int((labels[:, 1:] != -100).sum())
            nll, count, prev_end = nll + loss * scored, count + scored, end
            if end == ids.shape[1]:
                break
        opts = {"paths": [str(tmp_path / "t.txt")], "max_length": max_length, "stride": stride}
        m = run_task("perplexity", EvalContext(model, tok, batch_size=4), opts).metrics
        assert m["tokens"] == count == ids.shape[1] - 1
        assert m["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
