"""OPD diagnostics (spec/opd.md §6, §10.3, §10.5 (1) and (6)) on hand-computed 4-token vocabularies."""

from math import log

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.distill import metrics

L = np.log
metric_sums = jax.jit(metrics.metric_sums, static_argnums=2)
position_chunk_sums = jax.jit(metrics.position_chunk_sums, static_argnums=(4, 5))


def hand_stored():
    """V = 4, k = 2, four positions; position 2 is masked out and holds garbage.

    t0: p = [.5, .3, .1, .1], S^p = (0, 1); q = [.45, .1, .3, .15], S^q = (0, 2); O = {0}; sampled 1.
    t1: p = [.1, .2, .3, .4], S^p = (3, 2); q = [.05, .15, .5, .3], S^q = (2, 3); O = {3, 2}; sampled 2.
    t3: p = [.4, .3, .2, .1], S^p = (0, 1); q = [.1, .2, .3, .4], S^q = (3, 2); O = {}; sampled 0.
    Stored entropies (H_p, H_q): t0 (1.2, 1.0), t1 (0.5, 0.9), t3 (1.3, 1.3).
    """
    stored = {
        "stu_topk_ids": [[0, 1], [3, 2], [0, 1], [0, 1]],
        "stu_topk_logp": L([[0.5, 0.3], [0.4, 0.3], [0.9, 0.05], [0.4, 0.3]]),
        "tch_logp_on_stu_ids": L([[0.45, 0.1], [0.3, 0.5], [1e-6, 1e-6], [0.1, 0.2]]),
        "tch_topk_ids": [[0, 2], [2, 3], [0, 1], [3, 2]],
        "tch_topk_logp": L([[0.45, 0.3], [0.5, 0.3], [0.5, 0.5], [0.4, 0.3]]),
        "stu_logp_tok": L([0.3, 0.3, 0.9, 0.4]),
        "tch_logp_tok": L([0.1, 0.5, 1e-6, 0.1]),
        "stu_entropy": [1.2, 0.5, 100.0, 1.3],
        "tch_entropy": [1.0, 0.9, 0.0, 1.3],
    }
    stored = {n: jnp.asarray(a, jnp.int32 if n.endswith("topk_ids") else jnp.float32) for n, a in stored.items()}
    return stored, jnp.asarray([1.0, 1.0, 0.0, 1.0])


def ratios(sums):
    return {n: float(a) / float(b) for n, (a, b) in sums.items()}


def test_hand_computed_values():
    stored, mask = hand_stored()
    sums = metric_sums(stored, mask, k=2)
    got = ratios(sums)
    want = {
        # Eq. 6: (1/2 + 2/2 + 0/2) / 3
        "overlap_ratio": 0.5,
        # Eq. 7, O_t-renormalised, over t0, t1 (O_t non-empty). t0: |O| = 1, p-bar = q-bar = 1 -> 0.
        # t1: p-bar(3), p-bar(2) = 4/7, 3/7; q-bar(3), q-bar(2) = 3/8, 5/8 -> the mean of the two entries
        # [4/7 log((3/8)/(4/7)) + 3/7 log((5/8)/(3/7))] / 2 = [4/7 log(21/32) + 3/7 log(35/24)] / 2 ~ -0.0395
        "overlap_token_adv": (0.0 + (4 / 7 * log(21 / 32) + 3 / 7 * log(35 / 24)) / 2) / 2,
        # thunlp: p-bar on S^p times log q - log p, mean over the 3 overlap entries:
        # t0 v=0: (.5/.8) log(.45/.5); t1 v=3: (4/7) log(.3/.4); t1 v=2: (3/7) log(.5/.3)
        "overlap_token_adv_code": (0.625 * log(0.9) + 4 / 7 * log(0.75) + 3 / 7 * log(5 / 3)) / 3,
        # the same advantage summed per position over O_t, resp. S^p \ S^q, mean over the 3 positions
        "adv_overlap": (0.625 * log(0.9) + 4 / 7 * log(0.75) + 3 / 7 * log(5 / 3) + 0.0) / 3,
        # t0 v=1: (.3/.8) log(.1/.3); t1: none; t3: (4/7) log(.1/.4) + (3/7) log(.2/.3)
        "adv_only_student": (0.375 * log(1 / 3) + 0.0 + 4 / 7 * log(0.25) + 3 / 7 * log(2 / 3)) / 3,
        # Eq. 8: (|1.0 - 1.2| + |0.9 - 0.5| + 0) / 3
        "entropy_gap": 0.2,
        "student_entropy": (1.2 + 0.5 + 1.3) / 3,
        "teacher_entropy": (1.0 + 0.9 + 1.3) / 3,
        # Eqs. 9-10 (original probabilities on O_t): p: (.5 + (.4 + .3) + 0) / 3; q: (.45 + (.3 + .5) + 0) / 3
        "overlap_mass_student": 1.2 / 3,
        "overlap_mass_teacher": 1.25 / 3,
        # top-k mass: p: (.8 + .7 + .7) / 3; q: (.75 + .8 + .7) / 3
        "topk_mass_student": 2.2 / 3,
        "topk_mass_teacher": 2.25 / 3,
        # log p - log q of the sampled token: (log(.3/.1) + log(.3/.5) + log(.4/.1)) / 3 = log(7.2) / 3
        "sampled_rkl": log(7.2) / 3,
    }
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert float(sums["overlap_token_adv"][1]) == 2.0 and float(sums["overlap_token_adv_code"][1]) == 3.0
    assert got["overlap_token_adv"] <= 0.0  # = -mean KL(p-bar || q-bar) / |O_t|
    # a smaller k reads the leading (largest) entries: top-1 sets overlap at t0 only
    assert ratios(metric_sums(stored, mask, k=1))["overlap_ratio"] == pytest.approx(1 / 3)


