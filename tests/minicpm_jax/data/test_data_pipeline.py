"""The grain training pipeline: packing invariants, coverage, seeds, resume, host sharding, held-out eval."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest

from minicpm_jax.data import load_tokenizer, make_eval_batches, make_train_iterator
from minicpm_jax.data.pipeline import split
from minicpm_jax.data.synthetic import SyntheticSource

TOK = load_tokenizer(None)


def _iterator(h, cfg, batch=4, **kw):
    return make_train_iterator(
        cfg, tokenizer=TOK, global_batch_size=batch, vocab_size=h.VOCAB, max_position_embeddings=h.MAX_POS, **kw
    )


def _take(it, n):
    return list(islice(it, n))


def _equal(a, b) -> bool:
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def _expected_chunks(cfg, indices, seq_len):
    """Tokenized documents at ``indices`` of the synthetic source, cut into seq_len chunks."""
    src = SyntheticSource(cfg.synthetic_tasks, cfg.synthetic_documents, cfg.seed)
    out = []
    for i in indices:
        ids = TOK.encode(src[int(i)], add_bos=True, add_eos=True)
        out += [tuple(ids[j : j + seq_len]) for j in range(0, len(ids), seq_len)]
    return out


def _train_indices(cfg):
    src = SyntheticSource(cfg.synthetic_tasks, cfg.synthetic_documents, cfg.seed)
    train, held = split(src, cfg.eval_documents, cfg.seed)
    return [train.index(j) for j in range(len(train))], [held.index(i) for i in range(len(held))]


def test_batch_fields_and_packing_invariants(h):
    cfg = h.data_cfg()
    for b in _take(_iterator(h, cfg), 3):
        assert set(b) == {"input_ids", "targets", "loss_mask", "segment_ids", "positions"}
        assert all(v.shape == (4, 64) for v in b.values())
        h.check_packing(b)
        assert (b["segment_ids"] > 0).mean() > 0.7, "rows should be mostly full"


def test_one_pass_has_every_training_token_once(h):
    # seq_len 40 cuts the longer documents (up to ~120 bytes) into several chunks
    cfg = h.data_cfg(seq_len=40)
    batches = h.one_pass(cfg)
    for b in batches:
        h.check_packing(b)
    train_idx, _ = _train_indices(cfg)
    assert Counter(h.segments(batches)) == Counter(_expected_chunks(cfg, train_idx, 40))
    assert any(len(TOK.encode(SyntheticSource(cfg.synthetic_tasks, 200, 0)[i])) > 40 for i in train_idx)


def test_same_seed_same_order_other_seed_differs(h):
    a = _take(_iterator(h, h.data_cfg(seed=3)), 4)
    b = _take(_iterator(h, h.data_cfg(seed=3)), 4)
    c = _take(_iterator(h, h.data_cfg(seed=4)), 4)
    assert _equal(a, b)
    assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])


@pytest.mark.parametrize("skip", [3, 17])  # inside the first 64-row packing group / after it
def test_exact_resume_from_state_mid_epoch_and_across_epochs(h, skip):
    cfg = h.data_cfg(synthetic_documents=60, eval_documents=4)
    it = _iterator(h, cfg)
    _take(it, skip)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    expected = _take(it, 12)  # crosses the epoch boundary (~8 docs per batch, 56 training docs)
    resumed = _iterator(h, cfg)
    resumed.set_state(state)
    assert _equal(_take(resumed, 12), expected)


def test_two_hosts_see_disjoint_rows_covering_the_data(h):
    cfg = h.data_cfg(seq_len=48)
    hosts = [h.one_pass(cfg, batch=8, process_index=p, process_count=2) for p in range(2)]
    assert all(b["input_ids"].shape[0] <= 4 for host in hosts for b in host)
    assert hosts[0][0]["input_ids"].shape == (4, 48)
    parts = [Counter(h.segments(host)) for host in hosts]
    train_idx, _ = _train_indices(cfg)
    assert parts[0] + parts[1] == Counter(_expected_chunks(cfg, train_idx, 48))
    for p in range(2):  # each host holds exactly its own documents
        assert parts[p] == Counter(_expected_chunks(cfg, train_idx[p::2], 48))


def test_eval_documents_are_held_out_and_deterministic(h):
    cfg = h.data_cfg(eval_documents=12)
    train_idx, held_idx = _train_indices(cfg)
    assert len(held_idx) == 12 and not set(train_idx) & set(held_idx)
    assert sorted(train_idx + held_idx) == list(range(cfg.synthetic_documents))
    kw = dict(tokenizer=TOK, batch_size=4, vocab_size=h.VOCAB, max_position_embeddings=h.MAX_POS)
    ev = make_eval_batches(cfg, **kw)
    assert _equal(ev, make_eval_batches(cfg, **kw))
    for b in ev:
        assert b["input_ids"].shape == (4, 64)
        h.check_packing(b)
    assert Counter(h.segments(ev)) == Counter(_expected_chunks(cfg, held_idx, 64))
    assert make_eval_batches(h.data_cfg(eval_documents=0), **kw) == []
    # other seeds hold out other documents
    assert _train_indices(h.data_cfg(eval_documents=12, seed=1))[1] != held_idx
