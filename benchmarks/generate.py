"""Generation speed: the hybrid vs dense decode table (default), or ``--vs-transformers``.

**Hybrid vs dense** (default): decode speed vs context, tiny all-dense model vs tiny SALA-pattern
hybrid, and cache bytes per sequence.

Both models are ``benchmarks/hybrid.py``'s: SALA's 32-layer map (8 InfLLM v2 NoPE layers with the
9B's sparse parameters, 24 Lightning layers) at a tiny width, and the same model with every layer
dense softmax attention. For each context length the decode cache is filled with random keys and
values (for InfLLM v2 layers through ``prefill_cache``, which builds the compressed keys), since
decode time does not depend on the values and a CPU prefill of 32K tokens would dominate the run.
The timed unit is the jitted decode loop (``model.decode_step`` + argmax, ``--steps`` tokens in one
``fori_loop``), reported per token; the ratio columns compare the two models in the same run.

**vs transformers** (``--vs-transformers``): ``generate`` against Hugging Face ``transformers``
``LlamaForCausalLM.generate`` (PyTorch CPU) on the same weights: a preset (default MiniCPM4-0.5B) with
random weights in fp32, its ``format="llama"`` export loaded by transformers; random prompts of
``--prompt`` tokens, ``--new-tokens`` greedy tokens, no stop ids. Per batch size the two run
interleaved (``--repeats`` rounds, medians), the generated tokens must be identical (asserted), and the
decode time per token is ``(t(N tokens) - t(1 token)) / (N - 1)``. The weight-streaming bound is the
parameter bytes over the memory bandwidth measured in the same run (the best of several timed sums
over a parameter-sized fp32 array, in XLA and in PyTorch): no decode step can read its weights faster.
The prefill columns time one layer's prompt attention over its KV cache (``cache_attention``, the GQA
group folded into the query rows) against the same layer's MLP, on random activations.

    python benchmarks/generate.py [--contexts 1024 8192 32768] [--batch 1] [--steps 32]
    python benchmarks/generate.py --vs-transformers [--batches 1 8] [--prompt 512] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from baselines import median_time
from flax import nnx
from hybrid import model_configs

from minicpm_jax.config import load_config
from minicpm_jax.generate import generate
from minicpm_jax.interop import save_hf_checkpoint
from minicpm_jax.model import create_model
from minicpm_jax.model.attention import cache_attention
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

    return 1000 * median_time(run, state, cache, repeats=repeats) / steps


def hybrid_vs_dense(args) -> dict:
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
    return {"batch": args.batch, "backend": jax.default_backend(), "rows": rows, "growth": growth}


def bandwidth_bytes_per_s(nbytes: int, repeats: int = 5) -> float:
    """Memory bandwidth: the fastest of ``repeats`` timed sums over an ``nbytes`` fp32 array, XLA and PyTorch."""
    import torch

    x, t = jnp.ones((nbytes // 4,), jnp.float32), torch.ones(nbytes // 4)
    jax_sum = jax.jit(jnp.sum)
    jax_sum(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        for run in (lambda: jax_sum(x).block_until_ready(), lambda: t.sum()):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return nbytes / best


def prefill_layer_ms(model, batch: int, prompt: int, capacity: int, repeats: int) -> tuple[float, float]:
    """``(attention, MLP)`` ms of one layer on a ``prompt``-token prefill: ``cache_attention`` over a
    ``capacity``-slot cache, and the layer's MLP on the same tokens (fp32, random inputs)."""
    cfg, layer = model.config, model.model.layers[0]
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attn_head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, prompt, hq, d))
    k, v = (jax.random.normal(key, (batch, capacity, hkv, d)) for key in keys[1:3])
    positions = jnp.broadcast_to(jnp.arange(prompt), (batch, prompt))
    x = jax.random.normal(keys[3], (batch, prompt, cfg.hidden_size))
    graphdef, state = nnx.split(layer.mlp)
    mlp = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    attention = 1000 * median_time(jax.jit(cache_attention), q, k, v, positions, repeats=repeats)
    return attention, 1000 * median_time(mlp, state, x, repeats=repeats)


