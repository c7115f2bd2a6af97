"""InfLLM v2 benchmark: sparse path (selection + block-sparse attention) vs dense causal attention.

Default: CPU, B=1, Hq=16, Hkv=1, D=64, fp32, the spec's parameters (kernel 32/16, block 64,
window 2048, top-k 64 -> 96 blocks), T in {8K, 16K, 32K, 64K}; forward everywhere, forward+backward
at 8K and 16K. The dense baseline is the memory-safe flash-style jnp attention of the package.
Prints a ratio table with the FLOP-count limit of each ratio and writes JSON.

  python benchmarks/infllm_v2.py                       # 8K, 16K, 32K (~8 min on 2 busy cores)
  python benchmarks/infllm_v2.py --lengths 65536 --dense-max-len 32768 \
      --out benchmarks/results/infllm_v2_cpu_64k.json   # 64K sparse; dense extrapolated (T^2)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp

from pallas_kernels.infllm_v2 import InfLLMv2Config, dense_causal_attention, infllm_v2_attention
from pallas_kernels.infllm_v2 import select_blocks


def flops(t, hq, d, cfg: InfLLMv2Config):
    """(dense causal, sparse attention, selection) FLOPs counting only causally needed products."""
    dense = 4 * d * hq * t * (t + 1) // 2
    bs, n = cfg.block_size, cfg.num_selected
    sparse = sel = 0
    ks, kst = cfg.kernel_size, cfg.kernel_stride
    for i in range(t):  # python loop over 64K is fine (~0.1 s)
        qb = i // bs
        sparse += (min(n, qb + 1) - 1) * bs + i % bs + 1
        sel += max(0, (i + 1 - ks) // kst + 1) + max(0, (i + 1 - 4 * ks) // (4 * kst) + 1)
    return dense, 4 * d * hq * sparse, 2 * d * hq * sel


def timed(fn, args, repeats):
    """Compile ahead of time, then the best of `repeats` runs; also XLA's memory estimate."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
    return best, compile_s, peak


def _dense_reference(path, t):
    """The largest measured dense row below t in a previous result file."""
    with open(path) as f:
        rows = [r for r in json.load(f)["rows"] if r["T"] < t and "dense_extrapolated_from" not in r]
    return max(rows, key=lambda r: r["T"])


def with_grad(fn):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v))

    return jax.grad(loss, (0, 1, 2))


def run(args):
    cfg = InfLLMv2Config(dense_len=-1)
    b, hq, hkv, d = 1, args.heads, args.kv_heads, args.head_dim
    sparse = functools.partial(
        infllm_v2_attention,
        config=cfg,
        implementation=args.implementation,
        interpret=args.implementation.startswith("pallas") and args.interpret,
    )
    sparse_fn = lambda q, k, v: sparse(q, k, v)
    dense_fn = lambda q, k, v: dense_causal_attention(q, k, v)
    select_fn = lambda q, k, v: select_blocks(q, k, cfg)
    rows = []
    for t in args.lengths:
        key = jax.random.split(jax.random.key(t), 3)
        q = jax.random.normal(key[0], (b, t, hq, d), jnp.float32)
        k = jax.random.normal(key[1], (b, t, hkv, d), jnp.float32)
        v = jax.random.normal(key[2], (b, t, hkv, d), jnp.float32)
        f_dense, f_attn, f_sel = flops(t, hq, d, cfg)
        row = dict(
            T=t,
            flop_limit=f_dense / (f_attn + f_sel),
            dense_gflop=f_dense / 1e9,
            sparse_gflop=(f_attn + f_sel) / 1e9,
            selection_gflop=f_sel / 1e9,
        )
        for name, fn in (("sparse", sparse_fn), ("selection", select_fn), ("dense", dense_fn)):
            if name == "dense" and args.dense_max_len and t > args.dense_max_len:
                ref = _dense_reference(args.dense_from, t)
                row["dense_fwd_s"] = ref["dense_fwd_s"] * (t / ref["T"]) ** 2
                row["dense_extrapolated_from"] = dict(file=args.dense_from, T=ref["T"])
                row["dense_fwd_compile_s"] = row["dense_fwd_peak_bytes"] = None
                print(
                    f"  T={t} dense fwd NOT RUN: {row['dense_fwd_s']:.1f}s extrapolated (T^2) from "
                    f"T={ref['T']} in {args.dense_from}",
                    flush=True,
                )
                continue
            s, c, peak = timed(fn, (q, k, v), args.repeats)
            row[f"{name}_fwd_s"], row[f"{name}_fwd_compile_s"], row[f"{name}_fwd_peak_bytes"] = s, c, peak
            print(f"  T={t} {name} fwd {s:.3f}s (compile {c:.1f}s, peak {peak and peak / 2**20:.0f} MiB)", flush=True)
        if t in args.bwd_lengths:
            for name, fn in (("sparse", sparse_fn), ("dense", dense_fn)):
                s, c, peak = timed(with_grad(fn), (q, k, v), args.repeats)
                row[f"{name}_fwdbwd_s"], row[f"{name}_fwdbwd_peak_bytes"] = s, peak
                print(f"  T={t} {name} fwd+bwd {s:.3f}s (compile {c:.1f}s)", flush=True)
        row["speedup_fwd"] = row["dense_fwd_s"] / row["sparse_fwd_s"]
        row["selection_share"] = row["selection_fwd_s"] / row["sparse_fwd_s"]
        if "sparse_fwdbwd_s" in row:
            row["speedup_fwdbwd"] = row["dense_fwdbwd_s"] / row["sparse_fwdbwd_s"]
        rows.append(row)
    return rows


