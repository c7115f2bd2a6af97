"""Config loading: YAML presets in ``configs/models``, dotted overrides, one error for every problem."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from minicpm_jax.config.schema import Config, ModelConfig
from minicpm_jax.paths import as_path, is_remote


def _config_dir() -> Path:
    """The presets and recipes: the wheel's package data (``minicpm_jax/_configs``, built from the
    repository's top-level ``configs/``), else, in a source checkout or editable install, ``configs/``."""
    shipped = resources.files("minicpm_jax") / "_configs"
    return Path(str(shipped)) if shipped.is_dir() else Path(__file__).resolve().parents[2] / "configs"


CONFIG_DIR = _config_dir()
MODELS_DIR = CONFIG_DIR / "models"


class ConfigError(ValueError):
    """A config with problems; ``errors`` holds one line per offending key."""

    def __init__(self, errors: Sequence[str], source: str = "config"):
        self.errors = list(errors)
        super().__init__(f"invalid {source} ({len(self.errors)} problem(s)):\n  " + "\n  ".join(self.errors))


def preset_names() -> list[str]:
    """Names of the model presets shipped in ``configs/models``."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def read_model_preset(name_or_path: str | Path) -> dict[str, Any]:
    """The raw dict of a preset name (``minicpm4-0.5b``) or a YAML file path."""
    path = as_path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = MODELS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError([f"model: no preset or file {str(name_or_path)!r}; presets: {preset_names()}"])
    return yaml.safe_load(path.read_text()) or {}


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict copy."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"override {item!r}: expected dotted.key=value"])
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"override {item!r}: {part!r} is not a section"])
            node = child
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError([f"override {item!r}: the value is not valid YAML ({problem})"]) from None
    return out


def load_config(model: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Root config from a model preset name, YAML path or dict, plus dotted overrides."""
    model_raw = dict(model) if isinstance(model, Mapping) else read_model_preset(model)
    return build_config(apply_overrides({"model": model_raw}, overrides))


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Root config from a recipe YAML (``configs/recipes``) plus dotted overrides.

    The recipe's ``model`` is a preset name, or a mapping with ``preset`` plus fields that override
    the preset's. ``model=NAME`` or ``model.preset=NAME`` on the command line (a preset of
    ``configs/models`` or a YAML path) replaces the recipe's preset; the model is then resolved as,
    lowest to highest precedence::

        recipe's preset  <  command-line preset  <  recipe's model fields  <  command-line model fields

    so the recipe's own adjustments (e.g. ``vocab_size`` sized for its tokenizer) carry over to the
    new preset, and ``model.<field>=...`` overrides win over everything, wherever they appear on the
    command line. If several presets are given on the command line, the last one is used.
    """
    raw = read_recipe_yaml(path)
    cli_preset, overrides = split_preset_overrides(overrides)
    model = raw.get("model", {})
    model = {"preset": model} if isinstance(model, str) else dict(model)
    if cli_preset is not None:
        model["preset"] = cli_preset
    if "preset" in model:
        model = {**read_model_preset(model.pop("preset")), **model}
    return build_config(apply_overrides({**raw, "model": model}, overrides))


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: the path itself (a local path or a URL, ``minicpm_jax.paths``), or for a bare name
    (``pretrain-tiny``) the shipped ``recipes/NAME.yaml``."""
    if is_remote(name_or_path):
        return as_path(name_or_path)
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.is_file():
        return CONFIG_DIR / "recipes" / f"{name_or_path}.yaml"
    return path


def read_recipe_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a recipe (file or shipped name; empty file: ``{}``); one clear error when there is none."""
    path = recipe_path(path)
    if not path.is_file():
        names = sorted(p.stem for p in (CONFIG_DIR / "recipes").glob("*.yaml"))
        raise ConfigError([f"recipe: no file {str(path)!r}; shipped recipes: {names}"])
    return yaml.safe_load(path.read_text()) or {}


def validate_recipe(raw: Mapping[str, Any], schema: type[BaseModel], source: str):
    """``schema`` validated from ``raw``, every problem in one ``ConfigError`` (as ``build_config``)."""
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError([_describe(err, schema) for err in e.errors()], source) from None


def split_preset_overrides(overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the last ``model=NAME`` / ``model.preset=NAME`` preset or None, the other overrides)."""
    preset, rest = None, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() in ("model", "model.preset"):
            parsed = yaml.safe_load(value)
            if not isinstance(parsed, str) or not parsed:
                raise ConfigError(
                    [f"{key.strip()}: expected a preset name {preset_names()} or a YAML file path (got {value!r})"]
                )
            preset = parsed
        else:
            rest.append(item)
    return preset, rest


def build_config(raw: Mapping[str, Any]) -> Config:
    """Validate a root-config dict, reporting every problem at once."""
    errors = []
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        cfg = None
        errors += [_describe(err, Config) for err in e.errors() if err["loc"][0] != "model"]
    model_raw = raw.get("model", {})
    errors += model_errors(model_raw) if isinstance(model_raw, Mapping) else ["model: must be a mapping"]
    if errors:
        raise ConfigError(errors)
    return cfg


def build_model_config(raw: Mapping[str, Any], source: str = "model config") -> ModelConfig:
    """Validate a model-config dict, reporting every problem at once."""
    errors = model_errors(raw)
    if errors:
        raise ConfigError(errors, source)
    return ModelConfig.model_validate(raw)


def model_errors(raw: Mapping[str, Any]) -> list[str]:
    """Type/key errors plus cross-field rule violations of a model-config dict."""
    try:
        return ModelConfig.model_validate(raw).validate_rules()
    except ValidationError as e:
        errors = [_describe(err, ModelConfig, "model") for err in e.errors()]
        bad = {err["loc"][0] for err in e.errors()}
        try:  # rules still apply to the fields that did validate (defaults stand in for the others)
            rules = ModelConfig.model_validate({k: v for k, v in raw.items() if k not in bad}).validate_rules()
            errors += [r for r in rules if not any(str(b) in r for b in bad)]
        except ValidationError:
            pass
        return errors


def _describe(err: dict, schema: type[BaseModel], prefix: str = "") -> str:
    loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
    if err["type"] == "extra_forbidden":
        owner = _section(schema, err["loc"][:-1])
        allowed = sorted(owner.model_fields) if owner else []
        return f"{loc}: unknown key; allowed keys: {', '.join(allowed)}"
    return f"{loc}: {err['msg']} (got {err['input']!r})"


def _section(schema: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        if isinstance(part, int):  # an item of a list / tuple of sections
            continue
        field = schema.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [
            a
            for a in getattr(field.annotation, "__args__", (field.annotation,))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not candidates:
            return None
        schema = candidates[0]
    return schema


def _deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}