def vs_transformers(args) -> dict:
    import torch
    import transformers

    cfg = load_config(args.preset).model
    model = create_model(cfg, dtype=jnp.float32)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(model, cfg, tmp, format="llama", dtype="float32")
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    hf.generation_config = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    n = args.new_tokens

    def ours(ids, new):
        return generate(model, ids.tolist(), max_new_tokens=new).tokens

    def theirs(ids, new):
        with torch.no_grad():
            return hf.generate(torch.as_tensor(ids), max_new_tokens=new).numpy()[:, ids.shape[1] :]

    print(
        f"{args.preset}, fp32, random weights, prompt {args.prompt}, {n} new tokens, greedy, {jax.default_backend()}, "
        f"transformers {transformers.__version__} / torch {torch.__version__}\n"
        "| batch | ours s | transformers s | speedup | ours decode ms/token | transformers decode ms/token "
        "| streaming bound ms | ours / bound | tokens | prefill attention / MLP ms (one layer) |"
        "\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for batch in args.batches:
        ids = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, args.prompt))
        times = {(who, new): [] for who in ("ours", "hf") for new in (1, n)}
        tokens = {}
        for new in (1, n):  # compilation
            ours(ids, new)
        for _ in range(args.repeats):
            for (who, new), ts in times.items():
                start = time.perf_counter()
                tokens[who, new] = (ours if who == "ours" else theirs)(ids, new)
                ts.append(time.perf_counter() - start)
        for new in (1, n):
            np.testing.assert_array_equal(
                tokens["ours", new], tokens["hf", new], err_msg=f"batch {batch}: tokens differ"
            )
        bound_ms = 1000 * param_bytes / bandwidth_bytes_per_s(param_bytes)
        attention_ms, mlp_ms = prefill_layer_ms(model, batch, args.prompt, args.prompt + n, args.repeats)
        t = {key: float(np.median(ts)) for key, ts in times.items()}
        decode = {who: 1000 * (t[who, n] - t[who, 1]) / (n - 1) for who in ("ours", "hf")}
        row = {
            "batch": batch,
            "ours_s": t["ours", n],
            "transformers_s": t["hf", n],
            "speedup": t["hf", n] / t["ours", n],
            "ours_prefill_s": t["ours", 1],
            "transformers_prefill_s": t["hf", 1],
            "ours_decode_ms": decode["ours"],
            "transformers_decode_ms": decode["hf"],
            "bound_ms": bound_ms,
            "ours_over_bound": decode["ours"] / bound_ms,
            "tokens_identical": True,
            "prefill_attention_ms_per_layer": attention_ms,
            "prefill_mlp_ms_per_layer": mlp_ms,
        }
        rows.append(row)
        print(
            f"| {batch} | {row['ours_s']:.2f} | {row['transformers_s']:.2f} | {row['speedup']:.2f}x "
            f"| {decode['ours']:.1f} | {decode['hf']:.1f} | {bound_ms:.1f} | {row['ours_over_bound']:.2f}x | identical "
            f"| {attention_ms:.0f} / {mlp_ms:.0f} |",
            flush=True,
        )
    return {
        "preset": args.preset,
        "prompt": args.prompt,
        "new_tokens": n,
        "repeats": args.repeats,
        "param_bytes": param_bytes,
        "backend": jax.default_backend(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "rows": rows,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, nargs="*", default=[1024, 8192, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vs-transformers", action="store_true", help="ours vs transformers generate (see above)")
    parser.add_argument("--preset", default="minicpm4-0.5b")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--output", help="JSON path (default results/generate.json or results/generate_vs_hf.json)")
    args = parser.parse_args()
    out = vs_transformers(args) if args.vs_transformers else hybrid_vs_dense(args)
    path = Path(args.output or f"benchmarks/results/generate{'_vs_hf' if args.vs_transformers else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
