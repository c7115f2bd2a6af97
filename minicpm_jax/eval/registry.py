"""The task registry of ``minicpm_jax.eval``: every task is a function registered under a name.

A task takes an ``EvalContext`` (the in-memory model, its tokenizer, batch size, seed, where to
write plots) and its options (a dict from YAML or flags) and returns a ``TaskResult``: scalar
``metrics`` (what reports and training logs show), optional ``rows`` (a table, e.g. one row per
grid cell) and the paths of the ``plots`` it wrote. Unknown task names and unknown options raise
one clear error naming what is accepted.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvalContext:
    """What every task gets: ``model`` (``MiniCPMForCausalLM``), ``tokenizer`` (a
    ``minicpm_jax.generate.text.Tokenizer``), ``batch_size``, ``seed``, and ``output_dir`` for plots
    (None: write no plots)."""

    model: Any
    tokenizer: Any
    batch_size: int = 8
    seed: int = 0
    output_dir: Path | None = None


@dataclass
class TaskResult:
    metrics: dict[str, float]
    rows: list[dict] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


TaskFn = Callable[..., TaskResult]  # task(ctx, **options) -> TaskResult
TASKS: dict[str, TaskFn] = {}


def register(name: str) -> Callable[[TaskFn], TaskFn]:
    """Decorator: ``@register("passkey") def passkey(ctx, *, lengths=(...), ...) -> TaskResult``."""

    def add(fn: TaskFn) -> TaskFn:
        if name in TASKS:
            raise ValueError(f"eval task {name!r} is registered twice")
        TASKS[name] = fn
        return fn

    return add


def run_task(name: str, ctx: EvalContext, options: dict | None = None) -> TaskResult:
    """Runs task ``name`` with ``options``; clear errors for an unknown task or option."""
    if name not in TASKS:
        raise ValueError(f"unknown eval task {name!r}; available: {sorted(TASKS)}")
    fn, options = TASKS[name], dict(options or {})
    params = inspect.signature(fn).parameters
    accepted = [p for p in list(params)[1:] if params[p].kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"eval task {name!r}: unknown option(s) {unknown}; accepted: {accepted}")
    return fn(ctx, **options)
