"""Model construction: abstract (shapes only), and concrete with parameters born sharded.

``create_model`` runs the initialiser under ``jax.jit`` with ``out_shardings`` taken from the
parameters' logical axes, so no device (or host) ever holds the full unsharded model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from minicpm_jax.config.schema import ModelConfig
from minicpm_jax.model.decoder import MiniCPMForCausalLM
from minicpm_jax.sharding import divisibility_errors, logical_spec


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def abstract_model(
    cfg: ModelConfig,
    *,
    dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
    attention_impl: str = "auto",
    lightning_impl: str = "auto",
    scan_layers: bool = False,
) -> MiniCPMForCausalLM:
    """The model with ``ShapeDtypeStruct`` leaves: nothing is allocated.

    ``attention_impl`` / ``lightning_impl`` / ``scan_layers``: runtime options of ``MiniCPMForCausalLM``.
    """
    return nnx.eval_shape(
        lambda: MiniCPMForCausalLM(
            cfg,
            rngs=nnx.Rngs(0),
            dtype=dtype,
            param_dtype=param_dtype,
            attention_impl=attention_impl,
            lightning_impl=lightning_impl,
            scan_layers=scan_layers,
        )
    )


def param_axes(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """``{dotted path: (shape, logical axes)}`` of every parameter."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        out[".".join(map(str, path))] = (tuple(var.get_value().shape), var.get_metadata()["logical_axes"])
    return out


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters, from shapes only."""
    return sum(math.prod(shape) for shape, _ in param_axes(abstract_model(cfg)).values())


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A ``NamedSharding`` per variable from its logical axes; one error naming every misfit."""
    errors = []

    def one(path, var):
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        axes = var.get_metadata()["logical_axes"]
        errors.extend(divisibility_errors(mesh.shape, name, var.get_value().shape, axes))
        return var.replace(jax.sharding.NamedSharding(mesh, logical_spec(axes)))

    shardings = jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)
    if errors:
        raise ValueError(f"mesh {dict(mesh.shape)} does not fit the model:\n  " + "\n  ".join(errors))
    return shardings


def create_model(
    cfg: ModelConfig,
    *,
    mesh: Mesh | None = None,
    seed: int = 0,
    dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
    attention_impl: str = "auto",
    lightning_impl: str = "auto",
    scan_layers: bool = False,
) -> MiniCPMForCausalLM:
    """A freshly initialised model; with ``mesh``, every parameter is created already sharded."""

    def init():
        return nnx.split(MiniCPMForCausalLM(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype))[1]

    impls = dict(attention_impl=attention_impl, lightning_impl=lightning_impl, scan_layers=scan_layers)
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, **impls))
    out_shardings = state_shardings(abstract_state, mesh) if mesh is not None else None
    state = jax.jit(init, out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)
