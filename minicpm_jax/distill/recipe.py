"""The distillation recipe (``configs/recipes/distill-*.yaml``): student, teacher, prompts, rollout and
loss options, plus the engine's ``mesh`` / ``dtype`` / ``optimizer`` / ``train`` sections.

Defaults mirror spec/opd.md 10.2 where they are scale-free (temperature 1, n = 4, K = 16, weight mode
``student_p``, one update per batch, constant LR, clip 1.0); sizes are the recipe's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, get_type_hints

from pydantic import StrictBool, StrictInt, create_model

from minicpm_jax.config.loading import ConfigError, apply_overrides, read_recipe_yaml, recipe_path, validate_recipe
from minicpm_jax.config.schema import DTYPES, MeshConfig, _Strict
from minicpm_jax.distill.losses import LossOptions, check_options
from minicpm_jax.paths import as_path


class PromptSet(_Strict):
    """``synthetic``: the built-in arithmetic task (prompt ``47+38:``, verifiable answer); ``jsonl``:
    ``{"prompt", "answer" (optional)}`` records. ``provenance``: ``teacher`` (the teacher's own
    post-training prompts, spec 8.2) or ``ood``."""

    source: Literal["synthetic", "jsonl"] = "synthetic"
    dataset: Literal["arithmetic", "copy"] = "arithmetic"
    path: str | None = None
    num_prompts: StrictInt = 256
    seed: StrictInt = 0
    provenance: Literal["teacher", "ood"] = "teacher"


class PromptsConfig(_Strict):
    """Teacher-aligned prompt selection (spec 8.2): prompt sets by provenance, mixed so that a share
    ``ood_ratio`` of the prompts is out-of-distribution (None: the sets in order); each prompt is
    rendered with the teacher's ``template`` (``{prompt}`` is the question) and, with ``chat``, the chat
    template."""

    sets: tuple[PromptSet, ...] = (PromptSet(),)
    ood_ratio: float | None = None
    template: str = "{prompt}"
    chat: StrictBool = False


class ColdStartConfig(_Strict):
    """Off-policy cold start (spec 8.1): teacher rollouts on the first ``num_prompts`` prompts (the
    distillation uses the others), rejection filters, then ``steps`` of SFT."""

    enabled: StrictBool = False
    num_prompts: StrictInt = 256
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: StrictInt = 64
    max_attempts: StrictInt = 3
    require: str | None = None  # a regex every accepted response contains (e.g. "\\boxed")
    steps: StrictInt = 100
    batch_size: StrictInt = 16
    learning_rate: float = 3e-3


class RolloutConfig(_Strict):
    n: StrictInt = 4  # responses per prompt
    prompts_per_step: StrictInt = 4
    max_prompt_tokens: StrictInt = 32
    max_new_tokens: StrictInt = 64
    chunk_tokens: StrictInt = 1024  # tokens per chunk of the scoring and of the loss
    lmbda: float = 1.0  # GKD: share of steps sampled from the student (1 = strictly on-policy)


# the recipe's ``loss`` section: the fields of ``distill.losses.LossOptions`` (checked by ``check_options``)
LossConfig = create_model(
    "LossConfig",
    __base__=_Strict,
    **{f.name: (get_type_hints(LossOptions)[f.name], f.default) for f in dataclasses.fields(LossOptions)},
)


class DistillRecipe(_Strict):
    student: str
    teacher: str
    output_dir: str = "runs/distill"
    mesh: MeshConfig = MeshConfig()
    dtype: Literal[DTYPES] = "float32"
    param_dtype: Literal[DTYPES] = "float32"
    seed: StrictInt = 0
    prompts: PromptsConfig = PromptsConfig()
    cold_start: ColdStartConfig = ColdStartConfig()
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = LossConfig()
    optimizer: dict[str, Any] = {}
    train: dict[str, Any] = {}
    teacher_devices: StrictInt = 0  # > 0: the teacher on the last N devices, the student on the others


def load_distill_recipe(path: str | Path, overrides=()) -> DistillRecipe:
    """A validated recipe from YAML plus dotted overrides (``loss.k=4``); relative prompt-set paths are
    read beside the recipe when they exist there."""
    from minicpm_jax.eval.loading import resolve_task_paths

    path = recipe_path(path)
    raw = apply_overrides(read_recipe_yaml(path), overrides)
    recipe = validate_recipe(raw, DistillRecipe, str(path))
    check_options(LossOptions(**recipe.loss.model_dump()))
    pc = recipe.prompts
    if "{prompt}" not in pc.template:
        raise ConfigError([f"prompts.template: {pc.template!r} has no {{prompt}} placeholder"], str(path))
    if pc.ood_ratio is not None and not (
        0 <= pc.ood_ratio < 1
        and {s.provenance for s in pc.sets} >= ({"teacher", "ood"} if pc.ood_ratio else {"teacher"})
    ):
        raise ConfigError(
            [f"prompts.ood_ratio={pc.ood_ratio}: needs 0 <= ratio < 1 and prompt sets of both provenances"], str(path)
        )
    problems = []
    direct = recipe.loss.loss in ("full_vocab_rkl", "gkd_jsd", "forward_kl_teacher_topk")
    if not 0 < recipe.rollout.lmbda <= 1:
        problems.append(f"rollout.lmbda={recipe.rollout.lmbda}: needs 0 < lmbda <= 1")
    elif recipe.rollout.lmbda < 1 and not direct:
        problems.append(
            f"rollout.lmbda={recipe.rollout.lmbda} mixes teacher samples, but loss {recipe.loss.loss!r} is an on-policy "
            "policy-gradient estimator; use gkd_jsd, full_vocab_rkl or forward_kl_teacher_topk"
        )
    if recipe.teacher_devices < 0:
        problems.append(f"teacher_devices={recipe.teacher_devices}: needs >= 0")
    elif recipe.teacher_devices and recipe.loss.loss in ("full_vocab_rkl", "gkd_jsd"):
        problems.append(
            f"teacher_devices={recipe.teacher_devices}: loss {recipe.loss.loss!r} reads full-vocabulary teacher "
            "logits inside the train step; a teacher on its own devices serves only the top-k losses"
        )
    if problems:
        raise ConfigError(problems, str(path))
    base = as_path(path).parent
    sets = tuple(s.model_copy(update=resolve_task_paths({"path": s.path}, base)) for s in pc.sets)
    return recipe.model_copy(update={"prompts": pc.model_copy(update={"sets": sets})})
