"""Byte-level and Hugging Face ``tokenizer.json`` tokenizers, and training through an HF tokenizer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minicpm_jax.data import build_tokenizer, make_train_iterator

MINICPM_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "minicpm4-tokenizer"
CORPUS = ["the cat sat on the mat", "a dog ate the bone", "hello world, hello tokenizers", "ünï ✓"]


def _bpe(directory: Path, eos_name: str | None = "</s>") -> Path:
    """Train a tiny byte-level BPE tokenizer and save it as directory/tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if eos_name:
        (directory / "tokenizer_config.json").write_text(
            json.dumps({"bos_token": "<s>", "eos_token": {"content": eos_name}, "pad_token": None})
        )
    return directory / "tokenizer.json"


def test_byte_tokenizer_round_trip():
    tok = build_tokenizer(None)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
    text = "Hello, wörld ✓ 12+3=15\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and min(ids) >= 3 and max(ids) < 259
    assert tok.encode(text, add_bos=True, add_eos=True) == [1, *ids, 2]
    assert tok.decode([1, *ids, 2, 0]) == text


def test_hf_tokenizer_json_file_or_directory(tmp_path):
    path = _bpe(tmp_path / "tok")
    for where in (path, path.parent):
        tok = build_tokenizer(str(where))
        assert tok.vocab_size == 300
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
        for text in CORPUS:
            ids = tok.encode(text)
            assert tok.decode(ids) == text and len(ids) < len(text.encode())
            assert tok.encode(text, add_bos=True, add_eos=True) == [1, *ids, 2]
    # the eos named by tokenizer_config.json wins over the common names
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert build_tokenizer(str(path)).eos_id == 3


def test_hf_tokenizer_without_config_uses_common_names(tmp_path):
    tok = build_tokenizer(str(_bpe(tmp_path, eos_name=None)))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory .*nope.json"):
        build_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in directory"):
        build_tokenizer(str(tmp_path))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read .*broken.json"):
        build_tokenizer(str(tmp_path / "broken.json"))
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    tok.save(str(tmp_path / "noeos.json"))
    with pytest.raises(ValueError, match="no end-of-document token"):
        build_tokenizer(str(tmp_path / "noeos.json"))


def test_minicpm_tokenizer_dir_without_tokenizer_json_says_how_to_convert():
    if (MINICPM_TOKENIZER / "tokenizer.json").is_file():
        assert build_tokenizer(str(MINICPM_TOKENIZER)).vocab_size == 73448
        return
    with pytest.raises(FileNotFoundError, match="SentencePiece tokenizer.model.*save_pretrained"):
        build_tokenizer(str(MINICPM_TOKENIZER))


def test_training_batches_through_hf_tokenizer(h, tmp_path):
    tok = build_tokenizer(str(_bpe(tmp_path / "tok")))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    cfg = h.data_cfg(source="jsonl", paths=(str(tmp_path / "d.jsonl"),), eval_documents=1, seq_len=32)
    texts = Counter(tok.decode(seg) for seg in h.segments(h.one_pass(cfg, tok=tok)))
    assert len(texts) == 3 and set(texts) < set(CORPUS)
    with pytest.raises(ValueError, match="vocabulary of 300 tokens"):
        make_train_iterator(cfg, tokenizer=tok, global_batch_size=4, vocab_size=256, max_position_embeddings=64)


@pytest.mark.slow
def test_real_minicpm_tokenizer_converted_to_tokenizer_json(tmp_path):
    """The documented conversion (transformers, ~15 s) gives a tokenizer.json we load exactly."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(MINICPM_TOKENIZER))
    reference.save_pretrained(str(tmp_path))
    tok = build_tokenizer(str(tmp_path))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (73448, 1, 73440)
    for text in ("Hello 世界, 12+3=15", "  leading spaces\nnew line", "<|im_start|>user"):
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
