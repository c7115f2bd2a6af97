"""Softmax attention mixer (the ``"minicpm4"`` layer): GQA, optional RoPE (NoPE for SALA), output gate,
and InfLLM v2 sparse attention at or above ``sparse_config.dense_len`` (spec/infllm_v2.md).

Below ``dense_len`` (or without ``sparse_config``) the layer is dense causal attention and segment
ids keep packed documents apart. At or above it every query takes the InfLLM v2 path of
``pallas_kernels.infllm_v2`` (no extra parameters); with ``use_nope`` the block selection sees the
pre-RoPE q/k. With a decode cache (``minicpm_jax.model.cache``) the layer also appends its keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from minicpm_jax.config.schema import ModelConfig
from minicpm_jax.model.cache import KVCache, check_prefill, init_kv_cache
from minicpm_jax.model.dense_attention import causal_attention, dot_product_attention, fold_groups, unfold_groups
from minicpm_jax.model.layers import Linear
from minicpm_jax.model.partition import BATCH, HEADS, KV, Partition, cache_roles
from minicpm_jax.model.rope import apply_rope, rope_cos_sin
from minicpm_jax.sharding import constrain
from pallas_kernels.infllm_v2 import (
    DecodeCache,
    InfLLMv2Config,
    attention_blocks,
    block_sparse_attention,
    decode_step,
    dense_causal_attention,
    infllm_v2_attention,
    init_cache,
    prefill_cache,
    select_blocks,
)

CACHE_BLOCK = 1024  # keys per step when a multi-token call attends over a cache


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, block: int = CACHE_BLOCK):
    """Causal GQA attention of q ``[B,T,Hq,D]`` at ``positions [B,T]`` over a cache k/v ``[B,S,Hkv,D]``
    (slot s visible to position p iff s <= p), one block of keys at a time with an online softmax in
    fp32: memory O(T x block) instead of O(T x S), and blocks past the largest position are skipped.
    The GQA group is folded into the query rows (``fold_groups``): one ``[T*G, D] x [D, block]``
    matmul per KV head and block."""
    _, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    block = min(block, s)
    qf = fold_groups(q, hkv)  # [B, Hkv, R, D], row r at position positions[:, r // G]
    row_pos = jnp.repeat(positions, hq // hkv, axis=1)[:, None, :, None]  # [B, 1, R, 1]

    def step(i, carry):
        m, l, acc = carry
        start = jnp.minimum(i * block, s - block)  # the last block may overlap the previous one
        kb, vb = (jax.lax.dynamic_slice_in_dim(x, start, block, axis=1).astype(q.dtype) for x in (k, v))
        idx = start + jnp.arange(block)
        visible = (idx >= i * block) & (idx <= row_pos)
        scores = jnp.einsum("bkrd,bskd->bkrs", qf, kb, preferred_element_type=jnp.float32) * d**-0.5
        m_new = jnp.maximum(m, jnp.where(visible, scores, jnp.finfo(jnp.float32).min).max(-1))
        p = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bkrs,bskd->bkrd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

    shape = qf.shape[:3]
    init = (jnp.full(shape, jnp.finfo(jnp.float32).min), jnp.zeros(shape), jnp.zeros((*shape, d)))
    blocks = jnp.clip(jnp.max(positions) // block + 1, 1, -(-s // block))
    _, l, acc = jax.lax.fori_loop(0, blocks, step, init)
    return unfold_groups(acc / jnp.where(l > 0, l, 1.0)[..., None], t).astype(q.dtype)


def dense_attention(q, k, v, segment_ids: jax.Array | None, implementation: str = "auto") -> jax.Array:
    """Causal GQA attention of a prefill (the path below ``dense_len``), on one shard's operands:
    ``dense_attention.causal_attention`` by backend (cuDNN / splash / blockwise), or the plain
    ``[B, H, T, T]`` version when the layer's ``implementation`` is ``"reference"``."""
    return causal_attention(
        q, k, v, segment_ids, implementation="reference" if implementation == "reference" else "auto"
    )


