"""Scoring of rollouts before the update (spec/opd.md 5 steps 2-3, 10.1): the student recompute and the
teacher forward on identical token ids, without gradient, in token chunks (``[B, T, V]`` fp32 logits
never exist at once).

Rows are ``prompt + response`` right-padded; ``input_ids = row[:-1]``, ``targets = row[1:]``, so the
logits at position i score token i+1 and the response tokens are the targets where ``loss_mask`` is 1
(the same alignment as the contract's left-padded ``logits[:, -T-1:-1]``). Per position:

- student: ``stu_logp_tok`` (log p of the target = the sampled token), ``stu_topk_ids`` /
  ``stu_topk_logp`` (``lax.top_k`` of the log-softmax), ``stu_entropy`` (full vocabulary),
  ``stu_logp_on_tch_ids`` (log p at the teacher's top-k);
- teacher: ``tch_logp_tok``, ``tch_logp_on_stu_ids`` (log q at the student's top-k ids),
  ``tch_topk_ids`` / ``tch_topk_logp``, ``tch_entropy``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from minicpm_jax.train.frozen import merge_frozen
from minicpm_jax.train.loss import from_token_chunks, token_chunks


def _entropy(logp: jax.Array) -> jax.Array:
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _at(logp: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logp, ids, axis=-1)


def chunk_scores(stu_logp: jax.Array, tch_logp: jax.Array, targets: jax.Array, k: int) -> dict[str, jax.Array]:
    """Every stored array of one chunk from both models' log-softmax ``[..., V]`` and the targets ``[...]``."""
    stu_topk_logp, stu_topk_ids = jax.lax.top_k(stu_logp, k)
    tch_topk_logp, tch_topk_ids = jax.lax.top_k(tch_logp, k)
    t = targets[..., None]
    return {
        "stu_logp_tok": _at(stu_logp, t)[..., 0],
        "stu_topk_ids": stu_topk_ids.astype(jnp.int32),
        "stu_topk_logp": stu_topk_logp,
        "stu_entropy": _entropy(stu_logp),
        "stu_logp_on_tch_ids": _at(stu_logp, tch_topk_ids),
        "tch_logp_tok": _at(tch_logp, t)[..., 0],
        "tch_logp_on_stu_ids": _at(tch_logp, stu_topk_ids),
        "tch_topk_ids": tch_topk_ids.astype(jnp.int32),
        "tch_topk_logp": tch_topk_logp,
        "tch_entropy": _entropy(tch_logp),
    }


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6))
def score_rollouts(student_def, frozen_def, student_params, frozen_arrays, batch, k: int, chunk_tokens: int):
    """The stored arrays ``[B, T]`` / ``[B, T, k]`` of ``batch`` (``input_ids``, ``targets``) under the
    student parameters and ``frozen["teacher"]``; no gradient flows anywhere."""
    student = nnx.merge(student_def, student_params)
    teacher = merge_frozen(frozen_def, frozen_arrays)["teacher"]
    ids, targets = batch["input_ids"], batch["targets"]
    hs, ht = student.hidden_states(ids), teacher.hidden_states(ids)

    def chunk(xs):
        h_s, h_t, t_c = xs
        stu = jax.nn.log_softmax(student.logits(h_s), axis=-1)
        tch = jax.nn.log_softmax(teacher.logits(h_t), axis=-1)
        return chunk_scores(stu, tch, t_c, k)

    out = jax.lax.map(chunk, tuple(token_chunks(a, chunk_tokens) for a in (hs, ht, targets)))
    return jax.tree.map(lambda x: jax.lax.stop_gradient(from_token_chunks(x, ids.shape[1])), out)
