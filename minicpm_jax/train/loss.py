"""Next-token cross-entropy computed in token chunks, so ``[B, T, V]`` fp32 logits never exist at once.

The scan runs over token chunks of *every row at once* (``[B, c, H]`` per step), so the batch
axis stays sharded over the data axes and each device computes the LM head for its own rows only.
Chunk j takes the strided tokens ``i * n + j`` (order does not matter for a sum), which keeps a
``sequence``-sharded token axis sharded too. Each chunk's logits are rematerialised in the backward
pass (``jax.checkpoint``), so the scan keeps only the hidden-state inputs as residuals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minicpm_jax.model.decoder import MiniCPMForCausalLM


def token_chunks(x: jax.Array, chunk_tokens: int) -> jax.Array:
    """``[B, T, ...]`` -> ``[n, B, c, ...]`` with ``c = max(1, chunk_tokens // B)`` strided tokens per
    row and chunk (the token axis zero-padded to ``c * n``)."""
    b, t = x.shape[:2]
    c = max(1, min(t, chunk_tokens // b))
    n = -(-t // c)
    x = jnp.pad(x, [(0, 0), (0, c * n - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, c, n, *x.shape[2:]), 2, 0)


def from_token_chunks(x: jax.Array, t: int) -> jax.Array:
    """The inverse of ``token_chunks``: ``[n, B, c, ...]`` -> ``[B, t, ...]``."""
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 2).reshape(b, c * n, *x.shape[3:])[:, :t]


def chunked_cross_entropy(
    model: MiniCPMForCausalLM, hidden: jax.Array, targets: jax.Array, mask: jax.Array, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
    """``(sum of masked token losses, sum of mask)`` from final hidden states ``[B, T, H]``;
    ``chunk_size`` is the number of tokens (all rows together) whose logits exist at once."""
    mask = mask.astype(jnp.float32)

    @jax.checkpoint
    def chunk_loss(h_c, t_c, m_c):
        logits = model.logits(h_c)  # fp32 [B, c, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - target) * m_c)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    xs = tuple(token_chunks(a, chunk_size) for a in (hidden, targets, mask))
    total, _ = jax.lax.scan(body, jnp.float32(0), xs)
    return total, jnp.sum(mask)


def next_token_loss(
    model: MiniCPMForCausalLM, frozen, batch: dict, *, remat: str = "none", chunk_size: int = 1024
) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """Pretraining loss: ``(summed loss, (token count, aux))``; ``frozen`` is unused."""
    del frozen
    hidden = model.hidden_states(batch["input_ids"], batch.get("positions"), batch.get("segment_ids"), remat=remat)
    loss_sum, weight = chunked_cross_entropy(model, hidden, batch["targets"], batch["loss_mask"], chunk_size)
    return loss_sum, (weight, {})


def chunked_kl(
    student: MiniCPMForCausalLM,
    h_student: jax.Array,
    teacher: MiniCPMForCausalLM,
    h_teacher: jax.Array,
    mask: jax.Array,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """``(sum over masked tokens of KL(teacher || student), sum of mask)`` on full-vocabulary fp32
    log-softmax, from both models' final hidden states, ``chunk_size`` tokens of logits at a time."""
    mask = mask.astype(jnp.float32)

    @jax.checkpoint
    def chunk_kl(hs, ht, m):
        log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher.logits(ht)), axis=-1)
        log_q = jax.nn.log_softmax(student.logits(hs), axis=-1)
        return jnp.sum(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * m)

    def body(total, xs):
        return total + chunk_kl(*xs), None

    xs = tuple(token_chunks(a, chunk_size) for a in (h_student, h_teacher, mask))
    total, _ = jax.lax.scan(body, jnp.float32(0), xs)
    return total, jnp.sum(mask)
