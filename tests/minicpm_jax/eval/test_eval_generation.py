"""exact_match: the engine's completions equal greedy argmax decoding by hand; synthetic data is seeded."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.config import load_config
from minicpm_jax.eval import EvalContext, run_task
from minicpm_jax.eval.loading import byte_tokenizer
from minicpm_jax.eval.tasks import encode_context
from minicpm_jax.eval.tasks.exact_match import synthetic_examples
from minicpm_jax.model import create_model


def greedy_by_hand(model, ids, steps, stop_ids):
    ids = list(ids)
    out = []
    forward = jax.jit(lambda x: model(x))  # causal: right padding does not change earlier logits
    for _ in range(steps):
        padded = np.zeros((1, 32), np.int32)
        padded[0, : len(ids)] = ids
        logits = np.asarray(forward(padded))[0, len(ids) - 1]
        token = int(np.argmax(logits))
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return out


def test_synthetic_examples_are_seeded():
    a = synthetic_examples("arithmetic", 6, seed=0)
    assert a == synthetic_examples("arithmetic", 6, seed=0) and a != synthetic_examples("arithmetic", 6, seed=1)
    assert all(p.endswith(":") and (p + ans).count(":") == 1 for p, ans in a)
    c = synthetic_examples("copy", 8, seed=0)
    for prompt, answer in c:
        assert prompt.endswith(("->", "passkey?")) and answer.startswith(" ")
        if prompt.startswith("copy: "):
            assert answer.strip() == prompt[len("copy: ") : -len(" ->")]
    with pytest.raises(ValueError, match="dataset='nope'"):
        synthetic_examples("nope", 2, seed=0)


def test_exact_match_equals_greedy_decoding(tmp_path):
    cfg = load_config("tiny-minicpm4").model
    model, tok = create_model(cfg, seed=1, dtype=jnp.float32), byte_tokenizer()
    prompts = ["47+38:", "copy: abc ->", "x"]
    expected = [greedy_by_hand(model, encode_context(tok, p), 5, tok.stop_ids) for p in prompts]
    answers = [tok.decode(e) for e in expected]
    path = tmp_path / "em.jsonl"
    lines = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    lines[2]["answer"] = answers[2] + "!"  # one wrong answer
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ctx = EvalContext(model, tok, batch_size=2)
    res = run_task("exact_match", ctx, {"path": str(path), "max_new_tokens": 5, "until": []})
    assert [r["completion"] for r in res.rows] == answers
    assert res.metrics["exact_match"] == pytest.approx(2 / 3)
    with pytest.raises(FileNotFoundError, match="no such file"):
        run_task("exact_match", ctx, {"path": str(tmp_path / "none.jsonl")})
    path.write_text(json.dumps({"prompt": "a" * 1100, "answer": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: prompt is 1101 tokens; .* is 1024"):
        run_task("exact_match", ctx, {"path": str(path)})
    path.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: missing key\(s\) \['answer'\]"):
        run_task("exact_match", ctx, {"path": str(path)})
    syn = run_task("exact_match", ctx, {"dataset": "copy", "num_examples": 2, "max_new_tokens": 5})
    assert syn.metrics["examples"] == 2 and [r["prompt"] for r in syn.rows] == [
        p for p, _ in synthetic_examples("copy", 2, 0)
    ]
