"""Evaluation: tasks (perplexity, multiple choice, exact match, retrieval/recall), scoring, reports.

``evaluate(model, tasks, tokenizer=...)`` runs tasks on an in-memory model; ``run_task`` runs one;
``TASKS`` maps every registered task name to its function. Importing this package registers them.
"""

from minicpm_jax.eval.api import evaluate
from minicpm_jax.eval.registry import TASKS, EvalContext, TaskResult, register, run_task
from minicpm_jax.eval.tasks import choice, exact_match, perplexity  # noqa: F401 (they register)

try:  # long-context retrieval and recall tasks (their own modules)
    from minicpm_jax.eval.tasks import retrieval  # noqa: F401
except ImportError:  # pragma: no cover
    pass
try:
    from minicpm_jax.eval.tasks import recall  # noqa: F401
except ImportError:  # pragma: no cover
    pass
try:  # the lm-evaluation-harness backend "minicpm-jax" (when lm-eval is installed)
    from minicpm_jax.eval import harness  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["TASKS", "EvalContext", "TaskResult", "evaluate", "register", "run_task"]
