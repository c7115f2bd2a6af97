"""Transformer -> hybrid conversion (spec/sala.md 2): HALO weight transfer, stage-1 hidden-state
alignment, layer selection, KL distillation and continual stages on the shared training engine.

``run_conversion(load_convert_recipe(path))`` runs a recipe; the parts are usable alone:
``transfer`` (stage 0), ``alignment_loss`` / ``kl_loss`` (engine losses), ``select_layers``.
"""

from minicpm_jax.convert.losses import alignment_loss, kl_loss
from minicpm_jax.convert.pipeline import run_conversion
from minicpm_jax.convert.recipe import ConvertRecipe, load_convert_recipe
from minicpm_jax.convert.select import choose_mixer_types, select_layers, selection_scores
from minicpm_jax.convert.transfer import hybrid_config, transfer

__all__ = [
    "ConvertRecipe",
    "alignment_loss",
    "choose_mixer_types",
    "hybrid_config",
    "kl_loss",
    "load_convert_recipe",
    "run_conversion",
    "select_layers",
    "selection_scores",
    "transfer",
]
