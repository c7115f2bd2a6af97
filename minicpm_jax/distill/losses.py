"""OPD losses on one token chunk (spec/opd.md §2-3): pure functions of per-token arrays, jit-safe.

``logp`` ``[N, V]`` is the student log-softmax under the current parameters (the only differentiable input);
``stored`` holds the ``[N]`` / ``[N, K]`` arrays scored before the update (spec §10.1). Every advantage is
stop-gradient and policy-gradient terms use the ratio form ``exp(lp - sg(lp))``: the value is the
advantage-weighted count and the gradient is ``-adv * grad(lp)`` (spec §3 item 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

LOSSES = ("sampled", "student_topk", "full_vocab_rkl", "gkd_jsd", "forward_kl_teacher_topk")
WEIGHT_MODES = ("student_p", "teacher_p", "none")
SUPPORTS = ("student", "intersection", "teacher_topk", "union", "sym_diff")
FORBIDDEN = {
    "topk_kl_advantage": (
        "a per-position top-k KL value subtracted from the sampled token's advantage does not depend on the "
        "sampled token, so its expected on-policy gradient is E_y[c_t grad log p_t(y)] = 0: it only adds noise "
        "(spec 3.1, radixark/miles #2362); use student_topk, which acts on the k candidates' own log-probs"
    ),
    "unnormalized_topk_rkl": (
        "the unnormalised top-k reverse KL sum_{v in TopK(p)} p(v) log(p(v)/q(v)) as a direct loss can be driven "
        "down by moving student mass out of the top-k support (spec 3.1, verl PR #5041); use student_topk "
        "(policy gradient) or forward_kl_teacher_topk"
    ),
}
_TOPK_LOSSES = ("student_topk", "forward_kl_teacher_topk")


@dataclass(frozen=True)
class LossOptions:
    """Loss choice (spec §3). ``coef`` scales the distillation term of every loss; ``grpo_weight`` adds the
    GRPO outcome advantage on the sampled token (spec §3 item 6); ``beta`` is gkd_jsd's β."""

    loss: str = "student_topk"
    k: int = 16
    weight_mode: str = "student_p"
    support: str = "student"
    beta: float = 0.5
    coef: float = 1.0
    grpo_weight: float = 0.0
    # student_topk: subtract the support-weighted mean advantage per position. With student_p weights the
    # update is then exactly the gradient of KL(p̄ || q̄) renormalised on the support, and the support's
    # total student probability stays fixed to first order (without it, a support the teacher rates below
    # the student everywhere leaks mass to the unscored tail). False = the paper's code.
    renormalize: bool = False


def check_options(options: LossOptions) -> None:
    """Raise one ValueError listing every problem with ``options``."""
    o, problems = options, []
    if o.loss in FORBIDDEN:
        problems.append(f"loss {o.loss!r} must not be used: {FORBIDDEN[o.loss]}")
    elif o.loss not in LOSSES:
        problems.append(f"unknown loss {o.loss!r}; expected one of {LOSSES}")
    if o.weight_mode not in WEIGHT_MODES:
        problems.append(f"unknown weight_mode {o.weight_mode!r}; expected one of {WEIGHT_MODES}")
    if o.support not in SUPPORTS:
        problems.append(f"unknown support {o.support!r}; expected one of {SUPPORTS}")
    if o.loss != "student_topk" and ((o.weight_mode, o.support) != ("student_p", "student") or o.renormalize):
        problems.append(f"weight_mode/support/renormalize apply to loss 'student_topk' only, not {o.loss!r}")
    k_min = 1 if o.loss in _TOPK_LOSSES else 0
    if isinstance(o.k, bool) or not isinstance(o.k, int) or o.k < k_min:
        problems.append(f"k must be an int >= {k_min} for loss {o.loss!r}, got {o.k!r}")
    if not isinstance(o.beta, (int, float)) or not 0.0 <= o.beta <= 1.0:
        problems.append(f"beta must be in [0, 1], got {o.beta!r}")
    if not isinstance(o.coef, (int, float)) or not math.isfinite(o.coef):
        problems.append(f"coef must be a finite number, got {o.coef!r}")
    if not isinstance(o.grpo_weight, (int, float)) or not 0.0 <= o.grpo_weight < math.inf:
        problems.append(f"grpo_weight must be a finite number >= 0, got {o.grpo_weight!r}")
    if problems:
        raise ValueError("invalid LossOptions:\n  - " + "\n  - ".join(problems))


def needs_teacher_logits(options: LossOptions) -> bool:
    """Whether ``chunk_loss`` needs the teacher's full-vocab ``teacher_logp`` (spec §3 items 3-4)."""
    return options.loss in ("full_vocab_rkl", "gkd_jsd")


def isin(ids: jax.Array, of: jax.Array) -> jax.Array:
    """``[N, A]`` bool: ``ids[n, a]`` occurs in ``of[n, :]``."""
    return jnp.any(ids[..., :, None] == of[..., None, :], axis=-1)


