"""Memory plan of a distillation step on paper: the real engine step (``opd_loss``, the abstract
student trained, the abstract teacher as frozen state, a rollout batch with every stored array)
compiled from abstract shapes on the given meshes; nothing is allocated. The rollout and scoring
programs run before the step and hold at most this much (no optimizer state, no gradients)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax.numpy as jnp

from minicpm_jax.ckpt import config_of
from minicpm_jax.config.schema import MeshConfig
from minicpm_jax.distill.losses import LossOptions
from minicpm_jax.distill.objective import ROLLOUT_STATS, opd_loss
from minicpm_jax.distill.pipeline import DIAGNOSTIC_K, run_config
from minicpm_jax.distill.recipe import DistillRecipe
from minicpm_jax.train.plan import PlanRow, lm_batch_fields, plan_train_memory

TOPK_FIELDS = (
    "stu_topk_ids",
    "stu_topk_logp",
    "stu_logp_on_tch_ids",
    "tch_logp_on_stu_ids",
    "tch_topk_ids",
    "tch_topk_logp",
)
TOKEN_FIELDS = ("stu_logp_tok", "stu_entropy", "tch_logp_tok", "tch_entropy", "grpo_adv")


def rollout_batch_fields(k: int):
    """``batch_fields`` of a rollout batch with top-``k`` stored arrays."""

    def fields(rows: int, t: int) -> dict:
        out = {
            name: spec
            for name, spec in lm_batch_fields(rows, t).items()
            if name in ("input_ids", "targets", "loss_mask")
        }
        out |= {name: ((rows, t, k), jnp.int32 if name.endswith("ids") else jnp.float32) for name in TOPK_FIELDS}
        out |= {name: ((rows, t), jnp.float32) for name in TOKEN_FIELDS}
        return out | {name: ((rows,), jnp.float32) for name in ROLLOUT_STATS}

    return fields


def plan_distill(recipe: DistillRecipe, meshes: Sequence[MeshConfig], batch_sizes: Sequence[int]) -> list[PlanRow]:
    """One row per mesh x global batch size (rows of ``max_prompt + max_new - 1`` tokens)."""
    student, teacher = config_of(recipe.student), config_of(recipe.teacher)
    cfg = run_config(recipe, student, recipe.student)
    options = LossOptions(**recipe.loss.model_dump())
    loss = functools.partial(opd_loss, options=options, chunk_tokens=recipe.rollout.chunk_tokens, remat=cfg.train.remat)
    return plan_train_memory(
        cfg,
        meshes,
        batch_sizes,
        cfg.data.seq_len,
        loss_fn=loss,
        frozen_models={"teacher": teacher},
        batch_fields=rollout_batch_fields(options.k or DIAGNOSTIC_K),
    )
