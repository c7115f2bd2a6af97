"""Temp memory of the MiniCPM4 train step (forward + backward + update) by dense attention implementation.

Compile-only: the real train step (``minicpm_jax.train.plan.plan_train_memory``) is lowered from
abstract shapes and compiled, and XLA's ``memory_analysis().temp_size_in_bytes`` is read; nothing is
allocated or run. The model's dense path (``minicpm_jax.model.attention.dense_attention``) is pointed
at ``causal_attention(..., implementation=...)`` for each column. Prints the table and writes JSON.

    python benchmarks/dense_memory.py                                  # 0.5B, T = 4K..32K, batch 1
    python benchmarks/dense_memory.py --layers 4 --seq-lens 4096,8192  # fewer layers, faster compiles
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

from minicpm_jax.config import MeshConfig, load_config
from minicpm_jax.model import attention
from minicpm_jax.model.dense_attention import causal_attention
from minicpm_jax.train.plan import plan_train_memory

GIB = 2**30
IMPLEMENTATIONS = ("reference", "blockwise")


@contextlib.contextmanager
def dense_attention_as(implementation: str):
    """The model's dense attention goes through ``causal_attention(..., implementation=...)``."""

    def dense(q, k, v, segment_ids, _layer_implementation=None):
        return causal_attention(q, k, v, segment_ids, implementation=implementation)

    with mock.patch.object(attention, "dense_attention", dense):
        yield


def temp_bytes(cfg, seq_len: int, implementation: str) -> int:
    """Per-device temp bytes of the compiled train step, batch 1, one device."""
    with dense_attention_as(implementation):
        (row,) = plan_train_memory(cfg, [MeshConfig(fsdp=1)], [1], seq_len)
    return row.temp_bytes


def table(cfg, seq_lens) -> list[dict]:
    """One row per length: temp bytes of each implementation, plus the two compiles' seconds."""
    rows = []
    for t in seq_lens:
        start = time.perf_counter()
        row = {"seq_len": t, **{impl: temp_bytes(cfg, t, impl) for impl in IMPLEMENTATIONS}}
        row["compile_seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"remat={cfg.train.remat} T={t}: compiled both in {row['compile_seconds']} s", flush=True)
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    """T, GiB of each implementation, each over its first row, and blockwise GiB per 1K added tokens."""
    first = rows[0]
    print(f"\n{title}")
    print(
        f"{'T':>6} | {'reference GiB':>13} | {'blockwise GiB':>13} | {'ref / first':>11} | {'blk / first':>11} | "
        "blk GiB per added 1K tokens"
    )
    for row in rows:
        ref, blk, added = row["reference"], row["blockwise"], (row["seq_len"] - first["seq_len"]) / 1024
        slope = f"{(blk - first['blockwise']) / GIB / added:.3f}" if added else "-"
        print(
            f"{row['seq_len']:>6} | {ref / GIB:>13.2f} | {blk / GIB:>13.2f} | "
            f"{ref / first['reference']:>11.2f} | {blk / first['blockwise']:>11.2f} | {slope}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minicpm4-0.5b", help="model preset")
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers override (faster compiles)")
    parser.add_argument("--seq-lens", default="4096,8192,16384,32768")
    parser.add_argument("--remat", default="dots_saveable,full", help="train.remat settings, one table each")
    parser.add_argument("--out", default="benchmarks/results/dense_memory.json")
    args = parser.parse_args()

    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    tables = {}
    for remat in args.remat.split(","):
        overrides = ["dtype=bfloat16", "param_dtype=float32", f"train.remat={remat}", "train.loss_chunk_size=4096"]
        if args.layers:
            overrides.append(f"model.num_hidden_layers={args.layers}")
        cfg = load_config(args.model, overrides)
        tables[remat] = table(cfg, seq_lens)
    layers = cfg.model.num_hidden_layers
    for remat, rows in tables.items():
        print_table(f"{args.model}, {layers} layers, batch 1, bf16 compute, remat={remat}", rows)
    result = {
        "what": "temp_size_in_bytes of the compiled train step (XLA memory_analysis, compile only, CPU)",
        "command": "python benchmarks/dense_memory.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "num_hidden_layers": layers,
        "batch": 1,
        "dtype": "bfloat16",
        "tables_by_remat": tables,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
