"""Memory plan of a conversion on paper: every stage's real train step (its loss, trainable subset and
the abstract frozen teacher) compiled from abstract shapes on the given meshes (nothing is allocated).

The hybrid is planned with ``convert.mixer_types``, or before selection with Lightning at every
candidate layer (what stage 1 trains; the selected hybrid has fewer Lightning layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from minicpm_jax.ckpt import config_of
from minicpm_jax.config.schema import MeshConfig
from minicpm_jax.convert.pipeline import stage_loss, stage_trainable, with_sparse
from minicpm_jax.convert.recipe import ConvertRecipe, stage_config
from minicpm_jax.convert.select import initial_mixer_types
from minicpm_jax.convert.transfer import check_teacher, hybrid_config
from minicpm_jax.train.plan import PlanRow, plan_train_memory


def plan_conversion(
    recipe: ConvertRecipe, meshes: Sequence[MeshConfig], batch_sizes: Sequence[int]
) -> list[tuple[str, PlanRow]]:
    """``(stage label, plan row)`` for every stage x mesh x batch size (rows per micro-batch, all devices;
    the global batch is that times the stage's ``micro_batches``) at the stage's seq_len."""
    teacher = config_of(recipe.teacher)
    check_teacher(teacher)
    cv = recipe.convert
    hybrid = hybrid_config(
        teacher,
        initial_mixer_types(cv, teacher),
        nope=cv.nope,
        output_gate=cv.output_gate,
        overrides=cv.model,
    )
    rows = []
    for index, stage in enumerate(recipe.stages, start=1):
        model_cfg = with_sparse(hybrid, stage.sparse, recipe.sparse_config or teacher.sparse_config)
        _, patterns = stage_trainable(stage, model_cfg)
        frozen = {} if stage.loss == "lm" else {"teacher": recipe.teacher}
        cfg = stage_config(
            recipe, stage, model_cfg.model_dump(mode="json"), Path("plan"), frozen=frozen, trainable=patterns
        )
        plan = plan_train_memory(
            cfg,
            meshes,
            [b * cfg.train.micro_batches for b in batch_sizes],
            cfg.data.seq_len,
            loss_fn=stage_loss(stage, cfg),
            frozen_models={"teacher": teacher} if frozen else None,
            trainable=patterns or None,
        )
        rows += [(f"{index}-{stage.name} ({stage.loss})", row) for row in plan]
    return rows
