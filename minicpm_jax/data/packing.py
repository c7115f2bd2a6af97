"""Packing token documents into fixed-length rows and turning packed rows into training batches.

Documents longer than ``seq_len`` are cut into ``seq_len`` chunks (each chunk its own segment; the
target across a cut is not trained). ``packing="first_fit"``: grain's first-fit packer fills rows
with whole chunks and records ``segment_ids`` (1, 2, ... per document in the row, 0 = padding) and
``positions`` (restarting at 0 per document). ``packing="none"``: each chunk is its own row,
right-padded (``PadToRow``: segment id 1 on the chunk, 0 on padding). ``to_batch`` derives
next-token targets and the loss mask from either.
"""

from __future__ import annotations

from typing import TypedDict

import grain
import numpy as np

KEY = "tokens"  # the one packed feature; grain adds KEY_segment_ids and KEY_positions
PACKING_MODES = ("first_fit", "none")


class Batch(TypedDict):
    """One batch of packed rows, all ``[rows, seq_len]`` numpy arrays."""

    input_ids: np.ndarray  # int32 tokens
    targets: np.ndarray  # int32 next token of the same document (pad id where masked)
    loss_mask: np.ndarray  # float32: 1 where targets is the same document's next token
    segment_ids: np.ndarray  # int32: 1, 2, ... per packed document, 0 = padding
    positions: np.ndarray  # int32: position within the document, restarting at 0


class SplitLong(grain.experimental.FlatMapTransform):
    """Cut a ``{KEY: tokens}`` document into chunks of at most ``seq_len`` tokens."""

    max_fan_out = 2**31 - 1  # unused by FlatMapIterDataset; any length is allowed

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, element):
        tokens = element[KEY]
        return [{KEY: tokens[i : i + self.seq_len]} for i in range(0, len(tokens), self.seq_len)]


class PadToRow(grain.transforms.Map):
    """One chunk (at most ``seq_len`` tokens) -> one row in the packer's layout, right-padded."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id

    def map(self, element):
        tokens = np.asarray(element[KEY], dtype=np.int32)
        n = len(tokens)
        row = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        row[:n] = tokens
        segments = np.zeros(self.seq_len, dtype=np.int32)
        segments[:n] = 1
        positions = np.zeros(self.seq_len, dtype=np.int32)
        positions[:n] = np.arange(n, dtype=np.int32)
        return {KEY: row, f"{KEY}_segment_ids": segments, f"{KEY}_positions": positions}


def pack(
    ds: grain.IterDataset,
    *,
    seq_len: int,
    pad_id: int,
    num_bins: int,
    seed: int,
    shuffle_rows: bool,
    packing: str = "first_fit",
) -> grain.IterDataset:
    """Chunk long documents, then first-fit pack them into rows of ``seq_len`` tokens
    (``packing="none"``: one chunk per row, in document order; ``num_bins``/``shuffle_rows`` unused)."""
    if packing not in PACKING_MODES:
        raise ValueError(f"data.packing: {packing!r}; allowed: {list(PACKING_MODES)}")
    chunks = grain.experimental.FlatMapIterDataset(ds, SplitLong(seq_len))
    if packing == "none":
        return chunks.map(PadToRow(seq_len, pad_id))
    return grain.experimental.FirstFitPackIterDataset(
        chunks,
        length_struct={KEY: seq_len},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle_rows,
        padding_struct={KEY: pad_id},
    )


def to_batch(rows, pad_id: int) -> Batch:
    """Stack packed rows (grain's packer output) into a ``Batch`` with targets and loss mask."""
    tokens = np.stack([r[KEY] for r in rows]).astype(np.int32)
    segments = np.stack([r[f"{KEY}_segment_ids"] for r in rows]).astype(np.int32)
    positions = np.stack([r[f"{KEY}_positions"] for r in rows]).astype(np.int32)
    return batch_from_segments(tokens, segments, positions, pad_id)


def batch_from_segments(tokens, segments, positions, pad_id: int) -> Batch:
    """Targets = next token when it belongs to the same (non-padding) segment, else masked."""
    same = np.zeros(tokens.shape, dtype=bool)
    same[:, :-1] = (segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] > 0)
    targets = np.full(tokens.shape, pad_id, dtype=np.int32)
    targets[:, :-1] = np.where(same[:, :-1], tokens[:, 1:], pad_id)
    return Batch(
        input_ids=tokens, targets=targets, loss_mask=same.astype(np.float32), segment_ids=segments, positions=positions
    )


def empty_rows(n: int, seq_len: int, pad_id: int) -> Batch:
    """``n`` all-padding rows (loss mask 0), used to fill the last evaluation batch."""
    zeros = np.zeros((n, seq_len), dtype=np.int32)
    return batch_from_segments(np.full((n, seq_len), pad_id, dtype=np.int32), zeros, zeros, pad_id)
