"""Train-state construction: parameters (pure dict), optimizer state over the trainable leaves,
counters, frozen state, and their shardings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from minicpm_jax.config.schema import Config
from minicpm_jax.model.decoder import MiniCPMForCausalLM
from minicpm_jax.model.factory import create_model
from minicpm_jax.train import trainable as tr
from minicpm_jax.train.frozen import Frozen, prepare_frozen
from minicpm_jax.train.optimizer import build_optimizer
from minicpm_jax.train.step import LossFn, make_eval_step, make_train_step, opt_state_shardings, param_shardings

COUNTERS = ("step", "skipped", "consecutive")  # int32 scalars of the train state


@dataclass
class Trainer:
    """Everything a loop needs: the jitted steps, the train state, the frozen state and the shardings."""

    graphdef: nnx.GraphDef
    state: dict[str, Any]
    state_sharding: dict[str, Any]
    frozen: Frozen
    mask: Any  # bool tree like state["params"]: True = trained
    train_step: Callable  # (state, frozen arrays, batch) -> (state, metrics)
    eval_step: Callable  # (params, frozen arrays, batch) -> (loss_sum, weight, aux parts)
    optimizer: optax.GradientTransformation
    schedule: Callable
    mesh: Mesh

    def model(self, params=None) -> MiniCPMForCausalLM:
        return nnx.merge(self.graphdef, params if params is not None else self.state["params"])

    def step(self, batch: dict) -> dict:
        """One update of ``self.state`` on a global ``batch``; returns the (on-device) metrics."""
        self.state, metrics = self.train_step(self.state, self.frozen.arrays, batch)
        return metrics

    def evaluate_batch(self, batch: dict):
        return self.eval_step(self.state["params"], self.frozen.arrays, batch)


def build_train_step(
    cfg: Config,
    mesh: Mesh,
    loss_fn: LossFn,
    graphdef: nnx.GraphDef,
    params_state: nnx.State,
    frozen: Frozen,
    trainable=None,
):
    """``(optimizer, schedule, state shardings, mask, jitted step)`` for parameters shaped like
    ``params_state`` (concrete or abstract: nothing is allocated). ``trainable`` (patterns or a
    predicate on dotted paths) overrides ``cfg.train.trainable``."""
    p_shard = param_shardings(params_state, mesh)
    params_abstract = jax.eval_shape(lambda: nnx.to_pure_dict(params_state))
    mask = tr.trainable_mask(params_abstract, trainable if trainable is not None else cfg.train.trainable)
    train_abstract, _ = tr.split(params_abstract, mask)
    train_shard, _ = tr.split(p_shard, mask)
    optimizer, schedule = build_optimizer(train_abstract, cfg.model, cfg.optimizer, cfg.train.steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharding = {
        "params": p_shard,
        "opt_state": opt_state_shardings(optimizer, train_abstract, train_shard, mesh),
        **{name: replicated for name in COUNTERS},
    }
    step = make_train_step(
        graphdef,
        frozen.graphdef,
        loss_fn,
        optimizer,
        schedule,
        mask=mask,
        micro_batches=cfg.train.micro_batches,
        mesh=mesh,
        state_sharding=sharding,
        frozen_sharding=frozen.sharding,
    )
    return optimizer, schedule, sharding, mask, step


def create_trainer(
    cfg: Config,
    mesh: Mesh,
    loss_fn: LossFn,
    model: MiniCPMForCausalLM | None = None,
    *,
    frozen=None,
    trainable=None,
) -> Trainer:
    """A trainer for ``cfg`` on ``mesh``; the model is created sharded unless one is given.

    ``frozen``: a pytree of modules / arrays passed to the loss (see ``train.frozen``);
    ``trainable``: overrides ``cfg.train.trainable`` (patterns or a predicate on dotted paths).
    """
    if model is None:
        model = create_model(
            cfg.model, mesh=mesh, seed=cfg.seed, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype)
        )
    model.scan_layers = cfg.train.scan_layers  # a runtime option, also for a given model
    frozen = prepare_frozen(frozen, mesh)
    graphdef, params_state = nnx.split(model, nnx.Param)
    optimizer, schedule, sharding, mask, train_step = build_train_step(
        cfg, mesh, loss_fn, graphdef, params_state, frozen, trainable
    )
    params = jax.tree.map(jax.device_put, nnx.to_pure_dict(params_state), sharding["params"])
    train_params, _ = tr.split(params, mask)
    state = {
        "params": params,
        "opt_state": jax.jit(optimizer.init, out_shardings=sharding["opt_state"])(train_params),
        **{name: jax.device_put(jnp.int32(0), sharding[name]) for name in COUNTERS},
    }
    eval_step = make_eval_step(graphdef, frozen.graphdef, loss_fn, mesh, sharding["params"], frozen.sharding)
    return Trainer(graphdef, state, sharding, frozen, mask, train_step, eval_step, optimizer, schedule, mesh)
