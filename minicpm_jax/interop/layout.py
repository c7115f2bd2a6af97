"""Checkpoint layout: our parameter paths <-> Hugging Face tensor names, shapes and transforms.

The model's attribute names mirror the official checkpoint, so a parameter's state path *is* its
key (``kernel`` -> ``weight``). Linear kernels are ``[*in, *out]`` here and ``[out, in]`` in PyTorch:
export flattens the ``fan_in_dims`` leading dims and transposes; import undoes exactly that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flax import nnx

from minicpm_jax.config.schema import ModelConfig


@dataclass(frozen=True)
class Entry:
    """One checkpoint tensor: where it lives in the model and its shape on both sides."""

    path: tuple
    shape: tuple[int, ...]  # ours
    fan_in_dims: int  # 0 for non-linear parameters (embedding, norms)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if not self.fan_in_dims:
            return self.shape
        return (math.prod(self.shape[self.fan_in_dims :]), math.prod(self.shape[: self.fan_in_dims]))


def hf_key(path: tuple) -> str:
    """``('model', 'layers', 0, 'self_attn', 'q_proj', 'kernel')`` -> ``model.layers.0.self_attn.q_proj.weight``."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, "weight" if leaf == "kernel" else leaf])


def param_variables(model_or_state) -> list[tuple[tuple, nnx.Variable]]:
    """``(path, variable)`` of every parameter of a model or an ``nnx.State``."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return [(tuple(p), v) for p, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param)]


def layout(model_or_state) -> dict[str, Entry]:
    """``{hf key: Entry}`` for every parameter (abstract or concrete)."""
    return {
        hf_key(p): Entry(p, tuple(v.get_value().shape), v.get_metadata().get("fan_in_dims", 0))
        for p, v in param_variables(model_or_state)
    }


def to_hf(value: np.ndarray, entry: Entry) -> np.ndarray:
    """Our array -> the PyTorch-layout array."""
    if not entry.fan_in_dims:
        return value
    return value.reshape(math.prod(entry.shape[: entry.fan_in_dims]), -1).T


def from_hf(value: np.ndarray, entry: Entry) -> np.ndarray:
    """PyTorch-layout array -> our array."""
    if not entry.fan_in_dims:
        return value
    return value.T.reshape(entry.shape)


def llama_fold_scales(cfg: ModelConfig, key: str) -> float:
    """Multiplier that folds MiniCPM's muP scalars into tensor ``key`` for a plain Llama checkpoint."""
    if key == "model.embed_tokens.weight":
        return cfg.scale_emb
    if key.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
        return cfg.residual_scale
    if key == "lm_head.weight":
        return 1.0 / cfg.logit_divisor
    return 1.0
