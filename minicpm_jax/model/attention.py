"""Softmax attention mixer (the ``"minicpm4"`` layer): GQA, optional RoPE (NoPE for SALA) and output gate.

Dense causal attention here; segment ids keep packed documents apart. InfLLM v2 sparse attention
above ``dense_len`` plugs in through ``pallas_kernels.infllm_v2`` (no extra parameters).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minicpm_jax.config.schema import ModelConfig
from minicpm_jax.model.layers import Linear
from minicpm_jax.model.rope import apply_rope, rope_cos_sin
from minicpm_jax.sharding import constrain


def causal_mask(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """``[B, T, T]`` bool: query t sees key s iff s <= t and both lie in the same segment."""
    idx = jnp.arange(length)
    mask = jnp.broadcast_to(idx[:, None] >= idx[None, :], (batch, length, length))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """GQA softmax attention: q ``[B,T,Hq,D]``, k/v ``[B,S,Hkv,D]``, mask ``[B,T,S]``; fp32 softmax.

    Query head ``i`` uses KV head ``i // (Hq/Hkv)``.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * d**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, hq, d)


class Attention(nnx.Module):
    """``self_attn`` of a ``"minicpm4"`` layer: q/k/v/o projections (+ ``o_gate`` when configured)."""

    def __init__(self, cfg: ModelConfig, *, init_std: float, rngs: nnx.Rngs, dtype, param_dtype):
        h, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attn_head_dim
        kw = dict(init_std=init_std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = cfg
        self.q_proj = Linear((h,), (nh, hd), ("embed", "heads", "head_dim"), **kw)
        self.k_proj = Linear((h,), (nkv, hd), ("embed", "kv_heads", "head_dim"), **kw)
        self.v_proj = Linear((h,), (nkv, hd), ("embed", "kv_heads", "head_dim"), **kw)
        self.o_proj = Linear((nh, hd), (h,), ("heads", "head_dim", "embed"), **kw)
        self.o_gate = Linear((h,), (nh, hd), ("embed", "heads", "head_dim"), **kw) if cfg.attn_use_output_gate else None

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        cfg = self.config
        q = constrain(self.q_proj(x), ("batch", "act_seq", "act_heads", None))
        k, v = self.k_proj(x), self.v_proj(x)
        if cfg.attn_use_rope:
            cos, sin = rope_cos_sin(cfg, cfg.attn_head_dim, positions)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = dot_product_attention(q, k, v, causal_mask(segment_ids, *x.shape[:2]))
        if self.o_gate is not None:
            o = o * jax.nn.sigmoid(self.o_gate(x))
        return self.o_proj(o)
