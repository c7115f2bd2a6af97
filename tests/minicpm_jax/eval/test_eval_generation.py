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


def test_exact_match_sampled_avg_at_k():
    cfg = load_config("tiny-minicpm4").model
    model, tok = create_model(cfg, seed=1, dtype=jnp.float32), byte_tokenizer()
    opts = {"dataset": "copy", "num_examples": 3, "max_new_tokens": 4, "until": []}
    sample = {**opts, "num_samples": 4, "temperature": 1.0}
    a = run_task("exact_match", EvalContext(model, tok, batch_size=4, seed=3), sample)
    assert set(a.metrics) == {"exact_match", "pass_at_k", "num_samples", "examples"}
    assert a.metrics["num_samples"] == 4 and a.metrics["examples"] == 3 and len(a.rows) == 3
    assert all(len(r["completions"]) == len(r["correct"]) == 4 for r in a.rows)
    # per-sample keys: the same seed gives the same samples whatever the batch size
    b = run_task("exact_match", EvalContext(model, tok, batch_size=8, seed=3), sample)
    assert [r["completions"] for r in a.rows] == [r["completions"] for r in b.rows] and a.metrics == b.metrics
    c = run_task("exact_match", EvalContext(model, tok, batch_size=4, seed=4), sample)
    assert [r["completions"] for r in a.rows] != [r["completions"] for r in c.rows]
    # top_p tiny keeps only the argmax: sampled completions are the greedy ones
    ctx = EvalContext(model, tok, batch_size=4)
    greedy = run_task("exact_match", ctx, opts)
    narrow = run_task("exact_match", ctx, {**sample, "num_samples": 2, "top_p": 1e-6})
    assert [r["completions"] for r in narrow.rows] == [[r["completion"]] * 2 for r in greedy.rows]
    assert narrow.metrics["exact_match"] == greedy.metrics["exact_match"]
    assert 0 <= a.metrics["exact_match"] <= a.metrics["pass_at_k"] <= 1


def test_exact_match_sampling_options_are_checked():
    ctx = EvalContext(create_model(load_config("tiny-minicpm4").model, seed=1, dtype=jnp.float32), byte_tokenizer())
    with pytest.raises(ValueError, match=r"num_samples=4, top_p=1.0 need temperature > 0"):
        run_task("exact_match", ctx, {"num_samples": 4})
    with pytest.raises(ValueError, match=r"num_samples=0 .*; temperature=-1 .*; top_p=0 "):
        run_task("exact_match", ctx, {"num_samples": 0, "temperature": -1, "top_p": 0})
