"""Training throughput benchmark: tokens/s and MFU of the train step.

Tables (each step time is the median of ``--steps`` timed steps after one compile step; the configurations
of a table are stepped round-robin, so machine noise hits them alike and their ratios hold):

1. remat none/full x micro-batches 1/4, plus compile time (tiny + ~50M dense model, unpacked rows);
2. packed rows (``segment_ids`` + per-document ``positions``) at ``--packed-seq-len`` for the dense,
   InfLLM v2 sparse and SALA hybrid tiny presets, with ratios against dense;
3. trainable subset (``model.layers.*.self_attn`` only) vs full training: step time and AdamW bytes;
4. optionally the compiled-memory plan of a large model (``--plan``).

MFU uses analytic FLOPs (``minicpm_jax.train.flops``) over the device peak: the datasheet bf16 peak on
a known accelerator, or on CPU the FLOP/s of a large matmul measured in the same run (the measured
roofline, always printed).

    python benchmarks/train.py                                  # CPU tables (tiny + ~50M model)
    python benchmarks/train.py --presets minicpm4-0.5b --seq-len 4096 --batch 8 --dtype bfloat16  # GPU/TPU
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train.py --plan minicpm4-8b
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from baselines import matmul_gflops

from minicpm_jax.config import MeshConfig, load_config
from minicpm_jax.data.packing import batch_from_segments
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
# packed table: dense first (the baseline); dense-8L is the same-depth baseline of tiny-sala's 8 layers
PACKED = {
    "dense": ("tiny-minicpm4", []),
    "dense-8L": ("tiny-minicpm4", ["model.num_hidden_layers=8"]),
    "sparse": ("tiny-minicpm4-sparse", []),
    "hybrid": ("tiny-sala", []),
}
ATTENTION_ONLY = ("model.layers.*.self_attn",)


def random_rows(cfg, batch: int, seq_len: int, seed: int = 0) -> dict:
    """Unpacked rows of random tokens (one document per row, every target trained)."""
    ids = np.random.default_rng(seed).integers(0, cfg.model.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((batch, seq_len), np.float32)}


def packed_rows(cfg, batch: int, seq_len: int, seed: int = 0) -> dict:
    """Full rows packed with random documents of 8..seq_len tokens (the last one cut at the row end),
    with ``segment_ids`` 1, 2, ... and per-document ``positions``."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.model.vocab_size, (batch, seq_len)).astype(np.int32)
    segments = np.zeros((batch, seq_len), np.int32)
    positions = np.zeros((batch, seq_len), np.int32)
    for row in range(batch):
        start, seg = 0, 1
        while start < seq_len:
            n = min(int(rng.integers(8, seq_len + 1)), seq_len - start)
            segments[row, start : start + n], positions[row, start : start + n] = seg, np.arange(n)
            start, seg = start + n, seg + 1
    return dict(batch_from_segments(tokens, segments, positions, pad_id=0))


@dataclass(frozen=True)
class Spec:
    """One benchmarked configuration."""

    name: str
    preset: str
    overrides: tuple = ()
    remat: str = "none"
    micro: int = 1
    trainable: tuple | None = None


def make_trainer(spec: Spec, *, steps: int, dtype: str):
    """``(cfg, trainer)`` on one device, constant learning rate, next-token loss."""
    cfg = load_config(
        spec.preset,
        [
            *spec.overrides,
            f"train.remat={spec.remat}",
            f"train.micro_batches={spec.micro}",
            f"dtype={dtype}",
            f"train.steps={steps + 1}",
            "optimizer.warmup_steps=0",
            "optimizer.decay_steps=0",
        ],
    )
    mesh = make_mesh(MeshConfig(fsdp=-1), jax.devices()[:1])
    loss = functools.partial(next_token_loss, remat=spec.remat, chunk_size=1024)
    return cfg, create_trainer(cfg, mesh, loss, trainable=spec.trainable)


def timed_step(trainer, data) -> float:
    """Seconds of one ``trainer.step``, blocking on its metrics and the new state."""
    start = time.perf_counter()
    jax.block_until_ready((trainer.step(data), trainer.state))
    return time.perf_counter() - start


