"""Shared inputs and error metrics for the Lightning tests (a plain module, not a conftest)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.lightning import alibi_slopes, lightning_attention

# Four of SALA's 32 heads: the fastest (λ≈0.43), two middle and the slowest (λ≈0.996) decay.
SALA_SLOPES = alibi_slopes(32)
LOG_DECAY = -jnp.asarray(SALA_SLOPES[[0, 10, 21, 31]])


def inputs(t, *, b=2, h=4, dk=16, dv=8, dtype=jnp.float32, seed=0):
    """q, k, v (RMS-normalised like SALA's q/k) and a random fp32 initial state."""
    kq, kk, kv, ks = jax.random.split(jax.random.PRNGKey(seed + t), 4)
    q = jax.random.normal(kq, (b, t, h, dk), jnp.float32)
    k = jax.random.normal(kk, (b, t, h, dk), jnp.float32)
    v = jax.random.normal(kv, (b, t, h, dv), jnp.float32)
    s0 = 0.5 * jax.random.normal(ks, (b, h, dk, dv), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), s0


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@functools.lru_cache(maxsize=None)
def _vjp_fn(impl, chunk_size, interpret, log_decay_key, segmented=False):
    """Jitted ``(q, k, v, s0, do, ds[, segment_ids]) -> ((o, final), grads)``."""
    log_decay = jnp.asarray(log_decay_key)

    def f(q, k, v, s0, seg):
        return lightning_attention(
            q,
            k,
            v,
            log_decay,
            initial_state=s0,
            return_final_state=True,
            chunk_size=chunk_size,
            implementation=impl,
            interpret=interpret,
            segment_ids=seg,
        )

    def run(q, k, v, s0, do, ds, seg=None):
        out, vjp = jax.vjp(lambda *a: f(*a, seg), q, k, v, s0)
        return out, vjp((do.astype(out[0].dtype), ds))

    return jax.jit(run)


def cotangents(v, s0, seed=1):
    """The fixed random cotangents ``(do, d_final)`` used by ``forward_and_grads``."""
    kd, ks = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kd, v.shape, jnp.float32), jax.random.normal(ks, s0.shape, jnp.float32)


def forward_and_grads(impl, q, k, v, s0, *, log_decay=LOG_DECAY, chunk_size=64, seed=1, segment_ids=None, ct=None):
    """``((o, final_state), (dq, dk, dv, ds0))`` for a fixed random cotangent (or ``ct``)."""
    interpret = True if impl.startswith("pallas") else None
    do, ds = cotangents(v, s0, seed) if ct is None else ct
    fn = _vjp_fn(impl, chunk_size, interpret, tuple(np.asarray(log_decay).tolist()), segment_ids is not None)
    if segment_ids is None:
        return fn(q, k, v, s0, do, ds)
    return fn(q, k, v, s0, do, ds, segment_ids)