def masked_log_softmax(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Log-softmax of ``x`` over the ``valid`` entries of the last axis (0 elsewhere and on empty rows)."""
    lse = jax.nn.logsumexp(jnp.where(valid, x, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(valid, x - jnp.where(jnp.isfinite(lse), lse, 0.0), 0.0)


def _support(stored: dict, support: str) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Columns ``(ids, old student log p, teacher log q, valid)`` of a top-k support (spec §3 item 2, §5 step 4)."""
    sid, slp, sq = stored["stu_topk_ids"], stored["stu_topk_logp"], stored["tch_logp_on_stu_ids"]
    if support == "student":
        return sid, slp, sq, jnp.ones(sid.shape, bool)
    tid, tq = stored["tch_topk_ids"], stored["tch_topk_logp"]
    if support == "intersection":
        return sid, slp, sq, isin(sid, tid)
    tlp = stored["stu_logp_on_tch_ids"]
    if support == "teacher_topk":
        return tid, tlp, tq, jnp.ones(tid.shape, bool)
    t_new = ~isin(tid, sid)
    s_col = jnp.ones(sid.shape, bool) if support == "union" else ~isin(sid, tid)
    cat = lambda a, b: jnp.concatenate([a, b], axis=-1)
    return cat(sid, tid), cat(slp, tlp), cat(sq, tq), cat(s_col, t_new)


def advantages(stored: dict, options: LossOptions) -> dict[str, jax.Array]:
    """Stop-gradient policy-gradient advantages ``{"ids": [N, C] int, "adv": [N, C]}`` ({} if none), the PG term
    being ``-sum mask * adv * ratio(logp at ids)``. Columns: the OPD support (spec §3 items 1-2; none for the
    direct losses) then, when ``grpo_weight > 0``, the sampled token with ``grpo_weight * grpo_adv`` (item 6)."""
    o, st = options, jax.tree.map(jax.lax.stop_gradient, stored)
    ids, adv = [], []
    if o.loss == "sampled":
        ids.append(st["sampled"][:, None])
        adv.append(o.coef * (st["tch_logp_tok"] - st["stu_logp_tok"])[:, None])
    elif o.loss == "student_topk":
        if st["stu_topk_ids"].shape[-1] != o.k:
            raise ValueError(f"stored top-k has K={st['stu_topk_ids'].shape[-1]}, options.k={o.k}")
        cid, clp, cq, valid = _support(st, o.support)
        if o.weight_mode == "none":
            w = valid.astype(jnp.float32)
        else:
            lw = clp if o.weight_mode == "student_p" else cq
            # softmax over the support's valid columns; sym_diff keeps raw probabilities (spec §5 step 4).
            # weight_mode "none" is 1 on every valid column, never renormalised.
            w = jnp.where(valid, jnp.exp(lw if o.support == "sym_diff" else masked_log_softmax(lw, valid)), 0.0)
        gap = cq - clp
        if o.renormalize:
            total = jnp.sum(w, axis=-1, keepdims=True)
            gap = gap - jnp.sum(w * gap, axis=-1, keepdims=True) / jnp.where(total > 0, total, 1.0)
        ids.append(cid)
        adv.append(o.coef * w * gap)
    if o.grpo_weight > 0:
        ids.append(st["sampled"][:, None])
        adv.append(o.grpo_weight * st["grpo_adv"][:, None])
    return {"ids": jnp.concatenate(ids, axis=-1), "adv": jnp.concatenate(adv, axis=-1)} if ids else {}


def _kl(logx: jax.Array, logy: jax.Array) -> jax.Array:
    """``sum_v x(v) (log x(v) - log y(v))`` over the last axis, with ``0 log 0 = 0``."""
    ok = logx > -jnp.inf
    lx, ly = jnp.where(ok, logx, 0.0), jnp.where(ok, logy, 0.0)
    return jnp.sum(jnp.where(ok, jnp.exp(lx) * (lx - ly), 0.0), axis=-1)


def _direct(logp: jax.Array, stored: dict, teacher_logp: jax.Array | None, o: LossOptions) -> jax.Array | None:
    """Per-token value of a directly differentiated loss (spec §3 items 3-5), else None."""
    if o.loss == "forward_kl_teacher_topk":
        tid = stored["tch_topk_ids"]
        if tid.shape[-1] != o.k:
            raise ValueError(f"stored teacher top-k has K={tid.shape[-1]}, options.k={o.k}")
        return jnp.maximum(_kl(stored["tch_topk_logp"], jnp.take_along_axis(logp, tid, axis=-1)), 0.0)
    if not needs_teacher_logits(o):
        return None
    if teacher_logp is None:
        raise ValueError(f"loss {o.loss!r} needs teacher_logp [N, V]")
    lq = jax.lax.stop_gradient(teacher_logp)
    if o.loss == "full_vocab_rkl" or o.beta == 1.0:
        return _kl(logp, lq)  # reverse KL(student || teacher)
    if o.beta == 0.0:
        return _kl(lq, logp)  # forward KL(teacher || student)
    lm = jnp.logaddexp(lq + math.log(o.beta), logp + math.log1p(-o.beta))  # log(beta P + (1 - beta) Q)
    return o.beta * _kl(lq, lm) + (1.0 - o.beta) * _kl(logp, lm)


def chunk_loss(
    logp: jax.Array, stored: dict, mask: jax.Array, options: LossOptions, teacher_logp: jax.Array | None = None
) -> jax.Array:
    """Scalar loss SUMMED over the chunk's masked tokens (the caller divides by the global token count)."""
    check_options(options)
    stored = jax.tree.map(jax.lax.stop_gradient, stored)
    loss = jnp.zeros((), logp.dtype)
    if a := advantages(stored, options):
        lp = jnp.take_along_axis(logp, a["ids"], axis=-1)
        loss = loss - jnp.sum(mask[:, None] * a["adv"] * jnp.exp(lp - jax.lax.stop_gradient(lp)))
    direct = _direct(logp, stored, teacher_logp, options)
    if direct is not None:
        loss = loss + options.coef * jnp.sum(mask * direct)
    return loss
