"""AdamW with MiniCPM's muP learning-rate rule, a weight-decay mask, clipping and LR schedules.

Schedules (spec/minicpm4.md 3.2): ``wsd_exp`` is MiniCPM's warmup-stable-decay with exponential decay
``lr = eta * ratio ** ((s - T_stable) / D)`` (half-life ``D ln2 / ln(1/ratio)``); ``wsd_linear``
decays linearly to ``eta * ratio``; ``cosine`` goes from ``eta`` to ``eta * ratio`` after warmup.
Warmup is ``eta * s / W``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from minicpm_jax.config.schema import ModelConfig, OptimizerConfig

EMBEDDING_KEYS = ("embed_tokens", "lm_head")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """LR as a function of the (0-based) step."""
    warmup, decay = cfg.warmup_steps, cfg.decay_steps
    decay_start = total_steps - decay
    if decay_start < warmup:
        raise ValueError(f"optimizer: warmup_steps {warmup} + decay_steps {decay} exceed train.steps {total_steps}")

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        lr = cfg.learning_rate * (jnp.minimum(s / warmup, 1.0) if warmup else 1.0)
        if cfg.schedule == "cosine":
            p = jnp.clip((s - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
            return lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + jnp.cos(math.pi * p)))
        if cfg.schedule == "constant" or not decay:
            return lr * jnp.ones_like(s)
        p = jnp.clip((s - decay_start) / decay, 0.0, 1.0)
        if cfg.schedule == "wsd_exp":
            return lr * cfg.min_lr_ratio**p
        return lr * (1 - (1 - cfg.min_lr_ratio) * p)  # wsd_linear

    return schedule


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", k)) for k in path]


def lr_multipliers(params, model_cfg: ModelConfig, cfg: OptimizerConfig):
    """Per-parameter LR multiplier: muP scales matrices by ``dim_model_base / hidden``.

    Norms (1-D) are never scaled; the embedding and the LM head only with ``mup_embeddings``.
    """
    width = model_cfg.dim_model_base / model_cfg.hidden_size

    def one(path, p):
        names = _path_names(path)
        is_embedding = any(k in names for k in EMBEDDING_KEYS)
        scaled = cfg.mup and p.ndim >= 2 and (cfg.mup_embeddings or not is_embedding)
        return width if scaled else 1.0

    return jax.tree_util.tree_map_with_path(one, params)


def weight_decay_mask(params, cfg: OptimizerConfig):
    """True where weight decay applies: matrices; norms and embeddings only if configured."""

    def one(path, p):
        names = _path_names(path)
        if any(k in names for k in EMBEDDING_KEYS):
            return cfg.decay_embeddings
        return cfg.decay_norms if p.ndim == 1 else True

    return jax.tree_util.tree_map_with_path(one, params)


def build_optimizer(params, model_cfg: ModelConfig, cfg: OptimizerConfig, total_steps: int):
    """``(optax transformation, schedule)`` for a pure-dict parameter tree."""
    schedule = learning_rate_schedule(cfg, total_steps)
    multipliers = lr_multipliers(params, model_cfg, cfg)
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    chain += [
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask(params, cfg)),
        optax.stateless(lambda updates, _: jax.tree.map(lambda u, m: u * m, updates, multipliers)),
        optax.scale_by_learning_rate(schedule),
    ]
    return optax.chain(*chain), schedule
