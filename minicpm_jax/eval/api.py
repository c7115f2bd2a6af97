"""``evaluate``: run evaluation tasks on an in-memory model (what the conversion and distillation
loops call; ``minicpm-jax eval`` runs the same after loading a checkpoint).

``tasks`` is a list of task names (default options) or ``{label: options}``; a label is the task
name, or any name when the options hold ``task: <registered name>`` (to run one task twice, e.g.
``exact_match`` on arithmetic and on copy).

With several processes (``minicpm_jax.distributed``) every process calls ``evaluate`` with the same
arguments; log-likelihood scoring splits its batches across them (``eval.scoring``) and all return
the same metrics; only process 0 writes plots. A model laid over the devices of several processes
runs the scoring tasks (``SHARED_MODEL_TASKS``) only: generation and span scoring read their arrays on
one host.
"""

from __future__ import annotations

import time
from pathlib import Path

from flax import nnx

from minicpm_jax import distributed
from minicpm_jax.eval.registry import TASKS, EvalContext, run_task
from minicpm_jax.sharding import mesh_of


def normalize_tasks(tasks) -> dict[str, tuple[str, dict]]:
    """``{label: (task name, options)}``; one error lists every unknown task."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if isinstance(tasks, (list, tuple)):
        tasks = {t: {} for t in tasks}
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"tasks: expected a non-empty list of names or {{name: options}}, got {tasks!r}")
    out, unknown = {}, []
    for label, options in tasks.items():
        options = dict(options or {})
        name = options.pop("task", label)
        if name not in TASKS:
            unknown.append(name)
        out[label] = (name, options)
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}; available: {sorted(TASKS)}")
    return out


SHARED_MODEL_TASKS = ("perplexity", "multiple_choice")  # built on eval.scoring, which feeds every process's rows


def check_shared_model_tasks(tasks, where: str = "eval") -> None:
    """``ValueError`` naming the tasks that cannot run on a model over several processes."""
    refused = sorted({name for name, _ in normalize_tasks(tasks).values()} - set(SHARED_MODEL_TASKS))
    if refused:
        raise ValueError(
            f"{where}: task(s) {refused} cannot run on a model spread over several processes yet (accepted: "
            f"{list(SHARED_MODEL_TASKS)}); run them with `minicpm-jax eval` and no mesh.* override (each "
            "process then holds the whole model)"
        )


def evaluate(
    model,
    tasks,
    *,
    tokenizer,
    batch_size: int = 8,
    seed: int = 0,
    output_dir: str | Path | None = None,
) -> dict[str, dict]:
    """``{label: {"task", "options", "metrics", "rows", "plots", "seconds"}}`` for each task."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} (accepted: an integer >= 1)")
    plots = Path(output_dir) if output_dir is not None and distributed.is_main() else None
    if distributed.spans_processes(mesh_of(nnx.state(model))):
        check_shared_model_tasks(tasks)
    ctx = EvalContext(model, tokenizer, batch_size, seed, plots)
    results = {}
    for label, (name, options) in normalize_tasks(tasks).items():
        start = time.perf_counter()
        res = run_task(name, ctx, options)
        results[label] = {
            "task": name,
            "options": options,
            "metrics": dict(res.metrics),
            "rows": list(res.rows),
            "plots": list(res.plots),
            "seconds": time.perf_counter() - start,
        }
    return results