def table(rows):
    mib = lambda x: "-" if x is None else f"{x / 2**20:.0f}"
    lines = [
        "| T | dense fwd (s) | sparse fwd (s) | speedup | FLOP limit | % of limit | selection share "
        "| fwd+bwd speedup | peak MiB dense / sparse |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fb = f"{r['speedup_fwdbwd']:.2f}x" if "speedup_fwdbwd" in r else "-"
        star = "*" if "dense_extrapolated_from" in r else ""
        lines.append(
            f"| {r['T']} | {r['dense_fwd_s']:.2f}{star} | {r['sparse_fwd_s']:.2f} | "
            f"{r['speedup_fwd']:.2f}x{star} | {r['flop_limit']:.2f}x | "
            f"{100 * r['speedup_fwd'] / r['flop_limit']:.0f}% | {100 * r['selection_share']:.0f}% | "
            f"{fb} | {mib(r['dense_fwd_peak_bytes'])} / {mib(r['sparse_fwd_peak_bytes'])} |"
        )
    if any("dense_extrapolated_from" in r for r in rows):
        lines.append(
            "\n\\* dense not run at this length: time extrapolated as T^2 from the longest measured "
            "dense run (see JSON)"
        )
    return "\n".join(lines)


def targets(rows):
    by_t = {r["T"]: r for r in rows}
    out = {}
    if 32768 in by_t:
        out["speedup_32k>=1.8"] = by_t[32768]["speedup_fwd"] >= 1.8
        out["speedup_32k>=80%_of_limit"] = by_t[32768]["speedup_fwd"] >= 0.8 * by_t[32768]["flop_limit"]
    if 65536 in by_t:
        r = by_t[65536]
        measured = "dense_extrapolated_from" not in r  # an extrapolated baseline proves nothing
        out["speedup_64k>=3"] = r["speedup_fwd"] >= 3.0 if measured else None
        out["speedup_64k>=80%_of_limit"] = r["speedup_fwd"] >= 0.8 * r["flop_limit"] if measured else None
        out["selection_share_64k<=35%"] = r["selection_share"] <= 0.35
    if len(rows) >= 2:  # sub-quadratic: peak grows slower than T^2 between the two longest runs
        a, b = rows[-2], rows[-1]
        if a["sparse_fwd_peak_bytes"] and b["sparse_fwd_peak_bytes"]:
            out["sparse_peak_subquadratic"] = (
                b["sparse_fwd_peak_bytes"] / a["sparse_fwd_peak_bytes"] < 0.75 * (b["T"] / a["T"]) ** 2
            )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--bwd-lengths", type=int, nargs="*", default=[8192, 16384])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--implementation", default="xla")
    p.add_argument("--interpret", action="store_true")
    p.add_argument(
        "--dense-max-len",
        type=int,
        default=0,
        help="do not run dense above this T; extrapolate it (T^2) from --dense-from",
    )
    p.add_argument(
        "--dense-from",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "infllm_v2_cpu.json"),
    )
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "infllm_v2_cpu.json")
    )
    args = p.parse_args(argv)
    print(f"backend={jax.default_backend()} devices={jax.devices()}", flush=True)
    t0 = time.perf_counter()
    rows = run(args)
    result = dict(
        backend=jax.default_backend(),
        device=str(jax.devices()[0]),
        machine=platform.machine(),
        cpus=os.cpu_count(),
        jax=jax.__version__,
        args=vars(args),
        rows=rows,
        targets=targets(rows),
        total_s=time.perf_counter() - t0,
    )
    print(table(rows))
    print("targets:", result["targets"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
