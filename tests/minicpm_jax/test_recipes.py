"""Every shipped conversion and distillation recipe loads and validates (stage configs included)."""

from pathlib import Path

import pytest

from minicpm_jax.convert import load_convert_recipe
from minicpm_jax.distill import load_distill_recipe

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("convert-*.yaml")), ids=lambda p: p.name)
def test_convert_recipes_load(path):
    recipe = load_convert_recipe(path)
    assert recipe.stages and recipe.stages[0].loss == "align"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("distill-*.yaml")), ids=lambda p: p.name)
def test_distill_recipes_load(path):
    recipe = load_distill_recipe(path)
    assert recipe.prompts.sets and recipe.loss.loss == "student_topk"
