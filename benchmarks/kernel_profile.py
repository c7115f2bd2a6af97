"""Where the CPU time of the two ``xla`` kernels goes (``--profile`` of lightning.py / infllm_v2.py).

Each stage is jitted and timed on its own (median of ``repeats``), on inputs the earlier stages
produced, so the stage times show what each part costs when XLA runs it alone:

- ``lightning_stages``: one outer-scan step (a segment of chunks) of ``pallas_kernels.lightning.xla``'s
  forward split into layout changes, the per-chunk ``Kᵀ V`` products, the state scan, the ``Q Kᵀ``
  scores and the output products, times the number of steps; next to it the rate XLA and PyTorch
  reach on one batch of the step's ``C×D×D`` matmuls, which bounds the chunked forward from below.
- ``infllm_sparse_stages``: the gathered part of ``pallas_kernels.infllm_v2.xla`` (queries past the
  dense prefix) cut after the K/V gathers, the ``Q Kᵀ`` products, the ``exp`` and the ``P V``
  products; the differences are the stage costs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.baselines import median_time, torch_time
from pallas_kernels.infllm_v2 import InfLLMv2Config, attention_blocks, select_blocks
from pallas_kernels.infllm_v2 import xla as infllm_xla
from pallas_kernels.lightning import xla as lightning_xla
from pallas_kernels.lightning.chunking import num_chunks


def batched_matmul_rates(batch: int, c: int, d: int, repeats: int = 5) -> dict:
    """GFLOP/s of one ``[batch, c, d] x [batch, d, d]`` batched matmul in XLA and in PyTorch (``bmm``)."""
    import torch

    a, b = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(batch, c, d), (batch, d, d)]))
    gflop = 2 * batch * c * d * d / 1e9
    ta, tb = torch.randn(batch, c, d), torch.randn(batch, d, d)
    return {
        "shape": [batch, c, d, d],
        "xla_gflops": gflop / median_time(jax.jit(jnp.matmul), a, b, repeats=repeats),
        "torch_gflops": gflop / torch_time(torch.bmm, ta, tb, repeats=repeats),
    }


def lightning_stage_fns(q, k, v, log_decay, chunk: int = 64) -> dict:
    """``{stage: (fn, args)}`` of one step of the ``xla`` Lightning forward's outer scan (its first
    segment of ``SEGMENT`` chunks; q/k/v ``[B,T,H,D]`` fp32, zero initial state), each on the
    outputs of the stages before it; the last gives the segment's chunk-major output."""
    x = lightning_xla
    b, t, h, d = q.shape
    c = chunk
    s, split, const = x._layout(log_decay, t, c, None, d**-0.5)
    f = {**const, **{name: y[0] for name, y in split.items()}}
    qs, ks, vs = (x._segments(y, c, s)[0] for y in (q, k, v))
    qc, vc, kt = x._to_n(qs, c), x._to_n(vs, c), x._to_n(ks, c, transposed=True)
    u = x._ein("nbhdc,nbhcv->nbhdv", kt * jnp.swapaxes(f["kdec"], -1, -2), vc)
    zero = jnp.zeros((b, h, d, d))
    states = x._scan(u, f["lam"], zero)[0]
    scores = x._ein("nbhcd,nbhde->nbhce", qc, kt) * f["intra"]
    return {
        "layout (into and out of chunk-major)": (
            lambda qs, ks, vs: (x._from_n(x._to_n(qs, c)), x._to_n(vs, c), x._to_n(ks, c, transposed=True)),
            (qs, ks, vs),
        ),
        "K^T V per chunk": (
            lambda kt, vc: x._ein("nbhdc,nbhcv->nbhdv", kt * jnp.swapaxes(f["kdec"], -1, -2), vc),
            (kt, vc),
        ),
        "state scan": (lambda u: x._scan(u, f["lam"], zero)[0], (u,)),
        "Q K^T scores": (lambda qc, kt: x._ein("nbhcd,nbhde->nbhce", qc, kt) * f["intra"], (qc, kt)),
        "P V + Q S outputs": (
            lambda sc, vc, qc, st: (
                x._ein("nbhce,nbhev->nbhcv", sc, vc) + f["qdec"] * x._ein("nbhcd,nbhdv->nbhcv", qc, st)
            ),
            (scores, vc, qc, states),
        ),
    }


