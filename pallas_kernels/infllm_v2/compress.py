"""Key compression: mean-pooled keys over full, overlapping windows (spec §4 step 1).

``K1[j] = mean(k[s*j : s*j + 2s])`` for every window that lies fully inside the sequence, with
``s = kernel_stride`` (16) for K1 and ``4 * kernel_stride`` (64) for the coarse K2 used by the LSE
approximation. Sums are accumulated in fp32 and the result is cast back to the key dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import InfLLMv2Config


def num_compressed(seq_len: int, kernel_size: int, kernel_stride: int) -> int:
    """Number of full windows: (T - ks) // kst + 1, or 0 when T < ks."""
    return (seq_len - kernel_size) // kernel_stride + 1 if seq_len >= kernel_size else 0


def mean_pool(k: jax.Array, kernel_size: int, kernel_stride: int) -> jax.Array:
    """[B, T, H, D] -> [B, n, H, D] means over windows [j*kst, j*kst + ks); needs ks == 2*kst."""
    if kernel_size != 2 * kernel_stride:
        raise ValueError(f"kernel_size={kernel_size} must equal 2 * kernel_stride={kernel_stride}")
    b, t, h, d = k.shape
    n = num_compressed(t, kernel_size, kernel_stride)
    if n == 0:
        return jnp.zeros((b, 0, h, d), k.dtype)
    nc = n + 1  # stride-sized chunks covered by the windows
    chunks = k[:, : nc * kernel_stride].astype(jnp.float32).reshape(b, nc, kernel_stride, h, d).sum(2)
    return ((chunks[:, :-1] + chunks[:, 1:]) / kernel_size).astype(k.dtype)


def compress_keys(k: jax.Array, config: InfLLMv2Config) -> tuple[jax.Array, jax.Array]:
    """Returns (K1, K2): kernel (ks, kst) and the coarse kernel (4 ks, 4 kst), each [B, n, H, D]."""
    k1 = mean_pool(k, config.kernel_size, config.kernel_stride)
    k2 = mean_pool(k, 4 * config.kernel_size, 4 * config.kernel_stride)
    return k1, k2
