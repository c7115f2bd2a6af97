"""Basic layers with logical-axis-annotated parameters: Linear, Embed, RMSNorm, SwiGLU MLP.

Parameters are fp32 (``param_dtype``) master weights in Hugging Face semantics; layers cast them to
the compute ``dtype`` at use. Linear kernels are ``[*in_dims, *out_dims]`` (JAX layout); the
``fan_in_dims`` metadata says how many leading dims are inputs, so export is reshape + transpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def _normal(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype) -> jax.Array:
    return std * jax.random.normal(rngs.params(), tuple(shape), dtype)


class Linear(nnx.Module):
    """``y = x @ W`` with ``W: [*in_shape, *out_shape]``, no bias (MiniCPM has none)."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        axes: Sequence[str | None],
        *,
        init_std: float,
        rngs: nnx.Rngs,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
    ):
        self.in_shape, self.out_shape, self.dtype = tuple(in_shape), tuple(out_shape), dtype
        self.kernel = nnx.Param(
            _normal(rngs, (*in_shape, *out_shape), init_std, param_dtype),
            logical_axes=tuple(axes),
            fan_in_dims=len(self.in_shape),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        x_dims = "abcd"[: x.ndim - n_in] + "ijkl"[:n_in]
        w_dims = "ijkl"[:n_in] + "mnop"[:n_out]
        out = x_dims[: x.ndim - n_in] + "mnop"[:n_out]
        return jnp.einsum(f"{x_dims},{w_dims}->{out}", x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class Embed(nnx.Module):
    """Token embedding table ``[vocab, embed]`` (same layout as Hugging Face)."""

    def __init__(
        self, vocab: int, dim: int, *, init_std: float, rngs: nnx.Rngs, dtype=jnp.bfloat16, param_dtype=jnp.float32
    ):
        self.dtype = dtype
        self.weight = nnx.Param(_normal(rngs, (vocab, dim), init_std, param_dtype), logical_axes=("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """``(x * rsqrt(mean(x_fp32**2) + eps)).astype(x.dtype) * weight`` (Llama/MiniCPM convention)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return y * self.weight[...].astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden: int, intermediate: int, *, init_std: float, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(init_std=init_std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear((hidden,), (intermediate,), ("embed", "mlp"), **kw)
        self.up_proj = Linear((hidden,), (intermediate,), ("embed", "mlp"), **kw)
        self.down_proj = Linear((intermediate,), (hidden,), ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def mup_init_std(initializer_range: float, hidden_size: int, dim_model_base: int) -> float:
    """muP init std of every matrix: ``init_std / sqrt(d_model / d_base)`` (spec/minicpm4.md 3.1)."""
    return initializer_range / math.sqrt(hidden_size / dim_model_base)
