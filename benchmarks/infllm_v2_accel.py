"""InfLLM v2 benchmark for GPU / TPU: MiniCPM4-8B attention shape, bf16, sparse vs dense.

B=1, Hq=32, Hkv=2, D=128, bf16, the spec's parameters (96 blocks), T in {32K, 64K, 128K}.
Sparse = selection + block-sparse attention with ``implementation="auto"`` (Pallas TPU kernel on
TPU, XLA gather path on GPU; ``--implementation pallas_gpu`` for the Triton kernel). Dense = a fused flash attention of the platform
(``jax.nn.dot_product_attention(implementation="cudnn")`` on GPU, splash attention on TPU),
falling back to the package's flash-style jnp attention. Same table and JSON as the CPU script.

  python benchmarks/infllm_v2_accel.py [--lengths 32768 65536 131072] [--bwd-lengths 32768]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import jax
import jax.numpy as jnp

import infllm_v2 as cpu_bench  # the CPU script: flops, timed, table, targets
from pallas_kernels.infllm_v2 import InfLLMv2Config, dense_causal_attention, infllm_v2_attention
from pallas_kernels.infllm_v2 import select_blocks


def platform_dense():
    """(name, fn) of the best available dense causal attention on this backend."""
    backend = jax.default_backend()
    if backend == "gpu":
        return "cudnn", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if backend == "tpu":
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

        def splash(q, k, v):
            b, t, hq, d = q.shape
            g = hq // k.shape[2]
            mask = sm.MultiHeadMask([sm.CausalMask((t, t))] * hq)
            kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
            qh = q.transpose(0, 2, 1, 3) / jnp.sqrt(d).astype(q.dtype)
            kh = jnp.repeat(k.transpose(0, 2, 1, 3), g, axis=1)
            vh = jnp.repeat(v.transpose(0, 2, 1, 3), g, axis=1)
            return jax.vmap(kernel)(qh, kh, vh).transpose(0, 2, 1, 3)

        return "splash", splash
    return "jnp-flash", dense_causal_attention


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--bwd-lengths", type=int, nargs="*", default=[32768])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--implementation", default="auto", help="auto (pallas_tpu on TPU, xla on GPU), xla, pallas_tpu or pallas_gpu"
    )
    p.add_argument("--out", default=os.path.join(HERE, "results", f"infllm_v2_{jax.default_backend()}.json"))
    args = p.parse_args(argv)
    cfg = InfLLMv2Config(dense_len=-1)
    dense_name, dense_fn = platform_dense()
    sparse_fn = functools.partial(infllm_v2_attention, config=cfg, implementation=args.implementation, interpret=False)
    print(f"backend={jax.default_backend()} devices={jax.devices()} dense={dense_name}", flush=True)
    rows, t0 = [], time.perf_counter()
    for t in args.lengths:
        keys = jax.random.split(jax.random.key(t), 3)
        q = jax.random.normal(keys[0], (1, t, 32, 128), jnp.bfloat16)
        k = jax.random.normal(keys[1], (1, t, 2, 128), jnp.bfloat16)
        v = jax.random.normal(keys[2], (1, t, 2, 128), jnp.bfloat16)
        f_dense, f_attn, f_sel = cpu_bench.flops(t, 32, 128, cfg)
        row = dict(T=t, flop_limit=f_dense / (f_attn + f_sel))
        fns = (
            ("sparse", lambda q, k, v: sparse_fn(q, k, v)),
            ("selection", lambda q, k, v: select_blocks(q, k, cfg)),
            ("dense", dense_fn),
        )
        for name, fn in fns:
            s, c, peak = cpu_bench.timed(fn, (q, k, v), args.repeats)
            row[f"{name}_fwd_s"], row[f"{name}_fwd_peak_bytes"] = s, peak
            print(f"  T={t} {name} fwd {s * 1e3:.1f} ms (compile {c:.1f}s)", flush=True)
        if t in args.bwd_lengths:
            for name, fn in fns[::2]:
                s, _, _ = cpu_bench.timed(cpu_bench.with_grad(fn), (q, k, v), args.repeats)
                row[f"{name}_fwdbwd_s"] = s
            row["speedup_fwdbwd"] = row["dense_fwdbwd_s"] / row["sparse_fwdbwd_s"]
        row["speedup_fwd"] = row["dense_fwd_s"] / row["sparse_fwd_s"]
        row["selection_share"] = row["selection_fwd_s"] / row["sparse_fwd_s"]
        rows.append(row)
    print(cpu_bench.table(rows))
    result = dict(
        backend=jax.default_backend(),
        device=str(jax.devices()[0]),
        dense=dense_name,
        implementation=args.implementation,
        rows=rows,
        targets=cpu_bench.targets(rows),
        total_s=time.perf_counter() - t0,
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print("targets:", result["targets"], "\nwrote", args.out)


if __name__ == "__main__":
    main()
