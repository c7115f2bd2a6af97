"""Official Hugging Face ``config.json`` <-> ``ModelConfig`` (the ``format="minicpm"`` layout)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minicpm_jax.config.loading import ConfigError, build_model_config
from minicpm_jax.config.schema import ModelConfig

# Keys of config.json that describe the file, not the architecture.
HF_METADATA_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "auto_map",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "_attn_implementation",
    }
)
SUPPORTED_MODEL_TYPES = ("minicpm", "minicpm_sala")
SALA_ONLY_FIELDS = (
    "mixer_types",
    "lightning_nh",
    "lightning_nkv",
    "lightning_head_dim",
    "lightning_scale",
    "lightning_use_rope",
    "attn_use_rope",
    "attn_use_output_gate",
    "qk_norm",
    "use_output_gate",
    "use_output_norm",
    "shift_labels",
)

_AUTO_CLASSES = (
    "AutoConfig",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
)
_REMOTE_CODE = {
    # model_type: (Hub repo holding the official modeling code, architecture, module, class prefix).
    # MiniCPM4-8B's modeling file serves every dense/sparse MiniCPM4 (0.5B's refuses sparse_config).
    "minicpm": ("openbmb/MiniCPM4-8B", "MiniCPMForCausalLM", "minicpm", "MiniCPM"),
    "minicpm_sala": ("openbmb/MiniCPM-SALA", "MiniCPMSALAForCausalLM", "minicpm_sala", "MiniCPMSALA"),
}


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig of an official ``config.json`` dict (MiniCPM4 has no ``model_type`` key)."""
    model_type = hf.get("model_type")
    if model_type not in (None, *SUPPORTED_MODEL_TYPES):
        raise ConfigError(
            [
                f"model_type: {model_type!r} is not supported; supported: "
                f"{list(SUPPORTED_MODEL_TYPES)} (or no model_type, as in MiniCPM4-0.5B)"
            ],
            "config.json",
        )
    raw = {k: v for k, v in hf.items() if k not in HF_METADATA_KEYS}
    raw["model_type"] = model_type or "minicpm"
    return build_model_config(raw, "config.json")


def remote_code_fields(model_type: str) -> dict[str, Any]:
    """``architectures`` and ``auto_map`` pointing at the official remote code on the Hub.

    ``repo--module.Class`` references let ``from_pretrained(dir, trust_remote_code=True)`` fetch
    the official modeling code for a local export (online); the directory holds no code.
    """
    repo, arch, module, cls = _REMOTE_CODE[model_type]
    auto = {
        name: f"modeling_{module}.{cls}{name.removeprefix('Auto').removeprefix('Model') or 'Model'}"
        for name in _AUTO_CLASSES
    }
    auto["AutoConfig"] = f"configuration_{module}.{cls}Config"
    auto["AutoModelForCausalLM"] = auto["AutoModelForSeq2SeqLM"] = f"modeling_{module}.{arch}"
    return {"architectures": [arch], "auto_map": {k: f"{repo}--{v}" for k, v in auto.items()}}


def model_config_to_hf(cfg: ModelConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """Official ``config.json`` dict of a model config (loads with ``trust_remote_code=True``)."""
    d = cfg.model_dump(mode="json")
    if cfg.model_type != "minicpm_sala":
        for key in SALA_ONLY_FIELDS:
            d.pop(key)
    for key in ("head_dim", "shift_labels"):
        if d.get(key, 0) is None:
            d.pop(key)
    if d["rope_scaling"] and d["rope_scaling"]["factor"] is None:
        del d["rope_scaling"]["factor"]
    return {**remote_code_fields(cfg.model_type), **d, "torch_dtype": torch_dtype}
