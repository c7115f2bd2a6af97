"""Train tiny models on MQAR with the project's training engine (for issue 12's separation test).

Two models of equal width and depth: ``tiny-minicpm4`` (all softmax attention) and the same model
with every layer ``lightning-attn`` (SALA's Lightning layer, as ``convert.transfer.hybrid_config``
builds it). Training rows are ``recall.mqar_example`` sequences drawn from a seed stream disjoint
from the eval task's (``default_rng([seed, n, i])``), right-padded, with the loss on answer tokens only.

Measured so far (2 layers, lr 3e-3, 4000 steps of 16 rows, 2-6 pairs): both models stay near the
"copy a digit seen in context" stage and score alike (Lightning slightly ahead), so no separation test
is built on this yet.
"""

from __future__ import annotations

import jax
import numpy as np

from minicpm_jax.config import MeshConfig, load_config
from minicpm_jax.config.loading import build_model_config
from minicpm_jax.eval import EvalContext, run_task
from minicpm_jax.eval.loading import byte_tokenizer
from minicpm_jax.eval.tasks.recall import mqar_example
from minicpm_jax.sharding import make_mesh
from minicpm_jax.train.loop import pretrain_loss
from minicpm_jax.train.state import create_trainer

TRAIN_STREAM = 0x4D514152  # "MQAR": training rows come from default_rng([TRAIN_STREAM, seed])


def one_device():
    """A one-device mesh (as ``train_testutil.one_device``)."""
    return make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])


def configs(*, layers: int, lr: float, steps: int, batch: int, warmup: int, decay: int, seed: int, extra=()):
    """``(softmax config, lightning config)``: same width/depth/optimizer/schedule/seed.

    The Lightning model has a few more parameters (full-MHA K/V where softmax has GQA 4/2, plus
    ``z_proj`` and ``o_norm``); widths, heads and head dims are equal.
    """
    overrides = [
        "dtype=float32",
        "model.vocab_size=320",  # byte-level tokenizer
        f"model.num_hidden_layers={layers}",
        # dim_model_base = hidden: no muP logit divisor (h / 4 at the preset's 16) and init std 0.1 (not
        # 0.05); with the preset's muP scalars neither model left chance level within a CI budget
        "model.dim_model_base=64",
        f"seed={seed}",
        f"train.steps={steps}",
        f"train.global_batch_size={batch}",
        f"optimizer.learning_rate={lr}",
        "optimizer.schedule=wsd_exp",
        f"optimizer.warmup_steps={warmup}",
        f"optimizer.decay_steps={decay}",
        "optimizer.weight_decay=0.0",
        *extra,
    ]
    soft = load_config("tiny-minicpm4", overrides)
    m = soft.model
    # hybrid_config(m, ["lightning-attn"] * layers) without the converter's "keep one softmax layer" check
    lin_model = build_model_config(
        {
            **m.model_dump(mode="json"),
            "model_type": "minicpm_sala",
            "mixer_types": ["lightning-attn"] * layers,
            "head_dim": m.attn_head_dim,
            "lightning_nh": m.num_attention_heads,
            "lightning_nkv": m.num_attention_heads,
            "lightning_head_dim": m.attn_head_dim,
            "lightning_use_rope": True,
            "qk_norm": True,
            "use_output_gate": True,
            "use_output_norm": True,
        },
        "mqar lightning model",
    )
    return soft, soft.model_copy(update={"model": lin_model})


def mqar_rows(tok, rng, rows: int, seq_len: int, pairs: tuple[int, int], key_length=1, value_length=1) -> dict:
    """A ``[rows, seq_len]`` next-token batch of MQAR sequences (``num_pairs`` uniform in ``pairs``,
    every key queried), right-padded; ``loss_mask`` is 1 exactly where the next token is an answer."""
    pad = tok.pad_id if tok.pad_id is not None else 0
    ids = np.full((rows, seq_len + 1), pad, np.int32)
    mask = np.zeros((rows, seq_len), np.float32)
    for r in range(rows):
        n = int(rng.integers(pairs[0], pairs[1] + 1))
        seq, spans = mqar_example(tok, rng, n, n, key_length, value_length)
        if len(seq) > seq_len + 1:
            raise ValueError(f"MQAR row of {len(seq)} tokens > seq_len + 1 = {seq_len + 1}")
        ids[r, : len(seq)] = seq
        for s, e in spans:
            mask[r, s - 1 : e - 1] = 1.0
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}


def train(cfg, mesh, tok, *, seq_len: int, pairs: tuple[int, int], seed: int, log=None):
    """Train ``cfg.model`` for ``cfg.train.steps`` steps; returns the trained model."""
    trainer = create_trainer(cfg, mesh, pretrain_loss(cfg))
    rng = np.random.default_rng([TRAIN_STREAM, seed])
    for step in range(cfg.train.steps):
        metrics = trainer.step(mqar_rows(tok, rng, cfg.train.global_batch_size, seq_len, pairs))
        if log is not None and (step + 1) % 50 == 0:
            log(
                step + 1,
                {
                    k: float(v)
                    for k, v in jax.device_get(metrics).items()
                    if not isinstance(v, dict) and np.ndim(v) == 0
                },
            )
    return trainer.model()


def mqar_accuracy(model, tok, *, num_pairs, num_samples: int, seed: int, batch_size: int = 32) -> dict:
    """The registered ``mqar`` task's metrics (single-token keys and values, every key queried)."""
    options = {
        "num_pairs": list(num_pairs),
        "num_queries": max(num_pairs),
        "key_length": 1,
        "value_length": 1,
        "num_samples": num_samples,
        "seed": seed,
    }
    return run_task("mqar", EvalContext(model, tok, batch_size=batch_size), options).metrics


__all__ = ["byte_tokenizer", "configs", "mqar_accuracy", "mqar_rows", "one_device", "train"]
