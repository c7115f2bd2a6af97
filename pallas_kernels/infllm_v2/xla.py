"""XLA block-sparse attention: gather the selected K/V blocks per query, custom_vjp backward.

Queries are processed in chunks of ``chunk`` tokens (``lax.map`` / ``lax.scan``), so memory is
O(chunk * n_sel * block_size * D) per KV head on top of the inputs. The backward recomputes the
probabilities from the saved log-sum-exp, returns dq per query and scatter-adds dK/dV into the
blocks each query selected (the transpose of the gather). Runs on every backend.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _prep(q, k, v, block_idx, segment_ids, block_size, chunk):
  """Pads and reshapes inputs into per-chunk, per-KV-head layouts."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  nb = -(-t // block_size)
  nc = -(-t // chunk)
  tq = nc * chunk
  qc = jnp.pad(q, ((0, 0), (0, tq - t), (0, 0), (0, 0)))
  qc = qc.reshape(b, nc, chunk, hkv, hq // hkv, d).transpose(1, 0, 3, 2, 4, 5)   # [nc,B,Hkv,C,G,D]
  pad_k = ((0, 0), (0, nb * block_size - t), (0, 0), (0, 0))
  kb = jnp.pad(k, pad_k).reshape(b, nb, block_size, hkv, d).transpose(0, 3, 1, 2, 4)  # [B,Hkv,nb,Bk,D]
  vb = jnp.pad(v, pad_k).reshape(b, nb, block_size, hkv, d).transpose(0, 3, 1, 2, 4)
  idx = jnp.pad(block_idx, ((0, 0), (0, 0), (0, tq - t), (0, 0)), constant_values=-1)
  idx = idx.reshape(b, hkv, nc, chunk, -1).transpose(2, 0, 1, 3, 4)            # [nc,B,Hkv,C,n]
  seg = None
  if segment_ids is not None:
    sk = jnp.pad(segment_ids, ((0, 0), (0, nb * block_size - t)), constant_values=-1)
    sq = jnp.pad(segment_ids, ((0, 0), (0, tq - t)), constant_values=-2)
    seg = (sq.reshape(b, nc, chunk).swapaxes(0, 1), sk.reshape(b, nb, block_size))
  return qc, kb, vb, idx, seg


def _gather(xb, idx):
  """xb [B,Hkv,nb,Bk,D], idx [B,Hkv,C,n] -> [B,Hkv,C,n,Bk,D] (invalid ids read block 0)."""
  return jax.vmap(jax.vmap(lambda x, i: x[jnp.maximum(i, 0)]))(xb, idx)


def _mask(idx, ci, chunk, block_size, seg, sq):
  """[B,Hkv,C,n,Bk] validity: listed block, causal, same segment."""
  qpos = ci * chunk + jnp.arange(chunk)
  kpos = idx[..., None] * block_size + jnp.arange(block_size)
  m = (idx[..., None] >= 0) & (kpos <= qpos[None, None, :, None, None])
  if seg is not None:
    sk = jax.vmap(lambda s, i: s[jnp.maximum(i, 0)])(seg[1], idx)            # [B,Hkv,C,n,Bk]
    m = m & (sk == sq[:, None, :, None, None])
  return m


def _scores(qc, kg, m, scale):
  s = jnp.einsum("bgchd,bgcnkd->bgchnk", qc, kg, preferred_element_type=F32) * scale
  return jnp.where(m[:, :, :, None], s, -jnp.inf)


def _forward(q, k, v, block_idx, segment_ids, block_size, chunk):
  b, t, hq, d = q.shape
  scale = 1.0 / math.sqrt(d)
  qc, kb, vb, idx, seg = _prep(q, k, v, block_idx, segment_ids, block_size, chunk)

  def body(x):
    ci, qq, ii = x[0], x[1], x[2]
    m = _mask(ii, ci, chunk, block_size, seg, None if seg is None else x[3])
    s = _scores(qq, _gather(kb, ii), m, scale)
    mx = jnp.max(s, axis=(-2, -1), keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.exp(s - mx)
    l = jnp.sum(p, axis=(-2, -1), keepdims=True)
    o = jnp.einsum("bgchnk,bgcnkd->bgchd", p, _gather(vb, ii), preferred_element_type=F32)
    o = o / jnp.where(l[..., 0], l[..., 0], 1.0)
    lse = jnp.where(l[..., 0, 0] > 0, jnp.log(l[..., 0, 0]) + mx[..., 0, 0], jnp.inf)
    return o, lse                                                   # [B,Hkv,C,G,D], [B,Hkv,C,G]

  xs = (jnp.arange(qc.shape[0]), qc, idx) + (() if seg is None else (seg[0],))
  o, lse = jax.lax.map(body, xs)
  o = o.transpose(1, 0, 3, 2, 4, 5).reshape(b, -1, hq, d)[:, :t].astype(q.dtype)
  return o, lse                                                     # lse: [nc,B,Hkv,C,G]


def _backward(q, k, v, block_idx, segment_ids, o, lse, do, block_size, chunk):
  b, t, hq, d = q.shape
  scale = 1.0 / math.sqrt(d)
  qc, kb, vb, idx, seg = _prep(q, k, v, block_idx, segment_ids, block_size, chunk)
  oc = _prep(o, k, v, block_idx, None, block_size, chunk)[0]
  doc = _prep(do, k, v, block_idx, None, block_size, chunk)[0]
  nb = kb.shape[2]

  def body(carry, x):
    dk, dv = carry
    ci, qq, ii, oo, dd, ll = x[:6]
    m = _mask(ii, ci, chunk, block_size, seg, None if seg is None else x[6])
    kg, vg = _gather(kb, ii), _gather(vb, ii)
    p = jnp.exp(_scores(qq, kg, m, scale) - ll[..., None, None])             # [B,Hkv,C,G,n,Bk]
    dp = jnp.einsum("bgchd,bgcnkd->bgchnk", dd, vg, preferred_element_type=F32)
    delta = jnp.sum(dd.astype(F32) * oo.astype(F32), axis=-1)[..., None, None]
    ds = p * (dp - delta) * scale
    dq = jnp.einsum("bgchnk,bgcnkd->bgchd", ds, kg, preferred_element_type=F32)
    dkg = jnp.einsum("bgchnk,bgchd->bgcnkd", ds, qq, preferred_element_type=F32)
    dvg = jnp.einsum("bgchnk,bgchd->bgcnkd", p, dd, preferred_element_type=F32)
    tgt = jnp.where(ii >= 0, ii, nb)                                  # invalid -> dropped
    add = jax.vmap(jax.vmap(lambda acc, i, u: acc.at[i].add(u, mode="drop")))
    return (add(dk, tgt, dkg), add(dv, tgt, dvg)), dq

  zeros = jnp.zeros(kb.shape, F32)
  xs = (jnp.arange(qc.shape[0]), qc, idx, oc, doc, lse) + (() if seg is None else (seg[0],))
  (dk, dv), dq = jax.lax.scan(body, (zeros, zeros), xs)
  dq = dq.transpose(1, 0, 3, 2, 4, 5).reshape(b, -1, hq, d)[:, :t].astype(q.dtype)
  unblock = lambda x: x.transpose(0, 2, 3, 1, 4).reshape(b, -1, k.shape[2], d)[:, :t]
  return dq, unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, block_idx, segment_ids, block_size, chunk):
  return _forward(q, k, v, block_idx, segment_ids, block_size, chunk)[0]


def _attention_fwd(q, k, v, block_idx, segment_ids, block_size, chunk):
  o, lse = _forward(q, k, v, block_idx, segment_ids, block_size, chunk)
  return o, (q, k, v, block_idx, segment_ids, o, lse)


def _attention_bwd(block_size, chunk, res, do):
  q, k, v, block_idx, segment_ids, o, lse = res
  dq, dk, dv = _backward(q, k, v, block_idx, segment_ids, o, lse, do, block_size, chunk)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(q, k, v, block_idx, *, block_size, segment_ids=None, chunk=16):
  """Causal softmax attention of each query over its listed key blocks (-1 entries ignored).

  q [B, T, Hq, D]; k, v [B, T, Hkv, D]; block_idx int32 [B, Hkv, T, n] (no repeated ids in a row).
  """
  chunk = max(1, min(chunk, q.shape[1]))
  block_idx = jax.lax.stop_gradient(block_idx)
  return _attention(q, k, v, block_idx, segment_ids, block_size, chunk)
