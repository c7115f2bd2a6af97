"""The conversion recipe (``configs/recipes/convert-*.yaml``): a teacher, how to build the hybrid, and a
list of training stages run one after another by the shared engine.

A stage is the run config of ``minicpm-jax train`` (the recipe's top-level ``mesh``, ``dtype``,
``data``, ``optimizer``, ``train`` sections, with the stage's own ``data`` / ``optimizer`` / ``train``
on top) plus a ``loss`` (``align``: stage-1 hidden-state alignment, ``kl``: KL distillation from the
teacher, ``lm``: next-token loss), a ``trainable`` filter (``lightning``: only the Lightning mixers,
``all``, or a list of parameter patterns) and ``sparse`` (InfLLM v2 on/off; default: as the teacher).
Command-line overrides address a stage by name: ``stages.distill.train.steps=50``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, StrictBool, StrictInt

from minicpm_jax.config.loading import (
    ConfigError,
    apply_overrides,
    build_config,
    read_recipe_yaml,
    recipe_path,
    validate_recipe,
)
from minicpm_jax.config.schema import DTYPES, Config, MeshConfig, ModelConfig, SparseConfig, _Strict
from minicpm_jax.paths import as_path

LOSSES = ("align", "kl", "lm")


class SelectionConfig(_Strict):
    """Proxies of layer selection: lists of ``{task, metric, higher_is_better, **options}``."""

    commonsense: tuple[dict[str, Any], ...] = ()
    retrieval: tuple[dict[str, Any], ...] = ()
    batch_size: StrictInt = 8


class ConvertConfig(_Strict):
    """How the hybrid is built: given ``mixer_types`` (skips selection), or selected at ``softmax_ratio``."""

    mixer_types: tuple[str, ...] | None = None
    softmax_ratio: float = 0.25
    keep_first_last: StrictBool = True
    nope: StrictBool = True  # retained softmax layers drop RoPE
    output_gate: StrictBool = True  # retained softmax layers gain o_gate
    selection: SelectionConfig = SelectionConfig()
    model: dict[str, Any] = {}  # hybrid config fields without parameters (max_position_embeddings, rope_scaling...)
    export_hf: StrictBool = True  # write the final hybrid as a Hugging Face checkpoint (SALA layout)


class StageConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    loss: Literal[LOSSES]
    trainable: Literal["lightning", "all"] | tuple[str, ...] | None = None  # default: lm -> all, else lightning
    sparse: StrictBool | None = None
    data: dict[str, Any] = {}
    optimizer: dict[str, Any] = {}
    train: dict[str, Any] = {}


class ConvertRecipe(_Strict):
    teacher: str  # a dense MiniCPM4 checkpoint, Hugging Face directory or preset
    output_dir: str = "runs/convert"
    mesh: MeshConfig = MeshConfig()
    dtype: Literal[DTYPES] = "bfloat16"
    param_dtype: Literal[DTYPES] = "float32"
    seed: StrictInt = 0
    data: dict[str, Any] = {}
    optimizer: dict[str, Any] = {}
    train: dict[str, Any] = {}
    sparse_config: SparseConfig | None = None  # for `sparse: true` stages of a teacher without one
    convert: ConvertConfig = ConvertConfig()
    stages: tuple[StageConfig, ...] = Field(min_length=1)


def _stage_overrides(raw: dict, overrides) -> list[str]:
    """Rewrite ``stages.<name>.key=value`` into ``stages.<index>.key=value`` (lists become index dicts)."""
    names = [s.get("name") for s in raw.get("stages", []) if isinstance(s, dict)]
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        if parts[0] == "stages" and len(parts) > 2:
            if parts[1] not in names and not parts[1].isdigit():
                raise ConfigError([f"override {item!r}: no stage named {parts[1]!r}; stages: {names}"])
            parts[1] = str(names.index(parts[1])) if parts[1] in names else parts[1]
            item = ".".join(parts) + "=" + value
        out.append(item)
    return out


def load_convert_recipe(path: str | Path, overrides=()) -> ConvertRecipe:
    """A validated recipe from YAML plus dotted overrides; every stage's run config is checked too."""
    path = recipe_path(path)
    raw = read_recipe_yaml(path)
    overrides = _stage_overrides(raw, overrides)
    raw["stages"] = {str(i): s for i, s in enumerate(raw.get("stages") or [])}
    raw = apply_overrides(raw, overrides)
    if isinstance(raw["stages"], dict):  # an override ``stages=[...]`` replaces the whole list
        raw["stages"] = [raw["stages"][k] for k in sorted(raw["stages"], key=int)]
    recipe = validate_recipe(raw, ConvertRecipe, str(path))
    errors = []
    if any(s.loss == "align" for s in recipe.stages[1:]):
        errors.append("stages: an 'align' stage (stage 1, hidden-state alignment) can only be the first stage")
    if recipe.convert.mixer_types is None and recipe.stages[0].loss != "align":
        errors.append("stages: layer selection needs a first 'align' stage (or give convert.mixer_types)")
    if recipe.convert.mixer_types is None and not (
        recipe.convert.selection.commonsense and recipe.convert.selection.retrieval
    ):
        errors.append("convert.selection: give commonsense and retrieval proxies (or give convert.mixer_types)")
    from minicpm_jax.eval.loading import resolve_task_paths

    base = as_path(path).parent
    sel = recipe.convert.selection
    sel = sel.model_copy(
        update={k: tuple(resolve_task_paths(e, base) for e in getattr(sel, k)) for k in ("commonsense", "retrieval")}
    )
    recipe = recipe.model_copy(update={"convert": recipe.convert.model_copy(update={"selection": sel})})
    names = [s.name for s in recipe.stages]
    if len(set(names)) != len(names):
        errors.append(f"stages: names must be unique, got {names}")
    if errors:
        raise ConfigError(errors, str(path))
    placeholder = ModelConfig().model_dump(mode="json")  # the real model comes from the teacher at run time
    for stage in recipe.stages:
        stage_config(recipe, stage, placeholder, Path(recipe.output_dir), frozen={}, trainable=[])
    return recipe


def stage_config(
    recipe: ConvertRecipe, stage: StageConfig, model: dict, output_dir: Path, *, frozen: dict, trainable: list[str]
) -> Config:
    """The engine's run config of one stage (``trainable`` patterns, ``frozen`` sources)."""
    raw = {
        "model": model,
        "mesh": recipe.mesh.model_dump(),
        "dtype": recipe.dtype,
        "param_dtype": recipe.param_dtype,
        "seed": recipe.seed,
        "data": {**recipe.data, **stage.data},
        "optimizer": {**recipe.optimizer, **stage.optimizer},
        "train": {
            **recipe.train,
            **stage.train,
            "output_dir": str(output_dir),
            "frozen": frozen,
            "trainable": trainable,
        },
    }
    try:
        return build_config(raw)
    except ConfigError as e:
        raise ConfigError([f"stages.{stage.name}: {line}" for line in e.errors]) from None


def stage_tokens(recipe: ConvertRecipe) -> int:
    """Training tokens of all stages of ``recipe`` (steps x global batch x seq_len)."""
    total = 0
    for s in recipe.stages:
        train, data = {**recipe.train, **s.train}, {**recipe.data, **s.data}
        total += train["steps"] * train["global_batch_size"] * data["seq_len"]
    return total
