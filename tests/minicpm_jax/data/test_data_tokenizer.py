"""The one tokenizer loader: byte-level, ``tokenizer.json`` and the official SentencePiece MiniCPM4 tokenizer, and
training through them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minicpm_jax.config import load_recipe
from minicpm_jax.data import load_tokenizer, make_train_iterator
from minicpm_jax.data.tokenizer import SentencePieceTokenizer, copy_tokenizer
from minicpm_jax.train.loop import run_training

ROOT = Path(__file__).resolve().parents[3]
MINICPM_TOKENIZER = ROOT / "tests" / "data" / "minicpm4-tokenizer"
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
    tok = load_tokenizer(None)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
    text = "Hello, wörld ✓ 12+3=15\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and min(ids) >= 3 and max(ids) < 259
    assert tok.encode(text, add_bos=True, add_eos=True) == [1, *ids, 2]
    assert tok.decode([1, *ids, 2, 0]) == text


def test_hf_tokenizer_json_file_or_directory(tmp_path):
    path = _bpe(tmp_path / "tok")
    for where in (path, path.parent):
        tok = load_tokenizer(str(where))
        assert tok.vocab_size == 300
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
        for text in CORPUS:
            ids = tok.encode(text)
            assert tok.decode(ids) == text and len(ids) < len(text.encode())
            assert tok.encode(text, add_bos=True, add_eos=True) == [1, *ids, 2]
    # the eos named by tokenizer_config.json wins over the common names
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert load_tokenizer(str(path)).eos_id == 3


def test_hf_tokenizer_without_config_uses_common_names(tmp_path):
    tok = load_tokenizer(str(_bpe(tmp_path, eos_name=None)))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory .*nope.json"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer \(looked for tokenizer.json, tokenizer.model"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read .*broken.json"):
        load_tokenizer(str(tmp_path / "broken.json"))
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    tok.save(str(tmp_path / "noeos.json"))
    with pytest.raises(ValueError, match="no end-of-document token"):
        load_tokenizer(str(tmp_path / "noeos.json"))


def test_official_minicpm4_directory_loads_its_sentencepiece_model():
    tok = load_tokenizer(MINICPM_TOKENIZER)
    assert isinstance(tok.base, SentencePieceTokenizer) and tok.base.path == MINICPM_TOKENIZER / "tokenizer.model"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (73448, 1, 73440, 0, [2, 73440])
    assert tok.add_bos and tok.chat_template.startswith("{% for message in messages %}")
    # the file itself, with the config files beside it, reads the same
    assert load_tokenizer(MINICPM_TOKENIZER / "tokenizer.model").encode("<|im_start|>user") == tok.encode(
        "<|im_start|>user"
    )


def test_training_batches_through_hf_tokenizer(h, tmp_path):
    tok = load_tokenizer(str(_bpe(tmp_path / "tok")))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    cfg = h.data_cfg(source="jsonl", paths=(str(tmp_path / "d.jsonl"),), eval_documents=1, seq_len=32)
    texts = Counter(tok.decode(seg) for seg in h.segments(h.one_pass(cfg, tok=tok)))
    assert len(texts) == 3 and set(texts) < set(CORPUS)
    with pytest.raises(ValueError, match="vocabulary of 300 tokens"):
        make_train_iterator(cfg, tokenizer=tok, global_batch_size=4, vocab_size=256, max_position_embeddings=64)


SAMPLES = (
    "Hello 世界, 12+3=15",
    "  leading spaces\nnew line\t tab",
    "今天天气很好，我们去公园散步吧。",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "<s>text</s> <|tool_call|><|fim_prefix|>a<|fim_middle|>b<|fim_suffix|>",
    "emoji 🙂 and ünïcödé",
)


def test_official_tokenizer_sentencepiece_and_tokenizer_json_give_the_same_ids(tmp_path):
    """The tokenizer.json that transformers converts from tokenizer.model (~4 s) encodes exactly as the
    SentencePiece model plus added tokens, special tokens included."""
    transformers = pytest.importorskip("transformers")
    transformers.AutoTokenizer.from_pretrained(str(MINICPM_TOKENIZER)).save_pretrained(str(tmp_path))
    sp, hf = load_tokenizer(MINICPM_TOKENIZER), load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(sp.base, SentencePieceTokenizer) and type(hf.base).__name__ == "HFTokenizer"
    for attribute in ("vocab_size", "bos_id", "eos_id", "pad_id", "add_bos", "chat_template"):
        assert getattr(hf, attribute) == getattr(sp, attribute), attribute
    for text in SAMPLES:
        assert hf.encode(text) == sp.encode(text), text
        assert hf.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
    assert sp.encode(SAMPLES[3])[:2] == [1, 73441]  # bos, then <|im_start|> as one token


def test_copy_tokenizer_of_a_file_renames_a_tokenizer_json(tmp_path):
    path = _bpe(tmp_path / "src")
    path.rename(tmp_path / "src" / "mine.json")
    (tmp_path / "dst").mkdir()
    assert copy_tokenizer(tmp_path / "src" / "mine.json", tmp_path / "dst") == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer(tmp_path / "dst").encode("the cat") == load_tokenizer(tmp_path / "src" / "mine.json").encode(
        "the cat"
    )
    (tmp_path / "sp").mkdir()  # a SentencePiece file brings its config files; the copy reads the same
    assert copy_tokenizer(MINICPM_TOKENIZER / "tokenizer.model", tmp_path / "sp")[:2] == [
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert load_tokenizer(tmp_path / "sp").encode(SAMPLES[3]) == load_tokenizer(MINICPM_TOKENIZER).encode(SAMPLES[3])


def test_tiny_recipe_trains_with_the_official_tokenizer_directory(tmp_path):
    """Training reads the official SentencePiece tokenizer directory and saves it with the final checkpoint."""
    overrides = [
        f"train.output_dir={tmp_path / 'run'}",
        f"data.tokenizer={MINICPM_TOKENIZER}",
        "model.vocab_size=73448",
    ]
    overrides += ["train.steps=2", "optimizer.warmup_steps=1", "optimizer.decay_steps=1", "train.eval_every=0"]
    overrides += ["train.global_batch_size=8", "data.seq_len=32", "data.synthetic_documents=100"]
    summary = run_training(load_recipe(ROOT / "configs" / "recipes" / "pretrain-tiny.yaml", overrides))
    assert summary["steps"] == 2 and np.isfinite(summary["last_loss"]) and summary["last_loss"] > 0
    saved = load_tokenizer(tmp_path / "run" / "final")
    assert isinstance(saved.base, SentencePieceTokenizer) and saved.stop_ids == [2, 73440]
