"""Compile time of the real train step with and without ``train.scan_layers``, from abstract shapes.

For each model preset the step of ``minicpm-jax train`` (loss, grads, AdamW update; remat ``full``)
is lowered and compiled by ``minicpm_jax.train.plan`` (``nnx.eval_shape``: no weights allocated) on
a one-device mesh, once with the Python layer loop and once with scanned layers. Printed per model:
lower + compile wall seconds and their ratio scan / loop, process CPU seconds, and XLA's per-device
temp bytes (the stacked compute-dtype copy of the layer parameters a scan adds shows up here). Results go to ``benchmarks/results/compile_time.json``.

    python benchmarks/compile_time.py [--models minicpm4-0.5b minicpm4-8b] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax

from minicpm_jax.config import MeshConfig, load_config
from minicpm_jax.train.plan import plan_train_memory

OUT = Path(__file__).parent / "results" / "compile_time.json"


def measure(preset: str, scan: bool, seq_len: int, remat: str) -> dict:
    overrides = [f"train.scan_layers={str(scan).lower()}", f"train.remat={remat}", "train.global_batch_size=1"]
    cfg = load_config(preset, overrides)
    cpu = time.process_time()
    (row,) = plan_train_memory(cfg, [MeshConfig(fsdp=1)], [1], seq_len)
    return {
        "compile_seconds": row.compile_seconds,
        "cpu_seconds": time.process_time() - cpu,  # all threads, abstract model build included
        "temp_bytes": row.temp_bytes,
        "argument_bytes": row.argument_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minicpm4-0.5b", "minicpm4-8b", "minicpm-sala-9b"])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--remat", default="full", choices=["none", "dots_saveable", "full"])
    args = parser.parse_args()
    rows = []
    head = (
        "model",
        "layers",
        "loop s",
        "scan s",
        "ratio",
        "loop cpu s",
        "scan cpu s",
        "loop temp GiB",
        "scan temp GiB",
    )
    print(f"{head[0]:<18}" + "".join(f"{h:>{len(h) + 3}}" for h in head[1:]))
    for preset in args.models:
        loop, scan = (measure(preset, s, args.seq_len, args.remat) for s in (False, True))
        layers = load_config(preset).model.num_hidden_layers
        rows.append({"model": preset, "layers": layers, "loop": loop, "scan": scan})
        cells = [layers, loop["compile_seconds"], scan["compile_seconds"]]
        cells += [scan["compile_seconds"] / loop["compile_seconds"], loop["cpu_seconds"], scan["cpu_seconds"]]
        cells += [loop["temp_bytes"] / 2**30, scan["temp_bytes"] / 2**30]
        fmt = lambda h, c: f"{c:>{len(h) + 3}}" if isinstance(c, int) else f"{c:>{len(h) + 3}.2f}"
        print(f"{preset:<18}" + "".join(fmt(h, c) for h, c in zip(head[1:], cells)))
    meta = {
        "seq_len": args.seq_len,
        "batch": 1,
        "remat": args.remat,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
