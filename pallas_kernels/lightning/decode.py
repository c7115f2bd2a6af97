"""One-token Lightning step for generation, and SALA's ALiBi decay slopes.

``lightning_decode_step`` applies the recurrence exactly as the spec states it — decay, then add,
then read: ``S_t = exp(g)·S_{t−1} + k_tᵀ v_t``, ``o_t = scale·q_t S_t`` (state fp32).
"""

import math

import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32


def alibi_slopes(num_heads: int) -> np.ndarray:
    """SALA/ALiBi slopes (positive, float32 ``[num_heads]``); use ``log_decay = -slopes``.

    Power-of-two H: ``slope[h] = start·start^h`` with ``start = 2^(−2^−(log2 H − 3))``
    (H = 32 → ``2^(−(h+1)/4)``). Otherwise the standard ALiBi interleave: the slopes of the
    closest lower power of two, then every other slope of twice that size.
    """
    if not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

    def pow2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = pow2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = pow2(closest) + pow2(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(slopes, np.float32)


def decode_step(q_t, k_t, v_t, log_decay, state, scale):
    """Unvalidated step on fp32 arrays: q_t/k_t ``[B,H,Dk]``, v_t ``[B,H,Dv]``, state ``[B,H,Dk,Dv]``."""
    lam = jnp.exp(log_decay.astype(_F32))[None, :, None, None]
    new_state = lam * state + k_t[..., :, None] * v_t[..., None, :]
    o_t = jnp.einsum("bhd,bhdv->bhv", q_t * scale, new_state)
    return o_t, new_state
