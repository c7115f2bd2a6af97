"""``config.json`` of the two export formats and their import.

- ``"minicpm"``: the official layout (``config.hf``), loads with ``trust_remote_code=True``.
- ``"llama"``: plain ``LlamaForCausalLM``: muP scalars folded into the weights, untied head, and
  LongRoPE pinned to the factors the official code would use (both lists = the chosen one, explicit
  ``attention_factor``), so transformers' per-length switch cannot change them. Importing a Llama
  checkpoint gives a MiniCPM config with unit scalars (``scale_emb=1``, residual and logit scales 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from minicpm_jax.config.hf import model_config_from_hf, model_config_to_hf
from minicpm_jax.config.loading import ConfigError, build_model_config
from minicpm_jax.config.schema import ModelConfig
from minicpm_jax.model.rope import rope_factors

FORMATS = ("minicpm", "llama")


def export_config(cfg: ModelConfig, fmt: str, torch_dtype: str) -> dict[str, Any]:
    """The ``config.json`` dict of ``cfg`` written as format ``fmt``."""
    if fmt == "minicpm":
        return model_config_to_hf(cfg, torch_dtype)
    if fmt != "llama":
        raise ValueError(f"format: {fmt!r} is not supported; use one of {list(FORMATS)}")
    if set(cfg.layer_mixers) != {"minicpm4"} or cfg.attn_use_output_gate or not cfg.attn_use_rope:
        raise ValueError(
            "format='llama' needs a dense MiniCPM4 model (softmax layers with RoPE, no output "
            "gates); export MiniCPM-SALA with format='minicpm'"
        )
    hd = cfg.attn_head_dim
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": hd,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.attention_dropout,
        "tie_word_embeddings": False,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": _json_ids(cfg.eos_token_id),
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": torch_dtype,
    }
    if cfg.rope_scaling is not None:
        ext, mscale = rope_factors(cfg, hd)
        orig = cfg.rope_scaling.original_max_position_embeddings
        factors = [float(f) for f in ext]
        out["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": factors,
            "short_factor": factors,
            "factor": cfg.max_position_embeddings / orig,
            "original_max_position_embeddings": orig,
            "attention_factor": mscale,
        }
        out["original_max_position_embeddings"] = orig  # transformers reads this top-level field
    return out


def import_config(hf: Mapping[str, Any]) -> tuple[ModelConfig, str]:
    """``(ModelConfig, format)`` of a ``config.json`` dict of either format."""
    if hf.get("model_type") != "llama":
        return model_config_from_hf(hf), "minicpm"
    errors = [
        f"{k}: {hf[k]!r} is not supported (MiniCPM has none)" for k in ("attention_bias", "mlp_bias") if hf.get(k)
    ]
    if hf.get("hidden_act", "silu") != "silu":
        errors.append(f"hidden_act: {hf['hidden_act']!r}; only 'silu' is supported")
    layers, hidden = hf.get("num_hidden_layers", 32), hf.get("hidden_size", 4096)
    raw = {
        k: hf[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_theta",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "initializer_range",
            "attention_dropout",
        )
        if k in hf
    }
    if hf.get("head_dim") not in (None, hidden // hf.get("num_attention_heads", 32)):
        raw["head_dim"] = hf["head_dim"]
    raw.update(model_type="minicpm", scale_emb=1.0, dim_model_base=hidden, scale_depth=math.sqrt(layers))
    rs = hf.get("rope_scaling")
    if rs:
        if rs.get("rope_type", rs.get("type")) != "longrope" or rs.get("long_factor") != rs.get("short_factor"):
            errors.append(
                "rope_scaling: only longrope with long_factor == short_factor (as written by "
                f"format='llama') is supported, got {rs!r}"
            )
        else:
            orig = hf.get(
                "original_max_position_embeddings",
                rs.get("original_max_position_embeddings", raw.get("max_position_embeddings")),
            )
            raw["rope_scaling"] = {
                "rope_type": "longrope",
                "long_factor": rs["long_factor"],
                "short_factor": rs["short_factor"],
                "original_max_position_embeddings": orig,
            }
    if errors:
        raise ConfigError(errors, "config.json")
    cfg = build_model_config(raw, "config.json")
    if (
        rs
        and "attention_factor" in rs
        and not math.isclose(rs["attention_factor"], rope_factors(cfg, cfg.attn_head_dim)[1])
    ):
        raise ConfigError(
            [
                f"rope_scaling.attention_factor: {rs['attention_factor']} differs from LongRoPE's "
                "sqrt(1 + ln(max/orig)/ln(orig)) for this config"
            ],
            "config.json",
        )
    return cfg, "llama"


def generation_config(cfg: ModelConfig) -> dict[str, Any]:
    """``generation_config.json`` with MiniCPM's sampling defaults (temperature 0.8, top-p 0.8)."""
    eos = _json_ids(cfg.eos_token_id)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    return {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.8,
    }


def _json_ids(ids):
    return list(ids) if isinstance(ids, tuple) else ids
