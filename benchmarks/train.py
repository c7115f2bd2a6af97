"""Training throughput benchmark: tokens/s and MFU of the train step, remat none/full x micro-batches 1/4,
plus compile time; optionally the compiled-memory plan of a large model (``--plan``).

MFU uses analytic FLOPs (``minicpm_jax.train.flops``) over the device peak: the datasheet bf16 peak on
a known accelerator, or on CPU the FLOP/s of a large fp32 matmul measured in the same run.

    python benchmarks/train.py                                  # CPU table (tiny + ~50M model)
    python benchmarks/train.py --presets minicpm4-0.5b --seq-len 4096 --batch 8 --dtype bfloat16  # GPU/TPU
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train.py --plan minicpm4-8b
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.config import MeshConfig, load_config
from minicpm_jax.info import human_bytes, human_count
from minicpm_jax.model import param_count
from minicpm_jax.sharding import make_mesh
from minicpm_jax.train.flops import peak_flops_per_device, train_flops_per_token
from minicpm_jax.train.loss import next_token_loss
from minicpm_jax.train.plan import plan_train_memory
from minicpm_jax.train.state import create_trainer

SMALL_50M = [
    "model.hidden_size=512",
    "model.num_hidden_layers=8",
    "model.num_attention_heads=8",
    "model.num_key_value_heads=2",
    "model.intermediate_size=2048",
    "model.vocab_size=32000",
    "model.dim_model_base=256",
    "model.rope_scaling=null",
]
MODELS = {"tiny": ("tiny-minicpm4", []), "small-50M": ("tiny-minicpm4", SMALL_50M)}


def measured_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large fp32 matmul on this device (CPU peak proxy)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def bench(name, preset, overrides, *, remat, micro, batch, seq_len, steps, dtype, peak):
    cfg = load_config(
        preset,
        [
            *overrides,
            f"train.remat={remat}",
            f"train.micro_batches={micro}",
            f"dtype={dtype}",
            f"train.steps={steps + 1}",
            "optimizer.warmup_steps=0",
            "optimizer.decay_steps=0",
        ],
    )
    mesh = make_mesh(MeshConfig(fsdp=-1), jax.devices()[:1])
    trainer = create_trainer(cfg, mesh, functools.partial(next_token_loss, remat=remat, chunk_size=1024))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.model.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    data = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((batch, seq_len), np.float32)}
    start = time.perf_counter()
    state, m = trainer.train_step(trainer.state, data)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, m = trainer.train_step(state, data)
    jax.block_until_ready(m["loss"])
    tokens_s = steps * batch * seq_len / (time.perf_counter() - start)
    mfu = tokens_s * train_flops_per_token(cfg.model, seq_len) / peak
    return {
        "model": name,
        "params": param_count(cfg.model),
        "remat": remat,
        "micro_batches": micro,
        "tokens_per_s": tokens_s,
        "mfu": mfu,
        "compile_s": compile_s,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="*", default=None, help="presets instead of the built-in tiny/50M pair")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--plan", default=None, help="also print the compiled-memory plan of this preset")
    parser.add_argument("--output", default="benchmarks/results/train.json")
    args = parser.parse_args()
    peak = peak_flops_per_device()
    peak_source = "datasheet bf16 peak"
    if peak is None:
        peak, peak_source = measured_matmul_flops(), "measured fp32 2048^3 matmul"
    models = {p: (p, []) for p in args.presets} if args.presets else MODELS
    rows = [
        bench(
            name,
            preset,
            ov,
            remat=remat,
            micro=micro,
            batch=args.batch,
            seq_len=args.seq_len,
            steps=args.steps,
            dtype=args.dtype,
            peak=peak,
        )
        for name, (preset, ov) in models.items()
        for remat in ("none", "full")
        for micro in (1, 4)
    ]
    print(
        f"device {jax.devices()[0].device_kind}; peak {peak / 1e9:.1f} GFLOP/s ({peak_source}); "
        f"batch {args.batch} x {args.seq_len}, {args.dtype}"
    )
    print("| model | params | remat | micro-batches | tokens/s | vs none,1 | MFU | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["remat"] == "none" and b["micro_batches"] == 1)
        print(
            f"| {r['model']} | {human_count(r['params'])} | {r['remat']} | {r['micro_batches']} | "
            f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['mfu']:.1%} | "
            f"{r['compile_s']:.1f} |"
        )
    result = {"device": jax.devices()[0].device_kind, "peak_flops": peak, "peak_source": peak_source, "rows": rows}
    if args.plan:
        cfg = load_config(args.plan, ["train.remat=full", "dtype=bfloat16"])
        plan = plan_train_memory(cfg, [MeshConfig(fsdp=8), MeshConfig(fsdp=4, tensor=2)], [8], 4096)
        print(f"\n{args.plan} train step, remat full, bf16 compute, per device (XLA memory_analysis):")
        print("| mesh | batch x seq | resident | temp | total | compile s |\n|---|---|---|---|---|---|")
        for p in plan:
            mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1)
            print(
                f"| {mesh} | {p.batch_size} x {p.seq_len} | {human_bytes(p.argument_bytes)} | "
                f"{human_bytes(p.temp_bytes)} | {human_bytes(p.total_bytes)} | {p.compile_seconds:.0f} |"
            )
        result["plan"] = [dict(p.__dict__, total_bytes=p.total_bytes) for p in plan]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
