"""On-policy distillation (spec/opd.md): rollouts from the current student (``rollout``), scoring by
student and teacher (``scores``), the loss options and their math (``losses``), diagnostics
(``metrics``), the engine loss (``objective``), compatibility checks, recipes, the run, and plots.

``run_distill(load_distill_recipe(path))`` runs a recipe (``minicpm-jax distill --config``).
"""

from minicpm_jax.distill.losses import LOSSES, LossOptions
from minicpm_jax.distill.pipeline import run_distill
from minicpm_jax.distill.recipe import DistillRecipe, load_distill_recipe

__all__ = ["LOSSES", "DistillRecipe", "LossOptions", "load_distill_recipe", "run_distill"]
