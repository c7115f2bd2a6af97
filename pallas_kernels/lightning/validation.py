"""Input checks for the public Lightning API: one clear ``ValueError`` naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("reference", "recurrent", "xla", "pallas_tpu", "pallas_gpu")
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_float(name, x):
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _FLOATS]:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got dtype {x.dtype}")


def check_log_decay(log_decay, num_heads):
    log_decay = jnp.asarray(log_decay) if not isinstance(log_decay, jax.Array) else log_decay
    if log_decay.shape != (num_heads,):
        raise ValueError(f"log_decay must have shape [H] = ({num_heads},), got {log_decay.shape}")
    check_float("log_decay", log_decay)
    if not isinstance(log_decay, jax.core.Tracer):
        vals = np.asarray(log_decay, np.float32)
        if not np.all(vals < 0) or not np.all(np.isfinite(vals)):
            raise ValueError(
                "log_decay must be finite and strictly negative (log λ = −slope, "
                f"e.g. -alibi_slopes(H)); got {vals.tolist()}"
            )
    return log_decay


def check_scale(scale, head_dim):
    if scale is None:
        return float(head_dim) ** -0.5
    if not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive Python float or None (→ Dk**-0.5), got {scale!r}")
    return float(scale)


def check_state(name, state, shape):
    if state.shape != shape:
        raise ValueError(f"{name} must have shape [B, H, Dk, Dv] = {shape}, got {state.shape}")
    check_float(name, state)


def check_inputs(q, k, v):
    """Validates ``q, k [B,T,H,Dk]`` and ``v [B,T,H,Dv]``; returns ``(B, T, H, Dk, Dv)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {x.shape}")
        check_float(name, x)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {q.shape}, got {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, Dv] with B, T, H = {q.shape[:3]}, got {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] < 1:
        raise ValueError(f"sequence length T must be ≥ 1, got shape {q.shape}")
    return (*q.shape, v.shape[-1])


def resolve_implementation(implementation):
    """Maps ``"auto"`` to the backend default (``pallas_tpu`` on TPU, else ``xla``); checks the name.

    A Pallas kernel is accepted on any backend: ``interpret`` (see ``lightning_attention``) decides
    whether it is interpreted or compiled.
    """
    if implementation == "auto":
        return "pallas_tpu" if jax.default_backend() == "tpu" else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {('auto',) + IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


def check_chunk_size(chunk_size, implementation, dtype, head_dims):
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if implementation == "pallas_tpu":
        sub = 8 * (4 // jnp.dtype(dtype).itemsize)
        if chunk_size % sub:
            raise ValueError(
                f"chunk_size for pallas_tpu must be a multiple of {sub} for {dtype} "
                f"(TPU sublane tiling), got {chunk_size}"
            )
    if implementation == "pallas_gpu":
        from . import pallas_gpu

        pallas_gpu.check_tiling(chunk_size, dtype, head_dims)


def check_segment_ids(segment_ids, batch_seq):
    """``segment_ids`` must be an integer ``[B, T]`` array (packed documents; 0 = padding)."""
    shape = tuple(getattr(segment_ids, "shape", ()))
    if shape != tuple(batch_seq):
        raise ValueError(f"segment_ids must have shape [B, T] = {tuple(batch_seq)}, got {shape}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must have an integer dtype (e.g. int32), got {segment_ids.dtype}")
