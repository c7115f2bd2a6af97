"""The ``minicpm-jax eval`` command: recipe + flags -> evaluated tasks, a report and a printed table."""

from __future__ import annotations

import time
from pathlib import Path

import jax.numpy as jnp
import yaml
from rich.table import Table

from minicpm_jax import distributed
from minicpm_jax.config import ConfigError, build_config
from minicpm_jax.config.loading import apply_overrides
from minicpm_jax.paths import as_path
from minicpm_jax.safety import check_output, check_recipe_file

EVAL_RECIPE_KEYS = ("tasks", "batch_size", "seed", "output_dir", "mesh", "dtype", "param_dtype")


def _eval_recipe(args) -> tuple[dict, dict]:
    """``(recipe, run-config overrides)`` of ``eval``: the recipe YAML (if any) with ``tasks.*``
    overrides applied, relative data paths resolved against the recipe's folder, ``--tasks`` chosen."""
    from minicpm_jax.eval.loading import resolve_task_paths

    recipe: dict = {}
    base = Path.cwd()
    if args.config:
        path = check_recipe_file(args.config)
        recipe = yaml.safe_load(path.read_text())
        base = path.resolve().parent
        unknown = sorted(set(recipe) - set(EVAL_RECIPE_KEYS))
        if unknown:
            raise ConfigError([f"{k}: unknown key (accepted: {list(EVAL_RECIPE_KEYS)})" for k in unknown], str(path))
    task_overrides = [o for o in args.overrides if o.startswith("tasks.")]
    recipe = apply_overrides(recipe, task_overrides)
    tasks = recipe.get("tasks") or {}
    if isinstance(tasks, list):
        tasks = {t: {} for t in tasks}
    if args.tasks:
        chosen = [t for t in args.tasks.split(",") if t]
        tasks = {t: tasks.get(t, {}) for t in chosen}
    if not tasks:
        raise ValueError("eval: no tasks (give --tasks name,... or a --config recipe with tasks: {name: options})")
    tasks = {label: resolve_task_paths(options, base) for label, options in tasks.items()}
    run = {k: recipe[k] for k in ("mesh", "dtype", "param_dtype") if k in recipe}
    if "seed" in recipe:
        run["seed"] = recipe["seed"]
    return recipe | {"tasks": tasks}, run


def run_eval(args, console) -> None:
    """``minicpm-jax eval``: lm-evaluation-harness tasks (``--lm-eval``) or the package's own tasks."""

    if args.lm_eval:  # lm-evaluation-harness tasks through the minicpm-jax backend
        if args.config or args.tasks or args.overrides:
            raise ValueError("eval --lm-eval runs harness tasks alone: drop --config, --tasks and overrides")
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ValueError(
                "--lm-eval needs lm-evaluation-harness: pip install 'minicpm-jax[eval]' (or 'lm-eval==0.4.13')"
            ) from None
        from lm_eval.utils import make_table

        from minicpm_jax.eval.harness import run_harness

        output = as_path(args.output or "outputs/eval")
        check_output(output, overwrite=args.overwrite, sources=[args.checkpoint, args.tokenizer])
        distributed.barrier("minicpm_jax.eval.checked")
        tasks = [t for t in args.lm_eval.split(",") if t]
        results = run_harness(
            args.checkpoint,
            tasks,
            output,
            include_path=args.lm_eval_include_path,
            tokenizer=args.tokenizer,
            batch_size=args.batch_size or 8,
            limit=args.limit,
        )
        console.print(make_table(results), highlight=False, markup=False)
        console.print(f"report -> {output / 'lm_eval.json'}, {output / 'lm_eval.md'}")
        return

    from minicpm_jax.eval import evaluate
    from minicpm_jax.eval.api import normalize_tasks
    from minicpm_jax.eval.loading import load_model_and_tokenizer
    from minicpm_jax.eval.report import write_report
    from minicpm_jax.sharding import make_mesh

    recipe, run = _eval_recipe(args)
    overrides = [o for o in args.overrides if not o.startswith("tasks.")]
    if any(o.startswith("model.") for o in overrides):
        raise ConfigError(["model.*: eval takes the model from --checkpoint; only mesh.*, dtype, param_dtype, seed"])
    cfg = build_config(apply_overrides(run, overrides))
    mesh = make_mesh(cfg.mesh) if any(o.startswith("mesh.") for o in overrides) or "mesh" in run else None
    output = as_path(args.output or recipe.get("output_dir") or "outputs/eval")
    normalize_tasks(recipe["tasks"])  # an unknown task is reported before the output is checked
    check_output(output, overwrite=args.overwrite, sources=[args.checkpoint, args.tokenizer, args.config])
    distributed.barrier("minicpm_jax.eval.checked")  # every host checked the output before process 0 writes
    batch_size = args.batch_size or recipe.get("batch_size", 8)
    start = time.perf_counter()
    model_cfg, model, tokenizer = load_model_and_tokenizer(
        args.checkpoint,
        tokenizer=args.tokenizer,
        mesh=mesh,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        seed=cfg.seed,
    )
    console.print(
        f"evaluating {args.checkpoint} ({model_cfg.model_type}, {model_cfg.num_hidden_layers} layers, "
        f"{cfg.dtype}) on {list(recipe['tasks'])}, batch {batch_size}"
    )
    results = evaluate(
        model, recipe["tasks"], tokenizer=tokenizer, batch_size=batch_size, seed=cfg.seed, output_dir=output
    )
    config = {"recipe": args.config, "tasks": recipe["tasks"], "batch_size": batch_size}
    config |= {"run": cfg.model_dump(mode="json", include={"mesh", "dtype", "param_dtype", "seed"})}
    config |= {"model": model_cfg.model_dump(mode="json"), "tokenizer": repr(tokenizer)}
    write_report(output, results, source=str(args.checkpoint), config=config)
    table = Table(title=f"{args.checkpoint} ({time.perf_counter() - start:.1f}s)")
    for col in ("task", "metric", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for label, res in results.items():
        for metric, value in res["metrics"].items():
            table.add_row(label, metric, f"{value:.4f}")
    console.print(table)
    console.print(f"report -> {output / 'report.json'}, {output / 'report.md'}")
