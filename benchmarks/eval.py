"""lm-evaluation-harness log-likelihood throughput: the ``minicpm-jax`` backend vs lm-eval's ``hf`` backend.

Both read the same checkpoint (a small MiniCPM4 with MiniCPM4's vocabulary and tokenizer, exported to
the Llama layout in float32) on the same devices and score the same ``loglikelihood`` requests (random
word contexts of ``--context-words`` words, one-word continuations) at batch 1 and 8. Tokens/s counts
the tokens each request feeds the model, per wall second and per CPU second of this process (all
threads; other load on a shared machine disturbs it less than wall time). Each run's times are of the
fastest of ``--repeats`` runs after one warm-up run (which compiles every length bucket of the JAX
backend); the backends run round-robin.

    python benchmarks/eval.py                    # CPU table -> benchmarks/results/eval_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from minicpm_jax.config import load_config
from minicpm_jax.eval.harness import MiniCPMLM
from minicpm_jax.interop import save_hf_checkpoint
from minicpm_jax.model import create_model, param_count

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "data" / "minicpm4-tokenizer"
MODEL = [  # 19.8M parameters, 18.8M of them the untied embedding and head of MiniCPM4's vocabulary
    "model.vocab_size=73448",
    "model.hidden_size=128",
    "model.num_attention_heads=8",
    "model.intermediate_size=512",
    "model.num_hidden_layers=4",
    "model.tie_word_embeddings=false",
]


def markdown(rows: list, columns: dict) -> str:
    """A markdown table: one line per row, ``columns`` maps each title to a formatter of a row."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(f(r)) for f in columns.values()) + " |" for r in rows])


def requests(n: int, words: int, seed: int = 0) -> list[Instance]:
    rng = random.Random(seed)
    vocab = ["the", "sun", "is", "warm", "passkey", "copy", "river", "stone", "light", "seven", "north", "blue"]
    pick = lambda k: " ".join(rng.choice(vocab) for _ in range(k))
    return [Instance("loglikelihood", {}, (pick(words), " " + pick(1)), i) for i in range(n)]


def timed(lm, reqs) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of one run of ``reqs``."""
    wall, cpu = time.perf_counter(), time.process_time()
    lm.loglikelihood(reqs, disable_tqdm=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--context-words", type=int, default=96)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (best reported)")
    parser.add_argument("--output", default="benchmarks/results/eval_cpu.json")
    args = parser.parse_args()

    cfg = load_config("tiny-minicpm4", MODEL).model
    reqs = requests(args.requests, args.context_words)
    model = create_model(cfg, seed=0, dtype=jnp.float32)
    params = param_count(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(model, cfg, tmp, format="llama", dtype="float32", tokenizer_dir=TOKENIZER)
        rows = []
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            backends = {
                "minicpm-jax": MiniCPMLM(checkpoint=tmp, batch_size=bs, dtype="float32"),
                "hf": HFLM(pretrained=tmp, dtype="float32", device="cpu", batch_size=bs),
            }
            pairs = [backends["minicpm-jax"]._encode_pair(*r.args) for r in reqs]
            tokens = sum(len(c) + len(x) - 1 for c, x in pairs)
            times = {name: [] for name in backends}
            for name, lm in backends.items():
                timed(lm, reqs)  # warm-up: compiles
            for _ in range(args.repeats):
                for name, lm in backends.items():
                    times[name].append(timed(lm, reqs))
            best = {name: min(t) for name, t in times.items()}  # fastest wall time, and its CPU time
            row = {"batch": bs, "tokens": tokens}
            for key, name in (("jax", "minicpm-jax"), ("hf", "hf")):
                row |= {f"{key}_tok_s": tokens / best[name][0], f"{key}_tok_cpu_s": tokens / best[name][1]}
            rows.append(row)
    columns = {
        "batch": lambda r: r["batch"],
        "tokens/run": lambda r: r["tokens"],
        "minicpm-jax tok/s": lambda r: f"{r['jax_tok_s']:,.0f}",
        "hf tok/s": lambda r: f"{r['hf_tok_s']:,.0f}",
        "ratio": lambda r: f"{r['jax_tok_s'] / r['hf_tok_s']:.2f}x",
        "minicpm-jax tok/CPU-s": lambda r: f"{r['jax_tok_cpu_s']:,.0f}",
        "hf tok/CPU-s": lambda r: f"{r['hf_tok_cpu_s']:,.0f}",
        "CPU ratio": lambda r: f"{r['jax_tok_cpu_s'] / r['hf_tok_cpu_s']:.2f}x",
    }
    print(
        f"loglikelihood throughput, {args.requests} requests, {params / 1e6:.1f}M params, {jax.devices()[0].platform}"
    )
    print(markdown(rows, columns))
    load = os.getloadavg()[0]  # other processes on the machine disturb the times
    print(f"1-minute load average at the end: {load:.2f} on {os.cpu_count()} cores")
    result = {"device": str(jax.devices()[0]), "params": params, "args": vars(args), "rows": rows, "loadavg": load}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
