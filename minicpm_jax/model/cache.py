"""Decode caches: fixed-shape, jit-friendly pytrees, one per layer, plus the model-level wrapper.

- ``KVCache``: dense ``"minicpm4"`` layers without ``sparse_config`` (K/V ``[B, capacity, Hkv, D]``).
- ``pallas_kernels.infllm_v2.DecodeCache``: ``"minicpm4"`` layers with ``sparse_config`` (K/V, the
  compressed K1/K2 caches and their pending-key buffers; dense below ``dense_len``).
- ``LightningCache``: ``"lightning-attn"`` layers, the fp32 state ``[B, H, Dk, Dv]`` (length-independent).

Every row has its own length: slot ``p`` of a row holds its token at position ``p`` (prompts of
different lengths are right-padded; slots past a row's length hold garbage that nothing reads).
``ModelCache.length [B]`` counts each row's tokens; the positions of new tokens are
``length[:, None] + arange(T)``. The mixers build their own layer caches (``init_cache``) and update
them when called with one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.config.schema import ModelConfig
from minicpm_jax.sharding import constrain


class KVCache(NamedTuple):
    """Plain KV cache of a dense softmax layer; slot p holds the row's token at position p."""

    k: jax.Array  # [B, capacity, Hkv, D]
    v: jax.Array  # [B, capacity, Hkv, D]


class LightningCache(NamedTuple):
    """Recurrent state of a Lightning layer after the tokens seen so far."""

    state: jax.Array  # fp32 [B, H, Dk, Dv]


class ModelCache(NamedTuple):
    """Per-layer caches of a whole model and the number of tokens each row holds."""

    length: jax.Array  # int32 [B]
    layers: tuple[Any, ...]

    @property
    def capacity(self) -> int:
        """Most tokens the softmax layers' caches can hold (None for an all-Lightning model)."""
        caps = [c.k.shape[1] for c in self.layers if hasattr(c, "k")]
        return min(caps) if caps else None


def _concrete(x) -> np.ndarray | None:
    """``x`` as a NumPy array if it is concrete, None under tracing."""
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        return None


def check_prefill(length: jax.Array) -> None:
    """A multi-token call on an InfLLM v2 cache must start from an empty cache (checked when concrete)."""
    n = _concrete(length)
    if n is not None and n.any():
        raise ValueError(
            f"a multi-token step on a sparse (InfLLM v2) layer cache needs an empty cache, "
            f"this one holds {int(n.max())} tokens: prefill once, then decode one token at a time"
        )


def check_room(cache: ModelCache, new_tokens: int) -> None:
    """Raises when ``new_tokens`` more do not fit (checked when the lengths are concrete)."""
    n, cap = _concrete(cache.length), cache.capacity
    if n is not None and cap is not None and int(n.max()) + new_tokens > cap:
        raise ValueError(f"decode cache capacity {cap} exceeded: holds {int(n.max())} tokens, {new_tokens} more given")


def init_kv_cache(batch: int, capacity: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
    """An empty ``KVCache``."""
    z = jnp.zeros((batch, capacity, kv_heads, head_dim), dtype)
    return KVCache(z, z)


def constrain_cache(cache: ModelCache) -> ModelCache:
    """Sharding constraints for a cache (a no-op without a mesh): rows over the data axes, the
    Lightning states' heads and the K/V buffers' heads (dim 2) over ``tensor`` where it divides them
    (else replicated), as the kernels' ``shard_map`` (``minicpm_jax.model.partition``) expects."""

    def leaf(x):
        axes = ("batch", None, "act_heads", None) if x.ndim == 4 else ("batch",) + (None,) * (x.ndim - 1)
        return constrain(x, axes) if x.ndim else x

    def layer(c):
        if isinstance(c, LightningCache):
            return LightningCache(constrain(c.state, ("batch", "act_heads", None, None)))
        return jax.tree.map(leaf, c)

    return ModelCache(leaf(cache.length), tuple(layer(c) for c in cache.layers))


def cache_bytes(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.bfloat16) -> int:
    """Bytes of a decode cache for ``capacity`` tokens, from abstract shapes (nothing allocated)."""
    from minicpm_jax.model.factory import abstract_model

    model = abstract_model(cfg, dtype=dtype)
    shapes = jax.eval_shape(lambda: model.init_cache(batch, capacity))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
