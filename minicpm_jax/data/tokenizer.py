"""Tokenizers: the one loader used by training data, generation, evaluation, import/export and checkpoints.

``load_tokenizer(source)`` reads

- ``None``: the byte-level tokenizer (UTF-8 bytes, no files);
- a directory (a checkpoint or a Hugging Face model directory): the first of ``tokenizer.json`` (Hugging Face
  ``tokenizers``), ``tokenizer.model`` (SentencePiece, with the added tokens of ``tokenizer_config.json`` /
  ``added_tokens.json`` matched as whole tokens, as ``transformers``' ``LlamaTokenizer`` does in its default
  "legacy" mode) and ``byte_tokenizer.json`` (the byte-level tokenizer of training runs);
- a file: ``*.model`` (SentencePiece), ``byte_tokenizer.json``, or a ``tokenizer.json`` under any name;
- a URL of either (``gs://``, ``s3://``, ``memory://``: ``minicpm_jax.paths``): its tokenizer files are
  copied once per process into a local temporary directory and read from there.

The config files beside it apply: bos / eos / pad from ``tokenizer_config.json`` or ``special_tokens_map.json``
(else common token names; an eos is required, it ends documents), the chat template, ``add_bos_token``, and
the generation stop ids of ``generation_config.json``. Encodings equal ``transformers.AutoTokenizer(dir).encode``.

``save_tokenizer(source, directory)`` puts a tokenizer (its files, or the byte-level marker for ``"byte"``)
into a checkpoint directory, with a ``generation_config.json``.
"""

from __future__ import annotations

import atexit
import functools
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from minicpm_jax.paths import as_path, is_remote

BYTE_TOKENIZER = "byte"  # ``save_tokenizer`` source of the byte-level tokenizer
BYTE_MARKER = "byte_tokenizer.json"
TOKENIZER_MAIN_FILES = ("tokenizer.json", "tokenizer.model", BYTE_MARKER)  # one of these is a tokenizer
TOKENIZER_FILES = (
    *TOKENIZER_MAIN_FILES,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)

# special-token names tried, in order, when the tokenizer's config does not name them
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
    """A Hugging Face ``tokenizers`` tokenizer from a ``tokenizer.json`` file."""

    def __init__(self, path: Path, config: dict[str, Any]):
        from tokenizers import Tokenizer as HFTokenizers

        self.path = path
        try:
            self._tok = HFTokenizers.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"tokenizer: cannot read {path}: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id(_content(config.get("bos_token")), _BOS_NAMES)
        self.eos_id = self._special_id(_content(config.get("eos_token")), _EOS_NAMES)
        if self.eos_id is None:
            raise ValueError(
                f"tokenizer: {path} has no end-of-document token (looked for eos_token in tokenizer_config.json "
                f"and {list(_EOS_NAMES)})"
            )
        pad = self._special_id(_content(config.get("pad_token")), _PAD_NAMES)
        self.pad_id = self.eos_id if pad is None else pad

    def _special_id(self, name: str | None, fallbacks: tuple[str, ...]) -> int | None:
        for candidate in ((name,) if name else ()) + fallbacks:
            token_id = self._tok.token_to_id(candidate)
            if token_id is not None:
                return token_id
        return None

    def adds_bos(self) -> bool:
        """Whether the file's post-processor puts the bos token in front (its rule without a config)."""
        return self.bos_id is not None and self._tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    def _ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(_Base):
    """``tokenizer.model`` plus added tokens, which are cut out of the text before SentencePiece sees it."""

    def __init__(self, path: Path, config: dict[str, Any]):
        import sentencepiece as spm

        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"tokenizer: cannot read {path}: {e}") from e
        self.added, self.special_ids, self._strip = _added_tokens(path.parent, config)
        for piece_id in (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()):  # HF registers them as special
            if 0 <= piece_id < self._sp.vocab_size():
                self.added.setdefault(self._sp.id_to_piece(piece_id), piece_id)
                self.special_ids.add(piece_id)
        self._check_legacy(config)
        self.vocab_size = max(self._sp.vocab_size(), max(self.added.values(), default=-1) + 1)
        self._pattern = re.compile("|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)))
        self.bos_id = self._token_id(config.get("bos_token"), self._sp.bos_id())
        self.eos_id = self._token_id(config.get("eos_token"), self._sp.eos_id())
        if self.eos_id is None:
            raise ValueError(f"tokenizer: {path} has no eos token (eos_token in tokenizer_config.json)")
        pad = self._token_id(config.get("pad_token"), self._sp.pad_id())
        if pad is None:  # as HFTokenizer: the first common pad name in the vocabulary
            pad = next((i for i in (self._token_id(name, -1) for name in _PAD_NAMES) if i is not None), None)
        self.pad_id = self.eos_id if pad is None else pad

    def _check_legacy(self, config: dict[str, Any]) -> None:
        dummy_prefix = "".join(self._sp.encode("a", out_type=str)).startswith("\u2581")
        if config.get("legacy", True) is False and dummy_prefix:
            raise ValueError(
                f"tokenizer: {self.path.parent}/tokenizer_config.json sets legacy=false on a SentencePiece model "
                "with add_dummy_prefix; only legacy mode is supported: write a tokenizer.json with "
                "transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
            )

    def _token_id(self, token: Any, fallback: int) -> int | None:
        token = _content(token)
        if token is not None:
            if token in self.added:
                return self.added[token]
            piece_id = self._sp.piece_to_id(token)
            if piece_id != self._sp.unk_id() or token == self._sp.id_to_piece(self._sp.unk_id()):
                return piece_id
        return fallback if fallback >= 0 else None

    def _ids(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for match in self._pattern.finditer(text) if self.added else ():
            lstrip, rstrip = self._strip.get(match.group(), (False, False))
            chunk = text[pos : match.start()]
            ids += self._sp.encode(chunk.rstrip() if lstrip else chunk)
            ids.append(self.added[match.group()])
            pos = match.end()
            while rstrip and pos < len(text) and text[pos].isspace():
                pos += 1
        return ids + self._sp.encode(text[pos:])

    def decode(self, ids) -> str:
        """Text of ``ids``: special tokens dropped, other added tokens as their content."""
        by_id = {v: k for k, v in self.added.items()}
        out: list[str] = []
        run: list[int] = []
        for i in (int(i) for i in ids):
            if i in self.special_ids or not 0 <= i < self.vocab_size:
                continue
            if i in by_id or i >= self._sp.vocab_size():
                out += [self._sp.decode(run), by_id.get(i, "")]
                run = []
            else:
                run.append(i)
        return "".join(out) + self._sp.decode(run)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class Tokenizer:
    """A loaded tokenizer: encode/decode, special ids, chat template, bos rule and generation stop ids."""

    def __init__(self, base, *, directory: Path | None, config: dict[str, Any], add_bos: bool, stop_ids: list[int]):
        self.base = base
        self.directory = directory
        self.add_bos = add_bos
        self.stop_ids = stop_ids
        self.chat_template = _chat_template(directory, config)
        self.special_tokens = {
            k: _content(v) for k, v in config.items() if k.endswith("_token") and isinstance(v, (str, dict))
        }

    vocab_size = property(lambda self: self.base.vocab_size)
    bos_id = property(lambda self: self.base.bos_id)
    eos_id = property(lambda self: self.base.eos_id)
    pad_id = property(lambda self: self.base.pad_id)

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (added/special tokens in the text included); ``add_bos`` defaults to the config's."""
        return self.base.encode(text, add_bos=self.add_bos if add_bos is None else add_bos, add_eos=add_eos)

    def decode(self, ids) -> str:
        """Text of ``ids`` with special tokens dropped."""
        return self.base.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.base!r}, stop_ids={self.stop_ids})"


