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


def own_scores(logp: jax.Array, targets: jax.Array, k: int) -> dict[str, jax.Array]:
    """One model's arrays from its log-softmax ``[..., V]``: ``logp_tok`` (at the targets), ``topk_ids``,
    ``topk_logp`` and ``entropy``."""
    topk_logp, topk_ids = jax.lax.top_k(logp, k)
    return {
        "logp_tok": _at(logp, targets[..., None])[..., 0],
        "topk_ids": topk_ids.astype(jnp.int32),
        "topk_logp": topk_logp,
        "entropy": _entropy(logp),
    }


def chunk_scores(stu_logp: jax.Array, tch_logp: jax.Array, targets: jax.Array, k: int) -> dict[str, jax.Array]:
    """Every stored array of one chunk from both models' log-softmax ``[..., V]`` and the targets ``[...]``."""
    stu, tch = own_scores(stu_logp, targets, k), own_scores(tch_logp, targets, k)
    return {
        **{f"stu_{name}": v for name, v in stu.items()},
        "stu_logp_on_tch_ids": _at(stu_logp, tch["topk_ids"]),
        **{f"tch_{name}": v for name, v in tch.items()},
        "tch_logp_on_stu_ids": _at(tch_logp, stu["topk_ids"]),
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


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def model_scores(graphdef, params, batch, other_ids, k: int, chunk_tokens: int) -> dict[str, jax.Array]:
    """One model's half of the scores (``logp_tok``, ``topk_ids``, ``topk_logp``, ``entropy``, and
    ``logp_on_other`` at ``other_ids [B, T, K]`` if given), for a teacher on its own devices."""
    model = nnx.merge(graphdef, params)
    ids, targets = batch["input_ids"], batch["targets"]
    xs = (model.hidden_states(ids), targets) + (() if other_ids is None else (other_ids,))

    def chunk(c):
        logp = jax.nn.log_softmax(model.logits(c[0]), axis=-1)
        return own_scores(logp, c[1], k) | ({"logp_on_other": _at(logp, c[2])} if len(c) > 2 else {})

    out = jax.lax.map(chunk, tuple(token_chunks(a, chunk_tokens) for a in xs))
    return jax.tree.map(lambda x: jax.lax.stop_gradient(from_token_chunks(x, ids.shape[1])), out)


def score_on_two_meshes(student_def, student_params, teacher, batch, k: int, chunk_tokens: int, student_mesh):
    """The arrays of ``score_rollouts`` with the teacher on its own mesh: the student's top-k (pass 1),
    the teacher on the same ids and at those top-k ids (only ``[B, T]`` ids and ``[B, T, k]`` arrays
    cross between the meshes), then the student at the teacher's top-k (pass 2)."""
    from minicpm_jax.sharding import mesh_of
    from minicpm_jax.train.sources import global_batch

    t_def, t_params = nnx.split(teacher)
    stu = model_scores(student_def, student_params, batch, None, k, chunk_tokens)
    to_teacher = global_batch(mesh_of(t_params), {**batch, "other": stu["topk_ids"]})
    tch = model_scores(
        t_def,
        t_params,
        {"input_ids": to_teacher["input_ids"], "targets": to_teacher["targets"]},
        to_teacher["other"],
        k,
        chunk_tokens,
    )
    tch = global_batch(student_mesh, tch)
    back = model_scores(student_def, student_params, batch, tch["topk_ids"], k, chunk_tokens)["logp_on_other"]
    return {
        **{f"stu_{name}": v for name, v in stu.items()},
        "stu_logp_on_tch_ids": back,
        **{f"tch_{name}": v for name, v in tch.items() if name != "logp_on_other"},
        "tch_logp_on_stu_ids": tch["logp_on_other"],
    }
