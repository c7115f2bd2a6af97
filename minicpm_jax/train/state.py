"""Train-state construction: parameters (pure dict), optimizer state, step, and their shardings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from minicpm_jax.config.schema import Config
from minicpm_jax.model.decoder import MiniCPMForCausalLM
from minicpm_jax.model.factory import create_model
from minicpm_jax.train.optimizer import build_optimizer
from minicpm_jax.train.step import LossFn, make_eval_step, make_train_step, opt_state_shardings, param_shardings


@dataclass
class Trainer:
    """Everything a loop needs: the jitted steps, the state and its shardings."""

    graphdef: nnx.GraphDef
    state: dict[str, Any]
    state_sharding: dict[str, Any]
    train_step: Callable
    eval_step: Callable
    optimizer: optax.GradientTransformation
    schedule: Callable
    mesh: Mesh

    def model(self, params=None) -> MiniCPMForCausalLM:
        return nnx.merge(self.graphdef, params if params is not None else self.state["params"])


def build_train_step(cfg: Config, mesh: Mesh, loss_fn: LossFn, graphdef: nnx.GraphDef, params_state: nnx.State):
    """``(optimizer, schedule, state shardings, jitted step)`` for parameters shaped like ``params_state``
    (concrete or abstract: nothing is allocated)."""
    p_shard = param_shardings(params_state, mesh)
    params_abstract = jax.eval_shape(lambda: nnx.to_pure_dict(params_state))
    optimizer, schedule = build_optimizer(params_abstract, cfg.model, cfg.optimizer, cfg.train.steps)
    sharding = {
        "params": p_shard,
        "opt_state": opt_state_shardings(optimizer, params_abstract, p_shard, mesh),
        "step": NamedSharding(mesh, PartitionSpec()),
    }
    step = make_train_step(
        graphdef,
        loss_fn,
        optimizer,
        schedule,
        micro_batches=cfg.train.micro_batches,
        mesh=mesh,
        state_sharding=sharding,
    )
    return optimizer, schedule, sharding, step


def create_trainer(cfg: Config, mesh: Mesh, loss_fn: LossFn, model: MiniCPMForCausalLM | None = None) -> Trainer:
    """A trainer for ``cfg`` on ``mesh``; the model is created sharded unless one is given."""
    if model is None:
        model = create_model(
            cfg.model, mesh=mesh, seed=cfg.seed, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype)
        )
    graphdef, params_state = nnx.split(model, nnx.Param)
    optimizer, schedule, sharding, train_step = build_train_step(cfg, mesh, loss_fn, graphdef, params_state)
    params = jax.tree.map(jax.device_put, nnx.to_pure_dict(params_state), sharding["params"])
    state = {
        "params": params,
        "opt_state": jax.jit(optimizer.init, out_shardings=sharding["opt_state"])(params),
        "step": jax.device_put(jnp.int32(0), sharding["step"]),
    }
    return Trainer(
        graphdef,
        state,
        sharding,
        train_step,
        make_eval_step(graphdef, loss_fn, mesh, sharding["params"]),
        optimizer,
        schedule,
        mesh,
    )
