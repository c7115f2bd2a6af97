"""One process of the multi-host test (test_multihost), on CPU with gloo collectives.

``python multihost_run.py cli DEVICES ARGS...``: ``minicpm-jax ARGS...`` on DEVICES local devices.
``python multihost_run.py reference SHARDS RECIPE OVERRIDES...``: one process on 8 devices training on
the global batches that SHARDS processes would feed (their shards' rows, concatenated in process order).
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


class ShardedSource:
    """The batches of ``shards`` processes, concatenated row-wise as they are laid out on the mesh."""

    def __init__(self, cfg, shards: int):
        from minicpm_jax.data import load_tokenizer, make_train_iterator

        kw = {
            "tokenizer": load_tokenizer(cfg.data.tokenizer),
            "vocab_size": cfg.model.vocab_size,
            "max_position_embeddings": cfg.model.max_position_embeddings,
            "global_batch_size": cfg.train.global_batch_size,
            "process_count": shards,
        }
        self.iterators = [make_train_iterator(cfg.data, process_index=i, **kw) for i in range(shards)]

    def next_batch(self, step, trainer):
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return {"shards": [it.get_state() for it in self.iterators]}

    def set_state(self, state):
        for it, s in zip(self.iterators, state["shards"]):
            it.set_state(s)


def main() -> int:
    if MODE == "cli":
        from minicpm_jax import cli

        return cli.main(sys.argv[3:])
    from minicpm_jax.config import load_recipe
    from minicpm_jax.train.loop import run_training

    cfg = load_recipe(sys.argv[3], sys.argv[4:])
    run_training(cfg, source=ShardedSource(cfg, COUNT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
