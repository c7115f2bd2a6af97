"""InfLLM v2 benchmark: sparse path (selection + block-sparse attention) vs strong dense attention.

CPU, B=1, Hq=16, Hkv=1, D=64, fp32, the released config (kernel 32/16, block 64, window 2048,
top-k 64 -> 96 blocks). In one run: this machine's fp32 matmul GFLOP/s (the roofline); the
baseline ``baselines.blockwise_attention`` (causal blocks only, GQA folded, blocks of 512) and
``jax.nn.dot_product_attention`` where its ``[Hq, T, T]`` scores fit in ``--max-gib``; the
library's dense path (``dense_causal_attention``), our sparse path and its selection alone. All
forward timings are interleaved (median of ``--repeats``). Forward+backward (``--bwd-lengths``)
compares sparse with the library dense path (the baseline loop has a data-dependent trip count and
no reverse-mode derivative). FLOPs count only causally needed products. Writes JSON.

  python benchmarks/infllm_v2.py                       # 8K, 16K, 32K
  python benchmarks/infllm_v2.py --lengths 32768 65536 --bwd-lengths \
      --out benchmarks/results/infllm_v2_cpu_64k.json  # the 32K -> 64K scaling (long)
  python benchmarks/infllm_v2.py --profile 16384       # adds the sparse part stage by stage
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.baselines import blockwise_attention, matmul_gflops, write_report
from benchmarks.kernel_profile import infllm_sparse_stages, profile_lines
from pallas_kernels.infllm_v2 import InfLLMv2Config, dense_causal_attention, infllm_v2_attention, select_blocks

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def flops(t, hq, d, cfg: InfLLMv2Config):
    """(dense causal, sparse attention, selection) FLOPs counting only causally needed products."""
    i = np.arange(t, dtype=np.int64)
    bs, n, ks, kst = cfg.block_size, cfg.num_selected, cfg.kernel_size, cfg.kernel_stride
    sparse = np.sum((np.minimum(n, i // bs + 1) - 1) * bs + i % bs + 1)
    sel = np.sum(np.maximum(0, (i + 1 - ks) // kst + 1) + np.maximum(0, (i + 1 - 4 * ks) // (4 * kst) + 1))
    return 4 * d * hq * t * (t + 1) // 2, 4 * d * hq * int(sparse), 2 * d * hq * int(sel)


def compiled(fn, args):
    """AOT-compiled fn, compile seconds and XLA's peak estimate (arguments + outputs + temps)."""
    t0 = time.perf_counter()
    c = jax.jit(fn).lower(*args).compile()
    m = c.memory_analysis()
    peak = None if m is None else int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    return c, time.perf_counter() - t0, peak


def interleaved(fns, args, repeats):
    """{name: median seconds}: one warm-up call each, then the fns take turns."""
    times = {n: [] for n in fns}
    for f in fns.values():
        jax.block_until_ready(f(*args))
    for _ in range(repeats):
        for n, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(x) for n, x in times.items()}


def with_grad(fn):
    """Gradient of ``sum(fn(q, k, v))`` w.r.t. q, k, v (also used by benchmarks/accel.py)."""
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), (0, 1, 2))


def measure(names_fns, args, repeats, row, suffix):
    fns = {}
    for name, fn in names_fns.items():
        fns[name], row[f"{name}_{suffix}_compile_s"], row[f"{name}_{suffix}_peak_bytes"] = compiled(fn, args)
    for name, s in interleaved(fns, args, repeats).items():
        row[f"{name}_{suffix}_s"] = s
        print(f"  T={row['T']} {name} {suffix} {s:.3f}s", flush=True)


