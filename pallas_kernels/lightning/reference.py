"""Ground-truth Lightning attention: the masked quadratic (parallel) form in fp32.

``O = ((scale·Q Kᵀ) ⊙ M) V + diag(λ^{t+1}) (scale·Q) S₀`` with ``M_ts = λ^{t−s}`` for ``t ≥ s``
and 0 otherwise (λ = exp(g)); final state ``S_T = λ^T S₀ + Σ_s λ^{T−1−s} k_sᵀ v_s``. O(T²) memory:
obvious and slow, used only to check the other implementations. Gradients come from autodiff.

Packed rows (document index ``d``): ``M_ts`` also needs ``d_t = d_s``; the initial-state terms
need ``d_t = 0`` (outputs) and ``d_{T−1} = 0`` (final state); the final state sums only the keys
with ``d_s = d_{T−1}``.
"""

import jax.numpy as jnp

_F32 = jnp.float32


def decay_exp(log_decay, delta):
    """``exp(g·Δ)`` for Δ ≥ 0 and 0 where Δ < 0 (masked before ``exp``; never forms λ^{−j})."""
    delta = jnp.asarray(delta, _F32)
    safe = jnp.where(delta >= 0, delta, 0.0)
    return jnp.where(delta >= 0, jnp.exp(log_decay * safe), 0.0)


def forward(q, k, v, log_decay, initial_state, *, scale, docs=None):
    """Returns ``(o [B,T,H,Dv] fp32, final_state [B,H,Dk,Dv] fp32)``; ``docs``: optional ``[B,T]``
    document index (``chunking.document_index``)."""
    t = q.shape[1]
    g = log_decay.astype(_F32)[:, None, None]  # [H,1,1]
    qs = q.astype(_F32) * scale
    k, v, s0 = k.astype(_F32), v.astype(_F32), initial_state.astype(_F32)
    pos = jnp.arange(t, dtype=_F32)
    mask = decay_exp(g, pos[:, None] - pos[None, :])  # [H,T,T]
    qdec = jnp.exp(g[:, :, 0] * (pos + 1.0)).T[None, :, :, None]  # [1,T,H,1]
    kdec = jnp.exp(g[:, :, 0] * (t - 1.0 - pos)).T[None, :, :, None]
    carry = jnp.exp(g[:, 0, 0] * t)[None, :, None, None]  # [1,H,1,1]
    if docs is not None:
        mask = jnp.where((docs[:, :, None] == docs[:, None, :])[:, None], mask, 0.0)  # [B,H,T,T]
        first, last = docs == 0, docs == docs[:, -1:]  # [B,T]
        qdec = jnp.where(first[:, :, None, None], qdec, 0.0)
        kdec = jnp.where(last[:, :, None, None], kdec, 0.0)
        carry = jnp.where(first[:, -1, None, None, None], carry, 0.0)
    scores = jnp.einsum("bthd,bshd->bhts", qs, k) * mask
    o = jnp.einsum("bhts,bshv->bthv", scores, v)
    o = o + jnp.einsum("bthd,bhdv->bthv", qs * qdec, s0)
    final = carry * s0 + jnp.einsum("bshd,bshv->bhdv", k * kdec, v)
    return o, final
