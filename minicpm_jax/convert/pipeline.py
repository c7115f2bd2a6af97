"""``run_conversion``: a convert recipe end to end, resumable stage by stage.

Output layout (``output_dir``)::

    stage-0-transfer/      the transferred hybrid (native checkpoint); with layer selection, Lightning
                           at every candidate layer (what stage 1 aligns)
    stage-1-<name>/        one engine run per stage (checkpoints/, metrics, final/, summary.json)
    selection/             after an 'align' first stage without convert.mixer_types: selection.json/.md,
                           scores.png, and hybrid/ (teacher + the aligned Lightning mixers of the chosen layers)
    stage-N-<name>/        the following stages, each starting from the previous one's final/
    export-hf/             the final hybrid in the official MiniCPM-SALA Hugging Face layout
    conversion.json        every stage's summary and the chosen mixer_types

A finished stage (``final/`` present) is skipped on a rerun; an interrupted one resumes from its own
checkpoints, so killing the process at any point loses at most the steps since the last checkpoint.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax.numpy as jnp
from flax import nnx
from rich.console import Console

from minicpm_jax.ckpt import is_native_checkpoint, load_any, save_model
from minicpm_jax.convert.losses import alignment_loss, kl_loss
from minicpm_jax.convert.recipe import ConvertRecipe, StageConfig, stage_config
from minicpm_jax.convert.select import initial_mixer_types, select_layers, write_selection
from minicpm_jax.convert.transfer import LIGHTNING, check_teacher, replace_mixers, transfer
from minicpm_jax.data.tokenizer import BYTE_TOKENIZER, check_vocab, load_tokenizer
from minicpm_jax.eval.report import atomic_write_text
from minicpm_jax.model.factory import create_model
from minicpm_jax.sharding import make_mesh


def lightning_patterns(cfg) -> list[str]:
    """Trainable patterns selecting exactly the Lightning mixers of ``cfg``."""
    return [f"model.layers.{i}.self_attn" for i, kind in enumerate(cfg.layer_mixers) if kind == LIGHTNING]


def stage_trainable(stage: StageConfig, model_cfg) -> tuple[str, list[str]]:
    """``(label, patterns)`` of a stage's trainable filter (default: lm -> all, else the Lightning mixers)."""
    trainable = stage.trainable or ("all" if stage.loss == "lm" else "lightning")
    if stage.loss == "align" and trainable != "lightning":
        raise ValueError(f"stages.{stage.name}: an align stage trains the Lightning mixers only (trainable: lightning)")
    if isinstance(trainable, str):
        return trainable, lightning_patterns(model_cfg) if trainable == "lightning" else []
    return ",".join(trainable), list(trainable)


def stage_loss(stage: StageConfig, cfg):
    """The engine loss of a stage."""
    from minicpm_jax.train.loop import pretrain_loss

    if stage.loss == "align":
        return alignment_loss
    if stage.loss == "kl":
        return functools.partial(kl_loss, remat=cfg.train.remat, chunk_size=cfg.train.loss_chunk_size)
    return pretrain_loss(cfg)


def with_sparse(cfg, sparse: bool | None, sparse_config):
    """``cfg`` with InfLLM v2 switched on (``sparse_config``) or off; ``sparse=None`` leaves it."""
    if sparse is None or sparse == (cfg.sparse_config is not None):
        return cfg
    if sparse and sparse_config is None:
        raise ValueError("a stage has sparse: true, but neither the teacher nor the recipe has a sparse_config")
    return cfg.model_copy(update={"sparse_config": sparse_config if sparse else None})


