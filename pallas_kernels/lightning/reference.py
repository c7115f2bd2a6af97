"""Ground-truth Lightning attention: the masked quadratic (parallel) form in fp32.

``O = ((scale·Q Kᵀ) ⊙ M) V + diag(λ^{t+1}) (scale·Q) S₀`` with ``M_ts = λ^{t−s}`` for ``t ≥ s``
and 0 otherwise (λ = exp(g)); final state ``S_T = λ^T S₀ + Σ_s λ^{T−1−s} k_sᵀ v_s``. O(T²) memory:
obvious and slow, used only to check the other implementations. Gradients come from autodiff.
"""

import jax.numpy as jnp

_F32 = jnp.float32


def decay_exp(log_decay, delta):
    """``exp(g·Δ)`` for Δ ≥ 0 and 0 where Δ < 0 (masked before ``exp``; never forms λ^{−j})."""
    delta = jnp.asarray(delta, _F32)
    safe = jnp.where(delta >= 0, delta, 0.0)
    return jnp.where(delta >= 0, jnp.exp(log_decay * safe), 0.0)


def forward(q, k, v, log_decay, initial_state, *, scale):
    """Returns ``(o [B,T,H,Dv] fp32, final_state [B,H,Dk,Dv] fp32)``."""
    t = q.shape[1]
    g = log_decay.astype(_F32)[:, None, None]  # [H,1,1]
    qs = q.astype(_F32) * scale
    k, v, s0 = k.astype(_F32), v.astype(_F32), initial_state.astype(_F32)
    pos = jnp.arange(t, dtype=_F32)
    mask = decay_exp(g, pos[:, None] - pos[None, :])  # [H,T,T]
    scores = jnp.einsum("bthd,bshd->bhts", qs, k) * mask
    o = jnp.einsum("bhts,bshv->bthv", scores, v)
    qdec = jnp.exp(g[:, :, 0] * (pos + 1.0))  # [H,T]
    o = o + jnp.einsum("bthd,bhdv->bthv", qs * qdec.T[None, :, :, None], s0)
    kdec = jnp.exp(g[:, :, 0] * (t - 1.0 - pos))  # [H,T]
    final = jnp.exp(g[:, 0, 0] * t)[None, :, None, None] * s0
    final = final + jnp.einsum("bshd,bshv->bhdv", k * kdec.T[None, :, :, None], v)
    return o, final