def interleaved_medians(runs: list, steps: int) -> list[float]:
    """Median step seconds of each ``(trainer, data)``, stepped round-robin so machine noise hits all alike."""
    times = [[] for _ in runs]
    for _ in range(steps):
        for (trainer, data), t in zip(runs, times):
            t.append(timed_step(trainer, data))
    return [statistics.median(t) for t in times]


def opt_state_bytes(trainer) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(trainer.state["opt_state"]))


def bench(specs: list[Spec], rows_fn, *, batch, seq_len, steps, dtype, peak) -> list[dict]:
    """Measured rows of ``specs`` on ``rows_fn`` batches: throughput, MFU, compile time (compile + first
    step) and optimizer-state size; the timed steps of all specs are interleaved."""
    built = [make_trainer(s, steps=steps, dtype=dtype) for s in specs]
    data = [jax.device_put(rows_fn(cfg, batch, seq_len)) for cfg, _ in built]
    compile_s = [timed_step(trainer, d) for (_, trainer), d in zip(built, data)]
    step_s = interleaved_medians([(trainer, d) for (_, trainer), d in zip(built, data)], steps)
    rows = []
    for spec, (cfg, trainer), d, c, t in zip(specs, built, data, compile_s, step_s):
        flops_s = batch * seq_len / t * train_flops_per_token(cfg.model, seq_len)
        rows.append(
            {
                "model": spec.name,
                "preset": spec.preset,
                "layers": cfg.model.num_hidden_layers,
                "params": param_count(cfg.model),
                "remat": spec.remat,
                "micro_batches": spec.micro,
                "trainable": list(spec.trainable or ["all"]),
                "seq_len": seq_len,
                "step_s": t,
                "tokens_per_s": batch * seq_len / t,
                "loss_token_fraction": float(np.mean(d["loss_mask"])),
                "flops_per_s": flops_s,
                "mfu": flops_s / peak,
                "compile_s": c,
                "opt_state_bytes": opt_state_bytes(trainer),
            }
        )
    return rows


