"""Sampling: logit processing against an independent NumPy reference, chi-square fits of the draws, greedy
rows, per-row keys and parameter validation."""

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from minicpm_jax.generate import sampling
from minicpm_jax.generate.sampling import (
    SamplingArrays,
    SamplingParams,
    process_logits,
    sample,
    sampling_arrays,
)

V = 24
# A non-trivial logit vector: a few strong tokens, a long tail, positive and negative values, no ties.
LOGITS = np.array(
    [2.3, 1.9, 1.6, 1.25, 1.0, 0.8, 0.55, 0.35, 0.2, 0.05, -0.1, -0.3]
    + [-0.45, -0.6, -0.8, -1.0, -1.2, -1.45, -1.7, -2.0, -2.3, -2.6, -3.0, -3.5],
    dtype=np.float32,
)
LOGITS = LOGITS[np.random.default_rng(0).permutation(V)]  # not sorted, so index order means nothing
SEEN = np.zeros(V, bool)
SEEN[[int(np.argmax(LOGITS)), int(np.argsort(LOGITS)[-3]), int(np.argmin(LOGITS)), int(np.argsort(LOGITS)[5])]] = True
N_DRAWS = 20_000
jit_sample = jax.jit(sample)  # everything traced: parameters, seen mask and keys
jit_process = jax.jit(process_logits)


# ---------------------------------------------------------------- independent NumPy reference (float64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def reference_logprobs(logits: np.ndarray, seen: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Log-probs of the sampling distribution for one row, written step by step in float64."""
    x = np.array(logits, dtype=np.float64)
    r = p.repetition_penalty
    for i in np.flatnonzero(seen):
        x[i] = x[i] / r if x[i] > 0 else x[i] * r
    if p.temperature == 0:
        out = np.full_like(x, -np.inf)
        out[np.argmax(x)] = 0.0
        return out
    x = x / p.temperature
    if p.top_k > 0:
        kth_largest = np.sort(x)[::-1][min(p.top_k, len(x)) - 1]
        x[x < kth_largest] = -np.inf  # ties with the k-th token are kept
    if p.top_p < 1:
        probs = _softmax(x)
        order = np.argsort(-probs, kind="stable")
        total = 0.0
        keep = np.zeros(len(x), bool)
        for i in order:  # add tokens, most likely first, until the kept mass reaches top_p
            keep[i] = True
            total += probs[i]
            if total >= p.top_p:
                keep |= probs == probs[i]  # ties with the last kept token are kept
                break
        x[~keep] = -np.inf
    if p.min_p > 0:
        probs = _softmax(x)
        x[probs < p.min_p * probs.max()] = -np.inf
    return x - np.max(x) - np.log(np.sum(np.exp(x - np.max(x))))


def reference_probs(logits: np.ndarray, seen: np.ndarray, p: SamplingParams) -> np.ndarray:
    return np.exp(reference_logprobs(logits, seen, p))


# ---------------------------------------------------------------- helpers


