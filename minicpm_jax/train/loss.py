"""Next-token cross-entropy computed in token chunks, so ``[B, T, V]`` fp32 logits never exist at once.

Each chunk's logits are rematerialised in the backward pass (``jax.checkpoint``), so the scan keeps
only the ``[chunk, hidden]`` inputs as residuals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minicpm_jax.model.decoder import MiniCPMForCausalLM


def chunked_cross_entropy(
    model: MiniCPMForCausalLM, hidden: jax.Array, targets: jax.Array, mask: jax.Array, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
    """``(sum of masked token losses, sum of mask)`` from final hidden states ``[B, T, H]``."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t, m = targets.reshape(-1), mask.reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    chunk = min(chunk_size, n)
    pad = -n % chunk
    h, t, m = jnp.pad(h, ((0, pad), (0, 0))), jnp.pad(t, (0, pad)), jnp.pad(m, (0, pad))

    @jax.checkpoint
    def chunk_loss(h_c, t_c, m_c):
        logits = model.logits(h_c[None])[0]  # fp32 [chunk, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        return jnp.sum((lse - target) * m_c)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    shape = (-1, chunk)
    total, _ = jax.lax.scan(body, jnp.float32(0), (h.reshape(*shape, h.shape[-1]), t.reshape(shape), m.reshape(shape)))
    return total, jnp.sum(m)


def next_token_loss(
    model: MiniCPMForCausalLM, batch: dict, *, remat: str = "none", chunk_size: int = 1024
) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """Pretraining loss: ``(summed loss, (token count, aux metrics))`` for token-weighted averaging."""
    hidden = model.hidden_states(batch["input_ids"], batch.get("positions"), batch.get("segment_ids"), remat=remat)
    loss_sum, weight = chunked_cross_entropy(model, hidden, batch["targets"], batch["loss_mask"], chunk_size)
    return loss_sum, (weight, {})