def load_tokenizer(source: str | Path | None = None) -> Tokenizer:
    """The tokenizer of ``source`` (see the module docstring); ``None``: the byte-level tokenizer."""
    if source is None:
        base = ByteTokenizer()
        return Tokenizer(base, directory=None, config={}, add_bos=False, stop_ids=[base.eos_id])
    file = tokenizer_file(source)
    directory = file.parent
    config = _config(directory)
    if file.name == BYTE_MARKER:
        base, add_bos = _byte_tokenizer(file), _read_json(file).get("add_bos", False)
    elif file.suffix == ".model":
        base, add_bos = SentencePieceTokenizer(file, config), config.get("add_bos_token", True)
    else:
        base = HFTokenizer(file, config)
        add_bos = config["add_bos_token"] if "add_bos_token" in config else base.adds_bos()
    stop_ids = _stop_ids(directory, base)
    return Tokenizer(base, directory=directory, config=config, add_bos=bool(add_bos), stop_ids=stop_ids)


@functools.cache
def _fetched(url: str) -> Path:
    """A local copy of the remote tokenizer ``url``: a directory's ``TOKENIZER_FILES``, or a file and the
    config files beside it (removed when the process exits)."""
    remote = as_path(url)
    is_dir = remote.is_dir()
    if not is_dir and not remote.is_file():
        raise FileNotFoundError(f"tokenizer: no such file or directory {url}")
    folder, names = (remote, TOKENIZER_FILES) if is_dir else (remote.parent, (remote.name, *TOKENIZER_FILES))
    local = Path(tempfile.mkdtemp(prefix="minicpm-jax-tokenizer-"))
    atexit.register(shutil.rmtree, local, True)
    for name in dict.fromkeys(names):
        if (folder / name).is_file():
            (local / name).write_bytes((folder / name).read_bytes())
    return local if is_dir else local / remote.name


def _local(source: str | Path) -> Path:
    return _fetched(str(as_path(source))) if is_remote(source) else Path(source)


def tokenizer_file(source: str | Path) -> Path:
    """The main tokenizer file of ``source``: the file itself, or the first of ``TOKENIZER_MAIN_FILES`` in a
    directory."""
    path = _local(source)
    if path.is_dir():
        for name in TOKENIZER_MAIN_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"tokenizer: {path} has no tokenizer (looked for {', '.join(TOKENIZER_MAIN_FILES)}); copy the tokenizer "
            "files of the model into the directory"
        )
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: no such file or directory {path}")
    return path