def kv_attend(cache: KVCache, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array):
    """Writes k/v ``[B, T, Hkv, D]`` at slots ``positions [B, T]`` and attends q ``[B, T, Hq, D]`` causally
    over the cache (slot s is visible to the query at position p iff s <= p); returns ``(out, cache)``.
    Slots past the capacity are dropped. A multi-token call (a prefill chunk) goes block by block.
    Partitioned over rows and heads (``minicpm_jax.model.partition``)."""
    part = Partition(q.shape[0], q.shape[2], k.shape[2])

    def shard(cache, q, k, v, positions):
        rows = jnp.arange(q.shape[0])[:, None]
        upd = lambda buf, x: buf.at[rows, positions].set(x.astype(buf.dtype), mode="drop")
        cache = KVCache(upd(cache.k, k), upd(cache.v, v))
        ck, cv = part.local_kv(cache.k), part.local_kv(cache.v)
        if q.shape[1] > 1:
            return cache_attention(q, ck, cv, positions), cache
        mask = jnp.arange(ck.shape[1])[None, None, :] <= positions[:, :, None]
        return dot_product_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask), cache

    qkv = (P(BATCH, None, HEADS, None), P(BATCH, None, KV, None), P(BATCH, None, KV, None))
    roles = cache_roles(cache)
    return part(shard, (roles, *qkv, P(BATCH, None)), (qkv[0], roles))(cache, q, k, v, positions)


def infllm_config(cfg: ModelConfig) -> InfLLMv2Config | None:
    """The kernel config of the model's ``sparse_config`` (generation B, LSE approximation), or None."""
    sc = cfg.sparse_config
    if sc is None:
        return None
    return InfLLMv2Config(**sc.model_dump(exclude={"use_nope"}))


def separate_select_keys(cfg: ModelConfig) -> bool:
    """True when block selection uses other q/k than the attention (``use_nope`` with RoPE on)."""
    return cfg.sparse_config is not None and cfg.sparse_config.use_nope and cfg.attn_use_rope


