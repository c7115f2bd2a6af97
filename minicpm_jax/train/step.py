"""The training-step engine shared by pretraining, conversion and distillation.

A caller supplies ``loss_fn(model, micro_batch) -> (loss_sum, (weight, aux))``; the engine splits the
batch into micro-batches, accumulates gradients of the *summed* loss with ``lax.scan`` and divides
by the total weight at the end (token-weighted: equal to the full-batch gradient), clips/updates
with optax, skips the update when the loss or gradient is not finite, and runs under ``jax.jit``
with explicit shardings and the train state donated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from minicpm_jax.model.factory import state_shardings

LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, tuple[jax.Array, dict]]]
BATCH_AXES = ("data", "fsdp")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over ``data x fsdp``, tokens over ``sequence``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, "sequence"))


def check_batch(mesh: Mesh, global_batch_size: int, micro_batches: int, seq_len: int) -> None:
    """Clear errors for batch shapes the mesh cannot split."""
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    errors = []
    if global_batch_size % micro_batches:
        errors.append(
            f"train.global_batch_size {global_batch_size} is not divisible by train.micro_batches {micro_batches}"
        )
    elif (global_batch_size // micro_batches) % rows:
        errors.append(
            f"micro-batch of {global_batch_size // micro_batches} rows is not divisible by the data axes "
            f"data x fsdp = {rows}"
        )
    if seq_len % mesh.shape["sequence"]:
        errors.append(f"data.seq_len {seq_len} is not divisible by mesh axis sequence={mesh.shape['sequence']}")
    if errors:
        raise ValueError("batch does not fit the mesh:\n  " + "\n  ".join(errors))


def param_shardings(abstract_params_state: nnx.State, mesh: Mesh) -> dict:
    """Pure-dict tree of ``NamedSharding`` for the parameters."""
    return nnx.to_pure_dict(state_shardings(abstract_params_state, mesh))


def opt_state_shardings(optimizer: optax.GradientTransformation, params_abstract, params_shard, mesh: Mesh):
    """Optimizer-state leaves that mirror a parameter take its sharding; the rest are replicated."""
    by_path = {tuple(_names(p)): s for p, s in jax.tree_util.tree_leaves_with_path(params_shard)}
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, _leaf):
        names = _names(path)
        for start in range(len(names)):
            if tuple(names[start:]) in by_path:
                return by_path[tuple(names[start:])]
        return replicated

    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(optimizer.init, params_abstract))


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def _tree_where(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def accumulate_gradients(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    params,
    batch: dict,
    micro_batches: int,
    row_sharding: NamedSharding | None = None,
):
    """``(mean gradient, mean loss, total weight)`` over ``micro_batches`` scanned micro-batches.

    Gradients of the summed loss are added up and divided once by the total weight, so the result
    equals the full-batch gradient whatever the token count of each micro-batch.
    """

    def accumulate(carry, micro):
        if row_sharding is not None:
            micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, row_sharding), micro)

        def objective(p):
            return loss_fn(nnx.merge(graphdef, p), micro)

        (loss_sum, (weight, _)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        g_acc, l_acc, w_acc = carry
        return (jax.tree.map(jnp.add, g_acc, grads), l_acc + loss_sum, w_acc + weight), None

    # micro-batch m takes rows m, m+M, ...: every micro-batch is spread over all data shards
    micros = jax.tree.map(lambda x: x.reshape(-1, micro_batches, *x.shape[1:]).swapaxes(0, 1), batch)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, loss_sum, weight), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micros)
    weight = jnp.maximum(weight, 1.0)
    return jax.tree.map(lambda g, p: (g / weight).astype(p.dtype), grads, params), loss_sum / weight, weight


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: Callable,
    *,
    micro_batches: int,
    mesh: Mesh,
    state_sharding: Any,
):
    """``step(state, batch) -> (state, metrics)``, jitted with shardings and ``state`` donated.

    ``state`` is ``{"params", "opt_state", "step"}``; ``batch`` a dict of ``[B, T]`` arrays.
    """
    row_sharding = batch_sharding(mesh)

    def step_fn(state, batch):
        params = state["params"]
        grads, loss, weight = accumulate_gradients(graphdef, loss_fn, params, batch, micro_batches, row_sharding)
        grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {
            "params": _tree_where(finite, new_params, params),
            "opt_state": _tree_where(finite, new_opt, state["opt_state"]),
            "step": state["step"] + 1,
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "tokens": weight,
            "finite": finite,
        }
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, row_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn, mesh: Mesh, params_sharding):
    """``eval(params, batch) -> (loss_sum, weight)``."""

    def eval_fn(params, batch):
        loss_sum, (weight, _) = loss_fn(nnx.merge(graphdef, params), batch)
        return loss_sum, weight

    return jax.jit(eval_fn, in_shardings=(params_sharding, batch_sharding(mesh)))