def test_sums_add_over_chunks():
    stored, mask = hand_stored()
    full = metric_sums(stored, mask, 2)
    halves = [metric_sums({n: a[s] for n, a in stored.items()}, mask[s], 2) for s in (slice(0, 2), slice(2, 4))]
    for name, (num, den) in full.items():
        np.testing.assert_allclose([num, den], [sum(h[name][i] for h in halves) for i in (0, 1)], rtol=1e-6)


def test_teacher_equals_student():
    # §10.5 (1): overlap ratio 1, entropy gap 0, overlap mass = top-k mass, zero advantages
    logits = np.random.default_rng(0).normal(size=(5, 8))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    topk_ids = np.argsort(-logp, -1)[:, :3]
    topk_logp = np.take_along_axis(logp, topk_ids, -1)
    ent = -np.sum(np.exp(logp) * logp, -1)
    tok = logp[:, 0]
    stored = {
        "stu_topk_ids": topk_ids,
        "stu_topk_logp": topk_logp,
        "tch_logp_on_stu_ids": topk_logp,
        "tch_topk_ids": topk_ids,
        "tch_topk_logp": topk_logp,
        "stu_logp_tok": tok,
        "tch_logp_tok": tok,
        "stu_entropy": ent,
        "tch_entropy": ent,
    }
    got = ratios(metric_sums({n: jnp.asarray(a) for n, a in stored.items()}, jnp.ones(5), 3))
    assert got["overlap_ratio"] == 1.0 and got["entropy_gap"] == 0.0
    assert got["overlap_mass_student"] == pytest.approx(got["topk_mass_student"], rel=1e-6)
    assert got["overlap_mass_teacher"] == pytest.approx(got["topk_mass_teacher"], rel=1e-6)
    for name in ("overlap_token_adv", "overlap_token_adv_code", "adv_overlap", "adv_only_student", "sampled_rkl"):
        assert got[name] == 0.0, name


def test_position_chunks():
    # k = 1; rows of response length 4 (positions 0-3) and 2 (positions 0-1), 2 chunks:
    # chunks 0, 0, 1, 1 | 0, 1; token 3 masked. overlap = [1, 0, 1, 1, 0, 1], H_p = 1..6, H_q = 0.
    stored = {
        "stu_topk_ids": jnp.zeros((6, 1), jnp.int32),
        "tch_topk_ids": jnp.asarray([[0], [1], [0], [0], [1], [0]]),
        "stu_entropy": jnp.arange(1.0, 7.0),
        "tch_entropy": jnp.zeros(6),
    }
    out = position_chunk_sums(
        stored, jnp.asarray([1, 1, 1, 0, 1, 1]), jnp.asarray([0, 1, 2, 3, 0, 1]), jnp.asarray([4, 4, 4, 4, 2, 2]), 1, 2
    )
    np.testing.assert_allclose(out["overlap_ratio"][0], [1.0, 2.0])  # chunk 0: tokens 0, 1, 4; chunk 1: 2, 5
    np.testing.assert_allclose(out["overlap_ratio"][1], [3.0, 2.0])
    np.testing.assert_allclose(out["student_entropy"][0], [1.0 + 2.0 + 5.0, 3.0 + 6.0])
    np.testing.assert_allclose(out["teacher_entropy"][0], [0.0, 0.0])


def test_bad_k():
    stored, mask = hand_stored()
    for k in (0, 3):
        with pytest.raises(ValueError, match="k="):
            metric_sums(stored, mask, k)
