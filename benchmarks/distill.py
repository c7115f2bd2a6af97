"""On-policy distillation benchmark: where a distillation step spends its time, and what chunking saves.

Tables:

1. time per distillation step split into rollout (generation from the current student, T=1), scoring
   (``distill.scores.score_rollouts``: student recompute + teacher forward, top-k, entropies) and update
   (the engine's train step with ``opd_loss``), with tokens/s of each phase and its share of the step.
   Medians of ``--steps`` timed steps after ``--warmup`` steps (compiles, plus every new prompt-length
   shape the generation engine meets); the phases are timed inside the same steps, so their ratios hold
   under machine noise;
2. XLA ``memory_analysis()`` of the compiled programs from abstract shapes (nothing is allocated) at a
   large vocabulary (default 73448, MiniCPM4's): the engine train step (``plan_train_memory``, as
   ``distill --plan`` does) and the scoring program, with ``rollout.chunk_tokens`` = 64 vs one chunk
   holding every token of the batch (no chunking).

    python benchmarks/distill.py                                    # tiny pair from the toy (or presets)
    python benchmarks/distill.py --student runs/distill-toy/student/final --teacher runs/distill-toy/teacher/final
    python benchmarks/distill.py --skip-timing --vocab 73448 --rows 16 --seq-len 256
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpm_jax.ckpt import config_of, load_any
from minicpm_jax.config.schema import MeshConfig
from minicpm_jax.distill.losses import LossOptions
from minicpm_jax.distill.objective import opd_loss
from minicpm_jax.distill.pipeline import DIAGNOSTIC_K, build_prompts, distill_parts, run_config
from minicpm_jax.distill.plan import rollout_batch_fields
from minicpm_jax.distill.recipe import load_distill_recipe
from minicpm_jax.distill.scores import score_rollouts
from minicpm_jax.eval.loading import tokenizer_of
from minicpm_jax.info import human_bytes
from minicpm_jax.model.factory import abstract_model
from minicpm_jax.sharding import make_mesh
from minicpm_jax.train.frozen import prepare_frozen
from minicpm_jax.train.plan import plan_train_memory
from minicpm_jax.train.sources import global_batch
from minicpm_jax.train.state import create_trainer

RECIPE = "configs/recipes/distill-tiny.yaml"


def markdown(rows: list, columns: dict) -> str:
    """A markdown table: one line per row, ``columns`` maps each title to a formatter of a row."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(f(r)) for f in columns.values()) + " |" for r in rows])


def _sync(tree):
    jax.block_until_ready(tree)
    return tree


