"""The distillation loss in the engine's form ``loss_fn(model, frozen, batch) -> (sum, (weight, aux))``.

The student forward (with gradient) runs once; its logits are taken in token chunks (``jax.checkpoint``
per chunk, so only hidden states are kept for the backward pass) and each chunk's full-vocabulary
log-softmax goes to ``distill.losses.chunk_loss`` with the chunk's stored arrays (``distill.scores``).
Direct full-vocabulary losses also run the frozen teacher forward (no gradient) and chunk its logits
alongside. Weight = response tokens (token-mean over the global batch). Aux: every diagnostic of
``distill.metrics.metric_sums`` (as ``opd/<name>``), the position-resolved overlap ratio and
entropies (``opd/<name>_chunk_<i>``, 8 chunks of each response) plus the rollout statistics (response length, truncation rate, reward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minicpm_jax.distill.losses import LossOptions, chunk_loss, needs_teacher_logits
from minicpm_jax.distill.metrics import metric_sums, position_chunk_sums
from minicpm_jax.train.loss import token_chunks

STORED = (
    "stu_logp_tok",
    "stu_topk_ids",
    "stu_topk_logp",
    "stu_entropy",
    "stu_logp_on_tch_ids",
    "tch_logp_tok",
    "tch_logp_on_stu_ids",
    "tch_topk_ids",
    "tch_topk_logp",
    "tch_entropy",
    "grpo_adv",
)
ROLLOUT_STATS = ("response_length", "truncated", "reward", "on_policy")
POSITION_CHUNKS = 8  # response-position chunks of the position-resolved diagnostics


def _flat(x: jax.Array) -> jax.Array:
    """``[B, c, ...]`` -> ``[B*c, ...]``."""
    return x.reshape(-1, *x.shape[2:])


def opd_loss(model, frozen, batch: dict, *, options: LossOptions, chunk_tokens: int = 1024, remat: str = "none"):
    """On-policy distillation loss of a rollout batch (see the module docstring)."""
    ids, mask = batch["input_ids"], batch["loss_mask"].astype(jnp.float32)
    stored = {k: batch[k] for k in STORED if k in batch} | {"sampled": batch["targets"]}
    h = model.hidden_states(ids, remat=remat)
    teacher = frozen["teacher"] if needs_teacher_logits(options) else None
    xs = {"h": h, "mask": mask, "stored": stored}
    if teacher is not None:
        xs["h_teacher"] = jax.lax.stop_gradient(teacher.hidden_states(ids))
    chunks = jax.tree.map(lambda a: token_chunks(a, chunk_tokens), xs)

    @jax.checkpoint
    def chunk(c):
        logp = _flat(jax.nn.log_softmax(model.logits(c["h"]), axis=-1))
        tlogp = None
        if teacher is not None:
            tlogp = _flat(jax.lax.stop_gradient(jax.nn.log_softmax(teacher.logits(c["h_teacher"]), axis=-1)))
        return chunk_loss(logp, jax.tree.map(_flat, c["stored"]), _flat(c["mask"]), options, tlogp)

    def body(total, c):
        return total + chunk(c), None

    total, _ = jax.lax.scan(body, jnp.float32(0), chunks)
    weight = jnp.sum(mask)
    flat_stored = {k: v.reshape(-1, *v.shape[2:]) for k, v in stored.items()}
    k, flat_mask = stored["stu_topk_ids"].shape[-1], mask.reshape(-1)
    aux = {f"opd/{name}": v for name, v in metric_sums(flat_stored, flat_mask, k).items()}
    position = (jnp.cumsum(mask, axis=1) - 1).reshape(-1)  # 0-based position inside the response
    length = jnp.broadcast_to(jnp.sum(mask, axis=1, keepdims=True), mask.shape).reshape(-1)
    by_position = position_chunk_sums(flat_stored, flat_mask, position, length, k, POSITION_CHUNKS)
    for name, (num, den) in by_position.items():
        aux |= {f"opd/{name}_chunk_{i}": (num[i], den[i]) for i in range(POSITION_CHUNKS)}
    rows = jnp.float32(ids.shape[0])
    aux |= {f"rollout/{k}": (jnp.sum(batch[k].astype(jnp.float32)), rows) for k in ROLLOUT_STATS if k in batch}
    return total, (weight, aux)
