"""The grain pipelines: held-out split, host sharding, shuffling, tokenization, packing, batching.

Training: source -> training documents (eval ones removed) -> this host's shard (every
``process_count``-th document) -> per-epoch shuffle by seed -> repeat forever -> tokenize ->
chunk + first-fit pack (``data.packing: none``: one chunk per padded row) -> batches of
``global_batch_size // process_count`` rows. The returned iterator is grain's: ``get_state()`` is a
JSON-serialisable dict and ``set_state`` resumes the exact data order. Evaluation: the held-out
documents in order, packed (or one per row), as a list of equal-shape batches.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from minicpm_jax.data.packing import KEY, Batch, empty_rows, pack, to_batch
from minicpm_jax.data.sources import open_source
from minicpm_jax.data.tokenizer import Tokenizer, check_vocab

MIN_PACKING_BINS = 64  # first-fit packs over at least this many rows at once (less padding)
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
_SPLIT_SALT = 0x5EED  # the held-out draw uses a different permutation than the epoch-0 shuffle


class _Subset:
    """The held-out documents of ``source`` (``keep=False``) or all the others (``keep=True``),
    in source order; a picklable grain random-access source."""

    def __init__(self, source, held: np.ndarray, keep: bool):
        self._source, self._held, self._keep = source, held, keep
        # the j-th kept index is j + #{held h : h - rank(h) <= j}
        self._gaps = held - np.arange(len(held))
        self._n = len(source) - len(held) if keep else len(held)

    def __len__(self) -> int:
        return self._n

    def index(self, i: int) -> int:
        """Index in ``source`` of this subset's ``i``-th document."""
        if not 0 <= i < self._n:
            raise IndexError(f"document {i} out of range [0, {self._n})")
        if self._keep:
            return i + int(np.searchsorted(self._gaps, i, side="right"))
        return int(self._held[i])

    def __getitem__(self, i: int):
        return self._source[self.index(i)]


def heldout_indices(num_documents: int, eval_documents: int, seed: int) -> np.ndarray:
    """Sorted indices of the held-out documents: a seeded draw, the same on every host and run."""
    if eval_documents < 0:
        raise ValueError(f"data.eval_documents: {eval_documents}; must be >= 0")
    if eval_documents >= num_documents:
        raise ValueError(
            f"data: empty training set: data.eval_documents {eval_documents} holds out "
            f"every one of the {num_documents} documents"
        )
    shuffle = grain.experimental.index_shuffle
    seed = (seed + _SPLIT_SALT) % 2**32
    return np.sort(
        [shuffle(i, max_index=num_documents - 1, seed=seed, rounds=4) for i in range(eval_documents)]
    ).astype(np.int64)


def split(source, eval_documents: int, seed: int) -> tuple[_Subset, _Subset]:
    """(training, held-out) views of ``source``; the held-out documents never appear in training."""
    held = heldout_indices(len(source), eval_documents, seed)
    return _Subset(source, held, keep=True), _Subset(source, held, keep=False)


def _tokenize(doc, tokenizer: Tokenizer) -> dict:
    """Text -> bos + ids + eos; pre-tokenized arrays pass through (they carry their own eos)."""
    if isinstance(doc, str):
        doc = tokenizer.encode(doc, add_bos=True, add_eos=True)
    return {KEY: np.asarray(doc, dtype=np.int32)}


def _open(cfg, tokenizer: Tokenizer, vocab_size: int, max_position_embeddings: int):
    """Validate the data config against the model and return (training, held-out) sources."""
    if cfg.seq_len <= 0:
        raise ValueError(f"data.seq_len: {cfg.seq_len}; must be positive")
    if cfg.seq_len > max_position_embeddings:
        raise ValueError(
            f"data.seq_len: {cfg.seq_len} is larger than model.max_position_embeddings "
            f"{max_position_embeddings}; lower data.seq_len or use a longer-context model"
        )
    if not 0 <= cfg.seed < 2**32:
        raise ValueError(f"data.seed: {cfg.seed}; must be in [0, 2**32)")
    check_vocab(tokenizer, vocab_size)
    source = open_source(cfg, eos_id=tokenizer.eos_id, vocab_size=vocab_size)
    return split(source, cfg.eval_documents, cfg.seed)


def train_dataset(
    cfg,
    *,
    tokenizer: Tokenizer,
    global_batch_size: int,
    vocab_size: int,
    max_position_embeddings: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """The training ``IterDataset`` of this host's batches (``num_epochs=None``: repeat forever)."""
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"data: process_index {process_index} / process_count {process_count} invalid")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"train.global_batch_size: {global_batch_size} must be a positive multiple of "
            f"the number of processes ({process_count}); each host loads an equal share"
        )
    train, _ = _open(cfg, tokenizer, vocab_size, max_position_embeddings)
    if len(train) < process_count:
        raise ValueError(
            f"data: {len(train)} training documents cannot be shared by {process_count} "
            "processes; every process needs at least one"
        )
    rows = global_batch_size // process_count
    ds = grain.MapDataset.source(train)[process_index::process_count]
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(num_epochs).map(functools.partial(_tokenize, tokenizer=tokenizer))
    ds = pack(
        ds.to_iter_dataset(_READ_OPTIONS),
        seq_len=cfg.seq_len,
        pad_id=tokenizer.pad_id,
        num_bins=max(rows, MIN_PACKING_BINS),
        seed=cfg.seed,
        shuffle_rows=cfg.shuffle,
        packing=cfg.packing,
    )
    return ds.batch(rows, drop_remainder=drop_remainder, batch_fn=functools.partial(to_batch, pad_id=tokenizer.pad_id))


def make_train_iterator(
    cfg,
    *,
    tokenizer: Tokenizer,
    global_batch_size: int,
    vocab_size: int,
    max_position_embeddings: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """Endless iterator of this host's ``Batch``es, with ``get_state()`` / ``set_state(state)``."""
    return iter(
        train_dataset(
            cfg,
            tokenizer=tokenizer,
            global_batch_size=global_batch_size,
            vocab_size=vocab_size,
            max_position_embeddings=max_position_embeddings,
            process_index=process_index,
            process_count=process_count,
        )
    )


def make_eval_batches(
    cfg, *, tokenizer: Tokenizer, batch_size: int, vocab_size: int, max_position_embeddings: int
) -> list[Batch]:
    """The held-out documents, packed in order into ``[batch_size, seq_len]`` batches; the last one
    is filled with all-padding rows (loss mask 0). Empty when ``eval_documents`` is 0."""
    if batch_size <= 0:
        raise ValueError(f"data: evaluation batch_size {batch_size}; must be positive")
    _, held = _open(cfg, tokenizer, vocab_size, max_position_embeddings)
    if len(held) == 0:
        return []
    ds = grain.MapDataset.source(held).map(functools.partial(_tokenize, tokenizer=tokenizer))
    ds = pack(
        ds.to_iter_dataset(_READ_OPTIONS),
        seq_len=cfg.seq_len,
        pad_id=tokenizer.pad_id,
        num_bins=batch_size,
        seed=cfg.seed,
        shuffle_rows=False,
        packing=cfg.packing,
    )
    batches = list(ds.batch(batch_size, batch_fn=functools.partial(to_batch, pad_id=tokenizer.pad_id)))
    missing = batch_size - len(batches[-1]["input_ids"])
    if missing:
        fill = empty_rows(missing, cfg.seq_len, tokenizer.pad_id)
        batches[-1] = Batch(**{k: np.concatenate([batches[-1][k], fill[k]]) for k in fill})
    return batches
