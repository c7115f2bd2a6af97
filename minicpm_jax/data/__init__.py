"""Training data: tokenizers, document sources, grain pipelines that pack documents into batches.

``load_tokenizer`` -> ``make_train_iterator`` (endless, checkpointable through ``get_state`` /
``set_state``) and ``make_eval_batches`` (the held-out documents). See ``README.md`` here.
"""

from __future__ import annotations

from minicpm_jax.data.packing import Batch
from minicpm_jax.data.pipeline import make_eval_batches, make_train_iterator, train_dataset
from minicpm_jax.data.synthetic import SyntheticSource
from minicpm_jax.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer


__all__ = [
    "Batch",
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "SyntheticSource",
    "Tokenizer",
    "load_tokenizer",
    "make_eval_batches",
    "make_train_iterator",
    "train_dataset",
]
