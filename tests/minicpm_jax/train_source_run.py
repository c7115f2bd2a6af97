"""A run on the engine with a custom ``BatchSource`` whose batches depend on the current parameters
and a loss with aux metrics; ``python train_source_run.py OUT STEPS`` (used by test_train_source)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.config import load_recipe
from minicpm_jax.train.loop import run_training
from minicpm_jax.train.loss import next_token_loss

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROWS, SEQ = 8, 32


class ParamDependentSource:
    """Batch n is drawn from a seed made of n and the bits of the current final-norm weights."""

    def __init__(self):
        self.count = 0

    def next_batch(self, step, trainer):
        norm = np.asarray(jax.device_get(trainer.state["params"]["model"]["norm"]["weight"]))
        seed = (self.count * 7919 + int(norm.view(np.uint32).astype(np.uint64).sum())) % 2**31
        self.count += 1
        ids = np.random.default_rng(seed).integers(3, 259, (ROWS, SEQ + 1)).astype(np.int32)
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((ROWS, SEQ), np.float32)}

    def get_state(self):
        return {"count": self.count}

    def set_state(self, state):
        self.count = state["count"]


def loss_with_aux(model, frozen, batch):
    loss_sum, (weight, _) = next_token_loss(model, frozen, batch)
    first = batch["input_ids"][:, 0].astype(jnp.float32)
    return loss_sum, (weight, {"loss_copy": loss_sum, "mean_first_id": (first.sum(), first.shape[0] * 1.0)})


if __name__ == "__main__":
    out, steps = sys.argv[1], int(sys.argv[2])
    cfg = load_recipe(
        os.path.join(ROOT, "configs/recipes/pretrain-tiny.yaml"),
        [
            f"train.output_dir={out}",
            f"train.steps={steps}",
            f"train.global_batch_size={ROWS}",
            "train.micro_batches=2",
            "train.checkpoint_every=3",
            "train.log_every=1",
            "train.eval_every=0",
            "data.eval_documents=0",
            "data.synthetic_documents=100",
            "optimizer.warmup_steps=2",
            "optimizer.decay_steps=4",
        ],
    )
    print(run_training(cfg, loss_fn=loss_with_aux, source=ParamDependentSource()))