def _draw(p: SamplingParams, seen: np.ndarray = SEEN, n: int = N_DRAWS, seed: int = 0) -> np.ndarray:
    """``n`` draws at one step: the same row ``n`` times, one key per row."""
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, V))
    seen_b = jnp.broadcast_to(jnp.asarray(seen), (n, V))
    keys = jax.random.split(jax.random.key(seed), n)
    tokens, _, _ = jit_sample(logits, sampling_arrays(p, n), seen_b, keys)
    return np.bincount(np.asarray(tokens), minlength=V)


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit on the support of ``probs``, pooling bins expected below 5 draws."""
    support = probs > 0
    obs = counts[support].astype(np.float64)
    exp = probs[support] / probs[support].sum() * obs.sum()
    small = exp < 5
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    return float(stats.chisquare(obs, exp).pvalue)


def _arrays(rows: list[SamplingParams]) -> SamplingArrays:
    return sampling_arrays(rows, len(rows))


# ---------------------------------------------------------------- distribution of the draws

CASES = {
    "temperature": SamplingParams(temperature=0.7),
    "top_k": SamplingParams(top_k=5),
    "top_p": SamplingParams(top_p=0.8),
    "min_p": SamplingParams(min_p=0.1),
    "combined": SamplingParams(temperature=0.8, top_k=8, top_p=0.9),
    "repetition_penalty": SamplingParams(repetition_penalty=1.8),
    "everything": SamplingParams(temperature=1.3, top_k=12, top_p=0.95, min_p=0.05, repetition_penalty=1.3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_draws_follow_reference_distribution(name):
    p = CASES[name]
    seen = SEEN if p.repetition_penalty != 1 else np.zeros(V, bool)
    probs = reference_probs(LOGITS, seen, p)
    if name not in ("temperature", "repetition_penalty"):
        assert 1 < np.count_nonzero(probs) < V  # the case really truncates
    counts = _draw(p, seen)
    assert counts[probs == 0].sum() == 0, "an excluded token was drawn"
    assert _chi2_pvalue(counts, probs) > 1e-3


def test_chi2_rejects_wrong_distributions():
    """Negative controls: the same test catches an untruncated top-p, a missing temperature, a missing penalty."""
    counts = _draw(CASES["top_p"])
    assert _chi2_pvalue(counts, reference_probs(LOGITS, SEEN, SamplingParams())) < 1e-6
    counts = _draw(CASES["temperature"])
    assert _chi2_pvalue(counts, reference_probs(LOGITS, SEEN, SamplingParams())) < 1e-6
    counts = _draw(CASES["repetition_penalty"])
    assert _chi2_pvalue(counts, reference_probs(LOGITS, np.zeros(V, bool), SamplingParams())) < 1e-6


# ---------------------------------------------------------------- process_logits against the reference

MIXED_ROWS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=2.0),
    SamplingParams(top_k=4),
    SamplingParams(top_k=1000),  # larger than the vocabulary: keeps everything
    SamplingParams(top_p=0.7),
    SamplingParams(top_p=0.3, temperature=2.0),
    SamplingParams(min_p=0.2),
    SamplingParams(temperature=0.6, top_k=10, top_p=0.9, min_p=0.05),
    SamplingParams(repetition_penalty=1.5, temperature=1.2),
    SamplingParams(),
]


def test_process_logits_matches_reference_per_row():
    rng = np.random.default_rng(1)
    b, v = len(MIXED_ROWS), 32
    logits = (rng.standard_normal((b, v)) * 2).astype(np.float32)
    seen = rng.random((b, v)) < 0.3
    out = jit_process(jnp.asarray(logits), _arrays(MIXED_ROWS), jnp.asarray(seen))
    got = np.asarray(jax.nn.log_softmax(out, axis=-1))
    assert out.dtype == jnp.float32 and out.shape == (b, v)
    for i, p in enumerate(MIXED_ROWS):
        want = reference_logprobs(logits[i], seen[i], p)
        np.testing.assert_array_equal(np.isfinite(got[i]), np.isfinite(want), err_msg=f"row {i}: {p}")
        kept = np.isfinite(want)
        np.testing.assert_allclose(got[i][kept], want[kept], atol=1e-5, err_msg=f"row {i}: {p}")


def test_boundary_ties_are_kept():
    logits = jnp.asarray([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0], [2.0, 1.0, 1.0, 0.0, -1.0, -1.0]])
    rows = [SamplingParams(top_k=2), SamplingParams(top_p=0.6)]  # row 1: mass of token 0 ~0.5 < 0.6
    out = jit_process(logits, _arrays(rows), jnp.zeros(logits.shape, bool))
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])


def test_large_vocab_traced():
    v = 73_448
    logits = jax.random.normal(jax.random.key(3), (3, v)) * 3
    rows = [SamplingParams(top_k=50), SamplingParams(top_p=0.9), SamplingParams(temperature=0.0)]
    seen = jnp.zeros((3, v), bool)
    out = jit_process(logits, _arrays(rows), seen)
    kept = np.isfinite(np.asarray(out))
    assert kept[0].sum() == 50 and kept[2].sum() == 1
    probs = np.asarray(jax.nn.softmax(logits[1]), np.float64)
    assert probs[kept[1]].sum() >= 0.9 - 1e-4
    assert probs[kept[1]].sum() - probs[kept[1]].min() < 0.9 + 1e-4  # smallest such set
    tokens, _, _ = jit_sample(logits, _arrays(rows), seen, jax.random.split(jax.random.key(0), 3))
    assert kept[np.arange(3), np.asarray(tokens)].all()


# ---------------------------------------------------------------- greedy rows and log-probs


def test_greedy_is_argmax_with_zero_logprob():
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((4, 40)) * 2).astype(np.float32)
    seen = np.zeros((4, 40), bool)
    seen[1, np.argmax(logits[1])] = True  # the penalty moves row 1's argmax
    rows = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=100.0)] * 2
    keys = jax.random.split(jax.random.key(0), 4)
    tokens, logprob, model_logprob = jit_sample(jnp.asarray(logits), _arrays(rows), jnp.asarray(seen), keys)
    want = [int(np.argmax(reference_logprobs(logits[i], seen[i], p))) for i, p in enumerate(rows)]
    assert tokens.dtype == jnp.int32 and np.asarray(tokens).tolist() == want
    assert want[1] != int(np.argmax(logits[1]))
    np.testing.assert_array_equal(np.asarray(logprob), 0.0)
    log_softmax = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    np.testing.assert_allclose(np.asarray(model_logprob), log_softmax[np.arange(4), want], atol=1e-6)


def test_logprobs_of_sampled_tokens():
    rng = np.random.default_rng(4)
    b = len(MIXED_ROWS)
    logits = (rng.standard_normal((b, 32)) * 2).astype(np.float32)
    seen = rng.random((b, 32)) < 0.3
    keys = jax.random.split(jax.random.key(5), b)
    tokens, logprob, model_logprob = jit_sample(jnp.asarray(logits), _arrays(MIXED_ROWS), jnp.asarray(seen), keys)
    tokens = np.asarray(tokens)
    for i, p in enumerate(MIXED_ROWS):
        want = 0.0 if p.temperature == 0 else reference_logprobs(logits[i], seen[i], p)[tokens[i]]
        assert np.isfinite(want), f"row {i} drew an excluded token"
        np.testing.assert_allclose(float(logprob[i]), want, atol=1e-5)
        model = logits[i].astype(np.float64) - np.log(np.sum(np.exp(logits[i].astype(np.float64))))
        np.testing.assert_allclose(float(model_logprob[i]), model[tokens[i]], atol=1e-5)


# ---------------------------------------------------------------- keys


def _batch_inputs(b: int, seed: int = 6):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.standard_normal((b, 50)).astype(np.float32))
    return logits, jnp.zeros((b, 50), bool)


def test_same_keys_same_tokens_and_raw_keys_match_typed():
    logits, seen = _batch_inputs(8)
    params = sampling_arrays(SamplingParams(temperature=1.0, top_p=0.95), 8)
    keys = jax.random.split(jax.random.key(7), 8)
    first = jit_sample(logits, params, seen, keys)[0]
    again = jit_sample(logits, params, seen, keys)[0]
    raw = jit_sample(logits, params, seen, jax.random.key_data(keys))[0]
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(raw))


def test_rows_use_their_own_keys():
    """A row's token depends only on its logits, parameters and key, not on the other rows."""
    logits, seen = _batch_inputs(6)
    keys = jax.random.split(jax.random.key(8), 6)
    rows = [SamplingParams(temperature=0.9, top_k=20)] * 6
    batch = np.asarray(jit_sample(logits, _arrays(rows), seen, keys)[0])
    alone = jit_sample(logits[4:5], _arrays(rows[4:5]), seen[4:5], keys[4:5])[0]
    assert int(alone[0]) == batch[4]
    other_rows = [SamplingParams(temperature=0.0)] * 3 + rows[3:]
    mixed = np.asarray(jit_sample(logits, _arrays(other_rows), seen, keys)[0])
    np.testing.assert_array_equal(mixed[3:], batch[3:])


