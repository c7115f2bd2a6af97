"""Decode speed vs context: tiny all-dense model vs tiny SALA-pattern hybrid, and cache bytes per sequence.

Both models are ``benchmarks/hybrid.py``'s: SALA's 32-layer map (8 InfLLM v2 NoPE layers with the
9B's sparse parameters, 24 Lightning layers) at a tiny width, and the same model with every layer
dense softmax attention. For each context length the decode cache is filled with random keys and
values (for InfLLM v2 layers through ``prefill_cache``, which builds the compressed keys), since
decode time does not depend on the values and a CPU prefill of 32K tokens would dominate the run.
The timed unit is the jitted decode loop (``model.decode_step`` + argmax, ``--steps`` tokens in one
``fori_loop``), reported per token; the ratio columns compare the two models in the same run.

    python benchmarks/generate.py [--contexts 1024 8192 32768] [--batch 1] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hybrid import median_seconds, model_configs

from minicpm_jax.model import create_model
from minicpm_jax.model.cache import KVCache, LightningCache, ModelCache, cache_bytes
from pallas_kernels.infllm_v2 import DecodeCache, prefill_cache


def filled_cache(model, batch: int, length: int, capacity: int) -> ModelCache:
    """A decode cache holding ``length`` random tokens per row."""
    cache = model.init_cache(batch, capacity)
    rng = np.random.default_rng(0)
    rand = lambda shape, scale=1.0: jnp.asarray(rng.standard_normal(shape, np.float32) * scale)
    layers = []
    for layer, c in zip(model.model.layers, cache.layers):
        if isinstance(c, KVCache):
            layers.append(KVCache(rand(c.k.shape), rand(c.v.shape)))
        elif isinstance(c, LightningCache):
            layers.append(LightningCache(rand(c.state.shape, 0.1)))
        else:
            assert isinstance(c, DecodeCache) and c.k_sel is None
            shape = (batch, length) + c.k.shape[2:]
            layers.append(
                prefill_cache(
                    c, rand(shape), rand(shape), config=layer.self_attn.sparse, lengths=jnp.full((batch,), length)
                )
            )
    return ModelCache(jnp.full((batch,), length, jnp.int32), tuple(layers))


def decode_ms_per_token(cfg, batch: int, length: int, steps: int, repeats: int) -> float:
    model = create_model(cfg, dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    cache = filled_cache(model, batch, length, length + steps + 1)

    @jax.jit
    def run(state, cache):
        m = nnx.merge(graphdef, state)

        def body(_, carry):
            token, cache = carry
            logits, cache = m.decode_step(token, cache)
            return logits.argmax(-1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, steps, body, (jnp.zeros((batch,), jnp.int32), cache))[0]

    return 1000 * median_seconds(run, state, cache, repeats=repeats) / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, nargs="*", default=[1024, 8192, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/generate.json")
    args = parser.parse_args()
    hybrid, dense = model_configs()
    rows = []
    print(
        f"batch {args.batch}, fp32, {jax.default_backend()}\n"
        "| context | dense ms/token | hybrid ms/token | dense tok/s | hybrid tok/s | hybrid speedup "
        "| dense cache/seq | hybrid cache/seq |\n|---|---|---|---|---|---|---|---|"
    )
    for length in args.contexts:
        d, h = (decode_ms_per_token(c, args.batch, length, args.steps, args.repeats) for c in (dense, hybrid))
        db, hb = (cache_bytes(c, 1, length, jnp.float32) for c in (dense, hybrid))
        rows.append(
            {"context": length, "dense_ms": d, "hybrid_ms": h, "dense_cache_bytes": db, "hybrid_cache_bytes": hb}
        )
        tps = lambda ms: 1000 * args.batch / ms
        print(
            f"| {length} | {d:.2f} | {h:.2f} | {tps(d):.0f} | {tps(h):.0f} | {d / h:.2f}x "
            f"| {db / 2**20:.1f} MiB | {hb / 2**20:.1f} MiB |",
            flush=True,
        )
    first, last = rows[0], rows[-1]
    growth = {k: last[k] / first[k] for k in ("dense_ms", "hybrid_ms")}
    span = last["context"] / first["context"]
    print(
        f"\nper-token time x{growth['dense_ms']:.2f} (dense) and x{growth['hybrid_ms']:.2f} (hybrid) "
        f"for x{span:.0f} context"
    )
    out = {"batch": args.batch, "backend": jax.default_backend(), "rows": rows, "growth": growth}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
