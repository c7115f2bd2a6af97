"""Passkey / needle tasks: deterministic examples, option errors, the grid + heatmap, and a tiny model
trained for the passkey format (through the training engine) against the same model with shuffled weights."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minicpm_jax.ckpt import load_model, save_model
from minicpm_jax.config import MeshConfig, load_config
from minicpm_jax.eval.registry import EvalContext, run_task
from minicpm_jax.eval.tasks.retrieval import default_lengths, needle_example, passkey_example, score_spans
from minicpm_jax.generate.text import load_tokenizer
from minicpm_jax.model.factory import create_model
from minicpm_jax.sharding import make_mesh
from minicpm_jax.train.loop import run_training

TRAIN_LEN = 96  # rows of the training data; the evaluated lengths stay below it


def _tiny(tmp_path, name="model"):
    cfg = load_config("tiny-minicpm4", ["model.vocab_size=320"]).model
    model = create_model(cfg, dtype=jnp.float32)
    save_model(model, cfg, tmp_path / name, tokenizer_source="byte")
    return model, load_tokenizer(tmp_path / name)


KEY_LENGTH = 1  # one-digit keys: a tiny model learns them in a few hundred steps (5 digits need far more)


def test_examples_are_deterministic_and_exact_length(tmp_path):
    _, tok = _tiny(tmp_path)
    for make in (passkey_example, lambda t, r, n, d: needle_example(t, r, n, d, num_distractors=2)):
        a = make(tok, np.random.default_rng([3, 300, 500]), 300, 0.5)
        b = make(tok, np.random.default_rng([3, 300, 500]), 300, 0.5)
        c = make(tok, np.random.default_rng([4, 300, 500]), 300, 0.5)
        assert a == b and a != c
        assert len(a[0]) == 300
        assert tok.decode(a[1]) in tok.decode(a[0])  # the key is in the context
    prompt, answer = passkey_example(tok, np.random.default_rng(0), 150, 0.0)
    text = tok.decode(prompt)
    assert text.index(tok.decode(answer)) < 40 and text.endswith("What is the pass key? #")


def test_options_and_errors(tmp_path):
    model, tok = _tiny(tmp_path)
    ctx = EvalContext(model=model, tokenizer=tok, batch_size=4)
    with pytest.raises(ValueError, match="unknown option.*'lenghts'"):
        run_task("passkey", ctx, {"lenghts": [64]})
    with pytest.raises(ValueError, match="lengths.*depths") as err:
        run_task("passkey", ctx, {"lengths": [0], "depths": [1.5]})
    assert "num_samples" not in str(err.value)
    with pytest.raises(ValueError, match="max_position_embeddings 1024"):
        run_task("needle", ctx, {"lengths": [2048]})
    with pytest.raises(ValueError, match="length 40: context too short"):
        run_task("passkey", ctx, {"lengths": [40]})
    with pytest.raises(ValueError, match="key_length: 10"):
        run_task("passkey", ctx, {"key_length": 10})
    with pytest.raises(ValueError, match="num_distractors"):
        run_task("needle", ctx, {"num_distractors": -1})
    small = {"lengths": [160], "depths": [0.0, 1.0], "num_samples": 2}
    one, two = run_task("needle", ctx, small), run_task("needle", ctx, small)
    assert one.rows == two.rows and len(one.rows) == 2 and one.plots == []


def _shuffled(model, seed=0):
    """``model`` with every parameter's entries permuted (same values, no structure)."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jax.random.permutation(k, x.reshape(-1)).reshape(x.shape) for k, x in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def test_trained_passkey_model_retrieves_and_shuffled_weights_do_not(tmp_path):
    steps, rows = 400, 16
    cfg = load_config(
        "tiny-minicpm4",
        [
            "dtype=float32",
            "model.vocab_size=320",
            f"data.seq_len={TRAIN_LEN}",
            "data.eval_documents=0",
            f"train.steps={steps}",
            f"train.global_batch_size={rows}",
            "train.eval_every=0",
            "train.log_every=100",
            f"train.checkpoint_every={steps}",
            f"train.output_dir={tmp_path / 'run'}",
            "optimizer.learning_rate=0.01",
            "optimizer.warmup_steps=20",
            f"optimizer.decay_steps={steps // 4}",
            f"data.task_rows=[{{task: passkey, rows: {rows}, options: {{key_length: {KEY_LENGTH}, min_length: 56}}}}]",
        ],
    )
    start = time.perf_counter()
    run_training(cfg)  # every row a passkey example (data.task_rows), the loss on the key only
    print(f"passkey training: {time.perf_counter() - start:.1f} s")
    _, model = load_model(tmp_path / "run" / "final", dtype=jnp.float32)
    tok = load_tokenizer(tmp_path / "run" / "final")
    options = {"lengths": [64, 90], "depths": [0.0, 0.5, 1.0], "num_samples": 8, "seed": 7, "key_length": KEY_LENGTH}
    ctx = EvalContext(model=model, tokenizer=tok, batch_size=16, output_dir=tmp_path / "plots")
    result = run_task("passkey", ctx, options)
    print("trained:", result.metrics)
    assert result.metrics["acc"] == 1.0, result.rows
    assert [(r["length"], r["depth"]) for r in result.rows] == [(n, d) for n in (64, 90) for d in (0.0, 0.5, 1.0)]
    assert set(result.metrics) == {"acc", "acc_len_64", "acc_len_90"}
    assert result.plots == [str(tmp_path / "plots" / "passkey_heatmap.png")]
    assert (tmp_path / "plots" / "passkey_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ctx.model, ctx.output_dir = _shuffled(model), None
    shuffled = run_task("passkey", ctx, options)
    print("shuffled:", shuffled.metrics)
    assert shuffled.metrics["acc"] <= 0.3, shuffled.rows  # chance: 1/9


def test_scoring_matches_the_full_forward_on_a_sharded_hybrid_beyond_dense_len(tmp_path):
    """tiny-sala (InfLLM v2 + Lightning, dense_len 64): padded, batched, sharded scoring agrees with an
    unpadded forward of each sequence, below and beyond dense_len."""
    cfg = load_config("tiny-sala", ["model.vocab_size=320"]).model
    model = create_model(cfg, dtype=jnp.float32)
    save_model(model, cfg, tmp_path / "m", tokenizer_source="byte")
    tok = load_tokenizer(tmp_path / "m")
    rng = np.random.default_rng(0)
    forward = nnx.jit(lambda m, ids: m(ids))
    sequences, spans = [], []
    for n in (40, 100):
        seq = rng.integers(3, 259, n).tolist()
        seq[10] = int(jnp.argmax(forward(model, jnp.asarray([seq]))[0, 9]))  # causal: later tokens do not matter
        seq[-1] = int(jnp.argmax(forward(model, jnp.asarray([seq]))[0, -2]))  # the model's own next token
        sequences.append(seq)
        spans.append([(10, 11), (n - 1, n), (5, 7)])
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    sharded = create_model(cfg, mesh=mesh, dtype=jnp.float32)
    for m in (model, sharded):
        hits = score_spans(EvalContext(model=m, tokenizer=tok, batch_size=4), sequences, spans)
        assert [h[:2] for h in hits] == [[True, True]] * 2
    opts = {"lengths": [48, 100], "depths": [0.5], "num_samples": 2, "key_length": 1}
    rows = run_task("passkey", EvalContext(model=sharded, tokenizer=tok, batch_size=4), opts).rows
    assert [r["beyond_dense_len"] for r in rows] == [False, True]
    assert default_lengths(cfg.max_position_embeddings) == [256, 512, 1024, 2048]
    assert default_lengths(200) == [184]
