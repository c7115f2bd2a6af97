"""Memory plan on paper: lower and compile the real train step from abstract shapes (nothing is
allocated) and read XLA's per-device memory analysis, for several meshes and batch sizes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from minicpm_jax.config.schema import Config, MeshConfig, ModelConfig
from minicpm_jax.model.factory import abstract_model
from minicpm_jax.sharding import make_mesh
from minicpm_jax.train import trainable as tr
from minicpm_jax.train.frozen import prepare_frozen
from minicpm_jax.train.loop import pretrain_loss
from minicpm_jax.train.state import COUNTERS, build_train_step
from minicpm_jax.train.step import check_batch, leaf_batch_sharding


@dataclass(frozen=True)
class PlanRow:
    mesh: dict[str, int]
    batch_size: int
    seq_len: int
    argument_bytes: int  # parameters, optimizer state, batch resident on each device
    temp_bytes: int  # activations and scratch at the peak of the step
    compile_seconds: float

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes


def plan_train_memory(
    cfg: Config,
    meshes: Sequence[MeshConfig],
    batch_sizes: Sequence[int],
    seq_len: int,
    *,
    loss_fn=None,
    frozen_models: dict[str, ModelConfig] | None = None,
    trainable=None,
    batch_fields=None,
) -> list[PlanRow]:
    """One row per (mesh, global batch size): XLA's per-device memory of the compiled train step.

    ``loss_fn`` (default the LM loss), ``frozen_models`` (name -> config of an abstract frozen model
    in the compute dtype, e.g. a conversion's teacher) and ``trainable`` as the engine takes them;
    ``batch_fields(rows, seq_len) -> {name: (shape, dtype)}`` the batch the loss reads (default: LM rows)."""
    rows = []
    dtype = jnp.dtype(cfg.dtype)
    model = abstract_model(
        cfg.model, dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype), scan_layers=cfg.train.scan_layers
    )
    graphdef, params_state = nnx.split(model, nnx.Param)
    for mesh_cfg in meshes:
        mesh = make_mesh(mesh_cfg, jax.devices()[: _size(mesh_cfg)])
        teachers = {
            name: abstract_model(c, dtype=dtype, param_dtype=dtype) for name, c in (frozen_models or {}).items()
        }
        frozen = prepare_frozen(teachers or None, mesh)
        optimizer, _, sharding, mask, step = build_train_step(
            cfg, mesh, loss_fn or pretrain_loss(cfg), graphdef, params_state, frozen, trainable
        )
        params = jax.eval_shape(lambda: nnx.to_pure_dict(params_state))
        state = {
            "params": params,
            "opt_state": jax.eval_shape(optimizer.init, tr.split(params, mask)[0]),
            **{name: jax.ShapeDtypeStruct((), jnp.int32) for name in COUNTERS},
        }
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, sharding)
        for batch_size in batch_sizes:
            check_batch(mesh, batch_size, cfg.train.micro_batches, seq_len)
            fields = (batch_fields or lm_batch_fields)(batch_size, seq_len)
            batch = {}
            for name, (shape, dt) in fields.items():
                leaf = jax.ShapeDtypeStruct(shape, dt)
                batch[name] = jax.ShapeDtypeStruct(shape, dt, sharding=leaf_batch_sharding(mesh, leaf))
            start = time.perf_counter()
            memory = step.lower(state, frozen.arrays, batch).compile().memory_analysis()
            rows.append(
                PlanRow(
                    dict(mesh.shape),
                    batch_size,
                    seq_len,
                    memory.argument_size_in_bytes,
                    memory.temp_size_in_bytes,
                    time.perf_counter() - start,
                )
            )
    return rows


def lm_batch_fields(rows: int, seq_len: int) -> dict:
    """The packed next-token batch of pretraining."""
    tokens = ((rows, seq_len), jnp.int32)
    return {
        "input_ids": tokens,
        "targets": tokens,
        "positions": tokens,
        "segment_ids": tokens,
        "loss_mask": ((rows, seq_len), jnp.float32),
    }


def _size(mesh_cfg: MeshConfig) -> int:
    return mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor * mesh_cfg.sequence
