"""GPU/TPU benchmark: the Pallas Lightning kernel vs chunked ``xla``, ``recurrent`` and dense
causal softmax attention, forward and forward+backward, at the CPU table's shape and at SALA's.

    python benchmarks/lightning_accel.py [--dtype bfloat16] [--lengths 1024 4096 16384 65536]

On TPU the kernel is ``pallas_tpu``, on GPU ``pallas_gpu`` (Mosaic GPU; bf16/fp16 only).
It first checks the kernel's forward/backward against ``xla`` on the device. ``--interpret`` runs the same code path in Pallas interpret mode on CPU (a smoke test of the
script, not a measurement). Writes benchmarks/results/lightning_<backend>.json.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lightning import make_fns, measure  # noqa: E402

from pallas_kernels.lightning import alibi_slopes, lightning_attention  # noqa: E402


def check_kernel(kernel, dtype, interpret, t=1000, d=128):
    """On-device parity of the kernel (fwd, final state, VJP) vs ``xla`` in fp32 on the same inputs."""
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (jax.random.normal(kk, (2, t, 4, d), jnp.float32).astype(dtype) for kk in keys[:3])
    s0 = jax.random.normal(keys[3], (2, 4, d, d), jnp.float32)
    ld = -jnp.asarray(alibi_slopes(32)[::8])

    def run(impl, *xs):
        f = lambda *a: lightning_attention(
            *a[:3],
            ld,
            initial_state=a[3],
            return_final_state=True,
            implementation=impl,
            interpret=interpret if impl == kernel else None,
        )
        out, vjp = jax.vjp(f, *xs)
        return out, vjp((jnp.ones_like(out[0]), jnp.ones_like(out[1])))

    got = jax.jit(lambda *a: run(kernel, *a))(q, k, v, s0)
    want = jax.jit(lambda *a: run("xla", *a))(*(x.astype(jnp.float32) for x in (q, k, v)), s0)
    errs = [
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    ]
    names = ["o", "state", "dq", "dk", "dv", "ds0"]
    print(
        f"parity {kernel} vs xla(fp32), {jnp.dtype(dtype).name}: "
        + ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errs)),
        flush=True,
    )
    return dict(zip(names, errs))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--shapes", nargs="+", default=["1x4x64", "1x32x128"], help="BxHxD")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--max-gib", type=float, default=60.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--interpret", action="store_true", help="CPU smoke test of the script")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    backend = jax.default_backend()
    if backend == "cpu" and not args.interpret:
        sys.exit(
            "no GPU/TPU found: run benchmarks/lightning.py for the CPU table (or pass --interpret for a smoke test)"
        )
    kernel = "pallas_tpu" if backend == "tpu" else "pallas_gpu"
    dtype = jnp.dtype(args.dtype)
    try:
        parity = check_kernel(
            kernel, dtype, args.interpret or None, t=200 if args.interpret else 1000, d=64 if args.interpret else 128
        )
    except ValueError as e:  # pallas_gpu rejects float32
        parity = {"error": str(e)}
        print(f"parity check skipped: {e}")
    rows = []
    for shape in args.shapes:
        b, h, d = (int(x) for x in shape.split("x"))
        log_decay = -jnp.asarray(alibi_slopes(32)[:: 32 // h] if h <= 32 else alibi_slopes(h))
        for t in args.lengths:
            keys = jax.random.split(jax.random.PRNGKey(t), 3)
            qkv = [jax.random.normal(kk, (b, t, h, d), jnp.float32).astype(dtype) for kk in keys]
            base = {}
            for name in (kernel, "xla", "recurrent", "dense"):
                for mode, fn in make_fns(name, log_decay, interpret=args.interpret or None).items():
                    r = measure(fn, qkv, args.max_gib * 2**30, args.repeats)
                    if name == kernel and "seconds" in r:
                        base[mode] = r["seconds"]
                    speedup = (
                        (r["seconds"] and base.get(mode) and r["seconds"] / base[mode]) if "seconds" in r else None
                    )
                    rows.append({"shape": shape, "T": t, "impl": name, "mode": mode, "time_over_kernel": speedup, **r})
                    print(
                        f"{shape:9s} T={t:6d} {name:10s} {mode:8s} "
                        f"{r.get('seconds', float('nan')):9.5f}s  x{speedup or float('nan'):6.2f} "
                        f"of {kernel}  {r['status']}",
                        flush=True,
                    )
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"lightning_{backend}{'_interpret' if args.interpret else ''}.json",
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {
                "backend": backend,
                "devices": [str(x) for x in jax.devices()],
                "dtype": args.dtype,
                "kernel": kernel,
                "parity_vs_xla": parity,
                "rows": rows,
            },
            f,
            indent=1,
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
