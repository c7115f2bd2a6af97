"""Log-likelihood scoring, perplexity and multiple choice against NumPy sums from the model's full logits."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.config import load_config
from minicpm_jax.eval import EvalContext, evaluate, run_task
from minicpm_jax.eval.loading import byte_tokenizer
from minicpm_jax.eval.scoring import loglikelihood, rolling_windows
from minicpm_jax.eval.tasks import encode_pair
from minicpm_jax.model import create_model

TEXT = "the grass is green. 47+38: 40+30=70, 7+8=15, 70+15=85 copy: abcde -> abcde"


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny-minicpm4").model
    return create_model(cfg, seed=3, dtype=jnp.float32), byte_tokenizer()


@functools.cache
def _jitted(model):
    return jax.jit(lambda x: model(x))


def _forward(model, ids):
    return _jitted(model)(ids)


def np_logprobs(model, ids) -> np.ndarray:
    """log p(ids[t+1] | ids[:t+1]) for every t, float64 log-softmax of the full logits."""
    padded = np.zeros((1, 128), np.int32)  # one compilation; causal, so padding changes no earlier logit
    padded[0, : len(ids)] = ids
    logits = np.asarray(_forward(model, padded))[0, : len(ids)].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return logp[np.arange(len(ids) - 1), ids[1:]]


def test_loglikelihood_and_greedy(tiny):
    model, _ = tiny
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(3, 259, n).tolist(), rng.integers(3, 259, m).tolist()) for n, m in [(5, 3), (1, 7), (20, 1)]]
    logits = np.asarray(model(jnp.asarray([pairs[2][0]], jnp.int32)))[0, -1]
    pairs.append((pairs[2][0], [int(np.argmax(logits))]))  # the greedy token
    got = loglikelihood(model, pairs, batch_size=3)
    for (ctx, cont), (score, greedy) in zip(pairs, got):
        expected = np_logprobs(model, ctx + cont)[len(ctx) - 1 :].sum()
        assert score == pytest.approx(expected, abs=1e-4)
    assert got[3][1] and not got[0][1]


def test_rolling_windows_score_every_token_once():
    tokens = list(range(50))
    for max_length, stride in [(16, 5), (16, 16), (64, 8), (2, 1)]:
        windows = rolling_windows(tokens, max_length, stride)
        assert [t for _, cont in windows for t in cont] == tokens[1:]
        assert all(len(c) + len(x) <= max_length + 1 and len(c) >= 1 for c, x in windows)


def test_perplexity_sliding_window(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "a.txt").write_text(TEXT)
    ids = tok.encode(TEXT, add_bos=True)
    max_length, stride = 24, 10
    total, count, prev_end = 0.0, 0, 0  # the standard strided loop, one forward per window
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg = end - max(prev_end, 1)
        lp = np_logprobs(model, ids[begin:end])
        total, count, prev_end = total + lp[len(lp) - trg :].sum(), count + trg, end
        if end == len(ids):
            break
    assert count == len(ids) - 1
    opts = {"paths": [str(tmp_path / "a.txt")], "max_length": max_length, "stride": stride}
    m = run_task("perplexity", EvalContext(model, tok, batch_size=4), opts).metrics
    assert m["tokens"] == count and m["bytes"] == len(TEXT.encode())
    assert m["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(-total / count / math.log(2), rel=1e-5)  # 1 byte per token
    # the whole text in one window: exp of the mean next-token loss of one forward pass
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": TEXT}) + "\n")
    res = evaluate(model, {"perplexity": {"paths": str(tmp_path / "b.jsonl"), "text_field": "body"}}, tokenizer=tok)
    assert res["perplexity"]["metrics"]["perplexity"] == pytest.approx(
        math.exp(-np_logprobs(model, ids).mean()), rel=1e-5
    )


def test_perplexity_parquet(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    model, tok = tiny
    pq.write_table(pa.table({"text": ["abc def", "xyz"]}), tmp_path / "t.parquet")
    m = run_task("perplexity", EvalContext(model, tok), {"paths": [str(tmp_path / "t.parquet")]}).metrics
    assert m["documents"] == 2 and m["tokens"] == 10


def test_multiple_choice(tiny, tmp_path):
    model, tok = tiny
    lines = [
        {"context": "the sky is", "choices": [" blue.", " green and long.", " warm"], "gold": 0},
        {"context": "47+38:", "choices": [" 85", " 86"], "gold": 1},
        {"context": "copy: abc ->", "choices": [" abc", " abd", " xyzxyz"], "gold": " abc"},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = run_task("multiple_choice", EvalContext(model, tok, batch_size=4), {"path": str(path)})
    acc, acc_norm = [], []
    for line, row in zip(lines, res.rows):
        lls = []
        for choice in line["choices"]:
            ctx, cont = encode_pair(tok, line["context"], choice)
            assert ctx + cont == tok.encode(line["context"] + choice, add_bos=True)
            lls.append(np_logprobs(model, ctx + cont)[len(ctx) - 1 :].sum())
        np.testing.assert_allclose(row["loglikelihoods"], lls, atol=1e-4)
        gold = line["gold"] if isinstance(line["gold"], int) else line["choices"].index(line["gold"])
        acc.append(int(np.argmax(lls)) == gold)
        acc_norm.append(int(np.argmax(np.array(lls) / [len(c.encode()) for c in line["choices"]])) == gold)
    assert res.metrics["acc"] == pytest.approx(np.mean(acc)) and res.metrics["acc_norm"] == pytest.approx(
        np.mean(acc_norm)
    )


def test_bad_inputs(tiny, tmp_path):
    model, tok = tiny
    ctx = EvalContext(model, tok)
    with pytest.raises(ValueError, match="unknown eval task 'nope'"):
        run_task("nope", ctx, {})
    with pytest.raises(ValueError, match=r"unknown eval task\(s\) \['nope'\]"):
        evaluate(model, ["perplexity", "nope"], tokenizer=tok)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['strid'\]"):
        run_task("perplexity", ctx, {"paths": "x.txt", "strid": 3})
    with pytest.raises(FileNotFoundError, match="no such file 'missing.txt'"):
        run_task("perplexity", ctx, {"paths": ["missing.txt"]})
    with pytest.raises(FileNotFoundError, match="no such file"):
        run_task("multiple_choice", ctx, {"path": str(tmp_path / "none.jsonl")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"context": "a", "choices": ["b", "c"], "gold": 0})
        + "\n\n"
        + json.dumps({"context": "a", "gold": 1})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"line 3: missing key\(s\) \['choices'\]"):
        run_task("multiple_choice", ctx, {"path": str(bad)})
    bad.write_text(json.dumps({"context": "x" * 1030, "choices": ["b", "c"], "gold": 0}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: context \+ choice is 1031 tokens; .* is 1024"):
        run_task("multiple_choice", ctx, {"path": str(bad)})
    long = tmp_path / "long.txt"
    long.write_text("x" * 1100)
    with pytest.raises(ValueError, match="max_length=2048 exceeds the model's context"):
        run_task("perplexity", ctx, {"paths": [str(long)], "max_length": 2048})
    with pytest.raises(ValueError, match=r"is 1100 tokens; the model's context \(max_position_embeddings\) is 1024"):
        loglikelihood(model, [(tok.encode("x" * 1000), tok.encode("y" * 101))])


def test_loglikelihood_sharded_and_hybrid(tiny):
    """fsdp=8 parameters (a batch of 3 padded to 8 rows) give the single-device scores; the hybrid
    (sparse + Lightning) model's scores equal sums from its full logits."""
    from minicpm_jax.config import MeshConfig
    from minicpm_jax.sharding import make_mesh

    model, tok = tiny
    pairs = [encode_pair(tok, "47+38:", " 85"), encode_pair(tok, "copy: ab ->", " ab"), encode_pair(tok, "x", "yz")]
    sharded = create_model(model.config, mesh=make_mesh(MeshConfig(fsdp=8)), seed=3, dtype=jnp.float32)
    np.testing.assert_allclose(
        [s for s, _ in loglikelihood(sharded, pairs, 3)], [s for s, _ in loglikelihood(model, pairs, 3)], atol=1e-4
    )
    sala = create_model(load_config("tiny-sala").model, seed=0, dtype=jnp.float32)
    for (ctx, cont), (score, _) in zip(pairs, loglikelihood(sala, pairs, 2)):
        assert score == pytest.approx(np_logprobs(sala, ctx + cont)[len(ctx) - 1 :].sum(), abs=1e-4)
