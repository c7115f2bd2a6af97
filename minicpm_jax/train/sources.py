"""Batch sources: where the training loop gets each step's batch.

A ``BatchSource`` is asked for the batch of a step with read access to the trainer (its current
parameters, model, frozen state and mesh), so a batch may depend on the parameters being trained
(on-policy rollouts). Its ``get_state()`` (JSON-serialisable) is saved in every train checkpoint
and handed back to ``set_state`` on resume, so a resumed run sees the same batches.

A batch is a dict of arrays whose leading axis is the rows: numpy arrays holding this process's
rows (``jax.process_count()`` processes together make the global batch), or global ``jax.Array``s.
Do not keep references to the trainer's parameters after ``next_batch`` returns: the step donates them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jax
import numpy as np
from jax.sharding import Mesh

from minicpm_jax.train.step import leaf_batch_sharding

if TYPE_CHECKING:
    from minicpm_jax.train.state import Trainer


@runtime_checkable
class BatchSource(Protocol):
    """What the loop pulls batches from."""

    def next_batch(self, step: int, trainer: Trainer) -> dict[str, Any]:
        """The batch of ``step`` (1-based), built from this process's data (and, if it wants, the trainer)."""
        ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


class GrainSource:
    """A grain iterator of process-local batches (``minicpm_jax.data.make_train_iterator``) as a source."""

    def __init__(self, iterator):
        self.iterator = iterator

    def next_batch(self, step: int, trainer: Trainer) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)


def global_batch(mesh: Mesh, batch: dict) -> dict[str, jax.Array]:
    """Rows over ``data x fsdp`` (tokens over ``sequence``): process-local numpy rows are assembled
    into global arrays; global arrays are resharded only if they are laid out differently."""

    def one(x):
        sharding = leaf_batch_sharding(mesh, x)
        if isinstance(x, jax.Array):
            return x if x.sharding == sharding else jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return {k: one(v) for k, v in batch.items()}


def rows_of(batch: dict) -> int:
    """Global number of rows of a source's batch."""
    x = next(iter(batch.values()))
    return x.shape[0] * (1 if isinstance(x, jax.Array) else jax.process_count())
