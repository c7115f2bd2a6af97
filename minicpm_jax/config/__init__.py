"""Typed configs, presets, overrides and Hugging Face ``config.json`` conversion."""

from minicpm_jax.config.hf import model_config_from_hf, model_config_to_hf
from minicpm_jax.config.loading import (
    CONFIG_DIR,
    ConfigError,
    apply_overrides,
    build_config,
    build_model_config,
    load_config,
    load_recipe,
    preset_names,
    read_model_preset,
)
from minicpm_jax.config.schema import (
    MIXER_TYPES,
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    RopeScaling,
    SparseConfig,
    TrainConfig,
)

__all__ = [
    "CONFIG_DIR",
    "MIXER_TYPES",
    "Config",
    "ConfigError",
    "DataConfig",
    "MeshConfig",
    "OptimizerConfig",
    "TrainConfig",
    "ModelConfig",
    "RopeScaling",
    "SparseConfig",
    "apply_overrides",
    "build_config",
    "build_model_config",
    "load_config",
    "load_recipe",
    "model_config_from_hf",
    "model_config_to_hf",
    "preset_names",
    "read_model_preset",
]
