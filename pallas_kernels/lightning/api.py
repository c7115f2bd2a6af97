"""Public entry points: ``lightning_attention`` (dispatch + chunk-wise ``custom_vjp``) and
``lightning_decode_step``.

Semantics (SALA / FLA simple-GLA, per batch and head, λ = exp(log_decay[h])):
``S_t = λ·S_{t−1} + k_tᵀ v_t`` and ``o_t = scale·q_t S_t`` — decay first, current token undecayed.
Packed rows (``segment_ids``) reset ``S`` to zero at every document start.
"""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp

from .. import interpret as _interpret
from . import chunking, decode, recurrent, reference, validation

_F32 = jnp.float32
_CHUNKED = ("xla", "pallas_tpu", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class _Config:
    implementation: str
    scale: float
    chunk_size: int
    interpret: object  # None (per lowering platform), bool, or pltpu.InterpretParams for pallas_tpu


def _run(cfg, name, *args, docs, **kw):
    """``<implementation>.<name>(*args, docs=..., **kw)``; a Pallas kernel goes through
    ``interpret.call_kernel`` (``interpret=None``: interpreted on CPU, compiled elsewhere)."""
    fn = getattr(importlib.import_module(f"{__package__}.{cfg.implementation}"), name)
    kw.update(scale=cfg.scale, chunk_size=cfg.chunk_size)

    def call(docs, *args, **extra):
        if docs is not None:  # segment_ids=None keeps the unmasked code path (no docs argument)
            extra["docs"] = docs
        return fn(*args, **kw, **extra)

    if not cfg.implementation.startswith("pallas"):
        return call(docs, *args)
    return _interpret.call_kernel(call, cfg.interpret, docs, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _chunked(q, k, v, log_decay, state, docs, cfg):
    o, final, _ = _run(cfg, "forward", q, k, v, log_decay, state, docs=docs, save_states=False)
    return o, final


def _chunked_fwd(q, k, v, log_decay, state, docs, cfg):
    o, final, states = _run(cfg, "forward", q, k, v, log_decay, state, docs=docs, save_states=True)
    return (o, final), (q, k, v, log_decay, states, docs)


def _chunked_bwd(cfg, res, cotangents):
    q, k, v, log_decay, states, docs = res
    do, d_final = cotangents
    dq, dk, dv, d_state = _run(cfg, "backward", q, k, v, log_decay, states, do, d_final, docs=docs)
    # log_decay is a fixed (non-trainable) per-head constant in SALA: it gets a zero cotangent;
    # the integer document index gets none.
    grads = (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), jnp.zeros_like(log_decay), d_state)
    return grads + (None,)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def lightning_attention(
    q,
    k,
    v,
    log_decay,
    *,
    scale=None,
    initial_state=None,
    return_final_state=False,
    chunk_size=64,
    implementation="auto",
    interpret=None,
    segment_ids=None,
):
    """Lightning (simple-GLA, constant per-head decay) attention.

    Args:
      q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``; float32, bfloat16 or float16 (one dtype).
      log_decay: ``[H]``, strictly negative (``-alibi_slopes(H)`` for SALA). Gets no gradient.
      scale: multiplies q; default ``Dk**-0.5``.
      initial_state: optional ``[B, H, Dk, Dv]`` (kept fp32 internally); default zeros.
      return_final_state: also return the fp32 state after the last token.
      chunk_size: tokens per chunk for the chunked implementations and the recurrent checkpointing.
      implementation: ``"auto"`` (TPU → ``pallas_tpu``, else ``xla``), ``"reference"``,
        ``"recurrent"``, ``"xla"``, ``"pallas_tpu"``, ``"pallas_gpu"``.
      interpret: Pallas only. ``None``: decided when lowered (``jax.lax.platform_dependent``):
        interpreted on CPU, the compiled kernel on any other platform, so ``jax.export(...,
        platforms=["cuda"|"tpu"])`` from a CPU host lowers the real kernel; ``True``: always
        interpret mode (CPU tests); ``False``: always the compiled kernel. ``pallas_tpu`` also takes
        a ``pltpu.InterpretParams`` (TPU interpreter).
      segment_ids: optional integer ``[B, T]`` for packed rows (e.g. ``1,1,1,2,2,0,0``; 0 is
        padding by convention but is not special: it is a document like any other). The state is
        reset to zero wherever ``segment_ids[b, t] != segment_ids[b, t−1]`` (a document start),
        so token t sees key s ≤ t only if no document start lies in (s, t]: a packed row gives
        exactly what running each document alone gives (non-contiguous repeats of an id are
        separate documents). ``initial_state`` applies only to the row's first document (the
        tokens before its first document start); the final state is the state after the row's
        last token, i.e. of its last document (padding included if the row ends in padding), and
        contains ``initial_state`` only when the row is a single document. Supported by every
        implementation, forward and backward; ``None`` runs the unmasked code.

    Returns:
      ``o [B, T, H, Dv]`` in the input dtype, or ``(o, final_state fp32)``.
    """
    b, t, h, dk, dv = validation.check_inputs(q, k, v)
    log_decay = validation.check_log_decay(log_decay, h)
    scale = validation.check_scale(scale, dk)
    impl = validation.resolve_implementation(implementation)
    validation.check_chunk_size(chunk_size, impl, q.dtype, (dk, dv))
    if initial_state is None:
        state = jnp.zeros((b, h, dk, dv), _F32)
    else:
        validation.check_state("initial_state", initial_state, (b, h, dk, dv))
        state = initial_state.astype(_F32)
    docs = None
    if segment_ids is not None:
        validation.check_segment_ids(segment_ids, (b, t))
        docs = chunking.document_index(jnp.asarray(segment_ids))
    seg = {} if docs is None else dict(docs=docs)
    if impl == "reference":
        o, final = reference.forward(q, k, v, log_decay, state, scale=scale, **seg)
    elif impl == "recurrent":
        o, final = recurrent.forward(q, k, v, log_decay, state, scale=scale, chunk_size=chunk_size, **seg)
    else:
        chunk = min(chunk_size, t) if impl == "xla" else chunk_size
        interp = (
            interpret
            if interpret is None or (impl == "pallas_tpu" and not isinstance(interpret, bool))
            else bool(interpret)
        )  # None stays per-platform; pltpu.InterpretParams passes through (TPU interpreter)
        cfg = _Config(impl, scale, int(chunk), interp)
        o, final = _chunked(q, k, v, log_decay, state, docs, cfg)
    o = o.astype(q.dtype)
    return (o, final) if return_final_state else o


def lightning_decode_step(q_t, k_t, v_t, log_decay, state, *, scale=None):
    """One generation step. q_t, k_t ``[B, H, Dk]``, v_t ``[B, H, Dv]``, state ``[B, H, Dk, Dv]``.

    Returns ``(o_t [B, H, Dv] in q_t's dtype, new_state fp32)``; equals one token of
    ``lightning_attention(..., initial_state=state, return_final_state=True)``.
    """
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if x.ndim != 3:
            raise ValueError(f"{name} must be 3-D [B, H, D], got shape {x.shape}")
        validation.check_float(name, x)
    if k_t.shape != q_t.shape or v_t.shape[:2] != q_t.shape[:2]:
        raise ValueError(
            f"k_t must match q_t {q_t.shape} and v_t must be [B, H, Dv]; got k_t {k_t.shape}, v_t {v_t.shape}"
        )
    b, h, dk = q_t.shape
    log_decay = validation.check_log_decay(log_decay, h)
    scale = validation.check_scale(scale, dk)
    validation.check_state("state", state, (b, h, dk, v_t.shape[-1]))
    o_t, new_state = decode.decode_step(
        q_t.astype(_F32), k_t.astype(_F32), v_t.astype(_F32), log_decay, state.astype(_F32), scale
    )
    return o_t.astype(q_t.dtype), new_state
