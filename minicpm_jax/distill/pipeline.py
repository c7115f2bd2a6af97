"""``run_distill``: on-policy distillation of a recipe on the shared engine.

The student is the trained model (any ``load_any`` source), the teacher is frozen state (compute
dtype, same mesh, reloaded from ``train.frozen`` on resume), batches come from ``RolloutSource``
(rollouts from the current parameters, then scoring), the loss is ``objective.opd_loss``. Compatibility
is checked before anything is compiled. ``train.eval_tasks`` (e.g. ``exact_match`` on arithmetic)
validates every ``train.eval_every`` steps through the evaluation package.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from rich.console import Console

from minicpm_jax.ckpt import is_native_checkpoint, load_any
from minicpm_jax.config.loading import ConfigError, build_config
from minicpm_jax.config.schema import MeshConfig
from minicpm_jax.data.tokenizer import has_tokenizer
from minicpm_jax.distill.cold_start import SFTSource, teacher_rollouts, write_rollouts
from minicpm_jax.distill.compat import check_compatible
from minicpm_jax.distill.losses import LossOptions
from minicpm_jax.distill.objective import opd_loss
from minicpm_jax.distill.recipe import DistillRecipe
from minicpm_jax.distill.rollout import Prompt, RolloutSource
from minicpm_jax.eval.loading import tokenizer_of

DIAGNOSTIC_K = 16  # top-k scored for the diagnostics when the loss itself needs none (sampled, k = 0)


def _read_set(ps) -> list[tuple[str, str | None]]:
    from minicpm_jax.eval.loading import read_jsonl
    from minicpm_jax.eval.tasks.exact_match import synthetic_examples

    if ps.source == "synthetic":
        return synthetic_examples(ps.dataset, ps.num_prompts, ps.seed)
    if ps.path is None:
        raise ValueError("prompts.sets: a jsonl set needs a path")
    records = read_jsonl(ps.path, ("prompt",), what="distill prompts")[: ps.num_prompts]
    return [(str(r["prompt"]), None if r.get("answer") is None else str(r["answer"])) for r in records]


def mix(teacher_set: list, ood_set: list, ood_ratio: float) -> list:
    """A deterministic interleave with a share ``ood_ratio`` of OOD prompts (each set cycled), as long
    as the teacher set needs: ``len(teacher_set) / (1 - ood_ratio)`` prompts."""
    n = round(len(teacher_set) / (1 - ood_ratio))
    out, t, o = [], 0, 0
    for i in range(n):
        if ood_set and int((i + 1) * ood_ratio) > int(i * ood_ratio):
            out.append(ood_set[o % len(ood_set)])
            o += 1
        else:
            out.append(teacher_set[t % len(teacher_set)])
            t += 1
    return out


def build_prompts(recipe: DistillRecipe, tokenizer) -> list[Prompt]:
    """The recipe's prompts: its sets (mixed by provenance when ``ood_ratio`` is set), rendered with the
    teacher's template, encoded (chat template, or evaluation's plain bos rule)."""
    from minicpm_jax.eval.tasks import encode_context
    from minicpm_jax.generate.text import encode_prompt

    pc = recipe.prompts
    sets = [(ps.provenance, _read_set(ps)) for ps in pc.sets]
    if pc.ood_ratio is None:
        pairs = [pair for _, items in sets for pair in items]
    else:
        by = {which: [pair for prov, items in sets if prov == which for pair in items] for which in ("teacher", "ood")}
        pairs = mix(by["teacher"], by["ood"], pc.ood_ratio)

    def encode(text: str) -> tuple[int, ...]:
        text = pc.template.replace("{prompt}", text)
        return tuple(encode_prompt(tokenizer, text, chat=True) if pc.chat else encode_context(tokenizer, text))

    return [Prompt(encode(p), a) for p, a in pairs]


def run_config(recipe: DistillRecipe, student_cfg, student_dir: str, frozen: bool = True, **sft):
    """The engine's run config: rows = prompts_per_step x n of ``max_prompt + max_new - 1`` inputs; with
    ``sft`` (``seq_len``, ``rows``, ``output_dir``, ``steps``, ``learning_rate``) the cold start's SFT run."""
    ro = recipe.rollout
    tokenizer = str(student_dir) if has_tokenizer(student_dir) else None
    train = {
        **recipe.train,
        "global_batch_size": ro.n * ro.prompts_per_step,
        "output_dir": recipe.output_dir,
        "frozen": {"teacher": recipe.teacher} if frozen else {},
    }
    optimizer = {"schedule": "constant", "weight_decay": 0.0, "clip_norm": 1.0, **recipe.optimizer}
    seq_len = ro.max_prompt_tokens + ro.max_new_tokens - 1
    if sft:
        seq_len = sft["seq_len"]
        train |= {"global_batch_size": sft["rows"], "output_dir": sft["output_dir"], "steps": sft["steps"]}
        train |= {"frozen": {}, "eval_every": 0, "eval_tasks": {}}
        optimizer |= {"learning_rate": sft["learning_rate"]}
    raw = {
        "model": student_cfg.model_dump(mode="json"),
        "mesh": recipe.mesh.model_dump(),
        "dtype": recipe.dtype,
        "param_dtype": recipe.param_dtype,
        "seed": recipe.seed,
        "data": {"seq_len": seq_len, "eval_documents": 0, "tokenizer": tokenizer},
        "optimizer": optimizer,
        "train": train,
    }
    try:
        return build_config(raw)
    except ConfigError as e:
        raise ConfigError(e.errors, "distill recipe") from None


