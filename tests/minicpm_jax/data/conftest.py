"""Shared helpers for the data tests: small configs, packed-row invariants, documents of batches."""

from __future__ import annotations

import types

import numpy as np
import pytest

from minicpm_jax.config.schema import DataConfig
from minicpm_jax.data import load_tokenizer, train_dataset

VOCAB, MAX_POS = 512, 1024


def data_cfg(**overrides) -> DataConfig:
    """A small synthetic config (fast) with overrides."""
    base = dict(synthetic_documents=200, seq_len=64, eval_documents=8)
    return DataConfig(**{**base, **overrides})


def one_pass(cfg, tok=None, batch=4, **kw) -> list[dict]:
    """Every batch of one epoch (last partial batch kept)."""
    tok = tok or load_tokenizer(None)
    ds = train_dataset(
        cfg,
        tokenizer=tok,
        global_batch_size=batch,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POS,
        num_epochs=1,
        drop_remainder=False,
        **kw,
    )
    return list(ds)


def segments(batches) -> list[tuple[int, ...]]:
    """The token sequences of every packed segment (document chunk), in row order."""
    out = []
    for b in batches:
        for tokens, seg in zip(b["input_ids"], b["segment_ids"]):
            out += [tuple(int(t) for t in tokens[seg == s]) for s in range(1, int(seg.max()) + 1)]
    return out


def check_packing(b) -> None:
    """Row invariants: segment ids 1..k then padding, positions restart, mask/targets consistent."""
    keys = ("input_ids", "segment_ids", "positions", "loss_mask", "targets")
    ids, seg, pos, mask, tgt = (b[k] for k in keys)
    assert ids.dtype == tgt.dtype == seg.dtype == pos.dtype == np.int32 and mask.dtype == np.float32
    for r in range(ids.shape[0]):
        used = int((seg[r] > 0).sum())
        assert (seg[r, used:] == 0).all() and (seg[r, :used] > 0).all(), "padding only at the row end"
        assert (np.diff(seg[r, :used]) >= 0).all() and (np.diff(seg[r, :used]) <= 1).all()
        for s in range(1, int(seg[r].max()) + 1):
            where = np.flatnonzero(seg[r] == s)
            np.testing.assert_array_equal(pos[r, where], np.arange(len(where)))
            np.testing.assert_array_equal(mask[r, where], [1.0] * (len(where) - 1) + [0.0])
            np.testing.assert_array_equal(tgt[r, where[:-1]], ids[r, where[1:]])
        assert (mask[r, used:] == 0).all() and (pos[r, used:] == 0).all()


@pytest.fixture
def h():
    """The helpers above as one namespace."""
    return types.SimpleNamespace(
        data_cfg=data_cfg,
        one_pass=one_pass,
        segments=segments,
        check_packing=check_packing,
        VOCAB=VOCAB,
        MAX_POS=MAX_POS,
    )
