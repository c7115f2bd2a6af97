"""CPU benchmark: chunked Lightning attention (``xla``) vs a chunked pure-PyTorch simple-GLA.

B=1, H=4, D=64, fp32, SALA decays. In one run: this machine's fp32 matmul GFLOP/s (the roofline),
the PyTorch baseline (``baselines.torch_chunk_gla``, chunk 64; forward, and forward+backward with
torch autograd; checked against our ``reference`` first) and ours, timed interleaved (median of
``--repeats``). FLOPs count only causally needed products of the chunked form: per token and head
``2·D·(C+1)`` intra-chunk plus ``4·D²`` for the state (read and update). Prints the table, writes
JSON to benchmarks/results/.

    python benchmarks/lightning.py                    # 4K, 16K (~2 min on 2 busy cores)
    python benchmarks/lightning.py --long             # adds 64K (the scaling target)
    python benchmarks/lightning.py --profile          # adds the forward stage by stage
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.baselines import matmul_gflops, to_torch, torch_chunk_gla, write_report
from benchmarks.kernel_profile import lightning_stages, profile_lines
from pallas_kernels.lightning import alibi_slopes, lightning_attention

B, H, D, C = 1, 4, 64, 64


def flops(t):
    return B * H * t * (2 * D * (C + 1) + 4 * D * D)


def ours(log_decay):
    fwd = lambda q, k, v: lightning_attention(q, k, v, log_decay, implementation="xla")
    grad = jax.grad(lambda q, k, v, w: jnp.sum(w * fwd(q, k, v)), (0, 1, 2))
    return jax.jit(fwd), jax.jit(grad)


def torch_fwd_bwd(q, k, v, log_decay, w):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    (torch_chunk_gla(q, k, v, log_decay) * w).sum().backward()
    return q.grad, k.grad, v.grad


def interleaved(fns, repeats):
    """{name: median seconds}; one warm-up call each, then the fns take turns."""
    for f in fns.values():
        f()
    times = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(x) for n, x in times.items()}


def pick_torch_threads(log_decay, t=4096):
    """The faster of 1 and all threads for the baseline (on a busy machine 1 thread can win by 3x)."""
    x = torch.randn(B, t, H, D)
    times = {}
    for n in sorted({1, os.cpu_count()}):
        torch.set_num_threads(n)
        with torch.no_grad():
            times[n] = interleaved({"f": lambda: torch_chunk_gla(x, x, x, to_torch(log_decay))}, 3)["f"]
    torch.set_num_threads(min(times, key=times.get))
    return times


def parity(log_decay, t=2048):
    """max |torch - reference| / max |reference| at a short length."""
    q, k, v = (jax.random.normal(kk, (B, t, H, D), jnp.float32) for kk in jax.random.split(jax.random.key(0), 3))
    ref = np.asarray(lightning_attention(q, k, v, log_decay, implementation="reference"))
    got = torch_chunk_gla(*map(to_torch, (q, k, v)), to_torch(log_decay)).numpy()
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def cases(fwd, grad, inputs, tl):
    """The four timed callables of one length: ours and PyTorch, forward and forward+backward."""
    q, k, v, w = inputs
    tq, tk, tv, tw = map(to_torch, inputs)
    return {
        "ours_fwd": lambda: jax.block_until_ready(fwd(q, k, v)),
        "torch_fwd": lambda: torch_chunk_gla(tq, tk, tv, tl),
        "ours_fwdbwd": lambda: jax.block_until_ready(grad(q, k, v, w)),
        "torch_fwdbwd": lambda: torch_fwd_bwd(tq, tk, tv, tl, tw),
    }


def run(args):
    log_decay = -jnp.asarray(alibi_slopes(32)[::8])  # 4 of SALA's slopes, fast to slow
    tl = to_torch(log_decay)
    fwd, grad = ours(log_decay)
    rows = []
    for t in args.lengths:
        inputs = tuple(
            jax.random.normal(kk, (B, t, H, D), jnp.float32) for kk in jax.random.split(jax.random.key(t), 4)
        )
        fns = cases(fwd, grad, inputs, tl)
        with torch.no_grad():
            fwd_only = interleaved({n: f for n, f in fns.items() if n.endswith("_fwd")}, args.repeats)
        row = dict(T=t, gflop_fwd=flops(t) / 1e9, **fwd_only)
        row |= interleaved({n: f for n, f in fns.items() if n.endswith("fwdbwd")}, args.repeats)
        row["ratio_fwd"] = row["torch_fwd"] / row["ours_fwd"]
        row["ratio_fwdbwd"] = row["torch_fwdbwd"] / row["ours_fwdbwd"]
        row["roofline_pct_fwd"] = 100 * flops(t) / row["ours_fwd"] / (args.roofline * 1e9)
        row["torch_roofline_pct_fwd"] = 100 * flops(t) / row["torch_fwd"] / (args.roofline * 1e9)
        if args.profile:
            row["profile"] = lightning_stages(*inputs[:3], log_decay, chunk=C, repeats=args.repeats)
        rows.append(row)
        print({n: round(x, 4) if isinstance(x, float) else x for n, x in row.items()}, flush=True)
    return rows


def targets(rows):
    by = {r["T"]: r for r in rows}
    out = {}
    for t in (16384, 65536):
        if t in by:
            out[f"fwd ratio at {t // 1024}K >= 2"] = by[t]["ratio_fwd"]
            out[f"fwd % of roofline at {t // 1024}K >= 45"] = by[t]["roofline_pct_fwd"]
            out[f"fwd+bwd ratio at {t // 1024}K >= 5"] = by[t]["ratio_fwdbwd"]
    if 16384 in by and 65536 in by:
        for mode in ("fwd", "fwdbwd"):
            out[f"ours {mode}: t(64K)/t(16K) <= 4.5"] = by[65536][f"ours_{mode}"] / by[16384][f"ours_{mode}"]
    return out


def table(rows, roofline):
    lines = [
        f"roofline (fp32 matmul, measured in this run): {roofline:.0f} GFLOP/s",
        "",
        "| T | ours fwd | PyTorch fwd | ratio | % roofline ours / PyTorch | ours fwd+bwd | PyTorch fwd+bwd | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['T']} | {1e3 * r['ours_fwd']:.1f} ms | {1e3 * r['torch_fwd']:.1f} ms | {r['ratio_fwd']:.2f}x | "
            f"{r['roofline_pct_fwd']:.0f}% / {r['torch_roofline_pct_fwd']:.0f}% | {1e3 * r['ours_fwdbwd']:.1f} ms | "
            f"{1e3 * r['torch_fwdbwd']:.1f} ms | {r['ratio_fwdbwd']:.2f}x |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--long", action="store_true", help="also run T=65536")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also time the xla forward stage by stage")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lightning_cpu.json"))
    args = p.parse_args()
    if args.long:
        args.lengths = sorted(set(args.lengths) | {65536})
    log_decay = -jnp.asarray(alibi_slopes(32)[::8])
    threads = pick_torch_threads(log_decay)
    print(f"PyTorch threads: {torch.get_num_threads()} (fwd at T=4096 by threads: {threads})", flush=True)
    err = parity(log_decay)
    print(f"PyTorch baseline vs our reference (T=2048): max rel err {err:.1e}", flush=True)
    args.roofline = matmul_gflops()
    rows = run(args)
    roof_end = matmul_gflops()
    result = {
        "config": {"B": B, "H": H, "D": D, "chunk": C, "dtype": "float32", "torch_threads": torch.get_num_threads()},
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "load_average": os.getloadavg(),
        },
        "roofline_gflops": {"start": args.roofline, "end": roof_end},
        "baseline_parity_rel_err": err,
        "rows": rows,
        "targets": targets(rows),
    }
    text = table(rows, args.roofline)
    if args.profile:
        profiles = {r["T"]: r["profile"] for r in rows}
        text += "\n" + "\n".join(profile_lines("Forward of `xla`, stage by stage (kernel_profile.py):", profiles))
    write_report(result, args.out, text, roof_end)


if __name__ == "__main__":
    main()
