"""Decode caches: fixed-shape, jit-friendly pytrees, one per layer, plus the model-level wrapper.

- ``KVCache``: dense ``"minicpm4"`` layers without ``sparse_config`` (K/V ``[B, capacity, Hkv, D]``).
- ``pallas_kernels.infllm_v2.DecodeCache``: ``"minicpm4"`` layers with ``sparse_config`` (K/V, the
  compressed K1/K2 caches and their pending-key buffers; dense below ``dense_len``).
- ``LightningCache``: ``"lightning-attn"`` layers, the fp32 state ``[B, H, Dk, Dv]`` (length-independent).

``ModelCache.length`` counts the tokens already in the cache (same for every row of the batch: no
left/right padding); positions of new tokens are ``length + arange(T)``. The mixers build their own
layer caches (``init_cache``) and update them when called with one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from minicpm_jax.config.schema import ModelConfig


class KVCache(NamedTuple):
    """Plain KV cache of a dense softmax layer."""

    length: jax.Array  # int32 [], tokens cached
    k: jax.Array  # [B, capacity, Hkv, D]
    v: jax.Array  # [B, capacity, Hkv, D]


class LightningCache(NamedTuple):
    """Recurrent state of a Lightning layer after the tokens seen so far."""

    state: jax.Array  # fp32 [B, H, Dk, Dv]


class ModelCache(NamedTuple):
    """Per-layer caches of a whole model and the number of tokens they hold."""

    length: jax.Array  # int32 []
    layers: tuple[Any, ...]

    @property
    def capacity(self) -> int:
        """Most tokens the softmax layers' caches can hold (None for an all-Lightning model)."""
        caps = [c.k.shape[1] for c in self.layers if hasattr(c, "k")]
        return min(caps) if caps else None


def _concrete(x) -> int | None:
    """``int(x)`` if x is a concrete value, None under tracing."""
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None


def check_prefill(length: jax.Array) -> None:
    """A multi-token call on an InfLLM v2 cache must start from an empty cache (checked when concrete)."""
    n = _concrete(length)
    if n not in (None, 0):
        raise ValueError(
            f"a multi-token step on a sparse (InfLLM v2) layer cache needs an empty cache, "
            f"this one holds {n} tokens: prefill once, then decode one token at a time"
        )


def check_room(cache: ModelCache, new_tokens: int) -> None:
    """Raises when ``new_tokens`` more do not fit (checked when the length is concrete)."""
    n, cap = _concrete(cache.length), cache.capacity
    if n is not None and cap is not None and n + new_tokens > cap:
        raise ValueError(f"decode cache capacity {cap} exceeded: holds {n} tokens, {new_tokens} more given")


def init_kv_cache(batch: int, capacity: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
    """An empty ``KVCache``."""
    z = jnp.zeros((batch, capacity, kv_heads, head_dim), dtype)
    return KVCache(jnp.zeros((), jnp.int32), z, z)


def cache_bytes(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16) -> int:
    """Bytes of a decode cache for ``capacity`` tokens, from abstract shapes (nothing allocated)."""
    from minicpm_jax.model.factory import abstract_model

    model = abstract_model(cfg, dtype=dtype)
    shapes = jax.eval_shape(lambda: model.init_cache(batch, capacity))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
