"""Frozen state: models and arrays the loss reads but never trains (a teacher, a reference policy).

Any pytree of NNX modules and arrays (usually ``{"teacher": model}``) is split once into a static
graph definition and a tree of arrays. The arrays enter the jitted step as its own argument with
shardings from the logical-axis rules (module parameters) or their current ``NamedSharding``
(plain arrays; replicated otherwise), so they are neither traced in as constants nor gathered.
They get no gradient, no optimizer state, and are not in the train checkpoint: ``train.frozen``
(name -> checkpoint / HF directory / preset) records where they came from, and a resume reloads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from minicpm_jax.sharding import logical_spec


@dataclass
class Frozen:
    """``graphdef`` (static) + ``arrays`` (a pure pytree) + their ``sharding``; ``value()`` rebuilds the tree."""

    graphdef: Any
    arrays: Any
    sharding: Any

    def value(self):
        """The frozen pytree (modules merged back)."""
        return merge_frozen(self.graphdef, self.arrays)


def merge_frozen(graphdef, arrays):
    """The frozen pytree from its two halves (None without frozen state); also inside the jitted step."""
    return None if graphdef is None else nnx.merge(graphdef, arrays)


def prepare_frozen(frozen, mesh: Mesh) -> Frozen:
    """Split ``frozen`` (None, or a pytree of modules / arrays) and place its arrays on ``mesh``
    (``ShapeDtypeStruct`` leaves of an abstract model get their sharding and stay abstract)."""
    if frozen is None:
        return Frozen(None, {}, {})
    graphdef, state = nnx.split(frozen)
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding_of(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("logical_axes")
            return NamedSharding(mesh, logical_spec(axes)) if axes else replicated
        s = getattr(x, "sharding", None)
        return s if isinstance(s, NamedSharding) and s.mesh == mesh else replicated

    shardings = nnx.to_pure_dict(jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))

    def place(x, s):  # abstract leaves (memory plans) stay abstract
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return jax.device_put(jnp.asarray(x), s)

    arrays = jax.tree.map(place, nnx.to_pure_dict(state), shardings)
    return Frozen(graphdef, arrays, shardings)


def load_frozen(sources: dict[str, str], *, mesh: Mesh, dtype) -> dict | None:
    """``{name: model}`` loaded (sharded on ``mesh``) from ``train.frozen``'s sources; None if there are none.

    Frozen models only run forward, so their weights are stored in the compute ``dtype`` (no fp32
    master copy): a bf16 teacher takes half the memory of the student's fp32 weights.
    """
    if not sources:
        return None
    from minicpm_jax.ckpt import load_any

    return {name: load_any(src, mesh=mesh, dtype=dtype, param_dtype=dtype)[1] for name, src in sources.items()}
