"""Tokenizers for training data: a byte-level one (no files needed) and a Hugging Face ``tokenizer.json``.

Both expose ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``, ``encode(text) -> list[int]`` (no
special tokens unless asked) and ``decode(ids) -> str`` (special tokens dropped).
"""

from __future__ import annotations

import json
from pathlib import Path

# special-token names tried, in order, when the tokenizer directory does not name them
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<unk>")


class _Base:
    """Shared ``encode`` options: wrap the ids in bos/eos on request."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def _ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_bos`` / ``add_eos`` wrap them in the special tokens."""
        ids = self._ids(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return [*ids, self.eos_id] if add_eos else ids


class ByteTokenizer(_Base):
    """UTF-8 bytes as tokens: 0 = pad, 1 = bos, 2 = eos (MiniCPM's bos/eos ids), byte b = b + 3."""

    OFFSET = 3

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = 256 + self.OFFSET

    def _ids(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer(_Base):
    """A Hugging Face ``tokenizers`` tokenizer loaded from ``tokenizer.json``.

    bos / eos / pad come from ``tokenizer_config.json`` or ``special_tokens_map.json`` beside the
    file when present, else from common token names; an eos token is required (it ends documents).
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = _resolve_tokenizer_file(Path(path))
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"data.tokenizer: cannot read {self.path}: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        named = _named_special_tokens(self.path.parent)
        self.bos_id = self._special_id(named.get("bos_token"), _BOS_NAMES)
        self.eos_id = self._special_id(named.get("eos_token"), _EOS_NAMES)
        if self.eos_id is None:
            raise ValueError(
                f"data.tokenizer: {self.path} has no end-of-document token (looked for "
                f"eos_token in tokenizer_config.json and {list(_EOS_NAMES)})"
            )
        pad = self._special_id(named.get("pad_token"), _PAD_NAMES)
        self.pad_id = self.eos_id if pad is None else pad

    def _special_id(self, name: str | None, fallbacks: tuple[str, ...]) -> int | None:
        for candidate in ((name,) if name else ()) + fallbacks:
            token_id = self._tok.token_to_id(candidate)
            if token_id is not None:
                return token_id
        return None

    def _ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


Tokenizer = ByteTokenizer | HFTokenizer


def build_tokenizer(path: str | Path | None) -> Tokenizer:
    """``None`` -> byte-level tokenizer; a ``tokenizer.json`` file or a directory holding one -> HF."""
    return ByteTokenizer() if path is None else HFTokenizer(path)


def check_vocab(tokenizer, vocab_size: int, where: str = "data.tokenizer") -> None:
    """Raise if the tokenizer can emit ids the model's embedding table does not have."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"{where}: vocabulary of {tokenizer.vocab_size} tokens ({tokenizer!r}) is "
            f"larger than model.vocab_size {vocab_size}; use a model with vocab_size >= "
            f"{tokenizer.vocab_size} or a smaller tokenizer"
        )


def _resolve_tokenizer_file(path: Path) -> Path:
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return path / "tokenizer.json"
        hint = (
            " (it has a SentencePiece tokenizer.model: write tokenizer.json with "
            "transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
            if (path / "tokenizer.model").is_file()
            else ""
        )
        raise FileNotFoundError(f"data.tokenizer: no tokenizer.json in directory {path}{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"data.tokenizer: no such file or directory {path}")
    return path


def _named_special_tokens(directory: Path) -> dict[str, str]:
    """bos/eos/pad token strings named by tokenizer_config.json or special_tokens_map.json."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
        file = directory / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"data.tokenizer: cannot parse {file}: {e}") from e
        for key in ("bos_token", "eos_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
    return out