def has_tokenizer(directory: str | Path) -> bool:
    """True when ``directory`` holds a tokenizer (``tokenizer.json``, ``tokenizer.model`` or the byte marker)."""
    return any((as_path(directory) / name).is_file() for name in TOKENIZER_MAIN_FILES)


def copy_tokenizer(source: str | Path, directory: str | Path) -> list[str]:
    """Copy the tokenizer files of ``source`` (a directory, or a tokenizer file and the config files beside it;
    a file under another name is copied as ``tokenizer.model`` / ``tokenizer.json``) into ``directory``,
    overwriting; the names written."""
    main, directory = tokenizer_file(source), Path(directory)
    present = [n for n in TOKENIZER_FILES if (main.parent / n).is_file()]
    if _local(source).is_dir():
        copies = {n: n for n in present}
    else:  # this tokenizer file under its standard name, and the config files beside it
        standard = "tokenizer.model" if main.suffix == ".model" else "tokenizer.json"
        copies = {main.name: main.name if main.name in TOKENIZER_MAIN_FILES else standard}
        copies |= {n: n for n in present if n not in TOKENIZER_MAIN_FILES}
    for src, dst in copies.items():
        shutil.copy2(main.parent / src, directory / dst)
    return list(copies.values())


def save_tokenizer(source: str | Path, directory: str | Path) -> None:
    """Put the tokenizer of ``source`` into ``directory``: ``"byte"`` writes the byte-level marker, anything else
    is copied (``copy_tokenizer``); a ``generation_config.json`` naming its ids is written unless one is there."""
    directory = Path(directory)
    if str(source) == BYTE_TOKENIZER:
        write_byte_tokenizer_marker(directory)
    else:
        copy_tokenizer(source, directory)
    if not (directory / "generation_config.json").is_file():
        tok = load_tokenizer(directory)
        gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def write_byte_tokenizer_marker(directory: str | Path) -> Path:
    """Mark ``directory`` as using the byte-level tokenizer (``ByteTokenizer``)."""
    tok = ByteTokenizer()
    path = Path(directory) / BYTE_MARKER
    marker = {"type": "byte", "offset": tok.OFFSET, "vocab_size": tok.vocab_size, "add_bos": False}
    marker |= {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    path.write_text(json.dumps(marker, indent=2) + "\n")
    return path


def check_vocab(tokenizer, vocab_size: int, where: str = "data.tokenizer") -> None:
    """Raise if the tokenizer can emit ids the model's embedding table does not have."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"{where}: vocabulary of {tokenizer.vocab_size} tokens ({tokenizer!r}) is "
            f"larger than model.vocab_size {vocab_size}; use a model with vocab_size >= "
            f"{tokenizer.vocab_size} or a smaller tokenizer"
        )


def _config(directory: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` over ``special_tokens_map.json`` (its null entries do not hide the map's)."""
    config = _read_json(directory / "special_tokens_map.json") or {}
    config |= {k: v for k, v in (_read_json(directory / "tokenizer_config.json") or {}).items() if v is not None}
    return config


def _content(token: Any) -> str | None:
    """A special token's string (configs write either the string or ``{"content": ..., ...}``)."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _byte_tokenizer(path: Path) -> ByteTokenizer:
    marker = _read_json(path)
    tok = ByteTokenizer()
    expected = {"type": "byte", "offset": tok.OFFSET, "vocab_size": tok.vocab_size}
    wrong = {k: marker.get(k) for k, v in expected.items() if marker.get(k) != v}
    if wrong:
        raise ValueError(f"tokenizer: {path} has {wrong}; this version reads byte tokenizers with {expected}")
    return tok


def _stop_ids(directory: Path, base) -> list[int]:
    eos = (_read_json(directory / "generation_config.json") or {}).get("eos_token_id")
    if isinstance(eos, int):
        return [eos]
    if isinstance(eos, list) and eos and all(isinstance(i, int) for i in eos):
        return list(dict.fromkeys(eos))
    return [base.eos_id]


def _added_tokens(directory: Path, config: dict[str, Any]):
    """``{content: id}``, the ids of special ones, and ``{content: (lstrip, rstrip)}``."""
    added: dict[str, int] = {}
    special: set[int] = set()
    strip: dict[str, tuple[bool, bool]] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = entry["content"] if isinstance(entry, dict) else entry
        added[content] = int(key)
        if not isinstance(entry, dict) or entry.get("special", True):
            special.add(int(key))
        if isinstance(entry, dict):
            strip[content] = (bool(entry.get("lstrip")), bool(entry.get("rstrip")))
    extra = _read_json(directory / "added_tokens.json") or {}
    named = set(config.get("additional_special_tokens") or [])
    for content, token_id in extra.items():
        if content not in added:
            added[content] = int(token_id)
            if content in named:
                special.add(int(token_id))
    return added, special, strip


def _chat_template(directory: Path | None, config: dict[str, Any]) -> str | None:
    if directory is not None and (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"tokenizer: cannot parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"tokenizer: {path} must hold a JSON object, got {type(data).__name__}")  # noqa: TRY004
    return data
