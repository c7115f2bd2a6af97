"""The spec's NumPy reference (infllm_v2.md §5), transcribed; independent of the package.

Only change: stage-1 scores are accumulated in float64 (the spec stores them as float32, which
adds rounding that is irrelevant to the algorithm) so that float64 inputs give float64 results.
"""

import math

import numpy as np

NEG = -np.inf


def compress(k, ks, kst):
    n = (k.shape[0] - ks) // kst + 1 if k.shape[0] >= ks else 0
    return (
        np.stack([k[j * kst : j * kst + ks].mean(0) for j in range(n)])
        if n > 0
        else np.zeros((0,) + k.shape[1:], k.dtype)
    )


def visible(i, j, ks, kst):
    return j * kst + ks - 1 <= i


def stage1_scores(q, k1, k2, ks, kst, lse_approx=True):
    T, Hq, D = q.shape
    Hkv = k1.shape[1]
    G = Hq // Hkv
    sc = 1 / math.sqrt(D)
    S = np.zeros((Hkv, T, k1.shape[0]), np.float64)
    for i in range(T):
        v1 = np.array([visible(i, j, ks, kst) for j in range(k1.shape[0])], bool)
        v2 = np.array([visible(i, j, 4 * ks, 4 * kst) for j in range(k2.shape[0])], bool)
        for h in range(Hq):
            g = h // G
            s1 = (k1[:, g] @ q[i, h]) * sc
            s_l, m = ((k2[:, g] @ q[i, h]) * sc, v2) if lse_approx else (s1, v1)
            lse = (np.log(np.exp(s_l[m] - s_l[m].max()).sum()) + s_l[m].max()) if m.any() else NEG
            p = np.where(v1, np.exp(s1 - lse), 0.0) if np.isfinite(lse) else np.zeros_like(s1)
            S[g, i] += np.nan_to_num(p, nan=0.0, posinf=0.0)
    return S


def block_scores(S, T, B, kst, init, local, gen="B"):
    Hkv, _, n1 = S.shape
    nb = (T + B - 1) // B
    st = B // kst
    out = np.empty((Hkv, T, nb), np.float64)
    for i in range(T):
        qb = i // B
        for b in range(nb):
            lo, hi = max(b * st - 1, 0), min(b * st - 1 + st + 1, n1)
            val = S[:, i, lo:hi].max(-1) if hi > lo else np.full(Hkv, NEG)
            if b < init:
                val = np.full(Hkv, np.inf)
            elif gen == "B" and qb - local <= b <= qb:
                val = np.full(Hkv, np.inf)
            elif gen == "A" and qb - local < b <= qb:
                val = np.full(Hkv, NEG)
            out[:, i, b] = val
    return out


def select(bs, T, B, n_sel, gen="B"):
    Hkv, _, nb = bs.shape
    kk = min(n_sel, nb)
    sel = np.full((Hkv, T, kk), -1, np.int64)
    for g in range(Hkv):
        for i in range(T):
            qb = i // B
            idx = np.sort(np.argsort(-bs[g, i], kind="stable")[:kk])
            sel[g, i] = np.where(idx > qb if gen == "B" else idx >= qb, -1, idx)
    return sel


def sparse_attention(q, k, v, sel, B, gen="B", window_blocks=0):
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    out = np.zeros(q.shape, np.float64)
    for i in range(T):
        qb = i // B
        for h in range(Hq):
            blocks = {int(b) for b in sel[h // G, i] if b >= 0}
            if gen == "A":
                blocks |= set(range(max(qb - window_blocks + 1, 0), qb + 1))
            keys = np.array(sorted(t for b in blocks for t in range(b * B, min((b + 1) * B, i + 1))), np.int64)
            if keys.size:
                s = (k[keys, h // G] @ q[i, h]) / math.sqrt(D)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[i, h] = p @ v[keys, h // G]
    return out


def infllmv2_attention(
    q,
    k,
    v,
    *,
    kernel_size=32,
    kernel_stride=16,
    block_size=64,
    init_blocks=1,
    window_size=2048,
    topk=64,
    dense_len=8192,
    gen="B",
    lse_approx=True,
    q_sel=None,
    k_sel=None,
):
    T = q.shape[0]
    local = window_size // block_size
    nb = (T + block_size - 1) // block_size
    if T < dense_len:
        full = np.broadcast_to(np.arange(nb), (k.shape[1], T, nb)).copy()
        return sparse_attention(q, k, v, full, block_size), None
    qs, ksel = (q if q_sel is None else q_sel), (k if k_sel is None else k_sel)
    k1, k2 = compress(ksel, kernel_size, kernel_stride), compress(ksel, 4 * kernel_size, 4 * kernel_stride)
    S = stage1_scores(qs, k1, k2, kernel_size, kernel_stride, lse_approx and gen == "B")
    bs = block_scores(S, T, block_size, kernel_stride, init_blocks, local, gen)
    sel = select(bs, T, block_size, topk + local if gen == "B" else topk, gen)
    return sparse_attention(q, k, v, sel, block_size, gen, window_blocks=local), sel, bs
