"""``data.task_rows``: passkey / MQAR rows with the loss on the answers, appended to the packed corpus
rows of every batch; deterministic across resume; bad entries fail with one clear error."""

import numpy as np
import pytest

from minicpm_jax.config import load_recipe
from minicpm_jax.config.schema import TaskRowsConfig
from minicpm_jax.data import load_tokenizer, make_train_iterator
from minicpm_jax.train.task_rows import TaskRowMix, training_source

TASKS = "[{task: passkey, rows: 2, weight: 4.0}, {task: mqar, rows: 2, weight: 2.0, options: {num_pairs: [3]}}]"


def _cfg(*overrides):
    return load_recipe("pretrain-tiny", ["train.global_batch_size=8", f"data.task_rows={TASKS}", *overrides])


def _source(cfg):
    tok = load_tokenizer(None)
    kw = {"vocab_size": cfg.model.vocab_size, "max_position_embeddings": cfg.model.max_position_embeddings}
    return tok, kw, training_source(cfg, tokenizer=tok, **kw)


def test_corpus_rows_first_then_answer_only_task_rows():
    cfg = _cfg()
    tok, kw, source = _source(cfg)
    batch = source.next_batch(1, None)
    corpus = next(make_train_iterator(cfg.data, tokenizer=tok, global_batch_size=4, **kw))
    assert all(batch[k].shape == (8, 128) for k in batch)
    for k in corpus:  # the first 4 rows are the plain corpus iterator's batch of 4
        np.testing.assert_array_equal(batch[k][:4], corpus[k])
    for r, weight in ((4, 4.0), (5, 4.0), (6, 2.0), (7, 2.0)):
        mask, ids, targets = batch["loss_mask"][r], batch["input_ids"][r], batch["targets"][r]
        where = np.flatnonzero(mask)
        assert set(mask[where]) == {weight} and set(np.unique(mask)) == {0.0, weight}
        n = int(batch["segment_ids"][r].sum())
        np.testing.assert_array_equal(batch["positions"][r, :n], np.arange(n))
        np.testing.assert_array_equal(targets[: n - 1], ids[1:n])  # targets = the next token
        text = tok.decode(ids[: where[0] + 1].tolist())
        answer = tok.decode(targets[where].tolist())
        if weight == 4.0:  # one-digit key at the end, behind the evaluation's question
            assert text.endswith(" What is the pass key? #") and f"The pass key is #{answer}." in text
            assert len(where) == 1 and where[0] == n - 1
        else:  # three pairs, one query; the answer is the asked key's value
            pairs, query = text.removeprefix("kv ").split(" |")
            table = dict(p.split("=") for p in pairs.split())
            assert len(table) == 3 and table[query.strip().removesuffix("?")] == answer and len(where) == 2


def test_resume_gives_the_same_batches_and_every_step_new_examples():
    cfg = _cfg()
    _, _, source = _source(cfg)
    first = [source.next_batch(s, None) for s in (1, 2)]
    state = source.get_state()
    expected = source.next_batch(3, None)
    _, _, resumed = _source(cfg)
    resumed.set_state(state)
    got = resumed.next_batch(3, None)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    assert not np.array_equal(first[0]["input_ids"][4:], first[1]["input_ids"][4:])


def test_rows_filling_the_batch_need_no_corpus_and_seeds_give_other_examples():
    cfg = _cfg("data.task_rows=[{task: passkey, rows: 8}]")
    _, _, source = _source(cfg)
    assert source.corpus is None
    batch = source.next_batch(1, None)
    assert batch["input_ids"].shape == (8, 128) and (batch["loss_mask"].sum(axis=1) == 1.0).all()
    _, _, other = _source(_cfg("data.task_rows=[{task: passkey, rows: 8}]", "data.seed=1"))
    assert not np.array_equal(other.next_batch(1, None)["input_ids"], batch["input_ids"])


@pytest.mark.parametrize(
    "task_rows, message",
    [
        ("[{task: passkey, rows: 9}]", "9 rows in all, more than train.global_batch_size 8"),
        ("[{task: passkey, rows: 2, options: {depth: 1}}]", "passkey options {'depth': 1}"),
        ("[{task: passkey, rows: 2, options: {min_length: 10}}]", "context too short"),
        ("[{task: mqar, rows: 2, options: {num_pairs: [2, 40]}}]", "tokens; seq_len is 128"),
    ],
)
def test_bad_entries_fail_with_one_clear_error(task_rows, message):
    with pytest.raises(ValueError, match="data.task_rows") as e:
        _source(_cfg(f"data.task_rows={task_rows}"))
    assert message in str(e.value)


def test_rows_must_divide_over_processes_and_the_task_is_checked():
    entries = (TaskRowsConfig(task="passkey", rows=2),)
    with pytest.raises(ValueError, match="passkey has 2 rows, not divisible by 3 processes"):
        TaskRowMix(None, entries, load_tokenizer(None), 128, 0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="task"):
        TaskRowsConfig(task="copy", rows=1)
