"""One process of the multi-host tests (test_multihost), on CPU with gloo collectives.

``python multihost_run.py cli DEVICES ARGS...``: ``minicpm-jax ARGS...`` on DEVICES local devices.
``python multihost_run.py reference SHARDS ARGS...``: ``minicpm-jax ARGS...`` as one process on 8
devices whose training data are the global batches that SHARDS processes would feed (their shards'
rows, concatenated in process order), so its run can be compared with theirs.
``MULTIHOST_FAIL=PROCESS:STEP`` makes that process raise ``OSError`` at that training step (a host failing
alone).
"""

import os
import sys

MODE, COUNT = sys.argv[1], int(sys.argv[2])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={COUNT if MODE == 'cli' else 8}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


class ShardedIterator:
    """The batches of ``shards`` processes' data iterators, concatenated row-wise as they lie on the mesh."""

    def __init__(self, iterators):
        self.iterators = iterators

    def __next__(self):
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return {"shards": [it.get_state() for it in self.iterators]}

    def set_state(self, state):
        for it, s in zip(self.iterators, state["shards"]):
            it.set_state(s)


def main() -> int:
    from minicpm_jax import cli

    if MODE == "reference":
        from minicpm_jax.data import make_train_iterator
        from minicpm_jax.train import task_rows

        def sharded(data, *, process_index, process_count, **kw):
            assert (process_index, process_count) == (0, 1)
            shards = [make_train_iterator(data, process_index=i, process_count=COUNT, **kw) for i in range(COUNT)]
            return ShardedIterator(shards)

        task_rows.make_train_iterator = sharded
    if os.environ.get("MULTIHOST_FAIL"):  # "PROCESS:STEP": that process raises OSError at that step
        from minicpm_jax import distributed

        process, step = map(int, os.environ["MULTIHOST_FAIL"].split(":"))
        preempted = distributed.preempted

        def failing(at: int) -> bool:
            if jax.process_index() == process and at == step:
                raise OSError(f"injected failure at step {at}")
            return preempted(at)

        distributed.preempted = failing
    return cli.main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