def time_steps(args) -> dict:
    """Rollout / scoring / update seconds of ``warmup + steps`` distillation steps of the tiny pair."""
    overrides = [
        f"student={args.student}",
        f"teacher={args.teacher}",
        f"rollout.n={args.n}",
        f"rollout.prompts_per_step={args.prompts_per_step}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"loss.loss={args.loss}",
        f"loss.k={args.k}",
        "output_dir=/tmp/distill-bench",
    ]
    recipe = load_distill_recipe(RECIPE, overrides)
    dtype = jnp.dtype(recipe.dtype)
    mesh = make_mesh(recipe.mesh)
    student_cfg, student = load_any(recipe.student, mesh=mesh, dtype=dtype, param_dtype=dtype)
    _, teacher = load_any(recipe.teacher, mesh=mesh, dtype=dtype, param_dtype=dtype)
    tok = tokenizer_of(recipe.student)
    cfg, source, loss_fn = distill_parts(recipe, build_prompts(recipe, tok), tok, student_cfg)
    ro, options = recipe.rollout, recipe.loss
    trainer = create_trainer(cfg, mesh, loss_fn, student, frozen={"teacher": teacher})
    records = []
    for step in range(1, args.warmup + args.steps + 1):
        t0 = time.perf_counter()
        batch, _ = source.rollout(step, trainer.model())  # host numpy: generation has finished
        t1 = time.perf_counter()
        placed = global_batch(trainer.mesh, batch)
        scores = _sync(
            score_rollouts(
                trainer.graphdef,
                trainer.frozen.graphdef,
                trainer.state["params"],
                trainer.frozen.arrays,
                {"input_ids": placed["input_ids"], "targets": placed["targets"]},
                source.k,
                source.chunk,
            )
        )
        t2 = time.perf_counter()
        metrics = _sync(trainer.step(global_batch(trainer.mesh, {**placed, **scores})))
        t3 = time.perf_counter()
        records.append(
            {
                "step": step,
                "warmup": step <= args.warmup,
                "rollout_s": t1 - t0,
                "scoring_s": t2 - t1,
                "update_s": t3 - t2,
                "generated_tokens": float(batch["loss_mask"].sum()),
                "row_tokens": int(batch["input_ids"].size),
                "loss": float(metrics["loss"]) if "loss" in metrics else None,
            }
        )
    timed = [r for r in records if not r["warmup"]]
    med = {p: statistics.median(r[f"{p}_s"] for r in timed) for p in ("rollout", "scoring", "update")}
    total = sum(med.values())
    gen = statistics.median(r["generated_tokens"] for r in timed)
    row_tokens = timed[0]["row_tokens"]
    phases = [
        {"phase": "rollout (generation, T=1)", "seconds": med["rollout"], "tokens": gen},
        {"phase": "scoring (student + teacher)", "seconds": med["scoring"], "tokens": row_tokens},
        {"phase": "update (engine step)", "seconds": med["update"], "tokens": row_tokens},
        {"phase": "step (sum of medians)", "seconds": total, "tokens": gen},
    ]
    for p in phases:
        p["tokens_per_s"] = p["tokens"] / p["seconds"]
        p["share"] = p["seconds"] / total
    print(
        f"\ndistillation step: {recipe.student} <- {recipe.teacher}; {ro.prompts_per_step} prompts x n={ro.n}, "
        f"max_new_tokens {ro.max_new_tokens}, rows of {row_tokens // source.rows} tokens, loss {options.loss} "
        f"k={options.k}; median of {len(timed)} steps after {args.warmup} warm-up; load {os.getloadavg()[0]:.1f}"
    )
    print("(rollout tokens = generated response tokens; scoring/update tokens = all row positions)")
    print(
        markdown(
            phases,
            {
                "phase": lambda r: r["phase"],
                "s/step": lambda r: f"{r['seconds']:.3f}",
                "share": lambda r: f"{r['share']:.0%}",
                "tokens": lambda r: f"{r['tokens']:.0f}",
                "tokens/s": lambda r: f"{r['tokens_per_s']:.0f}",
            },
        )
    )
    return {
        "student": recipe.student,
        "teacher": recipe.teacher,
        "rollout": ro.model_dump(),
        "loss": recipe.loss.model_dump(),
        "warmup": args.warmup,
        "load_average": os.getloadavg()[0],
        "phases": phases,
        "ratios": {
            "rollout/update": med["rollout"] / med["update"],
            "scoring/update": med["scoring"] / med["update"],
        },
        "steps": records,
    }


def scoring_memory(cfg, rows: int, seq_len: int, k: int, chunk_tokens: int) -> dict:
    """XLA memory of the compiled scoring program (abstract student + teacher, abstract rows)."""
    dtype = jnp.dtype(cfg.dtype)
    student = abstract_model(cfg.model, dtype=dtype, param_dtype=dtype)
    graphdef, params_state = nnx.split(student, nnx.Param)
    params = jax.eval_shape(lambda: nnx.to_pure_dict(params_state))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=1), jax.devices()[:1])
    frozen = prepare_frozen({"teacher": abstract_model(cfg.model, dtype=dtype, param_dtype=dtype)}, mesh)
    ids = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
    lowered = score_rollouts.lower(
        graphdef, frozen.graphdef, params, frozen.arrays, {"input_ids": ids, "targets": ids}, k, chunk_tokens
    )
    m = lowered.compile().memory_analysis()
    return {"argument_bytes": m.argument_size_in_bytes, "temp_bytes": m.temp_size_in_bytes}


