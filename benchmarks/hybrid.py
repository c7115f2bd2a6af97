"""Hybrid (MiniCPM-SALA pattern) vs all-dense softmax: prefill time, and decode-cache bytes.

Prefill: a tiny-width model with SALA's 32-layer map (8 InfLLM v2 NoPE layers with the spec's
sparse parameters, 24 Lightning layers) against the same model with every layer dense softmax
attention, timing the jitted forward (hidden states, no LM head) at each length. The dense baseline
is the model's plain softmax path (O(T^2) scores); lengths whose score arrays exceed ``--max-gib``
are reported as not run with the estimate. Cache bytes come from ``jax.eval_shape`` of the real
``init_cache`` of ``minicpm-sala-9b`` and ``minicpm4-8b`` (nothing allocated).

    python benchmarks/hybrid.py [--lengths 4096 16384 65536] [--max-gib 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from baselines import median_time

from minicpm_jax.config import load_config
from minicpm_jax.model import create_model
from minicpm_jax.model.cache import cache_bytes

WIDTH = [
    "model.hidden_size=128",
    "model.intermediate_size=256",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.head_dim=32",
    "model.lightning_nh=4",
    "model.lightning_nkv=4",
    "model.lightning_head_dim=32",
    "model.vocab_size=512",
    "dtype=float32",
]


def model_configs():
    """``(hybrid, dense)``: SALA's 32-layer map at ``WIDTH``, and the same model with every layer dense."""
    hybrid = load_config("minicpm-sala-9b", WIDTH).model
    dense = hybrid.model_copy(
        update={"mixer_types": None, "sparse_config": None, "attn_use_rope": True, "attn_use_output_gate": False}
    )
    return hybrid, dense


def prefill_seconds(cfg, length: int, repeats: int) -> float:
    model = create_model(cfg, dtype=jnp.float32)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, length)), jnp.int32)
    return median_time(jax.jit(lambda x: model.hidden_states(x)), ids, repeats=repeats)


def dense_score_gib(cfg, length: int) -> float:
    """Scores + probabilities of one softmax layer, fp32."""
    return 2 * cfg.num_attention_heads * length * length * 4 / 2**30


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="*", default=[4096, 16384, 65536])
    parser.add_argument("--max-gib", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/hybrid.json")
    args = parser.parse_args()
    hybrid, dense = model_configs()
    rows = []
    print("| T | hybrid prefill | all-dense prefill | dense / hybrid |\n|---|---|---|---|")
    for length in args.lengths:
        h = prefill_seconds(hybrid, length, args.repeats)
        need = dense_score_gib(dense, length)
        d = prefill_seconds(dense, length, args.repeats) if need <= args.max_gib else None
        rows.append({"T": length, "hybrid_s": h, "dense_s": d, "dense_score_gib": need})
        dense_cell = f"{d:.2f} s" if d is not None else f"not run (needs ~{need:.0f} GiB)"
        ratio = f"{d / h:.2f}x" if d is not None else "n/a"
        print(f"| {length} | {h:.2f} s | {dense_cell} | {ratio} |", flush=True)
    sala, mc8 = load_config("minicpm-sala-9b").model, load_config("minicpm4-8b").model
    print(
        "\n| tokens | MiniCPM-SALA-9B cache | MiniCPM4-8B cache | 8B / SALA | per-token ratio |\n|---|---|---|---|---|"
    )
    caches = []
    for tokens in (32768, 262144, 1048576):
        s, m = cache_bytes(sala, 1, tokens), cache_bytes(mc8, 1, tokens)
        s2, m2 = cache_bytes(sala, 1, 2 * tokens), cache_bytes(mc8, 1, 2 * tokens)
        per_token = (s2 - s) / (m2 - m)
        caches.append({"tokens": tokens, "sala_bytes": s, "minicpm4_8b_bytes": m, "per_token_ratio": per_token})
        print(f"| {tokens} | {s / 2**30:.2f} GiB | {m / 2**30:.2f} GiB | {m / s:.2f}x | {per_token:.3f} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"prefill": rows, "cache": caches}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
