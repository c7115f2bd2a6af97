"""Conversion toy benchmark (minicpm_jax.convert on the 12-layer tiny teacher of pretrain-tiny-teacher.yaml).

Tables:

1. throughput: tokens/s of the stage-1 (align, MSE) and stage-2 (KL) train steps of the 25%-softmax
   hybrid vs plain LM training of the same hybrid (median of ``--steps`` jitted steps after one
   compile step, stepped round-robin so machine noise hits them alike; random tokens, unpacked rows);
2. the toy demonstration, every model on the same corpus (the recipe's data) and one held-out measure
   (``perplexity`` eval task on configs/recipes/data/synthetic-eval.jsonl; loss = log perplexity =
   mean NLL per token), plus passkey retrieval (one-digit keys, 64-512 tokens), MQAR (kv_recall
   format, 1 query) and copy / passkey exact match:
   the teacher; the converted hybrid (the recipe, layers selected by the CS/RT proxies); the same hybrid
   architecture trained from scratch (LM loss) on the same number of tokens as the conversion stages;
   an "all-Lightning" conversion (only layer 0 softmax: at least one softmax layer is required); and
   a conversion with a seeded random choice of the selected (non-forced) softmax layers;
3. cost: conversion tokens vs the tokens the from-scratch run needs to reach the converted hybrid's
   held-out loss (from its eval-loss curve).

Conversions are resumable: a rerun with the same ``--out`` reuses finished stages.

    python benchmarks/convert.py                  # ~20 min on 2 CPU cores, after the teacher recipe
    python benchmarks/convert.py --quick          # few steps, smoke test
    python benchmarks/convert.py --set stages.distill.train.steps=300   # any recipe override, repeatable
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console

from minicpm_jax.ckpt import load_any
from minicpm_jax.config.loading import build_config
from minicpm_jax.convert import alignment_loss, kl_loss, load_convert_recipe, run_conversion, transfer
from minicpm_jax.convert.pipeline import lightning_patterns
from minicpm_jax.convert.recipe import stage_config, stage_tokens
from minicpm_jax.convert.select import candidate_layers
from minicpm_jax.convert.transfer import LIGHTNING, SOFTMAX
from minicpm_jax.data.tokenizer import load_tokenizer
from minicpm_jax.eval import evaluate
from minicpm_jax.sharding import make_mesh
from minicpm_jax.train.loop import pretrain_loss, run_training
from minicpm_jax.train.metrics import read_metrics
from minicpm_jax.train.state import create_trainer

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = str(ROOT / "configs/recipes/data/synthetic-eval.jsonl")
PPL = {"task": "perplexity", "paths": [HELD_OUT], "max_length": 128, "stride": 64}


PASSKEY_LENGTHS = (64, 128, 256, 512)  # the teacher trained on 128-token rows


def eval_tasks(mqar_samples: int, copy_examples: int, passkey_samples: int) -> dict:
    """seed 123 for passkey: not the examples the selection proxy (seed 0) scored."""
    passkey = {"task": "passkey", "lengths": list(PASSKEY_LENGTHS), "depths": [0.0, 0.5, 1.0], "key_length": 1}
    return {
        "ppl": PPL,
        "passkey": passkey | {"num_samples": passkey_samples, "seed": 123},
        "mqar": {"task": "mqar", "num_pairs": [3, 4, 6], "num_queries": 1, "num_samples": mqar_samples},
        "copy": {"task": "exact_match", "dataset": "copy", "num_examples": copy_examples},
    }


def scores(model, tasks: dict, tokenizer) -> dict:
    """Held-out loss (log perplexity), passkey accuracy (mean and per length), MQAR accuracy (mean and per
    pair count) and copy/passkey exact match."""
    res = evaluate(model, tasks, tokenizer=tokenizer, batch_size=16, seed=0)
    mqar = res["mqar"]["metrics"]
    out = {"loss": math.log(res["ppl"]["metrics"]["perplexity"]), "mqar": mqar["acc"]}
    out |= {"passkey": res["passkey"]["metrics"]["acc"]}
    out |= {f"passkey_{n}": res["passkey"]["metrics"][f"acc_len_{n}"] for n in PASSKEY_LENGTHS}
    out |= {f"mqar_{k.rsplit('_', 1)[1]}": v for k, v in mqar.items() if k.startswith("acc_")}
    return out | {"copy_em": res["copy"]["metrics"]["exact_match"]}


def random_rows(vocab: int, batch: int, seq_len: int) -> dict:
    ids = np.random.default_rng(0).integers(3, vocab, (batch, seq_len + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((batch, seq_len), np.float32)}


def throughput(recipe, teacher, mixer_types, steps: int) -> list[dict]:
    """Tokens/s of the align, KL and LM train steps of the hybrid ``mixer_types`` (one device)."""
    cfg_h, _ = transfer(teacher, mixer_types)
    mesh = make_mesh(recipe.mesh.model_copy(update={"fsdp": -1}), jax.devices()[:1])
    stages = {s.loss: s for s in recipe.stages}
    runs = []
    for name, loss in (("align (stage 1, MSE)", "align"), ("KL (stage 2)", "kl"), ("LM pretraining", "lm")):
        cfg = stage_config(recipe, stages[loss], cfg_h.model_dump(mode="json"), Path("/tmp"), frozen={}, trainable=[])
        fn = {"align": alignment_loss, "kl": kl_loss, "lm": pretrain_loss(cfg)}[loss]
        trainable = lightning_patterns(cfg_h) if loss != "lm" else None
        _, model = transfer(teacher, mixer_types)
        trainer = create_trainer(cfg, mesh, fn, model, frozen={"teacher": teacher}, trainable=trainable)
        data = random_rows(cfg_h.vocab_size, cfg.train.global_batch_size, cfg.data.seq_len)
        jax.block_until_ready(trainer.step(data))  # compile
        runs.append((name, trainer, data))
    times = [[] for _ in runs]
    for _ in range(steps):
        for (_, trainer, data), t in zip(runs, times):
            start = time.perf_counter()
            jax.block_until_ready((trainer.step(data), trainer.state))
            t.append(time.perf_counter() - start)
    rows = []
    for (name, _, data), t in zip(runs, times):
        sec = statistics.median(t)
        rows.append({"step": name, "step_ms": 1e3 * sec, "tokens_per_s": data["input_ids"].size / sec})
    for row in rows:
        row["vs_lm"] = row["tokens_per_s"] / rows[-1]["tokens_per_s"]
    return rows


def convert(args, name: str, overrides=(), console=None) -> tuple[dict, object]:
    recipe = load_convert_recipe(
        args.recipe, [f"teacher={args.teacher}", f"output_dir={args.out}/{name}", *args.overrides, *overrides]
    )
    start = time.perf_counter()
    summary = run_conversion(recipe, console)
    summary["seconds"] = time.perf_counter() - start
    return summary, recipe


def from_scratch(args, recipe, model_cfg, tokens: int, console) -> tuple[list[tuple[int, float]], float]:
    """LM training of ``model_cfg`` from scratch on ``tokens`` tokens of the recipe's data; the held-out
    loss curve ``[(tokens, loss)]`` (perplexity task every tenth of the run) and the wall seconds."""
    batch, seq_len = recipe.train["global_batch_size"], recipe.data["seq_len"]
    steps = tokens // (batch * seq_len)
    out = Path(args.out) / "scratch"
    raw = {
        "model": model_cfg.model_dump(mode="json"),
        "mesh": recipe.mesh.model_dump(),
        "dtype": recipe.dtype,
        "seed": recipe.seed,
        "data": recipe.data,
        "optimizer": {
            "learning_rate": 0.01,
            "schedule": "wsd_exp",
            "warmup_steps": steps // 20,
            "decay_steps": steps // 5,
            "min_lr_ratio": 0.05,
            "weight_decay": 0.1,
            "clip_norm": 1.0,
        },
        "train": {
            "steps": steps,
            "global_batch_size": batch,
            "output_dir": str(out),
            "log_every": 20,
            "checkpoint_every": steps,
            "eval_every": max(1, steps // 10),
            "eval_tasks": {"ppl": PPL},
        },
    }
    start = time.perf_counter()
    if not (out / "final").exists():
        run_training(build_config(raw), console=console)
    seconds = time.perf_counter() - start
    curve = [
        (r["step"] * batch * seq_len, math.log(r["eval/ppl/perplexity"]))
        for r in read_metrics(out)
        if "eval/ppl/perplexity" in r
    ]
    return curve, seconds


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "configs/recipes/convert-tiny.yaml"))
    p.add_argument("--teacher", default="runs/pretrain-tiny-teacher/final")
    p.add_argument("--out", default="runs/bench-convert")
    p.add_argument("--steps", type=int, default=10, help="timed steps per throughput configuration")
    p.add_argument("--seed", type=int, default=0, help="seed of the random softmax-layer choice")
    p.add_argument("--mqar-samples", type=int, default=64)
    p.add_argument("--copy-examples", type=int, default=32)
    p.add_argument("--passkey-samples", type=int, default=16, help="per length x depth cell")
    p.add_argument("--no-random", action="store_true", help="skip the random-layer conversion")
    p.add_argument("--quick", action="store_true", help="10 steps per stage, few eval samples (smoke test)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/convert_cpu.json"))
    args = p.parse_args()
    args.overrides = list(args.set)
    if args.quick:
        args.overrides += [f"stages.{s}.train.steps=10" for s in ("align", "distill", "continual")]
        mqar = "{task: mqar, metric: acc, num_pairs: [3, 4, 6], num_queries: 1, num_samples: 8}"
        args.overrides.append(f"convert.selection.retrieval=[{mqar}]")
        args.steps, args.mqar_samples, args.copy_examples, args.passkey_samples = 3, 8, 8, 1
        args.out += "-quick"
    console = Console(stderr=True)
    tasks = eval_tasks(args.mqar_samples, args.copy_examples, args.passkey_samples)
    tokenizer = load_tokenizer(None)
    _, teacher = load_any(args.teacher, dtype=jnp.float32, param_dtype=jnp.float32)
    n = teacher.config.num_hidden_layers
    results = {"teacher": args.teacher, "overrides": args.overrides, "devices": str(jax.devices()), "models": {}}
    results["models"]["teacher (dense)"] = scores(teacher, tasks, tokenizer)

    selected, recipe = convert(args, "selected", console=console)
    types = selected["mixer_types"]
    tokens = stage_tokens(recipe)
    selection = json.loads((Path(args.out) / "selected/selection/selection.json").read_text())
    results |= {"mixer_types": types, "selection": selection["rows"], "conversion_tokens": tokens}
    results["models"]["converted (selected)"] = scores(
        load_any(selected["final"], dtype=jnp.float32)[1], tasks, tokenizer
    )
    results["models"]["converted (selected)"]["seconds"] = selected["seconds"]

    forced = [i for i in range(n) if i not in candidate_layers(n, recipe.convert.keep_first_last)]
    chosen = [i for i, k in enumerate(types) if k == SOFTMAX and i not in forced]
    pool = [i for i in candidate_layers(n, recipe.convert.keep_first_last) if i not in chosen]
    picked = sorted(np.random.default_rng(args.seed).choice(pool, size=len(chosen), replace=False).tolist())
    variants = {
        f"converted (random softmax {picked})": [SOFTMAX if i in forced + picked else LIGHTNING for i in range(n)],
        "converted (all-Lightning: layer 0 softmax)": [SOFTMAX] + [LIGHTNING] * (n - 1),
    }
    for label, mixer_types in variants.items():
        name = "random" if label.startswith("converted (random") else "all-lightning"
        if name == "random" and args.no_random:
            continue
        summary, _ = convert(args, name, [f"convert.mixer_types=[{','.join(mixer_types)}]"], console)
        results["models"][label] = scores(load_any(summary["final"], dtype=jnp.float32)[1], tasks, tokenizer)
        results["models"][label]["seconds"] = summary["seconds"]

    final_cfg, _ = load_any(selected["final"], dtype=jnp.float32)
    curve, seconds = from_scratch(args, recipe, final_cfg, tokens, console)
    scratch = load_any(Path(args.out) / "scratch/final", dtype=jnp.float32)[1]
    results["models"]["from scratch (same hybrid, same tokens)"] = scores(scratch, tasks, tokenizer) | {
        "seconds": seconds
    }
    target = results["models"]["converted (selected)"]["loss"]
    reached = next((t for t, loss in curve if loss <= target), None)
    results |= {"scratch_curve": curve, "scratch_tokens_to_converted_loss": reached}

    results["throughput"] = throughput(recipe, teacher, types, args.steps)

    table(
        f"Throughput, hybrid {types.count(SOFTMAX)}/{n} softmax, batch {recipe.train['global_batch_size']} x "
        f"{recipe.data['seq_len']} ({jax.devices()[0].platform})",
        ["train step", "ms/step", "tokens/s", "vs LM"],
        [[r["step"], r["step_ms"], r["tokens_per_s"], r["vs_lm"]] for r in results["throughput"]],
    )
    table(
        "Selection (each candidate converted alone; CS = -bits/byte, RT = the recipe's retrieval proxy)",
        ["layer", "CS", "RT", "score", "softmax"],
        [[r["layer"], r["cs"], r["rt"], r["score"], r["softmax"]] for r in selection["rows"]],
    )
    teacher_loss = results["models"]["teacher (dense)"]["loss"]
    table(
        f"Toy demonstration (conversion stages: {tokens} tokens; mixer_types softmax at "
        f"{[i for i, k in enumerate(types) if k == SOFTMAX]})",
        [
            "model",
            "held-out loss",
            "vs teacher",
            "passkey " + "/".join(map(str, PASSKEY_LENGTHS)),
            "passkey mean",
            "MQAR 3/4/6 pairs",
            "copy/passkey EM",
        ],
        [
            [
                name,
                m["loss"],
                f"{m['loss'] / teacher_loss - 1:+.1%}",
                "/".join(f"{m[f'passkey_{n}']:.2f}" for n in PASSKEY_LENGTHS),
                m["passkey"],
                "/".join(f"{m[f'mqar_{k}']:.2f}" for k in (3, 4, 6)),
                m["copy_em"],
            ]
            for name, m in results["models"].items()
        ],
    )
    first = curve[0][0] if curve else 0
    print(
        f"\nCost: conversion {tokens} tokens (after the teacher); from scratch reaches the converted loss "
        f"{target:.4f} "
        + (f"at {reached} tokens" if reached else f"not within {tokens} tokens")
        + f" (curve every {first} tokens: "
        + ", ".join(f"{loss:.3f}" for _, loss in curve)
        + ")"
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nsaved {args.json}")


if __name__ == "__main__":
    main()