class Attention(nnx.Module):
    """``self_attn`` of a ``"minicpm4"`` layer: q/k/v/o projections (+ ``o_gate`` when configured).

    ``implementation`` picks the InfLLM v2 kernel (``"auto"``, ``"reference"``, ``"xla"``,
    ``"pallas_tpu"``); it is a runtime option, not part of the config.
    """

    def __init__(
        self, cfg: ModelConfig, *, init_std: float, rngs: nnx.Rngs, dtype, param_dtype, implementation: str = "auto"
    ):
        h, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attn_head_dim
        kw = dict(init_std=init_std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config, self.implementation = cfg, implementation
        self.sparse = infllm_config(cfg)
        self.q_proj = Linear((h,), (nh, hd), ("embed", "heads", "head_dim"), **kw)
        self.k_proj = Linear((h,), (nkv, hd), ("embed", "kv_heads", "head_dim"), **kw)
        self.v_proj = Linear((h,), (nkv, hd), ("embed", "kv_heads", "head_dim"), **kw)
        self.o_proj = Linear((nh, hd), (h,), ("heads", "head_dim", "embed"), **kw)
        self.o_gate = Linear((h,), (nh, hd), ("embed", "heads", "head_dim"), **kw) if cfg.attn_use_output_gate else None

    def init_cache(self, batch: int, capacity: int, dtype):
        """An empty layer cache: InfLLM v2 ``DecodeCache`` with ``sparse_config``, else a ``KVCache``."""
        cfg = self.config
        if self.sparse is None:
            return init_kv_cache(batch, capacity, cfg.num_key_value_heads, cfg.attn_head_dim, dtype)
        return init_cache(
            batch,
            capacity,
            cfg.num_key_value_heads,
            cfg.attn_head_dim,
            dtype,
            self.sparse,
            separate_select_keys=separate_select_keys(cfg),
        )

    def _qkv(self, x: jax.Array, positions: jax.Array):
        """``q, k, v`` (RoPE applied if configured) and the selection copies (None unless use_nope)."""
        cfg = self.config
        q = constrain(self.q_proj(x), ("batch", "act_seq", "act_heads", None))
        k, v = self.k_proj(x), self.v_proj(x)
        q_sel = k_sel = None
        if cfg.attn_use_rope:
            if separate_select_keys(cfg):
                q_sel, k_sel = q, k
            cos, sin = rope_cos_sin(cfg, cfg.attn_head_dim, positions)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v, q_sel, k_sel

    def _attend(self, part: Partition, q, k, v, q_sel, k_sel, segment_ids) -> jax.Array:
        """Prefill attention on one shard: dense below ``dense_len`` (or without sparse_config), InfLLM v2 above."""
        t = q.shape[1]
        if self.sparse is None or self.sparse.is_dense(t):
            return dense_attention(q, part.local_kv(k), part.local_kv(v), segment_ids, self.implementation)
        if part.slice_kv:  # part of one GQA group: scores of its heads, summed with the group's other shards
            qs, ks = q if q_sel is None else q_sel, part.local_kv(k if k_sel is None else k_sel)
            sel = select_blocks(qs, ks, self.sparse, segment_ids=segment_ids, group_sum=part.group_sum)
            # The forced blocks (init + local window) are in every row: a hint for the xla path.
            window = self.sparse.local_blocks + (1 if self.sparse.generation == "B" else 0)
            return block_sparse_attention(
                q,
                part.local_kv(k),
                part.local_kv(v),
                attention_blocks(sel, jnp.arange(t), self.sparse, self.sparse.num_blocks(t)),
                block_size=self.sparse.block_size,
                segment_ids=segment_ids,
                implementation=self.implementation,
                shared=(self.sparse.init_blocks, window),
            )
        return infllm_v2_attention(
            q,
            k,
            v,
            config=self.sparse,
            q_select=q_sel,
            k_select=k_sel,
            segment_ids=segment_ids,
            implementation=self.implementation,
        )

    def _prefill_attend(self, part: Partition, q, k, v, q_sel, k_sel, valid) -> jax.Array:
        """Prefill of right-padded rows with ``valid [B]`` real tokens: a row shorter than ``dense_len``
        is computed densely even when the padded length reaches it, as it would be alone."""
        o = self._attend(part, q, k, v, q_sel, k_sel, None)
        if valid is None or self.sparse.is_dense(q.shape[1]) or self.sparse.dense_len <= 0:
            return o
        short = valid < self.sparse.dense_len
        return jax.lax.cond(
            jnp.any(short),
            lambda: jnp.where(
                short[:, None, None, None], dense_causal_attention(q, part.local_kv(k), part.local_kv(v)), o
            ),
            lambda: o,
        )

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, cache=None, valid=None):
        """``(output, cache)``; ``cache`` is None (plain forward), a ``KVCache`` or an InfLLM v2 ``DecodeCache``.

        ``valid [B]``: real tokens at the start of each row of a cached call (the rest is padding).
        With a ``DecodeCache`` a one-token input is a decode step and a longer one a prefill of an
        empty cache; a ``KVCache`` appends any number of tokens at ``positions``. Every kernel runs
        under ``shard_map`` (``minicpm_jax.model.partition``).
        """
        q, k, v, q_sel, k_sel = self._qkv(x, positions)
        qkv = (P(BATCH, None, HEADS, None), P(BATCH, None, KV, None), P(BATCH, None, KV, None))
        args, roles = (q, k, v, q_sel, k_sel), (*qkv, qkv[0], qkv[1])
        part = Partition(q.shape[0], q.shape[2], k.shape[2])
        if cache is None:
            attend = lambda *a: self._attend(part, *a)
            o = part(attend, (*roles, P(BATCH, None)), qkv[0])(*args, segment_ids)
        elif isinstance(cache, KVCache):
            o, cache = kv_attend(cache, q, k, v, positions)
        elif isinstance(cache, DecodeCache) and x.shape[1] == 1:

            def step(c, q, k, v, qs, ks):  # split GQA group: whole cache written, own heads attended
                kw = dict(q_select=qs, k_select=ks, kv_heads=part.kv_heads(), group_sum=part.group_sum)
                return decode_step(c, q, k, v, config=self.sparse, **kw)

            o, cache = part(step, (cache_roles(cache), *roles), (qkv[0], cache_roles(cache)))(cache, *args)
        else:
            check_prefill(cache.length)

            def prefill(c, q, k, v, qs, ks, valid):
                o = self._prefill_attend(part, q, k, v, qs, ks, valid)
                return o, prefill_cache(c, k, v, config=self.sparse, k_select=ks, lengths=valid)

            out_roles = (qkv[0], cache_roles(cache))
            o, cache = part(prefill, (cache_roles(cache), *roles, P(BATCH)), out_roles)(cache, *args, valid)
        if self.o_gate is not None:
            o = o * jax.nn.sigmoid(self.o_gate(x))
        return self.o_proj(o), cache
