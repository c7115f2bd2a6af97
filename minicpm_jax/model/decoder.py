"""The MiniCPM4 / MiniCPM-SALA causal LM: embedding x scale_emb, pre-norm blocks with residual
branches x scale_depth/sqrt(L), final norm, logits from ``h / (hidden/dim_model_base)``.

Module attribute names mirror the Hugging Face checkpoint (``model.layers.0.self_attn.q_proj``...),
so the state path of every parameter *is* its checkpoint key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minicpm_jax.config.schema import ModelConfig
from minicpm_jax.model.attention import Attention
from minicpm_jax.model.lightning import LightningAttention
from minicpm_jax.model.layers import MLP, Embed, Linear, RMSNorm, mup_init_std
from minicpm_jax.sharding import constrain


MIXERS = {"minicpm4": Attention, "lightning-attn": LightningAttention}
# Activation rematerialisation per decoder layer ("full" saves only each layer's input).
REMAT_POLICIES = {"dots_saveable": jax.checkpoint_policies.dots_saveable, "full": None}


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x += mixer(norm(x)) * r``; ``x += mlp(norm(x)) * r`` with ``r = scale_depth/sqrt(L)``."""

    def __init__(self, cfg: ModelConfig, kind: str, *, init_std: float, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(init_std=init_std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.residual_scale = cfg.residual_scale
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = MIXERS[kind](cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, **kw)

    def __call__(self, x, positions, segment_ids):
        x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids) * self.residual_scale
        x = x + self.mlp(self.post_attention_layernorm(x)) * self.residual_scale
        return constrain(x, ("batch", "act_seq", "act_embed"))


class MiniCPMModel(nnx.Module):
    """The decoder stack (``model.*`` in the checkpoint)."""

    def __init__(self, cfg: ModelConfig, *, init_std: float, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(init_std=init_std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nnx.List([DecoderLayer(cfg, kind, **kw) for kind in cfg.layer_mixers])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)


class MiniCPMForCausalLM(nnx.Module):
    """Causal LM over ``input_ids [B, T]`` returning fp32 logits ``[B, T, V]``.

    ``dtype`` is the compute dtype, ``param_dtype`` the master-weight dtype. Initialisation is muP:
    every matrix ~ N(0, (initializer_range / sqrt(hidden/dim_model_base))^2), norms = 1.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16, param_dtype=jnp.float32):
        self.config, self.dtype = cfg, dtype
        init_std = mup_init_std(cfg.initializer_range, cfg.hidden_size, cfg.dim_model_base)
        kw = dict(init_std=init_std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.model = MiniCPMModel(cfg, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            (cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"), **kw)

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None, *, remat: str = "none") -> jax.Array:
        """Final-norm hidden states ``[B, T, H]`` (before the logit scaling).

        ``remat``: ``"none"``, ``"dots_saveable"`` or ``"full"`` rematerialisation of each layer.
        """
        cfg = self.config
        b, t = input_ids.shape
        sparse = cfg.sparse_config
        if sparse is not None and t >= sparse.dense_len:
            raise NotImplementedError(f"sequence length {t} >= sparse_config.dense_len {sparse.dense_len}: "
                                      "InfLLM v2 sparse attention is not wired into the model yet")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        x = self.model.embed_tokens(input_ids) * jnp.asarray(cfg.scale_emb, self.dtype)
        x = constrain(x, ("batch", "act_seq", "act_embed"))
        def run(layer, x):
            return layer(x, positions, segment_ids)

        if remat != "none":
            run = nnx.remat(run, policy=REMAT_POLICIES[remat])
        for layer in self.model.layers:
            x = run(layer, x)
        return self.model.norm(x)

    def logits(self, h: jax.Array) -> jax.Array:
        """fp32 logits of final hidden states: ``lm_head(h / (hidden/dim_model_base))``."""
        h = h / jnp.asarray(self.config.logit_divisor, h.dtype)
        if self.lm_head is None:
            w = self.model.embed_tokens.weight[...].astype(self.dtype)
            out = jnp.einsum("bth,vh->btv", h, w, preferred_element_type=jnp.float32)
        else:
            out = jnp.einsum("bth,hv->btv", h, self.lm_head.kernel[...].astype(self.dtype),
                             preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "act_seq", "act_vocab"))

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden_states(input_ids, positions, segment_ids))
