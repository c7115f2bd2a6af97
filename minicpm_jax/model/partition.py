"""Kernel calls under ``jax.shard_map``: each device runs a kernel on its own rows and heads.

XLA cannot partition Pallas (Mosaic / Triton) custom calls: called on sharded activations they are
run on all-gathered operands. ``Partition`` wraps a per-shard function in ``jax.shard_map`` over
the current mesh (``jax.set_mesh``): the batch over the data axes (``LOGICAL_RULES["batch"]``),
query heads over ``tensor``. Without a mesh, or on one device, it calls the function as it is.

GQA: every shard keeps whole query groups or a part of one group, never parts of two. When
``tensor`` divides the KV heads they are sharded too; when it is a multiple of them (``slice_kv``)
the KV heads and caches are replicated (as their projections are), every shard writes all KV heads
of a cache, and each shard attends with the one KV head of its query heads (``local_kv``,
``kv_heads``). InfLLM v2 block selection sums per-head scores over a whole group: there each shard
scores its own query heads and ``group_sum`` adds the partial sums ``[B, 1, C, m1]`` (fp32) of the
shards of its group (``collective-permute`` within the group; q/k/v are not moved). A dimension its
mesh axes do not divide is replicated, as in ``constrain``; so are the heads when neither holds. A
``sequence`` axis > 1 is refused at the first call. Outputs replicated over an axis are identical on
its shards by construction, so ``check_vma`` is off.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from minicpm_jax.model.cache import LightningCache
from minicpm_jax.sharding import LOGICAL_RULES

BATCH, HEADS, KV = "batch", "heads", "kv_heads"  # the roles an operand dimension can have


class Partition:
    """How one kernel call is split: rows of ``batch``, ``heads`` query and ``kv_heads`` KV heads."""

    def __init__(self, batch: int, heads: int, kv_heads: int | None = None):
        mesh = jax.sharding.get_abstract_mesh()
        self.mesh = None if mesh.empty or mesh.size == 1 else mesh
        self.batch = self.heads = self.kv = None
        self.slice_kv = False
        if self.mesh is None:
            return
        size = lambda axes: math.prod(self.mesh.shape.get(a, 1) for a in axes)
        if size(["sequence"]) > 1:
            raise ValueError(
                f"mesh axis 'sequence' has size {self.mesh.shape['sequence']}: the attention kernels do not "
                "implement context parallelism; set mesh.sequence=1 (use data/fsdp/tensor instead)"
            )
        data = tuple(a for a in LOGICAL_RULES[BATCH] if a in self.mesh.shape)
        self.batch = data if data and batch % size(data) == 0 else None
        kv_heads = kv_heads or heads
        t = self.mesh.shape.get(LOGICAL_RULES["act_heads"], 1)
        group, local = heads // kv_heads, heads // t
        if t > 1 and kv_heads % t == 0:
            self.heads = self.kv = LOGICAL_RULES["act_heads"]
        elif t > 1 and heads % t == 0 and group % local == 0:
            self.heads, self.slice_kv = LOGICAL_RULES["act_heads"], True
        self.local_heads, self.group = (local if self.heads else heads), group

    def spec(self, roles: P) -> P:
        """Mesh ``PartitionSpec`` of a spec of roles (``BATCH``, ``HEADS``, ``KV`` or None per dim)."""
        return P(*({BATCH: self.batch, HEADS: self.heads, KV: self.kv}.get(r) for r in roles))

    def kv_heads(self) -> tuple[jax.Array, int] | None:
        """Inside a shard: ``(start, n)``, the KV heads its query heads use (``decode_step``'s
        ``kv_heads``), or None when they are all of its KV heads (unless ``slice_kv``)."""
        if not self.slice_kv:
            return None
        return jax.lax.axis_index(self.heads) * self.local_heads // self.group, 1

    def local_kv(self, x: jax.Array, axis: int = 2) -> jax.Array:
        """Inside a shard: the KV heads its query heads use (``x`` itself unless KV heads are replicated)."""
        if not self.slice_kv:
            return x
        start, n = self.kv_heads()
        return jax.lax.dynamic_slice_in_dim(x, start, n, axis)

    def group_sum(self, x: jax.Array) -> jax.Array:
        """Inside a shard holding part of one GQA group (``slice_kv``): ``x`` (this shard's partial
        per-group sum, e.g. InfLLM v2 selection scores) summed over the shards of its group, the same
        on each of them; ``x`` itself otherwise. The r = group / local_heads shards of a group are
        consecutive along ``tensor``: r - 1 ``ppermute`` s within the group bring the other partial
        sums, added in group order so that every shard of the group gets bit-identical sums."""
        if not self.slice_kv:
            return x
        r, t = self.group // self.local_heads, self.mesh.shape[self.heads]
        parts = [x]  # parts[s]: the partial sum of the shard s places before this one in its group
        for s in range(1, r):
            perm = [(g + j, g + (j + s) % r) for g in range(0, t, r) for j in range(r)]
            parts.append(jax.lax.ppermute(x, self.heads, perm))
        member = jax.lax.axis_index(self.heads) % r
        return jnp.sum(jnp.stack(parts)[(member - jnp.arange(r)) % r], axis=0)

    def __call__(self, fn, in_roles, out_roles):
        """``fn`` (on per-shard operands) as a function of global operands; ``in_roles`` / ``out_roles``
        are pytrees of role specs matching its arguments / outputs (None for None arguments)."""
        if self.mesh is None:
            return fn
        specs = lambda roles: jax.tree.map(self.spec, roles, is_leaf=lambda r: isinstance(r, P))
        return jax.shard_map(
            fn, mesh=self.mesh, in_specs=specs(tuple(in_roles)), out_specs=specs(out_roles), check_vma=False
        )


def cache_roles(cache):
    """Role specs of a layer cache: rows, and the heads of K/V buffers (dim 2) or a Lightning state (dim 1)."""
    if isinstance(cache, LightningCache):
        return LightningCache(P(BATCH, HEADS, None, None))
    return jax.tree.map(lambda x: P(BATCH, None, KV, None) if x.ndim == 4 else P(BATCH), cache)