def markdown(rows: list, columns: dict) -> str:
    """A markdown table: one line per row, ``columns`` maps each title to a formatter of a row."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(f(r)) for f in columns.values()) + " |" for r in rows])


def remat_table(models, common) -> list[dict]:
    rows = [
        row
        for name, (preset, ov) in models.items()
        for row in bench(
            [Spec(name, preset, tuple(ov), remat, micro) for remat in ("none", "full") for micro in (1, 4)],
            random_rows,
            **common,
        )
    ]
    base = {r["model"]: r for r in rows if r["remat"] == "none" and r["micro_batches"] == 1}
    columns = {
        "model": lambda r: r["model"],
        "params": lambda r: human_count(r["params"]),
        "remat": lambda r: r["remat"],
        "micro-batches": lambda r: r["micro_batches"],
        "tokens/s": lambda r: f"{r['tokens_per_s']:.0f}",
        "vs none,1": lambda r: f"{r['tokens_per_s'] / base[r['model']]['tokens_per_s']:.2f}",
        "MFU": lambda r: f"{r['mfu']:.1%}",
        "compile s": lambda r: f"{r['compile_s']:.1f}",
    }
    print(markdown(rows, columns))
    return rows


def packed_table(common, roofline: float) -> list[dict]:
    rows = bench([Spec(name, preset, tuple(ov)) for name, (preset, ov) in PACKED.items()], packed_rows, **common)
    dense = rows[0]
    same_depth = {r["layers"]: r for r in rows if r["preset"] == dense["preset"]}
    trained = rows[0]["loss_token_fraction"]
    print(f"\npacked rows: {common['batch']} x {common['seq_len']} tokens, {trained:.0%} of them trained")
    columns = {
        "model": lambda r: r["model"],
        "preset": lambda r: r["preset"],
        "layers": lambda r: r["layers"],
        "params": lambda r: human_count(r["params"]),
        "step ms": lambda r: f"{r['step_s'] * 1e3:.0f}",
        "tokens/s": lambda r: f"{r['tokens_per_s']:.0f}",
        "vs dense": lambda r: f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}",
        "vs dense, same depth": lambda r: f"{r['tokens_per_s'] / same_depth[r['layers']]['tokens_per_s']:.2f}",
        "GFLOP/s": lambda r: f"{r['flops_per_s'] / 1e9:.1f}",
        "of roofline": lambda r: f"{r['flops_per_s'] / roofline:.1%}",
        "MFU": lambda r: f"{r['mfu']:.1%}",
        "compile s": lambda r: f"{r['compile_s']:.1f}",
    }
    print(markdown(rows, columns))
    return rows


def trainable_table(name, preset, overrides, common) -> list[dict]:
    specs = [Spec(name, preset, tuple(overrides), trainable=t) for t in (None, ATTENTION_ONLY)]
    rows = bench(specs, random_rows, **common)
    full = rows[0]
    print(f"\ntrainable subset: {name} ({human_count(full['params'])} params), {common['batch']} x {common['seq_len']}")
    columns = {
        "trained": lambda r: ", ".join(r["trainable"]),
        "step ms": lambda r: f"{r['step_s'] * 1e3:.0f}",
        "vs full": lambda r: f"{r['step_s'] / full['step_s']:.2f}",
        "AdamW state": lambda r: human_bytes(r["opt_state_bytes"]),
        "state vs full": lambda r: f"{r['opt_state_bytes'] / full['opt_state_bytes']:.3f}",
    }
    print(markdown(rows, columns))
    return rows


def plan_table(preset: str) -> list[dict]:
    cfg = load_config(preset, ["train.remat=full", "dtype=bfloat16"])
    plan = plan_train_memory(cfg, [MeshConfig(fsdp=8), MeshConfig(fsdp=4, tensor=2)], [8], 4096)
    print(f"\n{preset} train step, remat full, bf16 compute, per device (XLA memory_analysis):")
    columns = {
        "mesh": lambda p: ",".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1),
        "batch x seq": lambda p: f"{p.batch_size} x {p.seq_len}",
        "resident": lambda p: human_bytes(p.argument_bytes),
        "temp": lambda p: human_bytes(p.temp_bytes),
        "total": lambda p: human_bytes(p.total_bytes),
        "compile s": lambda p: f"{p.compile_seconds:.0f}",
    }
    print(markdown(plan, columns))
    return [dict(p.__dict__, total_bytes=p.total_bytes) for p in plan]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="*", default=None, help="presets instead of the built-in tiny/50M pair")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--packed-seq-len", type=int, default=256, help="above the sparse presets' dense_len 64")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--plan", default=None, help="also print the compiled-memory plan of this preset")
    parser.add_argument("--output", default="benchmarks/results/train.json")
    args = parser.parse_args()
    roofline = matmul_gflops(dtype=args.dtype) * 1e9
    peak, peak_source = peak_flops_per_device(), "datasheet bf16 peak"
    if peak is None:
        peak, peak_source = roofline, f"measured {args.dtype} 2048^3 matmul"
    print(
        f"device {jax.devices()[0].device_kind}; peak {peak / 1e9:.1f} GFLOP/s ({peak_source}); measured matmul "
        f"roofline {roofline / 1e9:.1f} GFLOP/s; batch {args.batch} x {args.seq_len}, {args.dtype}, "
        f"median of {args.steps} steps\n"
    )
    models = {p: (p, []) for p in args.presets} if args.presets else MODELS
    common = {"batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "dtype": args.dtype, "peak": peak}
    result = {
        "device": jax.devices()[0].device_kind,
        "peak_flops": peak,
        "peak_source": peak_source,
        "roofline_flops": roofline,
        "rows": remat_table(models, common),
        "packed": packed_table({**common, "seq_len": args.packed_seq_len}, roofline),
        "trainable": trainable_table("small-50M", *MODELS["small-50M"], common),
    }
    if args.plan:
        result["plan"] = plan_table(args.plan)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
