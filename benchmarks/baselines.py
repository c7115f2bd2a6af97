"""Strong baselines the kernel benchmarks measure against, in the same run as our kernels.

- ``matmul_gflops``: this machine's fp32 matmul rate (the roofline every table quotes).
- ``blockwise_attention``: dense causal attention as a plain jnp flash loop — online softmax over
  key blocks of 512, only the causal blocks (the inner trip count depends on the query block), the
  GQA group folded into the query rows so each block product is one ``[bq*G, D] x [D, bk]`` matmul.
- ``torch_chunk_gla``: chunked simple-GLA (Lightning) in pure PyTorch, chunk 64, written from
  spec/sala.md §3; differentiable with torch autograd.

None of this is library code: the library must beat it.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def median_time(fn, *args, repeats=3):
    """Median wall time of ``fn(*args)`` (after one untimed warm-up call), in seconds."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(n=2048, repeats=5, dtype=F32):
    """GFLOP/s of one jitted ``[n,n] x [n,n]`` matmul in ``dtype`` (median of ``repeats``): the roofline."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in range(2))
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / median_time(f, a, b, repeats=repeats) / 1e9


def blockwise_attention(q, k, v, block=512):
    """Causal softmax attention, q ``[B,T,Hq,D]``, k/v ``[B,T,Hkv,D]`` (T a multiple of ``block``)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g, n = hq // hkv, t // block
    r = block * g
    qr = q.reshape(b, t, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * g, d) * d**-0.5
    kr, vr = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    rows = jnp.arange(r) // g

    def q_step(i, out):
        qi = jax.lax.dynamic_slice_in_dim(qr, i * r, r, axis=2)

        def kv_step(j, carry):
            m, l, acc = carry
            kj = jax.lax.dynamic_slice_in_dim(kr, j * block, block, axis=2)
            vj = jax.lax.dynamic_slice_in_dim(vr, j * block, block, axis=2)
            s = jnp.einsum("bhrd,bhcd->bhrc", qi, kj)
            s = jnp.where(j * block + jnp.arange(block) <= (i * block + rows)[:, None], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            a = jnp.exp(m - m_new)
            return m_new, a * l + p.sum(-1), a[..., None] * acc + jnp.einsum("bhrc,bhcd->bhrd", p, vj)

        init = (jnp.full((b, hkv, r), -jnp.inf), jnp.zeros((b, hkv, r)), jnp.zeros((b, hkv, r, d)))
        _, l, acc = jax.lax.fori_loop(0, i + 1, kv_step, init)
        return jax.lax.dynamic_update_slice_in_dim(out, acc / l[..., None], i * r, axis=2)

    out = jax.lax.fori_loop(0, n, q_step, jnp.zeros_like(qr))
    return out.reshape(b, hkv, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, hq, d)


def torch_chunk_gla(q, k, v, log_decay, chunk=64):
    """Chunked simple-GLA in PyTorch: q/k/v ``[B,T,H,D]`` tensors (q unscaled), ``log_decay [H]``.

    Per chunk (spec/sala.md §3): ``O = ((Q Kᵀ) ⊙ D) V + diag(λ^{i+1}) Q S`` and
    ``S' = λ^C S + (diag(λ^{C−1−j}) K)ᵀ V``; T a multiple of ``chunk``. Returns ``[B,T,H,Dv]``.
    """
    import torch

    b, t, h, d = q.shape
    n, c = t // chunk, chunk
    to_c = lambda x: x.reshape(b, n, c, h, x.shape[-1]).permute(0, 3, 1, 2, 4).contiguous()  # [B,H,N,C,D]
    qc, kc, vc = to_c(q * d**-0.5), to_c(k), to_c(v)
    g = log_decay.to(q.dtype)[:, None, None]
    i = torch.arange(c, dtype=q.dtype)
    delta = i[:, None] - i[None, :]
    intra = torch.where(delta >= 0, torch.exp(g * delta.clamp(min=0)), torch.zeros(()))  # [H,C,C]
    qdec = torch.exp(g[..., 0] * (i + 1))[:, None, :, None]  # [H,1,C,1]
    kdec = torch.exp(g[..., 0] * (c - 1 - i))[:, None, :, None]
    o = ((qc @ kc.transpose(-1, -2)) * intra[:, None]) @ vc
    u = (kc * kdec).transpose(-1, -2) @ vc  # [B,H,N,D,Dv]
    lam = torch.exp(g[..., 0, 0] * c)[None, :, None, None]
    s = torch.zeros_like(u[:, :, 0])
    states = []
    for uj in u.unbind(2):  # unbind, not u[:, :, j]: its backward is one stack, not N full-size zeros
        states.append(s)
        s = lam * s + uj
    o = o + (qc * qdec) @ torch.stack(states, 2)
    return o.permute(0, 2, 3, 1, 4).reshape(b, t, h, -1)


def torch_time(fn, *args, repeats=3):
    """Median wall time of a PyTorch callable (one warm-up call first)."""
    fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def to_torch(x):
    import torch

    return torch.from_numpy(np.array(x))


def write_report(result: dict, out: str, text: str, roof_end: float) -> None:
    """Print the table, the end-of-run roofline and the targets; write ``result`` as JSON to ``out`` atomically."""
    print(text)
    print(f"(roofline at the end of the run: {roof_end:.0f} GFLOP/s)")
    for name, value in result["targets"].items():
        print(f"- {name}: {value:.2f}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")
