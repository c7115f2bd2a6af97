"""Dense causal GQA attention by backend: cuDNN (GPU), splash (TPU), blockwise (any), reference.

``causal_attention(q, k, v, segment_ids)`` is the dense path of the model: q ``[B,T,Hq,D]``, k/v
``[B,T,Hkv,D]`` (query head ``i`` uses KV head ``i // (Hq/Hkv)``), causal, tokens attend only within
their segment (same id = same document), scale ``D**-0.5``, fp32 softmax, output in q's dtype.
Every implementation except ``reference`` keeps memory linear in ``T``, backward included.

GQA is computed with the group folded into the query rows (``fold_groups``): the query heads of
one KV head become rows ``t * G + g`` of one ``[B, Hkv, T*G, D]`` operand, so each score / value
product is one batched matmul per KV head and K/V are never repeated per query head.
``dot_product_attention`` (the plain masked softmax, also the decode step over a KV cache) and
``causal_mask`` live here; ``minicpm_jax.model.attention`` imports them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from pallas_kernels.infllm_v2 import dense_causal_attention

F32 = jnp.float32
IMPLEMENTATIONS = ("auto", "reference", "blockwise", "cudnn", "splash")
SPLASH_BLOCKS = (512, 256, 128)


def causal_mask(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """``[B, T, T]`` bool: query t sees key s iff s <= t and both lie in the same segment."""
    idx = jnp.arange(length)
    mask = jnp.broadcast_to(idx[:, None] >= idx[None, :], (batch, length, length))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def fold_groups(q: jax.Array, kv_heads: int) -> jax.Array:
    """q ``[B,T,Hq,D]`` -> ``[B,Hkv,T*G,D]`` (``G = Hq/Hkv``): query head ``h*G + g`` at position
    ``t`` is row ``t*G + g`` of KV head ``h``."""
    b, t, hq, d = q.shape
    return q.reshape(b, t, kv_heads, hq // kv_heads, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, -1, d)


def unfold_groups(x: jax.Array, length: int) -> jax.Array:
    """The inverse of ``fold_groups``: ``[B,Hkv,T*G,D]`` -> ``[B,T,Hq,D]``."""
    b, hkv, r, d = x.shape
    return x.reshape(b, hkv, length, r // length, d).transpose(0, 2, 1, 3, 4).reshape(b, length, -1, d)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """GQA softmax attention: q ``[B,T,Hq,D]``, k/v ``[B,S,Hkv,D]``, mask ``[B,T,S]``; fp32 softmax.

    Query head ``i`` uses KV head ``i // (Hq/Hkv)``; the group is folded into the query rows.
    """
    b, t, _, d = q.shape
    hkv, s = k.shape[2], k.shape[1]
    scores = jnp.einsum("bkrd,bskd->bkrs", fold_groups(q, hkv), k, preferred_element_type=F32) * d**-0.5
    scores = jnp.where(mask[:, None, :, None], scores.reshape(b, hkv, t, -1, s), jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, hkv, -1, s)
    return unfold_groups(jnp.einsum("bkrs,bskd->bkrd", probs, v), t)


def causal_attention(q, k, v, segment_ids=None, *, implementation="auto", block_size=512, interpret=False):
    """Causal softmax attention of q ``[B,T,Hq,D]`` over k/v ``[B,T,Hkv,D]``; returns ``[B,T,Hq,D]``.

    ``implementation``: ``"reference"`` (plain ``[B,H,T,T]`` scores), ``"blockwise"``
    (``pallas_kernels.infllm_v2.dense_causal_attention``: online softmax over ``block_size`` key
    blocks, causal blocks only, custom VJP), ``"cudnn"`` (cuDNN flash attention;
    it has no segment ids, so rows with ``segment_ids`` go blockwise), ``"splash"`` (the Pallas TPU
    splash kernel; ``interpret=True`` runs it on CPU), or ``"auto"``: cudnn on GPU for bf16/fp16,
    splash on TPU, blockwise otherwise (on CPU it beat reference at every length measured, 128 to 2048,
    forward + backward).
    """
    impl = _resolve(implementation, q)
    b, t = q.shape[:2]
    if impl == "reference":
        return dot_product_attention(q, k, v, causal_mask(segment_ids, b, t))
    if impl == "splash":
        return splash_attention(q, k, v, segment_ids, interpret=interpret)
    if impl == "cudnn" and segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return dense_causal_attention(q, k, v, segment_ids=segment_ids, q_chunk=block_size, kv_chunk=block_size)


def _resolve(implementation: str, q: jax.Array) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"causal_attention: implementation={implementation!r}; expected one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "gpu":
        return "cudnn" if q.dtype in (jnp.bfloat16, jnp.float16) else "blockwise"
    if backend == "tpu":
        return "splash"
    return "blockwise"


def _pad_seq(x, length, value=0):
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value)


# ---- splash (TPU) --------------------------------------------------------------------------------


def splash_attention(q, k, v, segment_ids=None, *, interpret=False):
    """The splash kernel (GQA natively, causal mask, segment ids), one batch row per ``vmap`` lane.

    ``T`` is padded to a multiple of 128 (padded keys lie after every real query, so no real query
    sees them); blocks are the largest of ``SPLASH_BLOCKS`` dividing the padded length.
    """
    _, t, hq, d = q.shape
    tp = -(-t // 128) * 128
    bs = next(s for s in SPLASH_BLOCKS if tp % s == 0)
    sizes = splash.BlockSizes(bs, bs, bs, bs, bs, bs, bs, bs)
    mask = splash.MultiHeadMask([splash.CausalMask((tp, tp))] * hq)
    kernel = splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)
    heads_first = lambda x: _pad_seq(x, tp).transpose(0, 2, 1, 3)
    qs, ks, vs = heads_first(q * jnp.asarray(d**-0.5, q.dtype)), heads_first(k), heads_first(v)
    if segment_ids is None:
        out = jax.vmap(kernel)(qs, ks, vs)
    else:
        seg = _pad_seq(segment_ids.astype(jnp.int32), tp, -1)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(qs, ks, vs, seg)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)
