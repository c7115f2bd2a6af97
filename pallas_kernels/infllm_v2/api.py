"""Public entry points: ``infllm_v2_attention`` and ``block_sparse_attention`` with dispatch.

``implementation`` is one of "reference", "xla", "pallas_tpu", "pallas_gpu" or "auto" (Pallas TPU
on TPU, XLA elsewhere, with or without segment ids). Below ``config.dense_len`` the call is exact
dense causal attention; at or above it every query takes the sparse path (spec §4 step 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..interpret import call_kernel
from . import reference, xla
from .config import InfLLMv2Config
from .dense import dense_causal_attention
from .selection import attention_blocks, select_blocks

IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu")


def resolve_implementation(implementation: str, segment_ids=None) -> str:
    """Maps "auto" to a concrete implementation for the default backend (Pallas TPU on TPU, XLA
    elsewhere). Every implementation takes segment ids; ``segment_ids`` is accepted for callers
    of the older signature and does not change the choice."""
    del segment_ids
    if implementation == "auto":
        return "pallas_tpu" if jax.default_backend() == "tpu" else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} must be 'auto' or one of {IMPLEMENTATIONS}")
    return implementation


def block_sparse_attention(
    q, k, v, block_idx, *, block_size, segment_ids=None, implementation="auto", interpret=None, shared=None
):
    """Causal attention of each query over the tokens of its listed blocks; empty rows give 0.

    q [B, T, Hq, D]; k, v [B, T, Hkv, D]; block_idx int32 [B, Hkv, T, n], -1 = unused slot;
    ``segment_ids`` int [B, T] (packed rows, every implementation): keys of other segments are
    masked out.
    ``shared=(init, window)`` is a hint for the xla path (see ``xla.py``), ignored elsewhere.
    ``interpret=None`` is decided when lowered (``jax.lax.platform_dependent``): the Pallas kernel is
    interpreted on CPU and compiled for any other platform, so ``jax.export(...,
    platforms=["cuda"|"tpu"])`` from a CPU host lowers the compiled kernel; ``True``/``False``
    force interpret mode / the compiled kernel.
    """
    impl = resolve_implementation(implementation, segment_ids)
    want = (q.shape[0], k.shape[2], q.shape[1])
    if block_idx.ndim != 4 or tuple(block_idx.shape[:3]) != want:
        raise ValueError(
            f"block_idx shape {tuple(block_idx.shape)} must be [B, Hkv, T, n] with [B, Hkv, T] = {list(want)}"
        )
    if not jnp.issubdtype(block_idx.dtype, jnp.integer):
        raise ValueError(f"block_idx dtype {block_idx.dtype} must be an integer type")
    if segment_ids is not None and (
        tuple(segment_ids.shape) != want[::2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
    ):
        raise ValueError(
            f"segment_ids (shape {tuple(segment_ids.shape)}, dtype {segment_ids.dtype}) must be integer [B, T] = "
            f"{list(want[::2])}"
        )
    if impl == "reference":
        return reference.block_sparse_attention(q, k, v, block_idx, block_size=block_size, segment_ids=segment_ids)
    if impl == "xla":
        return xla.block_sparse_attention(
            q, k, v, block_idx, block_size=block_size, segment_ids=segment_ids, shared=shared
        )
    if impl == "pallas_tpu":
        from . import pallas_tpu as kernels
    else:
        from . import pallas_gpu as kernels

    def kernel(q, k, v, ids, seg, *, interpret):
        return kernels.block_sparse_attention(
            q, k, v, ids, block_size=block_size, segment_ids=seg, interpret=bool(interpret)
        )

    # interpret=None: interpreted when lowered for CPU, compiled for any other platform.
    return call_kernel(kernel, interpret, q, k, v, block_idx, segment_ids)


def _validate(q, k, v, config, q_select, k_select, segment_ids):
    errors = []
    if not isinstance(config, InfLLMv2Config):
        errors.append(f"config must be an InfLLMv2Config, got {type(config).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            errors.append(f"{name} must be [B, T, H, D], got shape {getattr(x, 'shape', None)}")
    if errors:
        raise ValueError("infllm_v2_attention: " + "; ".join(errors))
    if k.shape != v.shape:
        errors.append(f"k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        errors.append(f"q {q.shape} and k {k.shape} must agree on batch, length and head_dim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        errors.append(
            f"q heads ({q.shape[2]}) must be a multiple of k heads ({k.shape[2]}) "
            "(GQA group must divide the query heads)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        errors.append(f"q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        errors.append(f"q dtype {q.dtype} must be floating point")
    for name, x, ref in (("q_select", q_select, q), ("k_select", k_select, k)):
        if x is not None and tuple(x.shape) != tuple(ref.shape):
            errors.append(f"{name} shape {tuple(x.shape)} must equal {name[0]} shape {tuple(ref.shape)}")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != tuple(q.shape[:2]):
            errors.append(f"segment_ids shape {tuple(segment_ids.shape)} must be [B, T] = {q.shape[:2]}")
        elif not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            errors.append(f"segment_ids dtype {segment_ids.dtype} must be an integer type")
    if errors:
        raise ValueError("infllm_v2_attention: " + "; ".join(errors))


def infllm_v2_attention(
    q,
    k,
    v,
    *,
    config: InfLLMv2Config,
    q_select=None,
    k_select=None,
    segment_ids=None,
    implementation="auto",
    interpret=None,
    return_selection=False,
):
    """InfLLM v2 attention of a prefill: dense below ``config.dense_len``, block-sparse above.

    q [B, T, Hq, D], k/v [B, T, Hkv, D] (post-RoPE). ``q_select``/``k_select`` (same shapes, e.g.
    pre-RoPE copies for ``use_nope``) are used only for selection. Returns the output [B, T, Hq, D]
    and, with ``return_selection``, the selection int32 [B, Hkv, T, n] (None on the dense path).
    """
    _validate(q, k, v, config, q_select, k_select, segment_ids)
    impl = resolve_implementation(implementation, segment_ids)
    t = q.shape[1]
    if config.is_dense(t):
        if impl == "reference":
            out = reference.dense_attention(q, k, v, segment_ids=segment_ids)
        else:
            out = dense_causal_attention(q, k, v, segment_ids=segment_ids)
        return (out, None) if return_selection else out
    qs = q if q_select is None else q_select
    ks = k if k_select is None else k_select
    if impl == "reference":
        if segment_ids is not None:
            raise ValueError("segment_ids with the sparse path: use implementation='xla'")
        sel = reference.select_blocks(qs, ks, config)
    else:
        sel = select_blocks(qs, ks, config, segment_ids=segment_ids)
    blocks = attention_blocks(sel, jnp.arange(t), config, config.num_blocks(t))
    # Forced blocks (init + local window) are in every row: the xla path shares them per chunk.
    window = config.local_blocks + (1 if config.generation == "B" else 0)
    out = block_sparse_attention(
        q,
        k,
        v,
        blocks,
        block_size=config.block_size,
        segment_ids=segment_ids,
        implementation=impl,
        interpret=interpret,
        shared=(config.init_blocks, window),
    )
    return (out, sel) if return_selection else out
