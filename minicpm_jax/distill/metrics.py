"""OPD diagnostics (spec/opd.md §6, §10.3) from the stored per-token arrays of one chunk.

Every metric is a ``(numerator sum, denominator sum)`` pair so chunks and micro-batches add up; the engine
divides at the end. Top-k arrays are assumed sorted by descending probability (``lax.top_k``), so ``k`` may
be smaller than the stored K.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minicpm_jax.distill.losses import isin, masked_log_softmax


def _overlap(stored: dict, k: int) -> jax.Array:
    """``[N, k]`` bool: student top-k entry is in the teacher top-k (``O_t`` on the student columns)."""
    if not 1 <= k <= min(stored["stu_topk_ids"].shape[-1], stored["tch_topk_ids"].shape[-1]):
        raise ValueError(f"k={k} must be in [1, stored K]")
    return isin(stored["stu_topk_ids"][:, :k], stored["tch_topk_ids"][:, :k])


def metric_sums(stored: dict, mask: jax.Array, k: int) -> dict[str, tuple[jax.Array, jax.Array]]:
    """All per-step diagnostics of spec §6 items 1-5 and §10.3 as masked ``(sum, count)`` pairs.

    Reads ``stu_topk_ids``, ``stu_topk_logp``, ``tch_logp_on_stu_ids``, ``tch_topk_ids``, ``tch_topk_logp``,
    ``stu_entropy``, ``tch_entropy``, ``stu_logp_tok``, ``tch_logp_tok``.
    """
    st = jax.tree.map(jax.lax.stop_gradient, stored)
    m = mask.astype(jnp.float32)
    ov = _overlap(st, k)
    ovf = ov.astype(jnp.float32)
    n_ov = ovf.sum(-1)
    slp, sq, tq = st["stu_topk_logp"][:, :k], st["tch_logp_on_stu_ids"][:, :k], st["tch_topk_logp"][:, :k]
    # Eq. 7 with p-bar, q-bar renormalised on O_t, mean over O_t, positions with O_t non-empty
    lpb, lqb = masked_log_softmax(slp, ov), masked_log_softmax(sq, ov)
    eq7 = jnp.sum(jnp.where(ov, jnp.exp(lpb) * (lqb - lpb), 0.0), -1) / jnp.maximum(n_ov, 1.0)
    has = m * (n_ov > 0)
    # thunlp training advantage p-bar_{S^p}(v) (log q(v) - log p(v)) on the student top-k (spec §5 step 4)
    a = jax.nn.softmax(slp, axis=-1) * (sq - slp)
    tok = jnp.sum(m)
    mean = lambda x: (jnp.sum(m * x), tok)
    return {
        "overlap_ratio": mean(n_ov / k),
        "overlap_token_adv": (jnp.sum(has * eq7), jnp.sum(has)),
        "overlap_token_adv_code": (jnp.sum(m[:, None] * ovf * a), jnp.sum(m * n_ov)),
        "adv_overlap": mean(jnp.sum(ovf * a, -1)),
        "adv_only_student": mean(jnp.sum((1.0 - ovf) * a, -1)),
        "entropy_gap": mean(jnp.abs(st["tch_entropy"] - st["stu_entropy"])),
        "student_entropy": mean(st["stu_entropy"]),
        "teacher_entropy": mean(st["tch_entropy"]),
        "overlap_mass_student": mean(jnp.sum(ovf * jnp.exp(slp), -1)),
        "overlap_mass_teacher": mean(jnp.sum(ovf * jnp.exp(sq), -1)),
        "topk_mass_student": mean(jnp.sum(jnp.exp(slp), -1)),
        "topk_mass_teacher": mean(jnp.sum(jnp.exp(tq), -1)),
        "sampled_rkl": mean(st["stu_logp_tok"] - st["tch_logp_tok"]),
    }


def position_chunk_sums(
    stored: dict, mask: jax.Array, positions: jax.Array, lengths: jax.Array, k: int, num_chunks: int = 8
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Overlap ratio and both entropies per response-position chunk (spec §6 item 8, §10.3): token t falls in
    chunk ``floor(num_chunks * positions / lengths)`` (``positions`` 0-based within the response, ``lengths``
    the row's response length, both ``[N]``); each value is a ``([num_chunks], [num_chunks])`` pair."""
    st = jax.tree.map(jax.lax.stop_gradient, stored)
    bucket = jnp.clip((positions * num_chunks) // jnp.maximum(lengths, 1), 0, num_chunks - 1)
    onehot = (bucket[:, None] == jnp.arange(num_chunks)) * mask.astype(jnp.float32)[:, None]
    den = onehot.sum(0)
    values = {
        "overlap_ratio": _overlap(st, k).sum(-1) / k,
        "student_entropy": st["stu_entropy"],
        "teacher_entropy": st["tch_entropy"],
    }
    return {name: (onehot.T @ v.astype(jnp.float32), den) for name, v in values.items()}