def lightning_stages(q, k, v, log_decay, chunk: int = 64, repeats: int = 5) -> dict:
    """Stage seconds of one outer-scan step times the number of steps, the whole forward (the rest
    is the scan's own cost), and the batched-matmul floor: a step's 4 per-chunk products at the
    batched rate XLA reaches here, times the steps."""
    x = lightning_xla
    b, t, h, d = q.shape
    s = x._layout(log_decay, t, chunk, None, d**-0.5)[0]  # chunks per outer-scan step
    steps = -(-num_chunks(t, chunk) // s)
    stages = lightning_stage_fns(q, k, v, log_decay, chunk)
    out = {name: steps * median_time(jax.jit(fn), *args, repeats=repeats) for name, (fn, args) in stages.items()}
    zero = jnp.zeros((b, h, d, d))
    full = lambda q, k, v: x.forward(q, k, v, log_decay, zero, scale=d**-0.5, chunk_size=chunk)[0]
    total = median_time(jax.jit(full), q, k, v, repeats=repeats)
    rates = batched_matmul_rates(s * b * h, chunk, d, repeats)
    floor = steps * 4 * 2 * s * b * h * chunk * d * d / 1e9 / rates["xla_gflops"]
    return {"steps": steps, "stages_s": out, "forward_s": total, "batched_matmul": rates, "matmul_floor_s": floor}


SPARSE_STAGES = ("gather", "scores", "exp", "full")


def _sparse_body(stage, parts_args, scale):
    """The per-chunk body of ``infllm_xla._forward`` stopped after ``stage`` (small reductions of
    the partial work), or all of it (``"full"``: the normalised output)."""

    def body(x):
        ci, qq, ii = x
        c0, chunk, kb, vb, kbt, block_size, shared = parts_args
        parts = infllm_xla._Parts(c0 + ci * chunk, ii, None, None, kb, vb, chunk, block_size, shared, kbt).groups()
        if stage == "gather":
            return sum(jnp.sum(kg) + jnp.sum(vg) for _, kg, vg, _, _, _ in parts)
        v_read = sum(jnp.sum(vg) for _, _, vg, _, _, _ in parts)  # keeps the V gathers in every cut
        ss = [infllm_xla._scores(qq, kg, m, ks, scale) for _, kg, _, m, _, ks in parts]
        if stage == "scores":
            return sum(jnp.max(s) for s in ss) + v_read
        mx = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1) for s in ss])[..., None]
        ps = [jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0)) for s in ss]
        l = sum(jnp.sum(p, axis=-1) for p in ps)
        if stage == "exp":
            return jnp.sum(l) + v_read
        o = sum(
            jnp.einsum(f"bgchn,{spec}d->bgchd", p, vg, preferred_element_type=jnp.float32)
            for p, (_, _, vg, _, spec, _) in zip(ps, parts)
        )
        return o / jnp.where(l > 0, l, 1.0)[..., None]

    return body


def sparse_stage_fns(q, k, v, cfg: InfLLMv2Config, chunk: int = 16):
    """``({stage: jitted fn}, args, q0)`` for the gathered part (queries from ``q0``) of InfLLM v2's
    ``xla`` path on q ``[B,T,Hq,D]``, k/v ``[B,T,Hkv,D]``; the selection is computed here, once.
    ``fns["full"](*args)`` is that part's output in the chunk layout ``[nc, B, Hkv, chunk, G, D]``."""
    t = q.shape[1]
    blocks = attention_blocks(select_blocks(q, k, cfg), jnp.arange(t), cfg, cfg.num_blocks(t))
    n, bs = blocks.shape[-1], cfg.block_size
    shared = (cfg.init_blocks, cfg.local_blocks + (1 if cfg.generation == "B" else 0))
    q0, chunk = min(t, n * bs), math.gcd(chunk, bs)
    qc, kb, vb, idx, _ = infllm_xla._prep(q[:, q0:], k, v, blocks[:, :, q0:], None, bs, chunk, q0)
    kbt = kb.swapaxes(-1, -2).swapaxes(-2, -3)
    parts_args = (q0, chunk, kb, vb, kbt, bs, shared)
    scale = 1.0 / math.sqrt(q.shape[-1])
    fn = lambda stage: jax.jit(
        lambda qc, idx: jax.lax.map(_sparse_body(stage, parts_args, scale), (jnp.arange(qc.shape[0]), qc, idx))
    )
    return {s: fn(s) for s in SPARSE_STAGES}, (qc, idx), q0


def infllm_sparse_stages(q, k, v, cfg: InfLLMv2Config, chunk: int = 16, repeats: int = 2) -> dict:
    """Cumulative seconds after each stage of the gathered sparse part, and their differences."""
    fns, args, q0 = sparse_stage_fns(q, k, v, cfg, chunk)
    cumulative = {s: median_time(fns[s], *args, repeats=repeats) for s in SPARSE_STAGES}
    labels = ["K/V block gathers (read)", "Q K^T products", "exp and max", "P V products"]
    steps = np.diff([0.0] + [cumulative[s] for s in SPARSE_STAGES])
    return {"queries": q.shape[1] - q0, "cumulative_s": cumulative, "stages_s": dict(zip(labels, map(float, steps)))}


def profile_lines(title: str, profiles: dict) -> list[str]:
    """Markdown table of ``{T: profile}`` (from either ``*_stages``): each stage's ms and share of the stage sum."""
    lines = ["", title, "", "| T | stage | ms | share |", "|---|---|---|---|"]
    for t, prof in profiles.items():
        total = sum(prof["stages_s"].values())
        for name, s in prof["stages_s"].items():
            lines.append(f"| {t} | {name} | {1e3 * s:.1f} | {100 * s / total:.0f}% |")
        if "batched_matmul" in prof:
            bm = prof["batched_matmul"]
            lines.append(
                f"| {t} | batched {'x'.join(map(str, bm['shape']))} matmul: XLA / torch.bmm | "
                f"{bm['xla_gflops']:.0f} / {bm['torch_gflops']:.0f} GFLOP/s | - |"
            )
            lines.append(
                f"| {t} | 4 such products per step at XLA's rate (floor) / whole forward | "
                f"{1e3 * prof['matmul_floor_s']:.1f} / {1e3 * prof['forward_s']:.1f} | - |"
            )
    return lines