def run(args, roofline):
    cfg = InfLLMv2Config(dense_len=-1)
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    sparse = functools.partial(infllm_v2_attention, config=cfg, implementation="xla")
    fwd = {
        "baseline": blockwise_attention,
        "dense": dense_causal_attention,
        "sparse": lambda q, k, v: sparse(q, k, v),
        "selection": lambda q, k, v: select_blocks(q, k, cfg),
    }
    rows = []
    for t in args.lengths:
        key = jax.random.split(jax.random.key(t), 3)
        q = jax.random.normal(key[0], (1, t, hq, d), jnp.float32)
        k, v = (jax.random.normal(kk, (1, t, hkv, d), jnp.float32) for kk in key[1:3])
        f_dense, f_attn, f_sel = flops(t, hq, d, cfg)
        row = {"T": t, "flop_limit": f_dense / (f_attn + f_sel), "dense_gflop": f_dense / 1e9}
        row |= {"sparse_gflop": (f_attn + f_sel) / 1e9, "selection_gflop": f_sel / 1e9}
        cases = dict(fwd)
        if 2 * hq * t * t * 4 <= args.max_gib * 2**30:  # scores + probabilities
            cases["dot_product_attention"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
        measure(cases, (q, k, v), args.repeats, row, "fwd")
        if t in args.bwd_lengths:
            grads = {"dense": with_grad(dense_causal_attention), "sparse": with_grad(fwd["sparse"])}
            measure(grads, (q, k, v), args.repeats, row, "fwdbwd")
            row["speedup_fwdbwd"] = row["dense_fwdbwd_s"] / row["sparse_fwdbwd_s"]
        row["speedup_fwd"] = row["baseline_fwd_s"] / row["sparse_fwd_s"]
        row["dense_vs_baseline"] = row["baseline_fwd_s"] / row["dense_fwd_s"]
        row["selection_share"] = row["selection_fwd_s"] / row["sparse_fwd_s"]
        pct = lambda gflop, s: 100 * gflop / s / roofline
        row["roofline_pct"] = {
            "baseline": pct(row["dense_gflop"], row["baseline_fwd_s"]),
            "dense": pct(row["dense_gflop"], row["dense_fwd_s"]),
            "sparse": pct(row["sparse_gflop"], row["sparse_fwd_s"]),
        }
        rows.append(row)
    return rows


def table(rows, roofline):
    sec = lambda r, n: f"{r[n]:.2f}" if n in r else "-"
    lines = [
        f"roofline (fp32 matmul, measured in this run): {roofline:.0f} GFLOP/s",
        "",
        (
            "| T | baseline fwd (s) | dot_product_attention | ours dense | ours sparse | selection share "
            "| sparse vs baseline | FLOP limit | % roofline baseline / dense / sparse | dense vs baseline "
            "| fwd+bwd dense / sparse (s) | fwd+bwd speedup |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["roofline_pct"]
        fb = f"{r['speedup_fwdbwd']:.2f}x" if "speedup_fwdbwd" in r else "-"
        lines.append(
            f"| {r['T']} | {r['baseline_fwd_s']:.2f} | {sec(r, 'dot_product_attention_fwd_s')} | "
            f"{r['dense_fwd_s']:.2f} | {r['sparse_fwd_s']:.2f} | {100 * r['selection_share']:.0f}% | "
            f"{r['speedup_fwd']:.2f}x | {r['flop_limit']:.2f}x | {p['baseline']:.0f}% / {p['dense']:.0f}% / "
            f"{p['sparse']:.0f}% | {r['dense_vs_baseline']:.2f}x | {sec(r, 'dense_fwdbwd_s')} / "
            f"{sec(r, 'sparse_fwdbwd_s')} | {fb} |"
        )
    return "\n".join(lines)


def targets(rows):
    """Issue-17 targets from rows with ``T, speedup_fwd, selection_share`` (and, from this script,
    ``dense_vs_baseline``, ``speedup_fwdbwd``, ``sparse_*``; benchmarks/accel.py passes the first)."""
    by = {r["T"]: r for r in rows}
    out = {}
    for t, need in ((8192, 0.9), (16384, 1.2), (32768, 2.1)):
        if t in by:
            out[f"sparse vs baseline at {t // 1024}K >= {need}"] = by[t]["speedup_fwd"]
            if "dense_vs_baseline" in by[t]:
                out[f"dense vs baseline at {t // 1024}K >= 1.0"] = by[t]["dense_vs_baseline"]
    if 32768 in by:
        out["selection share at 32K <= 0.25"] = by[32768]["selection_share"]
    if "speedup_fwdbwd" in by.get(16384, {}):
        out["fwd+bwd speedup at 16K >= 1.5"] = by[16384]["speedup_fwdbwd"]
    if "sparse_fwd_s" in by.get(32768, {}) and "sparse_fwd_s" in by.get(65536, {}):
        a, b = by[32768], by[65536]
        out["sparse t(64K)/t(32K)"] = b["sparse_fwd_s"] / a["sparse_fwd_s"]
        out["sparse FLOP(64K)/FLOP(32K)"] = b["sparse_gflop"] / a["sparse_gflop"]
        out["sparse t ratio / FLOP ratio <= 2.5"] = out["sparse t(64K)/t(32K)"] / out["sparse FLOP(64K)/FLOP(32K)"]
    return out


def profile_sparse(t, args):
    """``kernel_profile.infllm_sparse_stages`` on this script's shapes at length ``t``."""
    key = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(key[0], (1, t, args.heads, args.head_dim), jnp.float32)
    k, v = (jax.random.normal(kk, (1, t, args.kv_heads, args.head_dim), jnp.float32) for kk in key[1:3])
    return infllm_sparse_stages(q, k, v, InfLLMv2Config(dense_len=-1), repeats=args.repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--bwd-lengths", type=int, nargs="*", default=[8192, 16384])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-gib", type=float, default=6.0, help="run dot_product_attention only below this")
    p.add_argument("--out", default=os.path.join(RESULTS, "infllm_v2_cpu.json"))
    p.add_argument("--profile", type=int, nargs="*", default=[], help="lengths to profile the sparse part at")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    roofline = matmul_gflops()
    rows = run(args, roofline)
    profiles = {t: profile_sparse(t, args) for t in args.profile}
    roof_end = matmul_gflops()
    result = {
        "machine": {
            "processor": platform.machine(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "load_average": os.getloadavg(),
        },
        "args": vars(args),
        "roofline_gflops": {"start": roofline, "end": roof_end},
        "rows": rows,
        "targets": targets(rows),
        "profiles": profiles,
        "total_s": time.perf_counter() - t0,
    }
    text = table(rows, roofline)
    if profiles:
        text += "\n" + "\n".join(profile_lines("Sparse part, stage by stage (kernel_profile.py):", profiles))
    write_report(result, args.out, text, roof_end)
    print(f"({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
