"""XLA block-sparse attention: gathered K/V blocks per query, custom_vjp backward.

Queries are processed in chunks of ``chunk`` tokens (``lax.map`` / ``lax.scan``); memory is
O(chunk * n * block_size * D) per KV head on top of the inputs. With ``shared=(init, window)``
the blocks every token of a chunk may share — the first ``init`` blocks and the ``window`` blocks
ending at the chunk's own block — are gathered once per chunk and multiplied as one matrix
(rows masked by each token's own list); only the remaining ids are gathered per token. This needs
every row to list at most ``n - init - window`` other blocks, which InfLLM v2's selection
guarantees (its forced init/local blocks are exactly the shared ones). With ``shared`` the first
``n * block_size`` queries (whose causal blocks number at most ``n``, so InfLLM v2 lists them all)
run the dense flash path (``dense.py``) instead: same result, no gathers. The backward recomputes
probabilities from the saved log-sum-exp, gives dq per query and scatter-adds dK/dV into the
listed blocks (the transpose of the gather). Runs on every backend.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from .dense import dense_causal_attention

F32 = jnp.float32


def _prep(q, k, v, block_idx, segment_ids, block_size, chunk, q0):
    """Pads and reshapes inputs into per-chunk, per-KV-head layouts (queries start at ``q0``)."""
    b, tq, hq, d = q.shape
    t, hkv = k.shape[1:3]
    nb = -(-t // block_size)
    nc = -(-tq // chunk)
    tp = nc * chunk
    qc = jnp.pad(q, ((0, 0), (0, tp - tq), (0, 0), (0, 0)))
    qc = qc.reshape(b, nc, chunk, hkv, hq // hkv, d).transpose(1, 0, 3, 2, 4, 5)  # [nc,B,Hkv,C,G,D]
    pad_k = ((0, 0), (0, nb * block_size - t), (0, 0), (0, 0))
    kb = jnp.pad(k, pad_k).reshape(b, nb, block_size, hkv, d).transpose(0, 3, 1, 2, 4)  # [B,Hkv,nb,Bk,D]
    vb = jnp.pad(v, pad_k).reshape(b, nb, block_size, hkv, d).transpose(0, 3, 1, 2, 4)
    idx = jnp.pad(block_idx, ((0, 0), (0, 0), (0, tp - tq), (0, 0)), constant_values=-1)
    idx = idx.reshape(b, hkv, nc, chunk, -1).transpose(2, 0, 1, 3, 4)  # [nc,B,Hkv,C,n]
    seg = None
    if segment_ids is not None:
        sk = jnp.pad(segment_ids, ((0, 0), (0, nb * block_size - t)), constant_values=-1)
        sq = jnp.pad(segment_ids[:, q0:], ((0, 0), (0, tp - tq)), constant_values=-2)
        seg = (sq.reshape(b, nc, chunk).swapaxes(0, 1), sk.reshape(b, nb, block_size))
    return qc, kb, vb, idx, seg


class _Parts:
    """The key blocks of one chunk: shared (per chunk) and per-token, with their masks."""

    def __init__(self, c0, idx, sq, seg, kb, vb, chunk, block_size, shared, kbt=None):
        qpos = c0 + jnp.arange(chunk)
        gather = jax.vmap(jax.vmap(lambda x, i: x[jnp.maximum(i, 0)]))
        self.rest = idx
        self.ids = []
        if shared is not None:
            init, window = shared
            qb = c0 // block_size
            win = qb - window + 1 + jnp.arange(window)
            sh = jnp.concatenate([jnp.arange(init), jnp.where(win >= init, win, -1)])  # [S]
            in_sh = (idx >= 0) & ((idx < init) | ((idx > qb - window) & (idx <= qb)))
            big = jnp.iinfo(jnp.int32).max
            rest = jnp.sort(jnp.where(in_sh | (idx < 0), big, idx), axis=-1)
            rest = rest[..., : idx.shape[-1] - init - window]
            self.rest = jnp.where(rest == big, -1, rest)
            listed = ((idx[..., None] == sh) & (idx[..., None] >= 0)).any(-2)  # [B,Hkv,C,S]
            sh_b = jnp.broadcast_to(sh, idx.shape[:2] + sh.shape)  # [B,Hkv,S]
            kpos = sh[:, None] * block_size + jnp.arange(block_size)  # [S,Bk]
            m = listed[..., None] & (sh[:, None] >= 0) & (kpos <= qpos[:, None, None])
            if seg is not None:
                sk = jax.vmap(lambda s, i: s[jnp.maximum(i, 0)])(seg, sh_b[:, 0])  # [B,S,Bk]
                m = m & (sk[:, None, None] == sq[:, None, :, None, None])
            self.shared = (sh_b, gather(kb, sh_b), gather(vb, sh_b), m)  # per chunk
        else:
            self.shared = None
        r = self.rest
        kpos = r[..., None] * block_size + jnp.arange(block_size)
        m = (r[..., None] >= 0) & (kpos <= qpos[None, None, :, None, None])
        if seg is not None:
            sk = jax.vmap(lambda s, i: s[jnp.maximum(i, 0)])(seg, r)  # [B,Hkv,C,n,Bk]
            m = m & (sk == sq[:, None, :, None, None])
        if kbt is None:
            self.token = (r, gather(kb, r), gather(vb, r), m, "bgcskd")  # per token
        else:  # keys gathered pre-transposed: 256-byte rows, and the score product needs no transpose
            kt = jax.vmap(jax.vmap(jax.vmap(lambda x, i: x[:, jnp.maximum(i, 0)], (None, 0))))(kbt, r)
            self.token = (r, kt, gather(vb, r), m, "bgcdsk")

    def groups(self):
        """(ids, k, v, mask, spec, score key spec), each part's (block, key) axes merged into one
        axis ``n``: shared keys are 'bgn', per-token keys 'bgcn'. One contraction axis makes every
        ``P V`` product a plain batched matmul (XLA:CPU ran the two-axis contraction 2.5x slower)."""
        merge = lambda x, at: x.reshape(x.shape[:at] + (-1,) + x.shape[at + 2 :])
        ids, k, v, m, kspec = self.token
        transposed = kspec == "bgcdsk"
        out = [
            (
                ids,
                merge(k, 4 if transposed else 3),
                merge(v, 3),
                merge(m, 3),
                "bgcn",
                "bgcdn" if transposed else "bgcnd",
            )
        ]
        if self.shared is not None:
            ids, k, v, m = self.shared
            out.append((ids, merge(k, 2), merge(v, 2), merge(m, 3), "bgn", "bgnd"))
        return out


def _scores(qc, kg, m, kspec, scale):
    s = jnp.einsum(f"bgchd,{kspec}->bgchn", qc, kg, preferred_element_type=F32) * scale
    return jnp.where(m[:, :, :, None], s, -jnp.inf)


def _forward(q, k, v, block_idx, segment_ids, block_size, chunk, shared, q0):
    b, t, hq, d = q.shape
    scale = 1.0 / math.sqrt(d)
    qc, kb, vb, idx, seg = _prep(q, k, v, block_idx, segment_ids, block_size, chunk, q0)
    kbt = kb.swapaxes(-1, -2).swapaxes(-2, -3)  # [B,Hkv,D,nb,Bk]

    def body(x):
        ci, qq, ii = x[0], x[1], x[2]
        sq, sk = (None, None) if seg is None else (x[3], seg[1])
        parts = _Parts(q0 + ci * chunk, ii, sq, sk, kb, vb, chunk, block_size, shared, kbt).groups()
        ss = [_scores(qq, kg, m, ks, scale) for _, kg, _, m, _, ks in parts]
        mx = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1) for s in ss])[..., None]
        mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
        ps = [jnp.exp(s - mx) for s in ss]
        l = sum(jnp.sum(p, axis=-1) for p in ps)
        o = sum(
            jnp.einsum(f"bgchn,{spec}d->bgchd", p, vg, preferred_element_type=F32)
            for p, (_, _, vg, _, spec, _) in zip(ps, parts)
        )
        o = o / jnp.where(l > 0, l, 1.0)[..., None]
        lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + mx[..., 0], jnp.inf)
        return o, lse  # [B,Hkv,C,G,D], [B,Hkv,C,G]

    xs = (jnp.arange(qc.shape[0]), qc, idx) + (() if seg is None else (seg[0],))
    o, lse = jax.lax.map(body, xs)
    o = o.transpose(1, 0, 3, 2, 4, 5).reshape(b, -1, hq, d)[:, :t].astype(q.dtype)
    return o, lse  # lse: [nc,B,Hkv,C,G]


def _backward(q, k, v, block_idx, segment_ids, o, lse, do, block_size, chunk, shared, q0):
    b, t, hq, d = q.shape
    scale = 1.0 / math.sqrt(d)
    qc, kb, vb, idx, seg = _prep(q, k, v, block_idx, segment_ids, block_size, chunk, q0)
    oc = _prep(o, k, v, block_idx, None, block_size, chunk, q0)[0]
    doc = _prep(do, k, v, block_idx, None, block_size, chunk, q0)[0]
    nb, bk = kb.shape[2], kb.shape[3]
    add = jax.vmap(jax.vmap(lambda acc, i, u: acc.at[i].add(u, mode="drop")))

    def body(carry, x):
        dk, dv = carry
        ci, qq, ii, oo, dd, ll = x[:6]
        sq, sk = (None, None) if seg is None else (x[6], seg[1])
        parts = _Parts(q0 + ci * chunk, ii, sq, sk, kb, vb, chunk, block_size, shared).groups()
        delta = jnp.sum(dd.astype(F32) * oo.astype(F32), axis=-1)[..., None]
        dq = 0.0
        for ids, kg, vg, m, spec, ks in parts:
            p = jnp.exp(_scores(qq, kg, m, ks, scale) - ll[..., None])  # [B,Hkv,C,G,n]
            dp = jnp.einsum(f"bgchd,{spec}d->bgchn", dd, vg, preferred_element_type=F32)
            ds = p * (dp - delta) * scale
            dq = dq + jnp.einsum(f"bgchn,{spec}d->bgchd", ds, kg, preferred_element_type=F32)
            tgt = jnp.where(ids >= 0, ids, nb)  # invalid -> dropped
            dkg, dvg = (
                jnp.einsum(f"bgchn,bgchd->{spec}d", a, y, preferred_element_type=F32).reshape(ids.shape + (bk, d))
                for a, y in ((ds, qq), (p, dd))
            )  # back to one row per listed block
            if spec == "bgcn":
                tgt, dkg, dvg = (x.reshape(x.shape[:2] + (-1,) + x.shape[4:]) for x in (tgt, dkg, dvg))
            dk, dv = add(dk, tgt, dkg), add(dv, tgt, dvg)
        return (dk, dv), dq

    zeros = jnp.zeros(kb.shape, F32)
    xs = (jnp.arange(qc.shape[0]), qc, idx, oc, doc, lse) + (() if seg is None else (seg[0],))
    (dk, dv), dq = jax.lax.scan(body, (zeros, zeros), xs)
    dq = dq.transpose(1, 0, 3, 2, 4, 5).reshape(b, -1, hq, d)[:, :t].astype(q.dtype)
    unblock = lambda x: x.transpose(0, 2, 3, 1, 4).reshape(b, -1, k.shape[2], d)[:, : k.shape[1]]
    return dq, unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, block_idx, segment_ids, block_size, chunk, shared, q0):
    return _forward(q, k, v, block_idx, segment_ids, block_size, chunk, shared, q0)[0]


def _attention_fwd(q, k, v, block_idx, segment_ids, block_size, chunk, shared, q0):
    o, lse = _forward(q, k, v, block_idx, segment_ids, block_size, chunk, shared, q0)
    return o, (q, k, v, block_idx, segment_ids, o, lse)


def _attention_bwd(block_size, chunk, shared, q0, res, do):
    q, k, v, block_idx, segment_ids, o, lse = res
    dq, dk, dv = _backward(q, k, v, block_idx, segment_ids, o, lse, do, block_size, chunk, shared, q0)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(q, k, v, block_idx, *, block_size, segment_ids=None, chunk=16, shared=None):
    """Causal softmax attention of each query over its listed key blocks (-1 entries ignored).

    q [B, T, Hq, D]; k, v [B, T, Hkv, D]; block_idx int32 [B, Hkv, T, n] (no repeated ids in a
    row). ``shared=(init, window)``: see the module docstring (rows must list at most
    ``n - init - window`` blocks outside the shared ones, and every row with at most ``n`` causal
    blocks must list all of them: those rows, the first ``n * block_size``, run dense).
    """
    chunk = max(1, min(chunk, q.shape[1]))
    q0 = 0
    if shared is not None:
        q0 = min(q.shape[1], block_idx.shape[-1] * block_size)
        if sum(shared) >= block_idx.shape[-1]:
            shared = None  # nothing left per token: plain per-token gather
        else:
            chunk = math.gcd(chunk, block_size)  # a chunk must lie inside one block
    block_idx = jax.lax.stop_gradient(block_idx)
    prefix = lambda x: None if x is None else x[:, :q0]
    out = [] if q0 == 0 else [dense_causal_attention(q[:, :q0], k[:, :q0], v[:, :q0], segment_ids=prefix(segment_ids))]
    if q0 < q.shape[1]:
        shared = None if shared is None else tuple(shared)
        out.append(_attention(q[:, q0:], k, v, block_idx[:, :, q0:], segment_ids, block_size, chunk, shared, q0))
    return jnp.concatenate(out, axis=1)
