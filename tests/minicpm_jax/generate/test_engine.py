"""The generation engine against full forward passes: greedy = argmax of the full forward on the
growing sequence, returned log-probs = the full forward's, batched = alone, stop ids / limits /
finish reasons, streaming, sharded serving and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.config import load_config
from minicpm_jax.generate import SamplingParams, generate
from minicpm_jax.generate.sampling import process_logits, sampling_arrays
from minicpm_jax.model import create_model
from minicpm_jax.sharding import make_mesh

FOUR_LAYERS = ["model.num_hidden_layers=4"]  # small models compile faster
LIGHTNING_ONLY = FOUR_LAYERS + ["model.mixer_types=[" + ", ".join(["lightning-attn"] * 4) + "]"]
HYBRID = FOUR_LAYERS + ["model.mixer_types=[minicpm4, lightning-attn, lightning-attn, minicpm4]"]
# untied head and larger init, so that a random model does not just repeat its last token
VARIED = ["model.initializer_range=0.3", "model.tie_word_embeddings=false"]
CASES = {
    "dense": ("tiny-minicpm4", VARIED),
    "sparse": ("tiny-minicpm4-sparse", VARIED),  # dense_len 64: the 50-token prompt crosses it
    "lightning": ("tiny-sala", VARIED + LIGHTNING_ONLY),
    "hybrid": ("tiny-sala", VARIED + HYBRID),  # InfLLM v2 NoPE + Lightning layers
}
PROMPT_LENGTHS = (3, 17, 50)
NEW = 20


@functools.cache
def _model(case, mesh_shape=None):
    preset, overrides = CASES[case]
    axes = dict(zip(("data", "fsdp", "tensor", "sequence"), mesh_shape or ()))
    cfg = load_config(preset, overrides + [f"mesh.{k}={v}" for k, v in axes.items()])
    mesh = make_mesh(cfg.mesh) if mesh_shape else None
    return create_model(cfg.model, mesh=mesh, seed=5, dtype=jnp.float32)


@functools.cache
def _prompts(vocab):
    rng = np.random.default_rng(0)
    return tuple(tuple(rng.integers(3, vocab, n).tolist()) for n in PROMPT_LENGTHS)


def _full_logits(model, seq):
    return np.asarray(jax.jit(model)(jnp.asarray(seq)[None]))[0]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_argmax_of_full_forward_and_logprobs_match(case):
    model = _model(case)
    prompts = _prompts(model.config.vocab_size)
    out = generate(model, prompts, max_new_tokens=NEW)
    assert out.finish_reasons == ["length"] * 3 and out.lengths.tolist() == [NEW] * 3
    assert len({tuple(out.row_tokens(i)) for i in range(3)}) == 3 and len(set(out.row_tokens(2))) > 3
    for i, prompt in enumerate(prompts):
        seq = list(prompt) + out.row_tokens(i)
        logits = _full_logits(model, seq)[len(prompt) - 1 : -1]  # the logits each new token was drawn from
        np.testing.assert_array_equal(out.tokens[i], logits.argmax(-1))
        ref = np.asarray(jax.nn.log_softmax(logits))[np.arange(NEW), out.tokens[i]]
        np.testing.assert_allclose(out.model_logprobs[i], ref, atol=1e-4)
        np.testing.assert_array_equal(out.logprobs[i], 0.0)  # greedy: a point mass
    if case in ("sparse", "hybrid"):  # growing-sequence check across dense_len: each step's own forward
        seq = list(prompts[2])
        for t in (13, 14):  # forwards of 63 (dense) and 64 (sparse) tokens: dense_len = 64
            step_logits = _full_logits(model, seq + out.row_tokens(2)[:t])[-1]
            assert step_logits.argmax() == out.tokens[2, t]


@pytest.mark.parametrize("case", ["dense", "hybrid"])
def test_batched_mixed_lengths_equal_each_prompt_alone(case):
    model = _model(case)
    prompts = _prompts(model.config.vocab_size)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=40), SamplingParams(top_p=0.9)]
    keys = jax.random.split(jax.random.key(7), 3)
    batch = generate(model, prompts, max_new_tokens=NEW, sampling=params, rng=keys)
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=NEW, sampling=params[i], rng=keys[i : i + 1])
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i])
        np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], atol=1e-5)
        np.testing.assert_allclose(alone.model_logprobs[0], batch.model_logprobs[i], atol=1e-5)


def test_sampled_logprobs_equal_full_forward_under_the_sampling_distribution():
    model = _model("dense")
    prompts = _prompts(model.config.vocab_size)
    params = [SamplingParams(temperature=0.7, top_k=30), SamplingParams(top_p=0.8, min_p=0.02), SamplingParams()]
    out = generate(model, prompts, max_new_tokens=NEW, sampling=params, rng=3)
    for i, prompt in enumerate(prompts):
        logits = _full_logits(model, list(prompt) + out.row_tokens(i))[len(prompt) - 1 : -1]
        row = sampling_arrays(params[i], NEW)
        processed = process_logits(jnp.asarray(logits), row, jnp.zeros(logits.shape, bool))
        ref = np.asarray(jax.nn.log_softmax(processed))[np.arange(NEW), out.tokens[i]]
        np.testing.assert_allclose(out.logprobs[i], ref, atol=1e-4)
        assert np.isfinite(out.logprobs[i]).all() and (out.logprobs[i] >= out.model_logprobs[i] - 1e-4).all()
    again = generate(model, prompts, max_new_tokens=NEW, sampling=params, rng=3)
    np.testing.assert_array_equal(again.tokens, out.tokens)  # same seed, same draws
    other = generate(model, prompts, max_new_tokens=NEW, sampling=params, rng=4)
    assert (other.tokens != out.tokens).any()


def test_stop_ids_context_limit_finish_reasons_and_streaming():
    model = _model("dense")
    prompts = _prompts(model.config.vocab_size)
    free = generate(model, prompts, max_new_tokens=NEW)
    stop = free.tokens[1, 4]  # row 1 stops at its 5th token (or earlier if it appeared before)
    first = list(free.tokens[1]).index(stop)
    chunks = []
    out = generate(
        model, prompts, max_new_tokens=NEW, stop_token_ids=[stop, 10**6], on_tokens=lambda t, v: chunks.append((t, v))
    )
    assert out.finish_reasons[1] == "stop" and out.lengths[1] == first + 1
    assert out.row_tokens(1) == free.row_tokens(1)[: first + 1] and (out.tokens[1, first + 1 :] == 0).all()
    assert (out.model_logprobs[1, first + 1 :] == 0).all()
    streamed = [[] for _ in prompts]
    for tokens, valid in chunks:
        for i in range(len(prompts)):
            streamed[i] += tokens[i][valid[i]].tolist()
    assert streamed == [out.row_tokens(i) for i in range(3)] and len(chunks) > 2
    budgets = generate(model, prompts, max_new_tokens=[NEW, 5, 2])  # per-row budgets
    assert budgets.lengths.tolist() == [NEW, 5, 2] and budgets.finish_reasons == ["length"] * 3
    assert all(budgets.row_tokens(i) == free.row_tokens(i)[: budgets.lengths[i]] for i in range(3))
    context = model.config.max_position_embeddings
    near_end = [prompts[0], [5] * (context - 3)]
    capped = generate(model, near_end, max_new_tokens=8, prefill_chunk=128)
    assert capped.lengths.tolist() == [8, 3] and capped.finish_reasons == ["length", "length"]


@pytest.mark.parametrize("case", ["dense", "lightning"])
def test_chunked_prefill_equals_one_call(case):
    model = _model(case)
    prompts = [list(range(3, 90)), list(range(5, 40)), [7]]
    one = generate(model, prompts, max_new_tokens=6, prefill_chunk=512)
    chunked = generate(model, prompts, max_new_tokens=6, prefill_chunk=32)  # 3 chunks, rows end in different ones
    np.testing.assert_array_equal(one.tokens, chunked.tokens)
    np.testing.assert_allclose(one.model_logprobs, chunked.model_logprobs, atol=1e-5)


def test_sharded_serving_equals_single_device():
    """Parameters and caches sharded over data 2 x tensor 4; 3 prompts are padded to 4 rows internally."""
    sharded, single = _model("hybrid", (2, 1, 4, 1)), _model("hybrid")
    q_proj = sharded.model.layers[1].self_attn.q_proj.kernel[...]
    assert q_proj.sharding.spec[1] == "tensor" and len(q_proj.sharding.device_set) == 8
    mesh = q_proj.sharding.mesh
    with jax.set_mesh(mesh):
        cache = jax.jit(lambda: sharded.init_cache(4, 64))()  # as the engine builds it
    sparse_k, state = cache.layers[0].k, cache.layers[1].state
    assert sparse_k.addressable_shards[0].data.shape[0] == 2  # 4 rows over data = 2
    assert state.addressable_shards[0].data.shape[:2] == (2, 1)  # and 4 Lightning heads over tensor = 4
    prompts = _prompts(single.config.vocab_size)
    a = generate(sharded, prompts, max_new_tokens=8)
    b = generate(single, prompts, max_new_tokens=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.model_logprobs, b.model_logprobs, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompts": [[5, 6], []]}, "prompt 1 is empty"),
        ({"prompts": [[5] * 1024]}, "prompt 0 has 1024 tokens; the model's context"),
        ({"prompts": [[5, 600]]}, r"prompt 0 has ids outside \[0, 512\)"),
        ({"prompts": []}, "non-empty list"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"sampling": [SamplingParams()] * 2}, "got 2 SamplingParams for 1 prompts"),
        ({"prefill_chunk": 100}, "prefill_chunk=100"),
    ],
)
def test_bad_input_errors(kwargs, match):
    args = {"prompts": [[5, 6, 7]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(_model("dense"), args.pop("prompts"), **args)