def test_identical_rows_with_different_keys_differ():
    b = 256
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (b, V))
    keys = jax.random.split(jax.random.key(9), b)
    tokens = np.asarray(jit_sample(logits, sampling_arrays(SamplingParams(), b), jnp.zeros((b, V), bool), keys)[0])
    assert len(np.unique(tokens)) >= 10


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("min_p", 1.01),
        ("min_p", -0.1),
        ("min_p", float("nan")),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("nan")),
    ],
)
def test_invalid_params_raise(field, value):
    with pytest.raises(ValueError, match=field) as err:
        SamplingParams(**{field: value})
    assert repr(value) in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as err:
        SamplingParams(temperature=-1.0, top_p=2.0, top_k=-3)
    for field in ("temperature", "top_p", "top_k"):
        assert field in str(err.value)


def test_boundary_values_accepted():
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1e-3)
    SamplingParams(top_p=1e-6, min_p=1.0)


def test_sampling_arrays_shapes_and_length_check():
    rows = [SamplingParams(temperature=0.5, top_k=3), SamplingParams(top_p=0.5)]
    arrays = sampling_arrays(rows, 2)
    assert [a.shape for a in arrays] == [(2,)] * 5
    assert arrays.top_k.dtype == jnp.int32 and arrays.temperature.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(arrays.temperature), [0.5, 1.0])
    one = sampling_arrays(SamplingParams(min_p=0.25), 3)
    np.testing.assert_allclose(np.asarray(one.min_p), [0.25] * 3)
    with pytest.raises(ValueError, match="3"):
        sampling_arrays(rows, 3)


