"""Shared pieces of the training tests: the tiny config, random token batches, one-device mesh,
and the overrides of a short run of the tiny recipe."""

import jax
import numpy as np

from minicpm_jax.config import MeshConfig, load_config
from minicpm_jax.sharding import make_mesh

# a short run of the tiny recipe (in-process and subprocess tests)
SMALL_RUN = [
    "train.global_batch_size=8",
    "data.seq_len=64",
    "data.synthetic_documents=2000",
    "optimizer.warmup_steps=2",
    "optimizer.decay_steps=4",
    "train.log_every=1",
    "train.eval_every=0",
]


def tiny_cfg(*overrides):
    """tiny-minicpm4 in fp32, 10 steps, no warmup."""
    return load_config("tiny-minicpm4", ["dtype=float32", "train.steps=10", "optimizer.warmup_steps=0", *overrides])


def random_batch(rows=8, seq=16, vocab=512, seed=0):
    """Random next-token rows with uneven token counts (row 1 has none)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (rows, seq + 1)).astype(np.int32)
    mask = (rng.random((rows, seq)) < 0.7).astype(np.float32)
    mask[1] = 0.0
    mask[-1, :3] = 0.0
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}


def one_device():
    return make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
