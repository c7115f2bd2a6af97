"""GPU/TPU benchmark: the Pallas Lightning kernel vs chunked ``xla``, ``recurrent`` and dense
causal softmax attention, forward and forward+backward, at the CPU table's shape and at SALA's.

    python benchmarks/lightning_accel.py [--dtype bfloat16] [--lengths 1024 4096 16384 65536]

On TPU the kernel is ``pallas_tpu``, on GPU ``pallas_gpu`` (Mosaic GPU; bf16/fp16 only).
``--interpret`` runs the same code path in Pallas interpret mode on CPU (a smoke test of the
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

from pallas_kernels.lightning import alibi_slopes  # noqa: E402


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
    sys.exit("no GPU/TPU found: run benchmarks/lightning.py for the CPU table "
             "(or pass --interpret for a smoke test)")
  kernel = "pallas_tpu" if backend == "tpu" else "pallas_gpu"
  dtype = jnp.dtype(args.dtype)
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
          speedup = (r["seconds"] and base.get(mode) and r["seconds"] / base[mode]) \
              if "seconds" in r else None
          rows.append({"shape": shape, "T": t, "impl": name, "mode": mode,
                       "time_over_kernel": speedup, **r})
          print(f"{shape:9s} T={t:6d} {name:10s} {mode:8s} "
                f"{r.get('seconds', float('nan')):9.5f}s  x{speedup or float('nan'):6.2f} "
                f"of {kernel}  {r['status']}", flush=True)
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 f"lightning_{backend}{'_interpret' if args.interpret else ''}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"backend": backend, "devices": [str(x) for x in jax.devices()],
               "dtype": args.dtype, "kernel": kernel, "rows": rows}, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
