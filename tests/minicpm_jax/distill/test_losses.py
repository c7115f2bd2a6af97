"""OPD losses (spec/opd.md §3, §10.5): references are independent float64 numpy re-derivations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.distill.losses import (
    FORBIDDEN,
    LOSSES,
    SUPPORTS,
    WEIGHT_MODES,
    LossOptions,
    advantages,
    check_options,
    chunk_loss,
    needs_teacher_logits,
)

N, V, K = 4, 6, 3
MASK = np.array([1.0, 1.0, 0.0, 1.0])
INT_KEYS = ("sampled", "stu_topk_ids", "tch_topk_ids")


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def make_stored(stu_logits, tch_logits, k, rng):
    """float64 numpy ``stored`` arrays from old-student and teacher logits (spec §10.1)."""
    lp, lq = log_softmax(stu_logits), log_softmax(tch_logits)

    def at(a, i):
        return np.take_along_axis(a, i, -1)

    sampled = np.array([rng.choice(lp.shape[-1], p=np.exp(r)) for r in lp])
    sid, tid = np.argsort(-lp, -1)[:, :k], np.argsort(-lq, -1)[:, :k]
    return {
        "sampled": sampled,
        "stu_logp_tok": at(lp, sampled[:, None])[:, 0],
        "tch_logp_tok": at(lq, sampled[:, None])[:, 0],
        "stu_topk_ids": sid,
        "stu_topk_logp": at(lp, sid),
        "tch_logp_on_stu_ids": at(lq, sid),
        "tch_topk_ids": tid,
        "tch_topk_logp": at(lq, tid),
        "stu_logp_on_tch_ids": at(lp, tid),
        "grpo_adv": rng.normal(size=lp.shape[0]),
        "stu_entropy": -(np.exp(lp) * lp).sum(-1),
        "tch_entropy": -(np.exp(lq) * lq).sum(-1),
    }


def to_jax(stored):
    return {n: jnp.asarray(a, jnp.int32 if n in INT_KEYS else jnp.float32) for n, a in stored.items()}


def loss_of_logits(logits, stored, mask, o, tch_logits=None):
    lq = None if tch_logits is None else jax.nn.log_softmax(jnp.asarray(tch_logits, jnp.float32))
    return chunk_loss(jax.nn.log_softmax(logits), stored, jnp.asarray(mask, jnp.float32), o, lq)


def grad_logits(logits, stored, mask, o, tch_logits=None):
    return np.asarray(jax.grad(loss_of_logits)(jnp.asarray(logits, jnp.float32), stored, mask, o, tch_logits))


def ref_support(st, t, support):
    sp, sq = list(st["stu_topk_ids"][t]), list(st["tch_topk_ids"][t])
    return {
        "student": sp,
        "intersection": [v for v in sp if v in sq],
        "teacher_topk": sq,
        "union": sp + [v for v in sq if v not in sp],
        "sym_diff": [v for v in sp if v not in sq] + [v for v in sq if v not in sp],
    }[support]


def ref_adv(lp_old, lq, st, o):
    """Dense ``[N, V]`` PG advantages by sets (spec §3 items 1, 2, 6; §5 step 4)."""
    adv = np.zeros_like(lp_old)
    for t in range(adv.shape[0]):
        if o.loss == "sampled":
            y = st["sampled"][t]
            adv[t, y] += o.coef * (lq[t, y] - lp_old[t, y])
        elif o.loss == "student_topk":
            s = ref_support(st, t, o.support)
            w = np.exp((lp_old if o.weight_mode == "student_p" else lq)[t, s])
            if o.weight_mode == "none":
                w = np.ones(len(s))
            elif o.support != "sym_diff" and s:
                w = w / w.sum()
            adv[t, s] += o.coef * w * (lq[t, s] - lp_old[t, s])
        if o.grpo_weight > 0:
            adv[t, st["sampled"][t]] += o.grpo_weight * st["grpo_adv"][t]
    return adv


def kl(lx, ly):
    return (np.exp(lx) * (lx - ly)).sum(-1)


def ref_direct(logits, lq, st, o):
    """float64 per-token value of a direct loss (spec §3 items 3-5), 0 for the PG-only losses."""
    lp = log_softmax(logits)
    if o.loss == "full_vocab_rkl" or (o.loss == "gkd_jsd" and o.beta == 1):
        return o.coef * kl(lp, lq)
    if o.loss == "gkd_jsd" and o.beta == 0:
        return o.coef * kl(lq, lp)
    if o.loss == "gkd_jsd":
        lm = np.log(o.beta * np.exp(lq) + (1 - o.beta) * np.exp(lp))
        return o.coef * (o.beta * kl(lq, lm) + (1 - o.beta) * kl(lp, lm))
    if o.loss == "forward_kl_teacher_topk":
        tid = st["tch_topk_ids"]
        return np.maximum(kl(np.take_along_axis(lq, tid, -1), np.take_along_axis(lp, tid, -1)), 0.0)
    return np.zeros(lp.shape[0])


def ref_loss(logits, lp_old, lq, st, mask, o, surrogate=True):
    """float64 loss: PG terms with frozen advantages (``-adv log p`` for the gradient, ``-adv`` for the value,
    ratio 1) plus the direct terms."""
    pg = log_softmax(logits) if surrogate else 1.0
    return -(mask[:, None] * ref_adv(lp_old, lq, st, o) * pg).sum() + (mask * ref_direct(logits, lq, st, o)).sum()


def fd_grad(f, x, eps=1e-5):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        g[i] = (f(x + d) - f(x - d)) / (2 * eps)
    return g


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(3)
    stu, tch = 1.5 * rng.normal(size=(N, V)), 1.5 * rng.normal(size=(N, V))
    st = make_stored(stu, tch, K, rng)
    n_ov = sum(len(ref_support(st, t, "intersection")) for t in range(N))
    assert 0 < n_ov < N * K  # partial overlap, so every support differs
    return stu, tch, st


def all_options():
    yield LossOptions(loss="sampled", k=0)
    yield LossOptions(loss="sampled", k=0, coef=0.7, grpo_weight=0.5)
    for w, s in itertools.product(WEIGHT_MODES, SUPPORTS):
        yield LossOptions(loss="student_topk", k=K, weight_mode=w, support=s)
    yield LossOptions(loss="student_topk", k=K, coef=2.0, grpo_weight=0.3)
    yield LossOptions(loss="full_vocab_rkl", k=0, coef=0.5)
    for b in (0.0, 0.3, 1.0):
        yield LossOptions(loss="gkd_jsd", k=0, beta=b)
    yield LossOptions(loss="forward_kl_teacher_topk", k=K)


def option_id(o):
    return f"{o.loss}-{o.weight_mode}-{o.support}-b{o.beta}-c{o.coef}-g{o.grpo_weight}"


@pytest.mark.parametrize("o", list(all_options()), ids=option_id)
def test_value_and_gradients(toy, o):
    # gradient wrt the logits vs central finite differences of the float64 reference; §10.5 (5): zero gradient
    # wrt every stored array and the teacher log-probs (passed to every loss, used only by the direct ones)
    stu, tch, st = toy
    lp_old, lq = log_softmax(stu), log_softmax(tch)
    logits = stu + 0.3 * np.random.default_rng(1).normal(size=stu.shape)  # current != old parameters
    stj = to_jax(st)
    ints = {n: stj[n] for n in INT_KEYS}

    def f(x, floats, tl):
        return chunk_loss(jax.nn.log_softmax(x), {**ints, **floats}, jnp.asarray(MASK, jnp.float32), o, tl)

    floats = {n: a for n, a in stj.items() if n not in INT_KEYS}
    args = (jnp.asarray(logits, jnp.float32), floats, jnp.asarray(lq, jnp.float32))
    value, (g, g_st, g_t) = jax.value_and_grad(f, argnums=(0, 1, 2))(*args)
    want = fd_grad(lambda x: ref_loss(x, lp_old, lq, st, MASK, o), logits)
    np.testing.assert_allclose(g, want, atol=2e-5)
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(value, ref_loss(logits, lp_old, lq, st, MASK, o, surrogate=False), rtol=1e-5, atol=1e-5)
    for leaf in [*jax.tree.leaves(g_st), g_t]:
        assert np.all(np.asarray(leaf) == 0.0)


@pytest.mark.parametrize("o", [o for o in all_options() if o.loss != "forward_kl_teacher_topk"], ids=option_id)
def test_teacher_equals_student_zero_advantage_and_gradient(o):
    # §10.5 (1). forward_kl_teacher_topk is excluded: truncated forward KL at q = p has gradient
    # -(q 1[S^q] - q(S^q) p) != 0 (it pulls mass into S^q); only its value is 0.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(N, V))
    st = make_stored(logits, logits, K, rng)
    st["grpo_adv"][:] = 0.0
    a = advantages(to_jax(st), o)
    assert not a or np.abs(np.asarray(a["adv"])).max() == 0.0
    g = grad_logits(logits, to_jax(st), MASK, o, logits if needs_teacher_logits(o) else None)
    np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_forward_kl_teacher_topk_clamp():
    # k = 2, S^q = {0, 1}. Token 0: sum_{S^q} q log(q/p) = .35 log(.35/.5) + .25 log(.25/.4) < 0 -> clamped to 0.
    # Token 1 (uniform student): .35 log(.35/.25) + .25 log(.25/.25) = .35 log 1.4 > 0.
    q = np.log([[0.35, 0.25, 0.2, 0.2]] * 2)
    p = np.log([[0.5, 0.4, 0.05, 0.05], [0.25] * 4])
    st = to_jax(make_stored(p, q, 2, np.random.default_rng(0)))
    o = LossOptions(loss="forward_kl_teacher_topk", k=2)
    assert float(loss_of_logits(jnp.asarray(p, jnp.float32), st, [1.0, 1.0], o)) == pytest.approx(0.35 * np.log(1.4))
    g = grad_logits(p, st, [1.0, 1.0], o)
    assert np.all(g[0] == 0.0) and np.abs(g[1]).max() > 0.1


def test_gkd_jsd_ends_are_forward_and_reverse_kl(toy):
    stu, tch, st = toy
    lp, lq = log_softmax(stu), log_softmax(tch)

    def loss(**kw):
        return float(loss_of_logits(jnp.asarray(stu, jnp.float32), to_jax(st), MASK, LossOptions(k=0, **kw), tch))

    assert loss(loss="gkd_jsd", beta=0.0) == pytest.approx((MASK * kl(lq, lp)).sum(), rel=1e-5)
    assert loss(loss="gkd_jsd", beta=1.0) == pytest.approx(loss(loss="full_vocab_rkl"), rel=1e-6)
    assert loss(loss="gkd_jsd", beta=1.0) == pytest.approx((MASK * kl(lp, lq)).sum(), rel=1e-5)


def test_sampled_monte_carlo_converges_to_full_vocab_rkl_gradient():
    # §10.5 (2): one categorical position; M samples y ~ p as M rows sharing the logits theta.
    rng = np.random.default_rng(0)
    theta, tch = rng.normal(size=V), 2.0 * rng.normal(size=V)
    p, lp, lq = np.exp(log_softmax(theta)), log_softmax(theta), log_softmax(tch)
    exact = grad_logits(theta[None], {}, [1.0], LossOptions(loss="full_vocab_rkl", k=0), tch[None])[0]
    np.testing.assert_allclose(exact, p * (lp - lq) - p * (p * (lp - lq)).sum(), atol=1e-6)
    y = rng.choice(V, size=50_000, p=p)
    st = {"sampled": jnp.asarray(y), "stu_logp_tok": jnp.asarray(lp[y]), "tch_logp_tok": jnp.asarray(lq[y])}
    rows = jnp.broadcast_to(jnp.asarray(theta, jnp.float32), (len(y), V))
    per_row = grad_logits(rows, st, np.ones(len(y)), LossOptions(loss="sampled", k=0))  # one sample each
    np.testing.assert_allclose(per_row, -(lq[y] - lp[y])[:, None] * (np.eye(V)[y] - p), atol=1e-5)  # -adv grad log p
    errors = []
    for m in (2_000, 50_000):  # the first m samples
        mc = per_row[:m].mean(0)
        tol = 5 * per_row[:m].std(0) / np.sqrt(m) + 1e-6
        assert np.all(np.abs(mc - exact) < tol), (m, mc, exact, tol)
        errors.append(np.abs(mc - exact).max())
    assert errors[1] < errors[0]


def test_student_topk_full_support_equals_full_vocab_rkl_gradient(toy):
    # §10.5 (3): K = V, student_p weights (renormalisation constant 1), on-policy (current = old logits).
    stu, tch, _ = toy
    st = to_jax(make_stored(stu, tch, V, np.random.default_rng(0)))
    g_topk = grad_logits(stu, st, MASK, LossOptions(loss="student_topk", k=V))
    g_rkl = grad_logits(stu, st, MASK, LossOptions(loss="full_vocab_rkl", k=0), tch)
    np.testing.assert_allclose(g_topk, g_rkl, atol=1e-6)


def test_action_independent_penalty_has_zero_expected_gradient(toy):
    # §10.5 (4), the reason for FORBIDDEN["topk_kl_advantage"]: exact expectation over y ~ p of the sampled PG
    # gradient, as V rows (one per y) weighted by mask = p(y). A per-position constant advantage c (here the
    # top-k KL value) gives E_y[c grad log p(y)] = c grad sum_y p(y) = 0; the token-dependent log q(y) - log p(y)
    # gives exactly the full-vocab reverse-KL gradient.
    stu, tch, _ = toy
    theta, lp, lq = stu[0], log_softmax(stu[0]), log_softmax(tch[0])
    p, y = np.exp(lp), np.arange(V)
    top = np.argsort(-lp)[:K]
    pb, qb = p[top] / p[top].sum(), np.exp(lq[top]) / np.exp(lq[top]).sum()
    c = (pb * np.log(pb / qb)).sum()
    rows = np.broadcast_to(theta, (V, V))
    o = LossOptions(loss="sampled", k=0)

    def expect(tch_tok):
        st = {"sampled": jnp.asarray(y), "stu_logp_tok": jnp.asarray(lp), "tch_logp_tok": jnp.asarray(tch_tok)}
        return grad_logits(rows, st, p, o).sum(0)

    assert c > 0.01
    np.testing.assert_allclose(expect(lp - c), 0.0, atol=1e-6)
    rkl = grad_logits(stu[:1], {}, [1.0], LossOptions(loss="full_vocab_rkl", k=0), tch[:1])[0]
    np.testing.assert_allclose(expect(lq), rkl, atol=1e-6)
    with pytest.raises(ValueError, match="expected on-policy gradient"):
        check_options(LossOptions(loss="topk_kl_advantage"))


def test_jit_matches_eager(toy):
    stu, _, st = toy
    o = LossOptions(loss="student_topk", k=K, support="union", grpo_weight=0.2)
    args = (jax.nn.log_softmax(jnp.asarray(stu, jnp.float32)), to_jax(st), jnp.asarray(MASK, jnp.float32))
    f = jax.jit(jax.value_and_grad(chunk_loss), static_argnums=3)
    v, g = f(*args, o)
    v0, g0 = jax.value_and_grad(chunk_loss)(*args, o)
    np.testing.assert_allclose(v, v0, rtol=1e-6)
    np.testing.assert_allclose(g, g0, atol=1e-6)


def test_check_options():
    check_options(LossOptions())
    for name in LOSSES:
        check_options(LossOptions(loss=name, k=K))
    for name, reason in FORBIDDEN.items():
        with pytest.raises(ValueError) as e:
            check_options(LossOptions(loss=name))
        assert reason in str(e.value) and "must not be used" in str(e.value)
    with pytest.raises(ValueError) as e:
        check_options(LossOptions(loss="nope", k=-1, beta=1.5, weight_mode="x", support="y", grpo_weight=-1.0))
    msg = str(e.value)
    for part in (
        "unknown loss 'nope'",
        "k must be an int >= 0",
        "beta",
        "weight_mode 'x'",
        "support 'y'",
        "grpo_weight",
    ):
        assert part in msg, part
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            check_options(LossOptions(k=bad))
    with pytest.raises(ValueError, match="apply to loss 'student_topk' only"):
        check_options(LossOptions(loss="sampled", support="union"))
    assert needs_teacher_logits(LossOptions(loss="gkd_jsd")) and needs_teacher_logits(
        LossOptions(loss="full_vocab_rkl")
    )
    assert not any(
        needs_teacher_logits(LossOptions(loss=n)) for n in ("sampled", "student_topk", "forward_kl_teacher_topk")
    )


def test_shape_and_input_errors(toy):
    stu, _, st = toy
    args = (jax.nn.log_softmax(jnp.asarray(stu, jnp.float32)), to_jax(st), jnp.asarray(MASK))
    with pytest.raises(ValueError, match="K=3, options.k=4"):
        chunk_loss(*args, LossOptions(k=4))
    with pytest.raises(ValueError, match="needs teacher_logp"):
        chunk_loss(*args, LossOptions(loss="gkd_jsd", k=0))


def test_renormalized_student_topk_is_the_gradient_of_the_support_renormalised_kl(toy):
    # renormalize=True: on the fixed support S = the stored student top-K, the update is exactly the
    # gradient of KL(p̄ || q̄) with both distributions renormalised on S; the paper's form is not, and
    # at K = V (P(S) = 1) the two coincide.
    stu, tch, _ = toy
    st = to_jax(make_stored(stu, tch, K, np.random.default_rng(0)))
    sid, lq = st["stu_topk_ids"], jnp.asarray(log_softmax(tch), jnp.float32)

    def support_kl(logits):
        lp = jax.nn.log_softmax(logits)
        lp_s, lq_s = jnp.take_along_axis(lp, sid, -1), jnp.take_along_axis(lq, sid, -1)
        lp_bar = lp_s - jax.nn.logsumexp(lp_s, -1, keepdims=True)
        lq_bar = lq_s - jax.nn.logsumexp(lq_s, -1, keepdims=True)
        return jnp.sum(jnp.asarray(MASK) * jnp.sum(jnp.exp(lp_bar) * (lp_bar - lq_bar), -1))

    want = np.asarray(jax.grad(support_kl)(jnp.asarray(stu, jnp.float32)))
    got = grad_logits(stu, st, MASK, LossOptions(loss="student_topk", k=K, renormalize=True))
    np.testing.assert_allclose(got, want, atol=1e-6)
    paper = grad_logits(stu, st, MASK, LossOptions(loss="student_topk", k=K))
    assert np.abs(paper - want).max() > 1e-3
    full = to_jax(make_stored(stu, tch, V, np.random.default_rng(0)))
    np.testing.assert_allclose(
        grad_logits(stu, full, MASK, LossOptions(loss="student_topk", k=V, renormalize=True)),
        grad_logits(stu, full, MASK, LossOptions(loss="student_topk", k=V)),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="renormalize apply to loss 'student_topk' only"):
        check_options(LossOptions(loss="sampled", k=0, renormalize=True))