def run_cold_start(recipe: DistillRecipe, prompts, student, teacher, tokenizer, console) -> Path:
    """Teacher rollouts (cached in ``OUT/cold-start/teacher_rollouts.jsonl``) + SFT of the student;
    returns the SFT checkpoint (a finished one is reused)."""
    from minicpm_jax.train.loop import pretrain_loss, run_training

    cs, out = recipe.cold_start, Path(recipe.output_dir) / "cold-start"
    if is_native_checkpoint(out / "final"):
        console.print(f"cold start: done ({out / 'final'})")
        return out / "final"
    cache = out / "teacher_rollouts.jsonl"
    if cache.is_file():
        pairs = [(tuple(r["prompt_ids"]), r["response_ids"]) for r in map(json.loads, cache.read_text().splitlines())]
    else:
        pairs, stats = teacher_rollouts(teacher, prompts, tokenizer, cfg=cs, seed=recipe.seed)
        console.print(f"cold start: teacher rollouts {stats}")
        write_rollouts(cache, pairs, tokenizer)
    seq_len = recipe.rollout.max_prompt_tokens + cs.max_new_tokens - 1
    sft = dict(seq_len=seq_len, rows=cs.batch_size, output_dir=str(out), steps=cs.steps, learning_rate=cs.learning_rate)
    cfg = run_config(recipe, student.config, recipe.student, **sft)
    source = SFTSource(pairs, rows=cs.batch_size, width=seq_len, pad_id=tokenizer.pad_id)
    run_training(cfg, loss_fn=pretrain_loss(cfg), model=student, source=source, console=console)
    if not is_native_checkpoint(out / "final"):
        raise InterruptedError("cold start: the SFT run stopped before its last step")
    return out / "final"


def distill_parts(recipe: DistillRecipe, prompts: list[Prompt], tokenizer, student_cfg, teacher=None):
    """``(run config, rollout source, loss_fn)`` of the on-policy stage (what ``run_training`` takes);
    ``teacher``: a teacher on its own devices (else the engine's frozen state)."""
    options = LossOptions(**recipe.loss.model_dump())
    ro = recipe.rollout
    source = RolloutSource(
        prompts,
        tokenizer=tokenizer,
        n=ro.n,
        prompts_per_step=ro.prompts_per_step,
        max_prompt_tokens=ro.max_prompt_tokens,
        max_new_tokens=ro.max_new_tokens,
        k=options.k or DIAGNOSTIC_K,
        seed=recipe.seed,
        chunk_tokens=ro.chunk_tokens,
        lmbda=ro.lmbda,
        teacher=teacher,
    )
    cfg = run_config(recipe, student_cfg, recipe.student, frozen=teacher is None)
    loss_fn = functools.partial(opd_loss, options=options, chunk_tokens=ro.chunk_tokens, remat=cfg.train.remat)
    return cfg, source, loss_fn


def run_distill(recipe: DistillRecipe, console: Console | None = None) -> dict:
    """Distil ``recipe.teacher`` into ``recipe.student`` on-policy (after the cold start, if enabled),
    resuming from ``output_dir``."""
    from minicpm_jax.sharding import make_mesh
    from minicpm_jax.train.loop import run_training

    console = console or Console()
    dtype, param_dtype = jnp.dtype(recipe.dtype), jnp.dtype(recipe.param_dtype)
    student_tok, teacher_tok = tokenizer_of(recipe.student), tokenizer_of(recipe.teacher)
    devices, split = jax.devices(), recipe.teacher_devices
    if split and jax.process_count() > 1:
        raise ValueError(
            f"teacher_devices={split}: a teacher on its own devices needs one process ({jax.process_count()} "
            "running); with several, keep the teacher in the student's mesh (teacher_devices: 0)"
        )
    if split and split >= len(devices):
        raise ValueError(f"teacher_devices={split}: only {len(devices)} devices, none would be left for the student")
    student_devices = devices[: len(devices) - split]
    mesh = make_mesh(recipe.mesh, student_devices)
    teacher_mesh = make_mesh(MeshConfig(fsdp=split), devices[len(devices) - split :]) if split else mesh
    student_cfg, student = load_any(recipe.student, mesh=mesh, dtype=dtype, param_dtype=param_dtype)
    teacher_cfg, teacher = load_any(recipe.teacher, mesh=teacher_mesh, dtype=dtype, param_dtype=dtype)
    check_compatible(student_cfg, teacher_cfg, student_tok, teacher_tok)
    prompts = build_prompts(recipe, student_tok)
    if recipe.cold_start.enabled:
        cold, prompts = prompts[: recipe.cold_start.num_prompts], prompts[recipe.cold_start.num_prompts :]
        if not prompts:
            raise ValueError(f"cold_start.num_prompts={len(cold)} leaves no prompt for the distillation")
        sft = run_cold_start(recipe, cold, student, teacher, student_tok, console)
        student = load_any(sft, mesh=mesh, dtype=dtype, param_dtype=param_dtype)[1]
    own = teacher if split else None  # a teacher on its own devices is the source's, not the engine's
    cfg, source, loss_fn = distill_parts(recipe, prompts, student_tok, student_cfg, teacher=own)
    frozen = None if split else {"teacher": teacher}
    return run_training(
        cfg, loss_fn=loss_fn, model=student, frozen=frozen, source=source, console=console, devices=student_devices
    )