def memory_table(args) -> list[dict]:
    """Train-step and scoring temp bytes at ``--vocab``, chunk 64 vs no chunking, for each ``--losses``."""
    seq_len = args.seq_len
    rows = []
    student = config_of("tiny-minicpm4").model_copy(update={"vocab_size": args.vocab})
    tokens = args.rows * seq_len
    for loss in args.losses:
        for chunk in (args.chunk, tokens):
            overrides = [
                "student=tiny-minicpm4",
                "teacher=tiny-minicpm4",
                f"rollout.max_prompt_tokens={seq_len // 4}",
                f"rollout.max_new_tokens={seq_len - seq_len // 4 + 1}",
                f"rollout.chunk_tokens={chunk}",
                f"loss.loss={loss}",
                f"loss.k={0 if loss in ('sampled', 'full_vocab_rkl', 'gkd_jsd') else args.k}",
            ]
            recipe = load_distill_recipe(RECIPE, overrides)
            cfg = run_config(recipe, student, recipe.student)
            assert cfg.data.seq_len == seq_len, cfg.data.seq_len
            options = LossOptions(**recipe.loss.model_dump())
            loss_fn = functools.partial(opd_loss, options=options, chunk_tokens=chunk, remat=cfg.train.remat)
            start = time.perf_counter()
            (plan,) = plan_train_memory(
                cfg,
                [MeshConfig(data=1, fsdp=1, tensor=1, sequence=1)],
                [args.rows],
                seq_len,
                loss_fn=loss_fn,
                frozen_models={"teacher": student},
                batch_fields=rollout_batch_fields(options.k or DIAGNOSTIC_K),
            )
            score = scoring_memory(cfg, args.rows, seq_len, options.k or DIAGNOSTIC_K, chunk)
            row = {
                "loss": loss,
                "chunk_tokens": chunk,
                "chunked": chunk < tokens,
                "step_argument_bytes": plan.argument_bytes,
                "step_temp_bytes": plan.temp_bytes,
                "scoring_temp_bytes": score["temp_bytes"],
                "compile_s": time.perf_counter() - start,
            }
            rows.append(row)
            print(
                f"  {loss} chunk {chunk}: step temp {human_bytes(plan.temp_bytes)}, scoring temp "
                f"{human_bytes(score['temp_bytes'])} ({row['compile_s']:.1f} s)",
                flush=True,
            )
    logits = tokens * args.vocab * 4
    print(
        f"\npeak memory (XLA memory_analysis, CPU, fp32) of the compiled programs: tiny-minicpm4 student and "
        f"teacher at vocab {args.vocab}, {args.rows} rows x {seq_len} tokens = {tokens} tokens "
        f"(one fp32 [tokens, vocab] logits array: {human_bytes(logits)})"
    )
    by = {(r["loss"], r["chunked"]): r for r in rows}
    for r in rows:
        full = by[(r["loss"], False)]
        r["step_temp_vs_unchunked"] = r["step_temp_bytes"] / full["step_temp_bytes"]
        r["scoring_temp_vs_unchunked"] = r["scoring_temp_bytes"] / full["scoring_temp_bytes"]
    print(
        markdown(
            rows,
            {
                "loss": lambda r: r["loss"],
                "chunk_tokens": lambda r: r["chunk_tokens"] if r["chunked"] else f"{r['chunk_tokens']} (no chunking)",
                "train step temp": lambda r: human_bytes(r["step_temp_bytes"]),
                "vs unchunked": lambda r: f"{r['step_temp_vs_unchunked']:.3f}",
                "scoring temp": lambda r: human_bytes(r["scoring_temp_bytes"]),
                "vs unchunked ": lambda r: f"{r['scoring_temp_vs_unchunked']:.3f}",
                "step arguments": lambda r: human_bytes(r["step_argument_bytes"]),
            },
        )
    )
    return rows


def main():
    parser = argparse.ArgumentParser()
    toy = Path("runs/distill-toy")
    have_toy = (toy / "student/final").is_dir() and (toy / "teacher/final").is_dir()
    parser.add_argument("--student", default=str(toy / "student/final") if have_toy else "tiny-minicpm4")
    parser.add_argument("--teacher", default=str(toy / "teacher/final") if have_toy else "tiny-minicpm4")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--loss", default="student_topk")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (medians reported)")
    parser.add_argument("--vocab", type=int, default=73448, help="vocabulary of the memory table")
    parser.add_argument("--rows", type=int, default=16, help="rows of the memory table")
    parser.add_argument("--seq-len", type=int, default=256, help="row length of the memory table")
    parser.add_argument("--chunk", type=int, default=64, help="chunk_tokens of the chunked rows")
    parser.add_argument("--losses", nargs="*", default=["student_topk", "full_vocab_rkl"])
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/distill.json")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    result = {"device": jax.devices()[0].platform}
    if not args.skip_timing:
        result["timing"] = time_steps(args)
    if not args.skip_memory:
        result["memory"] = {
            "vocab": args.vocab,
            "rows": args.rows,
            "seq_len": args.seq_len,
            "table": memory_table(args),
        }
    out = Path(args.output)
    if out.is_file():  # keep the other table of an earlier run with --skip-*
        previous = json.loads(out.read_text())
        result = {**previous, **result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=lambda x: np.asarray(x).tolist()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
