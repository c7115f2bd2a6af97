"""Lightning linear-attention mixer (the ``"lightning-attn"`` layer of MiniCPM-SALA), spec/sala.md 1.5.

Order of the official forward: q/k/v projections (full MHA), per-head RMSNorm on q and k *before*
RoPE, the Lightning recurrence with SALA's ALiBi decays in fp32, cast back, RMSNorm over the full
width (``o_norm``), times ``sigmoid(z_proj(x))``, then ``o_proj``. With a ``LightningCache`` the
recurrence continues from the cached fp32 state (one token: the decode step; more: chunked prefill).
Packed rows (``segment_ids``, with per-document ``positions`` for the RoPE) reset the state at every
document start, so each document sees only itself. Kernels run under ``shard_map`` (rows over the data
axes, heads over ``tensor``; ``minicpm_jax.model.partition``); the GPU kernel takes the activation
dtype, the others fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from minicpm_jax.config.schema import ModelConfig
from minicpm_jax.model.cache import LightningCache
from minicpm_jax.model.layers import Linear, RMSNorm
from minicpm_jax.model.partition import BATCH, HEADS, Partition
from minicpm_jax.model.rope import apply_rope, rope_cos_sin
from pallas_kernels.lightning import alibi_slopes, lightning_attention, lightning_decode_step


class LightningAttention(nnx.Module):
    """``self_attn`` of a ``"lightning-attn"`` layer."""

    def __init__(
        self, cfg: ModelConfig, *, init_std: float, rngs: nnx.Rngs, dtype, param_dtype, implementation: str = "auto"
    ):
        h, nh, nkv, hd = cfg.hidden_size, cfg.lightning_nh, cfg.lightning_nkv, cfg.lightning_head_dim
        kw = dict(init_std=init_std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        kv_axis = "heads" if nkv == nh else "kv_heads"
        self.config, self.dtype, self.implementation = cfg, dtype, implementation
        self.q_proj = Linear((h,), (nh, hd), ("embed", "heads", "head_dim"), **kw)
        self.k_proj = Linear((h,), (nkv, hd), ("embed", kv_axis, "head_dim"), **kw)
        self.v_proj = Linear((h,), (nkv, hd), ("embed", kv_axis, "head_dim"), **kw)
        self.o_proj = Linear((nh, hd), (h,), ("heads", "head_dim", "embed"), **kw)
        self.z_proj = Linear((h,), (nh, hd), ("embed", "heads", "head_dim"), **kw) if cfg.use_output_gate else None
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype) if cfg.qk_norm else None
        self.o_norm = RMSNorm(nh * hd, cfg.rms_norm_eps, param_dtype=param_dtype) if cfg.use_output_norm else None

    def init_cache(self, batch: int, capacity: int, dtype) -> LightningCache:
        """A zero fp32 state ``[B, H, Dk, Dv]``: its size does not depend on ``capacity``."""
        nh, hd = self.config.lightning_nh, self.config.lightning_head_dim
        return LightningCache(jnp.zeros((batch, nh, hd, hd), jnp.float32))

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        cache: LightningCache | None = None,
        valid: jax.Array | None = None,
    ):
        """``(output, cache)``: with a cache the recurrence starts from its state and returns the state
        after each row's first ``valid [B]`` tokens (default all; the rest is right padding)."""
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed documents) cannot be combined with a decode cache")
        cfg = self.config
        nh, hd = cfg.lightning_nh, cfg.lightning_head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.lightning_use_rope:
            cos, sin = rope_cos_sin(cfg, hd, positions)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if k.shape[2] != nh:
            k, v = (jnp.repeat(a, nh // a.shape[2], axis=2) for a in (k, v))
        # The GPU kernel takes the activation dtype (its state stays fp32); the others take fp32.
        kernel_dtype = self.dtype if self.implementation == "pallas_gpu" else jnp.float32
        q, k, v = (a.astype(kernel_dtype) for a in (q, k, v))
        log_decay = -jnp.asarray(alibi_slopes(nh))
        part, scale, impl = Partition(x.shape[0], nh), hd**-0.5, self.implementation
        qkv, state = P(BATCH, None, HEADS, None), P(BATCH, HEADS, None, None)
        roles = (qkv, qkv, qkv, P(HEADS))
        if cache is None:
            attend = lambda q, k, v, g, seg: lightning_attention(
                q, k, v, g, scale=scale, segment_ids=seg, implementation=impl
            )
            o = part(attend, (*roles, P(BATCH, None)), qkv)(q, k, v, log_decay, segment_ids)
        elif x.shape[1] == 1:

            def step(q, k, v, g, s0, valid):
                o, s = lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], g, s0, scale=scale)
                if valid is not None:
                    s = jnp.where((valid > 0)[:, None, None, None], s, s0)
                return o[:, None], s

            o, s = part(step, (*roles, state, P(BATCH)), (qkv, state))(q, k, v, log_decay, cache.state, valid)
            cache = LightningCache(s)
        else:

            def prefill(q, k, v, g, s0, valid):
                o = lightning_attention(q, k, v, g, scale=scale, initial_state=s0, implementation=impl)
                return o, state_after(s0, k, v, g, valid)

            o, s = part(prefill, (*roles, state, P(BATCH)), (qkv, state))(q, k, v, log_decay, cache.state, valid)
            cache = LightningCache(s)
        b, t = x.shape[:2]
        o = o.reshape(b, t, nh * hd).astype(self.dtype)
        if self.o_norm is not None:
            o = self.o_norm(o)
        if self.z_proj is not None:
            o = o * jax.nn.sigmoid(self.z_proj(x)).reshape(b, t, nh * hd)
        return self.o_proj(o.reshape(b, t, nh, hd)), cache


def state_after(state: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, valid: jax.Array | None):
    """Lightning state after each row's first ``valid [B]`` tokens of k/v ``[B, T, H, D]`` (fp32):
    ``S = exp(g n) S0 + sum_{i<n} exp(g (n-1-i)) k_i v_i^T``, skipping the padding after them."""
    t = k.shape[1]
    n = jnp.full((k.shape[0],), t) if valid is None else valid
    age = (n[:, None] - 1 - jnp.arange(t)[None, :]).astype(jnp.float32)  # [B, T]
    g = log_decay.astype(jnp.float32)[None, :, None]  # [1, H, 1]
    w = jnp.exp(jnp.where((age >= 0)[:, None, :], g * age[:, None, :], -jnp.inf))  # [B, H, T]
    carry = jnp.exp(g[..., 0] * n[:, None].astype(jnp.float32))[..., None, None]  # [B, H, 1, 1]
    return carry * state + jnp.einsum("bht,bthk,bthv->bhkv", w, k, v)