def test_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 2.0  # type: ignore[misc]


# ---------------------------------------------------------------- top-k prefilter and its full-sort fallback


@pytest.mark.parametrize("width", [1, 3, 8, 1000])  # 1000 > V: the prefilter is the whole row
def test_prefilter_width_does_not_change_the_result(width, monkeypatch):
    """Narrow prefilters make most rows fall back to the full sort; every width gives the reference's sets."""
    monkeypatch.setattr(sampling, "CANDIDATES", width)
    rng = np.random.default_rng(1)
    b, v = len(MIXED_ROWS), 32
    logits = (rng.standard_normal((b, v)) * 2).astype(np.float32)
    seen = rng.random((b, v)) < 0.3
    out = np.asarray(jax.jit(process_logits)(jnp.asarray(logits), _arrays(MIXED_ROWS), jnp.asarray(seen)))
    for i, p in enumerate(MIXED_ROWS):
        want = reference_logprobs(logits[i], seen[i], p)
        np.testing.assert_array_equal(np.isfinite(out[i]), np.isfinite(want), err_msg=f"row {i}: {p}")
    ties = jnp.asarray([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0], [2.0, 1.0, 1.0, 0.0, -1.0, -1.0]])
    rows = [SamplingParams(top_k=2), SamplingParams(top_p=0.6)]  # the ties reach past a width-2 prefilter
    out = jax.jit(process_logits)(ties, _arrays(rows), jnp.zeros(ties.shape, bool))
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])


def _unconditional_primitives(jaxpr) -> set[str]:
    """Primitives a jaxpr always runs: its equations', recursing into everything but ``cond`` branches."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if eqn.primitive.name != "cond":
            for sub in eqn.params.values():
                if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    names |= _unconditional_primitives(getattr(sub, "jaxpr", sub))
    return names


def test_sorts_and_draws_only_where_needed():
    """The full sort runs only in the fallback branch, top-k and the draw only when some row samples."""
    v = 73_448
    logits = jax.random.normal(jax.random.key(3), (2, v)) * 3
    keys = jax.random.split(jax.random.key(0), 2)
    rows = _arrays([SamplingParams(temperature=0.0)] * 2)
    jaxpr = jax.make_jaxpr(sample)(logits, rows, jnp.zeros((2, v), bool), keys).jaxpr
    always = _unconditional_primitives(jaxpr)
    assert "cond" in always and not always & {"sort", "top_k", "random_bits", "threefry2x32"}
    tokens = jit_sample(logits, rows, jnp.zeros((2, v), bool), keys)[0]
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jnp.argmax(logits, axis=-1)))
