"""CPU benchmark: chunked Lightning attention (``xla``) vs ``recurrent`` vs dense causal softmax.

B=1, H=4, D=64, fp32, T in {1K, 4K, 16K, 64K}: forward and forward+backward wall time (median of
a few runs after an untimed first run; one sample when that run takes > 2 s) and XLA's compiled peak-memory estimate (arguments + outputs +
temporaries from ``memory_analysis()``). Cases whose estimate exceeds ``--max-gib`` are not run
and are reported as such. Prints a ratio table and writes JSON to benchmarks/results/.

    python benchmarks/lightning.py [--lengths 1024 4096 16384 65536] [--out PATH]
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.lightning import alibi_slopes, lightning_attention

B, H, D = 1, 4, 64


def make_fns(name, log_decay, interpret=None):
    if name == "dense":

        def fwd(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    else:

        def fwd(q, k, v):
            return lightning_attention(
                q, k, v, log_decay, implementation=name, interpret=interpret if name.startswith("pallas") else None
            )

    def fwd_bwd(q, k, v):
        o, vjp = jax.vjp(fwd, q, k, v)
        return vjp(o)

    return {"fwd": jax.jit(fwd), "fwd+bwd": jax.jit(fwd_bwd)}


def peak_bytes(compiled):
    m = compiled.memory_analysis()
    if m is None:
        return None
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def measure(fn, args, max_bytes, repeats):
    try:
        compiled = fn.lower(*args).compile()
    except ValueError as e:  # e.g. an implementation that rejects this dtype
        return {"status": f"not run: {str(e)[:160]}"}
    peak = peak_bytes(compiled)
    if peak is not None and peak > max_bytes:
        return {"status": f"not run: needs {peak / 2**30:.1f} GiB > limit", "peak_gib": peak / 2**30}
    try:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))  # first run (already compiled)
        times = [time.perf_counter() - t0]
        if times[0] < 2.0:  # slow cases: one sample is enough
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - report OOM / runtime failures in the table
        return {"status": f"failed: {type(e).__name__}: {str(e)[:120]}"}
    return {"status": "ok", "seconds": statistics.median(times), "peak_gib": None if peak is None else peak / 2**30}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--impls", nargs="+", default=["xla", "recurrent", "dense"])
    p.add_argument("--max-gib", type=float, default=6.0, help="skip cases estimated above this")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lightning_cpu.json"))
    args = p.parse_args()
    log_decay = -jnp.asarray(alibi_slopes(32)[::8])  # 4 of SALA's slopes, fast to slow
    rows = []
    for t in args.lengths:
        keys = jax.random.split(jax.random.PRNGKey(t), 3)
        qkv = [jax.random.normal(kk, (B, t, H, D), jnp.float32) for kk in keys]
        for name in args.impls:
            for mode, fn in make_fns(name, log_decay).items():
                r = measure(fn, qkv, args.max_gib * 2**30, args.repeats)
                rows.append({"T": t, "impl": name, "mode": mode, **r})
                print(
                    f"T={t:6d} {name:9s} {mode:8s} {r.get('seconds', float('nan')):9.4f}s "
                    f"peak={r.get('peak_gib') or float('nan'):7.3f} GiB  {r['status']}",
                    flush=True,
                )
    report = summarize(rows, args.lengths)
    print(report["table"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "config": {
                    "B": B,
                    "H": H,
                    "D": D,
                    "dtype": "float32",
                    "backend": jax.default_backend(),
                    "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "jax": jax.__version__,
                },
                "rows": rows,
                "ratios": report["ratios"],
                "targets": report["targets"],
            },
            f,
            indent=1,
        )
    print(f"wrote {args.out}")


def summarize(rows, lengths):
    """Markdown table (time, peak memory, ratios vs ``xla``) and the issue's targets."""
    by = {(r["T"], r["impl"], r["mode"]): r for r in rows}
    sec = {k: r.get("seconds") for k, r in by.items()}
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"

    def cell(t, impl, mode):
        r = by.get((t, impl, mode))
        if r is None:
            return "–"
        if "seconds" not in r:
            return r["status"].replace(" > limit", "") + (" (est.)" if "peak_gib" in r else "")
        return f"{r['seconds']:.4f} s / {r['peak_gib']:.3f} GiB"

    ratios = []
    lines = [
        "| T | mode | xla (time / peak) | recurrent | dense | recurrent/xla | dense/xla |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in lengths:
        for mode in ("fwd", "fwd+bwd"):
            x, rec, den = (sec.get((t, i, mode)) for i in ("xla", "recurrent", "dense"))
            r = {
                "T": t,
                "mode": mode,
                "xla_s": x,
                "recurrent_over_xla": rec / x if rec and x else None,
                "dense_over_xla": den / x if den and x else None,
            }
            ratios.append(r)
            lines.append(
                f"| {t} | {mode} | {cell(t, 'xla', mode)} | {cell(t, 'recurrent', mode)} | "
                f"{cell(t, 'dense', mode)} | {fmt(r['recurrent_over_xla'])} | "
                f"{fmt(r['dense_over_xla'])} |"
            )
    targets = {}
    for mode in ("fwd", "fwd+bwd"):
        a, b = sec.get((65536, "xla", mode)), sec.get((16384, "xla", mode))
        targets[f"xla {mode}: t(64K)/t(16K) <= 4.5"] = a / b if a and b else None
    for r in ratios:
        if r["T"] == 16384:
            targets[f"recurrent/xla {r['mode']} at 16K >= 10"] = r["recurrent_over_xla"]
        if r["T"] >= 4096:
            need = ">= 10" if r["T"] == 65536 else "> 1"
            targets[f"dense/xla {r['mode']} at {r['T']} {need}"] = r["dense_over_xla"]
    lines.append("")
    lines += [f"- {k}: {fmt(v)}" for k, v in targets.items()]
    return {"table": "\n".join(lines), "ratios": ratios, "targets": targets}


if __name__ == "__main__":
    main()
