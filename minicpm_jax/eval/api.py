"""``evaluate``: run evaluation tasks on an in-memory model (what the conversion and distillation
loops call; ``minicpm-jax eval`` runs the same after loading a checkpoint).

``tasks`` is a list of task names (default options) or ``{label: options}``; a label is the task
name, or any name when the options hold ``task: <registered name>`` (to run one task twice, e.g.
``exact_match`` on arithmetic and on copy).

With several processes (``minicpm_jax.distributed``) every process calls ``evaluate`` with the same
arguments; log-likelihood scoring splits its batches across them (``eval.scoring``) and all return
the same metrics; only process 0 writes plots. A model laid over the devices of several processes
runs every task: generation and span scoring gather their outputs to every host
(``distributed.to_host``).
"""

from __future__ import annotations

import time
from pathlib import Path

from minicpm_jax import distributed
from minicpm_jax.eval.registry import TASKS, EvalContext, run_task


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
