"""The MiniCPM4 / MiniCPM-SALA causal LM: embedding x scale_emb, pre-norm blocks with residual
branches x scale_depth/sqrt(L), final norm, logits from ``h / (hidden/dim_model_base)``.

Module attribute names mirror the Hugging Face checkpoint (``model.layers.0.self_attn.q_proj``...),
so the state path of every parameter *is* its checkpoint key.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from minicpm_jax.config.schema import ModelConfig
from minicpm_jax.model.attention import Attention
from minicpm_jax.model.cache import ModelCache, check_prefill, check_room, constrain_cache
from minicpm_jax.model.layers import MLP, Embed, Linear, RMSNorm, mup_init_std
from minicpm_jax.model.lightning import LightningAttention
from minicpm_jax.sharding import constrain
from pallas_kernels.infllm_v2 import IMPLEMENTATIONS as INFLLM_IMPLS
from pallas_kernels.infllm_v2 import DecodeCache
from pallas_kernels.lightning import IMPLEMENTATIONS as LIGHTNING_IMPLS

MIXERS = {"minicpm4": Attention, "lightning-attn": LightningAttention}
# Activation rematerialisation per decoder layer ("full" saves only each layer's input).
REMAT_POLICIES = {"dots_saveable": jax.checkpoint_policies.dots_saveable, "full": None}


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x += mixer(norm(x)) * r``; ``x += mlp(norm(x)) * r`` with ``r = scale_depth/sqrt(L)``."""

    def __init__(
        self,
        cfg: ModelConfig,
        kind: str,
        *,
        init_std: float,
        rngs: nnx.Rngs,
        dtype,
        param_dtype,
        implementation: str = "auto",
    ):
        kw = dict(init_std=init_std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.residual_scale = cfg.residual_scale
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = MIXERS[kind](cfg, implementation=implementation, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, **kw)

    def __call__(self, x, positions, segment_ids, cache=None, valid=None):
        """``(x, cache, (u, h))``: the layer output, the mixer's updated cache (None without one), and
        the mixer's input ``u = input_layernorm(x)`` and output ``h`` (what conversion aligns)."""
        u = self.input_layernorm(x)
        h, cache = self.self_attn(u, positions, segment_ids, cache, valid)
        x = x + h * self.residual_scale
        x = x + self.mlp(self.post_attention_layernorm(x)) * self.residual_scale
        return constrain(x, ("batch", "act_seq", "act_embed")), cache, (u, h)


class MiniCPMModel(nnx.Module):
    """The decoder stack (``model.*`` in the checkpoint)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        init_std: float,
        rngs: nnx.Rngs,
        dtype,
        param_dtype,
        attention_impl: str = "auto",
        lightning_impl: str = "auto",
    ):
        kw = dict(init_std=init_std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        impls = {"minicpm4": attention_impl, "lightning-attn": lightning_impl}
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nnx.List([DecoderLayer(cfg, kind, implementation=impls[kind], **kw) for kind in cfg.layer_mixers])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)


class MiniCPMForCausalLM(nnx.Module):
    """Causal LM over ``input_ids [B, T]`` returning fp32 logits ``[B, T, V]``.

    ``dtype`` is the compute dtype, ``param_dtype`` the master-weight dtype. Initialisation is muP:
    every matrix ~ N(0, (initializer_range / sqrt(hidden/dim_model_base))^2), norms = 1.
    ``attention_impl`` / ``lightning_impl`` choose the InfLLM v2 / Lightning kernels (``"auto"``
    picks by backend); they are runtime options, not part of the config. So is ``scan_layers``:
    runs of consecutive layers of one mixer kind go through one ``lax.scan`` (see ``_scan``), so the
    compiled program holds one copy of each kind's layer instead of one per layer. Parameters stay
    stored per layer (``model.layers.<i>...``), so checkpoints do not depend on it. Cached calls
    (``extend`` / ``step`` / ``prefill`` / ``decode_step``) always run the layer loop: a scan would
    stack, i.e. copy, every layer's cache on each decoded token.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        attention_impl: str = "auto",
        lightning_impl: str = "auto",
        scan_layers: bool = False,
    ):
        errors = [
            f"{name}={value!r}: expected one of {['auto', *allowed]}"
            for name, value, allowed in (
                ("attention_impl", attention_impl, INFLLM_IMPLS),
                ("lightning_impl", lightning_impl, LIGHTNING_IMPLS),
            )
            if value != "auto" and value not in allowed
        ]
        if errors:
            raise ValueError("; ".join(errors))
        self.config, self.dtype, self.scan_layers = cfg, dtype, bool(scan_layers)
        init_std = mup_init_std(cfg.initializer_range, cfg.hidden_size, cfg.dim_model_base)
        kw = dict(init_std=init_std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.model = MiniCPMModel(cfg, attention_impl=attention_impl, lightning_impl=lightning_impl, **kw)
        self.lm_head = (
            None if cfg.tie_word_embeddings else Linear((cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"), **kw)
        )

    def _run(self, input_ids, positions, segment_ids, caches, remat: str = "none", valid=None, collect_io=False):
        """Final-norm hidden states, the updated per-layer caches (``caches``: None or one per layer)
        and, with ``collect_io``, each layer's mixer ``(input, output)`` (else a list of None)."""
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        x = self.model.embed_tokens(input_ids) * jnp.asarray(self.config.scale_emb, self.dtype)
        x = constrain(x, ("batch", "act_seq", "act_embed"))

        def run(layer, x, cache=None):
            x, cache, io = layer(x, positions, segment_ids, cache, valid)
            return x, cache, io if collect_io else None

        layers = list(self.model.layers)
        caches = caches or [None] * len(layers)
        sizes = [1] * len(layers)
        if self.scan_layers and all(c is None for c in caches):
            sizes = [len(list(run_)) for _, run_ in itertools.groupby(self.config.layer_mixers)]
        loop_run = run if remat == "none" else nnx.remat(run, policy=REMAT_POLICIES[remat])
        new, mixer_io, start = [], [], 0
        for size in sizes:
            if size == 1:
                x, cache, io = loop_run(layers[start], x, caches[start])
                new.append(cache)
                mixer_io.append(io)
            else:
                x, ios = self._scan(layers[start : start + size], x, run, remat)
                new += [None] * size
                mixer_io += [None if ios is None else jax.tree.map(lambda a, i=i: a[i], ios) for i in range(size)]
            start += size
        return self.model.norm(x), tuple(new), mixer_io

    def _scan(self, layers, x, run, remat):
        """``(x, stacked mixer io or None)`` after ``layers`` (one kind) as one ``lax.scan``.

        Each step merges one layer from slices of the per-layer states stacked here (the backward
        of the stack slices the gradients back to the per-layer parameters). Float parameters are
        stacked already cast to the compute dtype, as every layer casts them at use (exact). Cost:
        that stacked copy, and the stacked gradient in the backward, are live across the step
        (``benchmarks/compile_time.py`` reports XLA's temp bytes with and without).
        """
        graphdef, state = nnx.split(layers[0])
        states = [state] + [nnx.split(layer)[1] for layer in layers[1:]]

        def cast(a):
            return a.astype(self.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

        stacked = jax.tree.map(lambda *a: jnp.stack([cast(y) for y in a]), *states)

        def step(x, layer_state):
            x, _, io = run(nnx.merge(graphdef, layer_state), x)
            return x, io

        if remat != "none":
            step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
        return jax.lax.scan(step, x, stacked)

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        remat: str = "none",
    ) -> jax.Array:
        """Final-norm hidden states ``[B, T, H]`` (before the logit scaling).

        ``remat``: ``"none"``, ``"dots_saveable"`` or ``"full"`` rematerialisation of each layer.
        """
        return self._run(input_ids, positions, segment_ids, None, remat)[0]

    def mixer_io(
        self, input_ids: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> list[tuple[jax.Array, jax.Array]]:
        """Per layer, the mixer's input (``input_layernorm`` output) and output ``[B, T, H]`` each."""
        return self._run(input_ids, positions, segment_ids, None, collect_io=True)[2]

    def logits(self, h: jax.Array) -> jax.Array:
        """fp32 logits of final hidden states: ``lm_head(h / (hidden/dim_model_base))``.

        A tied head contracts ``h`` with the ``[V, H]`` embedding as stored (``"bth,vh->btv"``): no
        transposed copy of it is made (that copy cost a decode step more than the head's matmul)."""
        h = h / jnp.asarray(self.config.logit_divisor, h.dtype)
        if self.lm_head is None:
            w, spec = self.model.embed_tokens.weight[...], "bth,vh->btv"
        else:
            w, spec = self.lm_head.kernel[...], "bth,hv->btv"
        out = jnp.einsum(spec, h, w.astype(self.dtype), preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "act_seq", "act_vocab"))

    def __call__(
        self, input_ids: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        return self.logits(self.hidden_states(input_ids, positions, segment_ids))

    # ----- decoding with caches (minicpm_jax.model.cache) -----

    def init_cache(self, batch: int, capacity: int, dtype=None) -> ModelCache:
        """An empty decode cache for up to ``capacity`` tokens per row (K/V in ``dtype``, default the compute dtype)."""
        dtype = dtype or self.dtype
        layers = tuple(layer.self_attn.init_cache(batch, capacity, dtype) for layer in self.model.layers)
        return constrain_cache(ModelCache(jnp.zeros((batch,), jnp.int32), layers))

    def extend(self, input_ids: jax.Array, cache: ModelCache, valid: jax.Array | None = None):
        """``(final-norm hidden states [B, T, H], cache)`` of ``input_ids`` appended at positions
        ``cache.length[:, None] + arange(T)`` (``valid``: as in ``step``); no LM head."""
        t = input_ids.shape[1]
        check_room(cache, t)
        if t > 1 and any(isinstance(c, DecodeCache) for c in cache.layers):
            check_prefill(cache.length)
        positions = cache.length[:, None] + jnp.arange(t)[None, :]
        h, layers, _ = self._run(input_ids, positions, None, cache.layers, valid=valid)
        return h, constrain_cache(ModelCache(cache.length + (t if valid is None else valid), layers))

    def step(
        self, input_ids: jax.Array, cache: ModelCache, valid: jax.Array | None = None
    ) -> tuple[jax.Array, ModelCache]:
        """Appends ``input_ids [B, T]`` after each row's cached tokens: ``(logits [B, T, V], cache)``.

        ``valid [B]`` (default T): real tokens at the start of each row; the rest is right padding,
        whose outputs are meaningless and which does not count in the row's length. Sparse (InfLLM v2)
        layers accept a multi-token step only on an empty cache (the prefill).
        """
        h, cache = self.extend(input_ids, cache, valid)
        return self.logits(h), cache

    def prefill(
        self, input_ids: jax.Array, cache: ModelCache, valid: jax.Array | None = None
    ) -> tuple[jax.Array, ModelCache]:
        """Fills an empty cache with right-padded prompts ``[B, T]`` of ``valid [B]`` tokens (default T):
        ``(logits at each row's last prompt token [B, V], cache)``. Only those positions go through the LM head."""
        h, cache = self.extend(input_ids, cache, valid)
        last = jnp.full((h.shape[0],), h.shape[1] - 1) if valid is None else valid - 1
        return self.logits(jnp.take_along_axis(h, last[:, None, None], axis=1))[:, 0], cache

    def decode_step(self, token_ids: jax.Array, cache: ModelCache) -> tuple[jax.Array, ModelCache]:
        """One token per row ``[B]``: ``(logits [B, V], cache)``, equal to the full forward's last row."""
        logits, cache = self.step(token_ids[:, None], cache)
        return logits[:, 0], cache
