"""``run_distill``: on-policy distillation of a recipe on the shared engine.

The student is the trained model (any ``load_any`` source), the teacher is frozen state (compute
dtype, same mesh, reloaded from ``train.frozen`` on resume), batches come from ``RolloutSource``
(rollouts from the current parameters, then scoring), the loss is ``objective.opd_loss``. Compatibility
is checked before anything is compiled. ``train.eval_tasks`` (e.g. ``exact_match`` on arithmetic)
validates every ``train.eval_every`` steps through the evaluation package.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax.numpy as jnp
from rich.console import Console

from minicpm_jax.ckpt import load_any
from minicpm_jax.config.loading import ConfigError, build_config
from minicpm_jax.distill.compat import check_compatible
from minicpm_jax.distill.losses import LossOptions
from minicpm_jax.distill.objective import opd_loss
from minicpm_jax.distill.recipe import DistillRecipe
from minicpm_jax.distill.rollout import Prompt, RolloutSource

DIAGNOSTIC_K = 16  # top-k scored for the diagnostics when the loss itself needs none (sampled, k = 0)


def tokenizer_of(source: str):
    """The tokenizer saved with a checkpoint directory (the byte-level one for a preset)."""
    from minicpm_jax.eval.loading import byte_tokenizer
    from minicpm_jax.generate.text import load_tokenizer

    return load_tokenizer(source) if Path(source).is_dir() else byte_tokenizer()


def build_prompts(recipe: DistillRecipe, tokenizer) -> list[Prompt]:
    """The recipe's prompt set, encoded (chat template or the plain bos rule of evaluation)."""
    from minicpm_jax.eval.loading import read_jsonl
    from minicpm_jax.eval.tasks import encode_context
    from minicpm_jax.eval.tasks.exact_match import synthetic_examples
    from minicpm_jax.generate.text import encode_prompt

    pc = recipe.prompts
    if pc.source == "synthetic":
        pairs = synthetic_examples(pc.dataset, pc.num_prompts, pc.seed)
    else:
        if pc.path is None:
            raise ValueError("prompts.path: required with prompts.source=jsonl")
        records = read_jsonl(pc.path, ("prompt",), what="distill prompts")[: pc.num_prompts]
        pairs = [(str(r["prompt"]), None if r.get("answer") is None else str(r["answer"])) for r in records]

    def encode(text: str) -> tuple[int, ...]:
        return tuple(encode_prompt(tokenizer, text, chat=True) if pc.chat else encode_context(tokenizer, text))

    return [Prompt(encode(p), a) for p, a in pairs]


def run_config(recipe: DistillRecipe, student_cfg, student_dir: str):
    """The engine's run config: rows = prompts_per_step x n of ``max_prompt + max_new - 1`` inputs."""
    ro = recipe.rollout
    tokenizer = str(student_dir) if (Path(student_dir) / "tokenizer.json").is_file() else None
    raw = {
        "model": student_cfg.model_dump(mode="json"),
        "mesh": recipe.mesh.model_dump(),
        "dtype": recipe.dtype,
        "param_dtype": recipe.param_dtype,
        "seed": recipe.seed,
        "data": {"seq_len": ro.max_prompt_tokens + ro.max_new_tokens - 1, "eval_documents": 0, "tokenizer": tokenizer},
        "optimizer": {"schedule": "constant", "weight_decay": 0.0, "clip_norm": 1.0, **recipe.optimizer},
        "train": {
            **recipe.train,
            "global_batch_size": ro.n * ro.prompts_per_step,
            "output_dir": recipe.output_dir,
            "frozen": {"teacher": recipe.teacher},
        },
    }
    try:
        return build_config(raw)
    except ConfigError as e:
        raise ConfigError(e.errors, "distill recipe") from None


def run_distill(recipe: DistillRecipe, console: Console | None = None) -> dict:
    """Distil ``recipe.teacher`` into ``recipe.student`` on-policy (resuming from ``output_dir``)."""
    from minicpm_jax.sharding import make_mesh
    from minicpm_jax.train.loop import run_training

    console = console or Console()
    dtype, param_dtype = jnp.dtype(recipe.dtype), jnp.dtype(recipe.param_dtype)
    student_tok, teacher_tok = tokenizer_of(recipe.student), tokenizer_of(recipe.teacher)
    mesh = make_mesh(recipe.mesh)
    student_cfg, student = load_any(recipe.student, mesh=mesh, dtype=dtype, param_dtype=param_dtype)
    teacher_cfg, teacher = load_any(recipe.teacher, mesh=mesh, dtype=dtype, param_dtype=dtype)
    check_compatible(student_cfg, teacher_cfg, student_tok, teacher_tok)
    options = LossOptions(**recipe.loss.model_dump())
    ro = recipe.rollout
    source = RolloutSource(
        build_prompts(recipe, student_tok),
        tokenizer=student_tok,
        n=ro.n,
        prompts_per_step=ro.prompts_per_step,
        max_prompt_tokens=ro.max_prompt_tokens,
        max_new_tokens=ro.max_new_tokens,
        k=options.k or DIAGNOSTIC_K,
        seed=recipe.seed,
        chunk_tokens=ro.chunk_tokens,
    )
    cfg = run_config(recipe, student_cfg, recipe.student)
    loss_fn = functools.partial(opd_loss, options=options, chunk_tokens=ro.chunk_tokens, remat=cfg.train.remat)
    return run_training(
        cfg, loss_fn=loss_fn, model=student, frozen={"teacher": teacher}, source=source, console=console
    )