class Conversion:
    """One conversion run (see the module docstring); ``run()`` returns the summary."""

    def __init__(self, recipe: ConvertRecipe, console: Console | None = None):
        self.recipe, self.console = recipe, console or Console()
        self.out = Path(recipe.output_dir)
        self.mesh = make_mesh(recipe.mesh)
        self.dtype, self.param_dtype = jnp.dtype(recipe.dtype), jnp.dtype(recipe.param_dtype)
        self.tokenizer_source = recipe.data.get("tokenizer") or BYTE_TOKENIZER
        self.teacher_cfg, self.teacher = load_any(
            recipe.teacher, mesh=self.mesh, dtype=self.dtype, param_dtype=self.dtype
        )
        check_teacher(self.teacher_cfg)
        self._check_vocab()
        self.initial_types = initial_mixer_types(recipe.convert, self.teacher_cfg)

    def _check_vocab(self) -> None:
        tok = load_tokenizer(self.recipe.data.get("tokenizer"))
        check_vocab(
            tok, self.teacher_cfg.vocab_size, where=f"data.tokenizer of the recipe vs teacher {self.recipe.teacher}"
        )

    def _load(self, directory: Path, sparse: bool | None = None):
        """A checkpoint as the stage's model; ``sparse`` switches InfLLM v2 on/off (no parameters change)."""
        loaded, model = load_any(directory, mesh=self.mesh, dtype=self.dtype, param_dtype=self.param_dtype)
        cfg = with_sparse(loaded, sparse, self.recipe.sparse_config or self.teacher_cfg.sparse_config)
        if cfg == loaded:
            return cfg, model
        new = create_model(cfg, mesh=self.mesh, dtype=self.dtype, param_dtype=self.param_dtype)
        nnx.update(new, nnx.state(model, nnx.Param))
        return cfg, new

    def transfer_stage(self) -> Path:
        target = self.out / "stage-0-transfer"
        if is_native_checkpoint(target):
            self.console.print(f"[bold]stage 0[/] transfer: done ({target})")
            return target
        cv = self.recipe.convert
        self.console.print(f"[bold]stage 0[/] transfer: {self.recipe.teacher} -> {list(self.initial_types)}")
        cfg, model = transfer(
            self.teacher,
            self.initial_types,
            nope=cv.nope,
            output_gate=cv.output_gate,
            overrides=cv.model,
            seed=self.recipe.seed,
            param_dtype=self.param_dtype,
            require_softmax=cv.mixer_types is not None,  # before selection every candidate is Lightning
        )
        return save_model(model, cfg, target, tokenizer_source=self.tokenizer_source)

    def train_stage(self, index: int, stage: StageConfig, previous: Path) -> tuple[Path, dict]:
        from minicpm_jax.train.loop import run_training

        stage_dir = self.out / f"stage-{index}-{stage.name}"
        if is_native_checkpoint(stage_dir / "final") and (stage_dir / "summary.json").is_file():
            self.console.print(f"[bold]stage {index}[/] {stage.name}: done ({stage_dir / 'final'})")
            return stage_dir / "final", json.loads((stage_dir / "summary.json").read_text())
        model_cfg, model = self._load(previous, stage.sparse)
        label, patterns = stage_trainable(stage, model_cfg)
        frozen = {} if stage.loss == "lm" else {"teacher": self.recipe.teacher}
        cfg = stage_config(
            self.recipe, stage, model_cfg.model_dump(mode="json"), stage_dir, frozen=frozen, trainable=patterns
        )
        loss_fn = stage_loss(stage, cfg)
        self.console.print(
            f"[bold]stage {index}[/] {stage.name}: loss {stage.loss}, {cfg.train.steps} steps, trainable {label}, "
            f"sparse {'on' if model_cfg.sparse_config else 'off'}, seq_len {cfg.data.seq_len}"
        )
        summary = run_training(
            cfg,
            loss_fn=loss_fn,
            model=model,
            frozen={"teacher": self.teacher} if frozen else None,
            console=self.console,
        )
        if summary["steps"] != cfg.train.steps:
            raise InterruptedError(f"stage {stage.name} stopped at step {summary['steps']} of {cfg.train.steps}")
        atomic_write_text(stage_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        return stage_dir / "final", summary

    def selection_stage(self, aligned_dir: Path) -> Path:
        sel_dir = self.out / "selection"
        if is_native_checkpoint(sel_dir / "hybrid"):
            self.console.print(f"[bold]selection[/]: done ({sel_dir})")
            return sel_dir / "hybrid"

        cv = self.recipe.convert
        self.console.print("[bold]selection[/]: scoring each candidate layer converted alone")
        _, aligned = load_any(aligned_dir, mesh=self.mesh, dtype=self.dtype, param_dtype=self.dtype)
        selection = select_layers(
            self.teacher,
            aligned,
            ratio=cv.softmax_ratio,
            keep_first_last=cv.keep_first_last,
            commonsense=cv.selection.commonsense,
            retrieval=cv.selection.retrieval,
            tokenizer=load_tokenizer(self.recipe.data.get("tokenizer")),
            batch_size=cv.selection.batch_size,
            seed=self.recipe.seed,
            console=self.console,
        )
        write_selection(sel_dir, selection)
        cfg, hybrid = transfer(
            self.teacher,
            selection["mixer_types"],
            nope=cv.nope,
            output_gate=cv.output_gate,
            overrides=cv.model,
            seed=self.recipe.seed,
            param_dtype=self.param_dtype,
        )
        replace_mixers(hybrid, aligned, [i for i, k in enumerate(cfg.layer_mixers) if k == LIGHTNING])
        self.console.print(f"  mixer_types: {selection['mixer_types']}")
        return save_model(hybrid, cfg, sel_dir / "hybrid", tokenizer_source=self.tokenizer_source)

    def run(self) -> dict:
        previous = self.transfer_stage()
        stages = {}
        for index, stage in enumerate(self.recipe.stages, start=1):
            previous, stages[stage.name] = self.train_stage(index, stage, previous)
            if stage.loss == "align" and self.recipe.convert.mixer_types is None:
                previous = self.selection_stage(previous)
        cfg, model = load_any(previous, dtype=self.dtype, param_dtype=self.param_dtype)
        summary = {"teacher": self.recipe.teacher, "final": str(previous), "mixer_types": list(cfg.layer_mixers)}
        if self.recipe.convert.export_hf:
            from minicpm_jax.interop import save_hf_checkpoint

            export = save_hf_checkpoint(
                model, cfg, self.out / "export-hf", format="minicpm", dtype="float32", tokenizer_dir=previous
            )
            summary["export_hf"] = str(export)
        summary["stages"] = stages
        atomic_write_text(self.out / "conversion.json", json.dumps(summary, indent=2, default=str) + "\n")
        return summary


def run_conversion(recipe: ConvertRecipe, console: Console | None = None) -> dict:
    """Run ``recipe`` (resuming a previous run in its ``output_dir``); returns the summary."""
    return Conversion(recipe, console).run()
