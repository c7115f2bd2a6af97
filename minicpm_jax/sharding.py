"""Device meshes and the one table of logical-axis rules.

Parameters and activations are annotated with logical axis names; ``LOGICAL_RULES`` maps each to a
mesh axis (or to replication). Meshes use explicit ``AxisType.Auto`` axes so that XLA propagates
shardings from the annotated parameters and the few activation constraints.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, PartitionSpec

from minicpm_jax.config.schema import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
GRANULES = ("slice_index", "process_index")  # what a hybrid mesh's DCN axes run across, in order of preference

# logical axis name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": None,  # 2 KV heads in every MiniCPM4 model: replicate rather than limit tensor parallelism
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "act_seq": "sequence",
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes of ``cfg`` for ``num_devices`` devices; one axis may be -1 to take what is left."""
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    bad = [f"mesh.{a}: {s} (must be a positive size or -1)" for a, s in sizes.items() if s == 0 or s < -1]
    if len(fill) > 1:
        bad.append(f"mesh: only one axis may be -1, got {fill}")
    if bad:
        raise ValueError("invalid mesh:\n  " + "\n  ".join(bad))
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(
                f"mesh: {num_devices} devices are not divisible by the fixed axes "
                f"{ {a: s for a, s in sizes.items() if s != -1} } (product {fixed})"
            )
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh: axes {sizes} use {math.prod(sizes.values())} devices, but {num_devices} are available")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor, sequence)`` mesh with Auto axis types over ``devices`` (in their order;
    default: all, laid out by ``jax.make_mesh`` for the device topology). With ``cfg.dcn`` the mesh is
    hybrid (``hybrid_devices``)."""
    shape = mesh_shape(cfg, len(devices if devices is not None else jax.devices()))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if math.prod(dcn_shape(cfg)) > 1:
        return Mesh(hybrid_devices(cfg, shape, devices), MESH_AXES, axis_types=axis_types)
    if devices is None:
        return jax.make_mesh(tuple(shape.values()), MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(tuple(shape.values())), MESH_AXES, axis_types=axis_types)


def dcn_shape(cfg: MeshConfig) -> tuple[int, ...]:
    return tuple(getattr(cfg.dcn, a) for a in MESH_AXES)


def hybrid_devices(cfg: MeshConfig, shape: Mapping[str, int], devices=None) -> np.ndarray:
    """The device array of a hybrid mesh: axis ``a`` of size ``shape[a]`` is ``cfg.dcn.a`` granules times
    ``shape[a] / cfg.dcn.a`` devices inside one granule, through
    ``jax.experimental.mesh_utils.create_hybrid_device_mesh``. Granules are TPU slices (``slice_index``)
    when their count is the product of ``cfg.dcn``, else processes (CPU / GPU hosts) when theirs is."""
    devices = list(devices if devices is not None else jax.devices())
    dcn = dict(zip(MESH_AXES, dcn_shape(cfg)))
    bad = [f"mesh.{a}={shape[a]} is not divisible by mesh.dcn.{a}={n}" for a, n in dcn.items() if shape[a] % n]
    if bad:
        raise ValueError("invalid hybrid mesh: " + "; ".join(bad))
    count = math.prod(dcn.values())
    granules = {key: collections.Counter(getattr(d, key, None) for d in devices) for key in GRANULES}
    key = next((k for k, groups in granules.items() if len(groups) == count and None not in groups), None)
    if key is None:
        found = ", ".join(f"{len(g)} {k}" for k, g in granules.items() if None not in g)
        raise ValueError(
            f"invalid hybrid mesh: mesh.dcn {dcn} spans {count} slices or processes, but the {len(devices)} "
            f"devices have {found}; give dcn sizes whose product is one of these"
        )
    groups = granules[key]
    ici = [shape[a] // dcn[a] for a in MESH_AXES]
    if set(groups.values()) != {math.prod(ici)}:
        raise ValueError(
            f"invalid hybrid mesh: each of the {len(groups)} {key} groups needs {math.prod(ici)} devices "
            f"(mesh {dict(shape)} / dcn {dcn}), they have {sorted(groups.values())}"
        )
    process_is_granule = key == "process_index"
    return mesh_utils.create_hybrid_device_mesh(ici, list(dcn.values()), devices, process_is_granule=process_is_granule)


def logical_spec(axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec of a tuple of logical axis names."""
    return PartitionSpec(*(LOGICAL_RULES[a] if a is not None else None for a in axes))


def divisibility_errors(
    mesh_sizes: Mapping[str, int], name: str, shape: Sequence[int], axes: Sequence[str | None]
) -> list[str]:
    """One message per dimension of ``name`` that its mesh axes do not divide."""
    errors = []
    for dim, (size, logical) in enumerate(zip(shape, axes)):
        n = shard_count(mesh_sizes, logical)
        if size % n:
            errors.append(
                f"{name}: dimension {dim} ({logical}={size}) is not divisible by mesh axis "
                f"{'x'.join(_as_tuple(LOGICAL_RULES[logical]))} of size {n}"
            )
    return errors


def shard_count(mesh_sizes: Mapping[str, int], logical: str | None) -> int:
    """Number of pieces a dimension with logical axis ``logical`` is split into."""
    return _mesh_size(mesh_sizes, LOGICAL_RULES[logical] if logical else None)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names when a mesh is set (``jax.set_mesh``); else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = [LOGICAL_RULES[a] if a else None for a in axes]
    spec = [s if n % _mesh_size(mesh.shape, s) == 0 else None for s, n in zip(spec, x.shape)]
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of ``tree`` (e.g. a model's state) are sharded over, or None (single device)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def _as_tuple(rule) -> tuple[str, ...]:
    return (rule,) if isinstance(rule, str) else tuple(rule or ())


def _mesh_size(mesh_sizes: Mapping[str, int], rule) -> int:
    """Number of devices a rule's mesh axes span."""
    return math.prod(mesh_sizes[a] for a in _as_tuple(rule))
