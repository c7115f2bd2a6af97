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


def test_unknown_keys_inside_lists_of_sections_name_the_allowed_keys():
    from minicpm_jax.config.loading import ConfigError

    with pytest.raises(ConfigError, match=r"stages\.0\.bogus: unknown key; allowed keys: data, loss, name"):
        load_convert_recipe(RECIPES / "convert-tiny.yaml", ["stages.align.bogus=1"])
    with pytest.raises(ConfigError, match=r"prompts\.sets\.0\.bogus: unknown key; allowed keys: dataset"):
        load_distill_recipe(RECIPES / "distill-tiny.yaml", ["prompts.sets=[{bogus: 1}]"])
