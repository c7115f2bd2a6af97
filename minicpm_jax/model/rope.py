"""Rotary position embeddings: rotate-half RoPE with MiniCPM's LongRoPE factors.

LongRoPE follows the official code's *static* choice: the long factors (and ``mscale > 1``) are used
iff ``max_position_embeddings > original_max_position_embeddings``, decided from the config and
applied to every position, whatever the input length (spec/minicpm4.md 2.2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.config.schema import ModelConfig


def rope_factors(cfg: ModelConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Per-frequency divisors ``ext`` (``[head_dim/2]``) and the cos/sin multiplier ``mscale``."""
    rs = cfg.rope_scaling
    if rs is None:
        return np.ones(head_dim // 2, np.float32), 1.0
    orig = rs.original_max_position_embeddings
    use_long = cfg.max_position_embeddings > orig
    scale = max(cfg.max_position_embeddings / orig, 1.0)
    mscale = math.sqrt(1 + math.log(scale) / math.log(orig))
    return np.asarray(rs.long_factor if use_long else rs.short_factor, np.float32), mscale


def rope_cos_sin(cfg: ModelConfig, head_dim: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fp32 ``cos, sin`` of shape ``[*positions.shape, head_dim]`` (NeoX / rotate-half layout)."""
    ext, mscale = rope_factors(cfg, head_dim)
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = (positions.astype(jnp.float32)[..., None] * jnp.asarray(1.0 / ext)) * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * mscale, jnp.sin(emb) * mscale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, H, D]`` by ``cos/sin [B, T, D]`` in fp32, cast back to ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)
