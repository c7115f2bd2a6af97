"""The jitted train and eval steps: the one engine under pretraining, conversion and distillation.

A loop supplies ``loss_fn(model, frozen, micro_batch) -> (loss_sum, (weight, aux))``:

- ``model`` is the model being trained (its fixed, non-trainable parameters merged in), ``frozen``
  the frozen pytree (teacher, reference policy; None without one), ``micro_batch`` a dict of
  ``[rows, ...]`` arrays.
- ``loss_sum`` is a *sum* over the micro-batch and ``weight`` what it is a sum over (e.g. tokens):
  gradients of the summed loss are added up over ``lax.scan``-ned micro-batches and divided once by
  the total weight, so accumulation equals the full batch whatever each micro-batch holds.
- ``aux`` is a dict of scalar diagnostics, each a sum normalised like the loss (divided by the
  total weight), or a ``(numerator, denominator)`` pair accumulated separately (e.g. a per-sequence
  mean). The step reports their exact full-batch values under ``metrics["aux"]``.

``step(state, frozen, batch) -> (state, metrics)``: ``state`` is ``{"params", "opt_state", "step",
"skipped", "consecutive"}`` (donated); only leaves selected by the trainable mask are differentiated
and have optimizer moments; the rest pass through bit-identical. A non-finite loss or gradient
skips the update on device and counts in ``skipped`` / ``consecutive``, so the loop never has to
read a metric every step.
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
from minicpm_jax.train import trainable as tr
from minicpm_jax.train.frozen import merge_frozen

LossFn = Callable[[nnx.Module, Any, dict], tuple[jax.Array, tuple[jax.Array, dict]]]
BATCH_AXES = ("data", "fsdp")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over ``data x fsdp``, tokens over ``sequence``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, "sequence"))


def leaf_batch_sharding(mesh: Mesh, x) -> NamedSharding:
    """``batch_sharding`` for ``[rows, tokens, ...]`` leaves; rows only for ``[rows]`` leaves."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *(["sequence"] if x.ndim > 1 else [])))


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


def aux_parts(aux: dict, weight) -> dict:
    """``{name: (numerator, denominator)}``: a bare scalar is normalised by the loss weight."""
    out = {}
    for name, value in aux.items():
        num, den = value if isinstance(value, tuple) else (value, weight)
        if jnp.ndim(num) or jnp.ndim(den):
            raise ValueError(f"loss aux {name!r}: expected a scalar or a (numerator, denominator) pair of scalars")
        out[name] = (jnp.asarray(num, jnp.float32), jnp.asarray(den, jnp.float32))
    return out


def aux_values(parts: dict) -> dict:
    """Full-batch value of every accumulated aux metric."""
    return {name: num / jnp.maximum(den, 1e-12) for name, (num, den) in parts.items()}


def accumulate_gradients(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    train_params,
    fixed_params,
    frozen,
    batch: dict,
    micro_batches: int,
    mesh: Mesh | None = None,
):
    """``(mean gradient of train_params, mean loss, total weight, aux parts)`` over ``micro_batches``
    scanned micro-batches; ``frozen`` is the already-merged frozen pytree (or None)."""

    def objective(p, micro):
        return loss_fn(nnx.merge(graphdef, tr.merge(p, fixed_params)), frozen, micro)

    def accumulate(carry, micro):
        if mesh is not None:
            micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, leaf_batch_sharding(mesh, x)), micro)
        (loss_sum, (weight, aux)), grads = jax.value_and_grad(objective, has_aux=True)(train_params, micro)
        g_acc, l_acc, w_acc = carry
        # aux parts leave the scan as per-micro-batch outputs, summed after it
        return (jax.tree.map(jnp.add, g_acc, grads), l_acc + loss_sum, w_acc + weight), aux_parts(aux, weight)

    # micro-batch m takes rows m, m+M, ...: every micro-batch is spread over all data shards
    micros = jax.tree.map(lambda x: x.reshape(-1, micro_batches, *x.shape[1:]).swapaxes(0, 1), batch)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train_params)
    (grads, loss_sum, weight), aux = jax.lax.scan(accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micros)
    aux = jax.tree.map(lambda x: jnp.sum(x, axis=0), aux)
    weight = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / weight).astype(p.dtype), grads, train_params)
    return grads, loss_sum / weight, weight, aux


def make_train_step(
    graphdef: nnx.GraphDef,
    frozen_def,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: Callable,
    *,
    mask,
    micro_batches: int,
    mesh: Mesh,
    state_sharding: Any,
    frozen_sharding: Any,
):
    """``step(state, frozen_arrays, batch) -> (state, metrics)``, jitted with shardings, ``state`` donated.

    ``mask`` (a bool tree like the params) selects the trainable leaves; the optimizer state in
    ``state`` covers only those. ``frozen_def`` is the static half of ``train.frozen.Frozen``.
    """

    def step_fn(state, frozen_arrays, batch):
        train_p, fixed_p = tr.split(state["params"], mask)
        frozen = merge_frozen(frozen_def, frozen_arrays)
        grads, loss, weight, aux = accumulate_gradients(
            graphdef, loss_fn, train_p, fixed_p, frozen, batch, micro_batches, mesh
        )
        grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state["opt_state"], train_p)
        new_train = optax.apply_updates(train_p, updates)
        consecutive = jnp.where(finite, 0, state["consecutive"] + 1)
        new_state = {
            "params": tr.merge(_tree_where(finite, new_train, train_p), fixed_p),
            "opt_state": _tree_where(finite, new_opt, state["opt_state"]),
            "step": state["step"] + 1,
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
            "consecutive": consecutive,
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "tokens": weight,
            "finite": finite,
            "skipped_steps": new_state["skipped"],
            "consecutive_nonfinite": consecutive,
            "aux": aux_values(aux),
        }
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, frozen_sharding, None),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
        keep_unused=True,  # frozen arrays a loss does not read stay arguments: memory plans count them
    )


def make_eval_step(graphdef: nnx.GraphDef, frozen_def, loss_fn: LossFn, mesh: Mesh, params_sharding, frozen_sharding):
    """``eval(params, frozen_arrays, batch) -> (loss_sum, weight, aux parts)``."""

    def eval_fn(params, frozen_arrays, batch):
        frozen = merge_frozen(frozen_def, frozen_arrays)
        loss_sum, (weight, aux) = loss_fn(nnx.merge(graphdef, params), frozen, batch)
        return loss_sum, weight, aux_parts(aux, weight)

    return jax.jit(eval_fn, in_shardings=(params_sharding, frozen_sharding, None))
