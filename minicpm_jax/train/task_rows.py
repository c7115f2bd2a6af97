"""Task rows (``data.task_rows``): rows of every training batch built from the example generators of
the ``passkey`` and ``mqar`` evaluation tasks, the loss on the answer tokens only, mixed with the
packed corpus rows.

A tiny model does not learn retrieval from plain next-token loss at toy budgets: the answer is one
token among thousands and the uniform guess is a deep plateau (a 2-layer hidden-64 MiniCPM4 stayed at
chance on one-digit passkeys after 1,500 steps of a passkey-only corpus). With the loss on the answers
only, a 12-layer one reached 100% at 64-512 tokens in 400 steps (batch 16, seq_len 128). Each entry
gives ``rows`` of every global batch (split evenly over the processes) and a loss ``weight`` per answer
token (corpus tokens weigh 1). Examples depend only on
``(data.seed, entry, step, process, row)``, a stream of their own, never the evaluation's examples.

Options: ``passkey``: ``key_length`` (default 1), ``min_length`` (default ``seq_len // 2``; lengths are
drawn uniformly up to what fits ``seq_len``); ``mqar``: ``num_pairs`` (a list, one drawn per row;
default ``[2, 4, 8]``), ``num_queries`` (default 1), ``key_length`` (3), ``value_length`` (2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np

from minicpm_jax.data import make_train_iterator
from minicpm_jax.train.sources import GrainSource

if TYPE_CHECKING:
    from minicpm_jax.config.schema import TaskRowsConfig

_STREAM = 7919  # separates these examples' seeds from the evaluation's ([seed, length, depth, i] / [seed, n, i])


def passkey_row(
    tok, rng: np.random.Generator, seq_len: int, key_length: int = 1, min_length: int | None = None, extreme=False
):
    """``(tokens, answer spans)`` of one passkey example of random length and depth within ``seq_len``
    (``extreme``: of the shortest length, to check the options)."""
    from minicpm_jax.eval.tasks.retrieval import passkey_example

    top = seq_len - key_length
    low = min(top, seq_len // 2 if min_length is None else min_length)
    length = low if extreme else int(rng.integers(low, top + 1))
    prompt, answer = passkey_example(tok, rng, length, float(rng.random()), key_length)
    return prompt + answer, [(len(prompt), len(prompt) + len(answer))]


def mqar_row(tok, rng: np.random.Generator, seq_len: int, num_pairs=(2, 4, 8), extreme=False, **options):
    """``(tokens, answer spans)`` of one MQAR example with a number of pairs drawn from ``num_pairs``
    (``extreme``: the most pairs, to check the options)."""
    from minicpm_jax.eval.tasks.recall import mqar_example

    n = max(num_pairs) if extreme else int(rng.choice(list(num_pairs)))
    queries = options.pop("num_queries", 1)
    return mqar_example(tok, rng, n, min(queries, n), **options)


ROW_MAKERS = {"passkey": passkey_row, "mqar": mqar_row}


class TaskRowMix:
    """A ``BatchSource``: the ``corpus`` source's rows (``None``: no corpus rows) followed by this
    process's task rows; its state is the corpus state plus the number of batches drawn."""

    def __init__(
        self,
        corpus,
        entries: tuple[TaskRowsConfig, ...],
        tokenizer,
        seq_len: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        for e in entries:
            if e.rows % process_count:
                raise ValueError(
                    f"data.task_rows: {e.task} has {e.rows} rows, not divisible by {process_count} processes"
                )
        self.corpus, self.entries, self.tok, self.seq_len = corpus, entries, tokenizer, seq_len
        self.seed, self.process, self.local = seed, process_index, [e.rows // process_count for e in entries]
        self.count, self.pad = 0, tokenizer.pad_id if tokenizer.pad_id is not None else 0
        for e in entries:  # options are checked before the first step, on their extreme example
            self._example(e, np.random.default_rng(0), extreme=True)

    def make(self, count: int) -> dict[str, np.ndarray]:
        """This process's task rows of batch ``count`` (0-based): ``[rows, seq_len]`` arrays in the
        packer's layout (segment 1 on the example, 0 on padding), ``loss_mask`` = ``weight`` where the
        target is an answer token, else 0."""
        n, t = sum(self.local), self.seq_len
        batch = {
            "input_ids": np.full((n, t), self.pad, np.int32),
            "targets": np.full((n, t), self.pad, np.int32),
            "loss_mask": np.zeros((n, t), np.float32),
            "segment_ids": np.zeros((n, t), np.int32),
            "positions": np.zeros((n, t), np.int32),
        }
        r = 0
        for k, (entry, rows) in enumerate(zip(self.entries, self.local)):
            for i in range(rows):
                rng = np.random.default_rng([self.seed, _STREAM, k, count, self.process, i])
                ids, spans = self._example(entry, rng)
                m = len(ids) - 1
                batch["input_ids"][r, :m], batch["targets"][r, :m] = ids[:-1], ids[1:]
                batch["segment_ids"][r, :m], batch["positions"][r, :m] = 1, np.arange(m)
                for s, e in spans:
                    batch["loss_mask"][r, s - 1 : e - 1] = entry.weight  # positions whose targets are the answer
                r += 1
        return batch

    def _example(self, entry, rng, **kw):
        try:
            ids, spans = ROW_MAKERS[entry.task](self.tok, rng, self.seq_len + 1, **entry.options, **kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"data.task_rows: {entry.task} options {entry.options}: {e}") from None
        if len(ids) > self.seq_len + 1:
            raise ValueError(f"data.task_rows: a {entry.task} example has {len(ids)} tokens; seq_len is {self.seq_len}")
        return ids, spans

    def next_batch(self, step, trainer) -> dict[str, np.ndarray]:
        rows = self.make(self.count)
        self.count += 1
        if self.corpus is None:
            return rows
        corpus = self.corpus.next_batch(step, trainer)
        return {k: np.concatenate([corpus[k], rows[k]]) for k in rows}

    def get_state(self) -> dict:
        return {"count": self.count, "corpus": None if self.corpus is None else self.corpus.get_state()}

    def set_state(self, state: dict) -> None:
        self.count = int(state["count"])
        if self.corpus is not None:
            self.corpus.set_state(state["corpus"])


def training_source(cfg, *, tokenizer, vocab_size: int, max_position_embeddings: int):
    """The default ``BatchSource`` of a run config: its packed corpus (``GrainSource``) with
    ``data.task_rows`` appended to every batch; all rows task rows when they fill the batch."""
    entries, total = cfg.data.task_rows, cfg.train.global_batch_size
    task = sum(e.rows for e in entries)
    if task > total:
        raise ValueError(f"data.task_rows: {task} rows in all, more than train.global_batch_size {total}")
    corpus = None
    if task < total:
        corpus = GrainSource(
            make_train_iterator(
                cfg.data,
                tokenizer=tokenizer,
                global_batch_size=total - task,
                vocab_size=vocab_size,
                max_position_embeddings=max_position_embeddings,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
        )
    if not entries:
        return corpus
    return TaskRowMix(
        corpus, entries, tokenizer, cfg.data.seq_len, cfg.data.seed, jax.process_index(), jax.process_count()
    )
