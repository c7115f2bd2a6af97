"""``minicpm-jax info``: parameter counts and per-device memory, from shapes only (nothing allocated)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from minicpm_jax.config.schema import Config
from minicpm_jax.model.factory import abstract_model, param_axes
from minicpm_jax.sharding import divisibility_errors, mesh_shape, shard_count
from minicpm_jax.train.trainable import selected

ADAM_MOMENTS = 2  # AdamW keeps mu and nu, fp32, one of each per parameter


@dataclass(frozen=True)
class ModelInfo:
    params: int
    embedding_params: int  # input embedding + untied lm_head
    mesh: dict[str, int]
    params_per_device: int  # largest shard sum over devices (even shards: the same on every device)
    param_bytes: int  # per device, master weights in param_dtype
    grad_bytes: int  # per device, gradients in param_dtype (trainable parameters only)
    optimizer_bytes: int  # per device, AdamW moments in fp32 (trainable parameters only)
    trainable_params: int  # parameters selected by train.trainable (all when it is empty)


def model_info(cfg: Config, num_devices: int) -> ModelInfo:
    """Counts and per-device bytes of ``cfg.model`` on ``cfg.mesh`` spread over ``num_devices``."""
    sizes = mesh_shape(cfg.mesh, num_devices)
    axes = param_axes(abstract_model(cfg.model))
    errors = [e for name, (shape, names) in axes.items() for e in divisibility_errors(sizes, name, shape, names)]
    if errors:
        raise ValueError(f"mesh {sizes} does not fit the model:\n  " + "\n  ".join(errors))
    total = sum(math.prod(shape) for shape, _ in axes.values())
    embedding = sum(
        math.prod(shape) for name, (shape, _) in axes.items() if name.startswith(("model.embed_tokens", "lm_head"))
    )
    shard = {
        name: math.prod(d // shard_count(sizes, a) for d, a in zip(shape, names))
        for name, (shape, names) in axes.items()
    }
    trained = selected(list(axes), cfg.train.trainable)
    per_device, trained_per_device = sum(shard.values()), sum(shard[n] for n in trained)
    width = np.dtype(cfg.param_dtype).itemsize
    return ModelInfo(
        total,
        embedding,
        sizes,
        per_device,
        per_device * width,
        trained_per_device * width,
        trained_per_device * 4 * ADAM_MOMENTS,
        sum(math.prod(axes[n][0]) for n in trained),
    )


def human_count(n: int) -> str:
    """433873920 -> '433.9M', 8185253888 -> '8.19B'."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
