"""The conversion losses, in the engine's ``loss_fn(model, frozen, batch)`` form (``frozen["teacher"]``
is the dense teacher): stage-1 hidden-state alignment and stage-2 KL distillation (spec/sala.md 2.3, 2.5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minicpm_jax.convert.transfer import LIGHTNING
from minicpm_jax.train.loss import chunked_kl


def _inputs(batch: dict):
    ids = batch["input_ids"]
    positions = batch.get("positions")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return ids, positions, batch.get("segment_ids")


def alignment_loss(model, frozen, batch: dict):
    """Stage 1: every Lightning layer of ``model`` reads the teacher layer's (detached) mixer input and
    is trained to reproduce the teacher's attention output; the loss is the sum over layers of each
    layer's mean squared error (mean over the hidden width, token-mean over ``loss_mask``). The
    teacher runs once; aux ``mse_<i>`` is layer i's error."""
    ids, positions, segment_ids = _inputs(batch)
    io = frozen["teacher"].mixer_io(ids, positions, segment_ids)
    mask = batch["loss_mask"].astype(jnp.float32)
    weight = jnp.sum(mask)
    total, aux = jnp.float32(0), {}
    for i, (layer, kind) in enumerate(zip(model.model.layers, model.config.layer_mixers)):
        if kind != LIGHTNING:
            continue
        u, target = (jax.lax.stop_gradient(a) for a in io[i])
        out, _ = layer.self_attn(u, positions, segment_ids)
        err = jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
        layer_sum = jnp.sum(err * mask)
        total = total + layer_sum
        aux[f"mse_{i}"] = (layer_sum, weight)
    return total, (weight, aux)


def kl_loss(model, frozen, batch: dict, *, remat: str = "none", chunk_size: int = 1024):
    """Stage 2: token-mean KL(teacher || student) over the full vocabulary, chunked over tokens."""
    ids, positions, segment_ids = _inputs(batch)
    teacher = frozen["teacher"]
    h_teacher = jax.lax.stop_gradient(teacher.hidden_states(ids, positions, segment_ids))
    h_student = model.hidden_states(ids, positions, segment_ids, remat=remat)
    total, weight = chunked_kl(model, h_student, teacher, h_teacher, batch["loss_mask"], chunk_size)
    return total, (weight, {})
