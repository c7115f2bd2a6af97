"""``data.packing: none``: one document (chunk) per right-padded row, for training and evaluation."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import grain
import numpy as np
import pytest

from minicpm_jax.config import ConfigError, build_config
from minicpm_jax.data import load_tokenizer, make_eval_batches, make_train_iterator
from minicpm_jax.data.packing import KEY, pack, to_batch
from minicpm_jax.data.pipeline import split
from minicpm_jax.data.synthetic import SyntheticSource

TOK = load_tokenizer(None)


def _chunks(cfg, indices):
    """Tokenized documents at ``indices`` of the synthetic source, cut into seq_len chunks, in order."""
    src = SyntheticSource(cfg.synthetic_tasks, cfg.synthetic_documents, cfg.seed)
    out = []
    for i in indices:
        ids = TOK.encode(src[int(i)], add_bos=True, add_eos=True)
        out += [tuple(ids[j : j + cfg.seq_len]) for j in range(0, len(ids), cfg.seq_len)]
    return out


def _rows(batches):
    """The tokens of every row's one document, in row order (all-padding rows skipped)."""
    rows = [(ids, seg) for b in batches for ids, seg in zip(b["input_ids"], b["segment_ids"])]
    return [tuple(int(t) for t in ids[seg == 1]) for ids, seg in rows if seg.any()]


def _check_one_per_row(h, b):
    h.check_packing(b)  # segment ids then padding, positions from 0, targets / mask as for packed rows
    seg, ids, pos = b["segment_ids"], b["input_ids"], b["positions"]
    assert set(np.unique(seg)) <= {0, 1}
    assert (ids[seg == 0] == TOK.pad_id).all() and (pos[seg == 0] == 0).all()


def _iterator(h, cfg, batch=4):
    return make_train_iterator(
        cfg, tokenizer=TOK, global_batch_size=batch, vocab_size=h.VOCAB, max_position_embeddings=h.MAX_POS
    )


def test_one_document_per_row_in_order_with_long_documents_cut(h):
    # seq_len 40: the longer synthetic documents are cut into several chunks, each its own row
    cfg = h.data_cfg(seq_len=40, packing="none", shuffle=False)
    batches = h.one_pass(cfg)
    for b in batches:
        assert b["input_ids"].shape[1] == 40
        _check_one_per_row(h, b)
    src = SyntheticSource(cfg.synthetic_tasks, cfg.synthetic_documents, cfg.seed)
    train, _ = split(src, cfg.eval_documents, cfg.seed)
    expected = _chunks(cfg, [train.index(j) for j in range(len(train))])
    assert _rows(batches) == expected  # exactly one row per chunk, in document order
    assert sum(b["input_ids"].shape[0] for b in batches) == len(expected)
    assert any(len(c) == 40 for c in expected) and any(len(c) < 40 for c in expected)
    # shuffled: the same rows, another order
    shuffled = _rows(h.one_pass(h.data_cfg(seq_len=40, packing="none")))
    assert Counter(shuffled) == Counter(expected) and shuffled != expected


def test_padding_masks_and_cut_of_each_row():
    # pad id 7 (not 0) so padding is told apart from token values; the 11-token document is cut 8 + 3
    docs = [[1, 10, 11, 12, 2], [1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 2]]
    src = grain.MapDataset.source([{KEY: np.asarray(d, np.int32)} for d in docs]).to_iter_dataset()
    ds = pack(src, seq_len=8, pad_id=7, num_bins=1, seed=0, shuffle_rows=False, packing="none")
    b = to_batch(list(ds), pad_id=7)
    np.testing.assert_array_equal(
        b["input_ids"], [[1, 10, 11, 12, 2, 7, 7, 7], [1, 20, 21, 22, 23, 24, 25, 26], [27, 28, 2, 7, 7, 7, 7, 7]]
    )
    np.testing.assert_array_equal(b["segment_ids"], [[1] * 5 + [0] * 3, [1] * 8, [1] * 3 + [0] * 5])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 4, 0, 0, 0], list(range(8)), [0, 1, 2, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(
        b["targets"], [[10, 11, 12, 2, 7, 7, 7, 7], [20, 21, 22, 23, 24, 25, 26, 7], [28, 2, 7, 7, 7, 7, 7, 7]]
    )
    np.testing.assert_array_equal(b["loss_mask"], [[1] * 4 + [0] * 4, [1] * 7 + [0], [1] * 2 + [0] * 6])
    with pytest.raises(ValueError, match=r"data.packing: 'best_fit'; allowed: \['first_fit', 'none'\]"):
        pack(src, seq_len=8, pad_id=7, num_bins=1, seed=0, shuffle_rows=False, packing="best_fit")


@pytest.mark.parametrize("skip", [3, 17])  # mid epoch / after the epoch boundary (~56 rows an epoch)
def test_resume_equals_uninterrupted(h, skip):
    cfg = h.data_cfg(synthetic_documents=60, eval_documents=4, packing="none")
    uninterrupted = list(islice(_iterator(h, cfg), skip + 10))
    it = _iterator(h, cfg)
    list(islice(it, skip))
    state = json.loads(json.dumps(it.get_state()))
    resumed = _iterator(h, cfg)
    resumed.set_state(state)
    got = list(islice(resumed, 10))
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(got, uninterrupted[skip:], strict=True) for k in a)
    for b in got:
        assert (b["segment_ids"].max(axis=1) == 1).all()  # training rows are never all padding


def test_eval_batches_one_document_per_row(h):
    cfg = h.data_cfg(eval_documents=10, seq_len=40, packing="none")
    kw = dict(tokenizer=TOK, batch_size=4, vocab_size=h.VOCAB, max_position_embeddings=h.MAX_POS)
    ev = make_eval_batches(cfg, **kw)
    for b in ev:
        assert b["input_ids"].shape == (4, 40)
        _check_one_per_row(h, b)
    src = SyntheticSource(cfg.synthetic_tasks, cfg.synthetic_documents, cfg.seed)
    _, held = split(src, cfg.eval_documents, cfg.seed)
    expected = _chunks(cfg, [held.index(i) for i in range(len(held))])
    assert _rows(ev) == expected  # held-out documents in order, one chunk per row
    filler = 4 * len(ev) - len(expected)  # the last batch is filled with all-padding rows
    assert 0 < filler < 4 and (ev[-1]["segment_ids"][-filler:] == 0).all()
    assert (ev[-1]["loss_mask"][-filler:] == 0).all()


def test_packing_config_value_is_checked():
    assert build_config({"data": {"packing": "none"}}).data.packing == "none"
    assert build_config({}).data.packing == "first_fit"
    with pytest.raises(ConfigError, match=r"data.packing: Input should be 'first_fit' or 'none'"):
        build_config({"data": {"packing": "best_fit"}})
