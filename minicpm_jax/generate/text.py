"""Text side of generation: the tokenizer of a checkpoint directory, its chat template, streaming decode.

``load_tokenizer(dir)`` reads, in order, ``tokenizer.json`` (Hugging Face ``tokenizers``), ``tokenizer.model``
(SentencePiece, with the added tokens of ``tokenizer_config.json`` / ``added_tokens.json`` matched as whole
tokens, as ``transformers``' ``LlamaTokenizer`` does in its default "legacy" mode) or ``byte_tokenizer.json``
(the byte-level tokenizer of training runs). Encodings equal ``transformers.AutoTokenizer(dir).encode``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from minicpm_jax.data.tokenizer import ByteTokenizer, HFTokenizer, _Base

BYTE_MARKER = "byte_tokenizer.json"
LOOKED_FOR = ("tokenizer.json", "tokenizer.model", BYTE_MARKER)


class SentencePieceTokenizer(_Base):
    """``tokenizer.model`` plus added tokens, which are cut out of the text before SentencePiece sees it."""

    def __init__(self, directory: Path, config: dict[str, Any]):
        import sentencepiece as spm

        self.path = directory / "tokenizer.model"
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"tokenizer: cannot read {self.path}: {e}") from e
        self.added, self.special_ids, self._strip = _added_tokens(directory, config)
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
            raise ValueError(f"tokenizer: {self.path} has no eos token (eos_token in tokenizer_config.json)")
        pad = self._token_id(config.get("pad_token"), self._sp.pad_id())
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
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
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
    """A checkpoint's tokenizer: encode/decode, special ids, chat template and generation stop ids."""

    def __init__(self, base, *, directory: Path, config: dict[str, Any], add_bos: bool, stop_ids: list[int]):
        self.base = base
        self.directory = directory
        self.add_bos = add_bos
        self.stop_ids = stop_ids
        self.chat_template = _chat_template(directory, config)
        self.special_tokens = {
            k: v.get("content") if isinstance(v, dict) else v
            for k, v in config.items()
            if k.endswith("_token") and isinstance(v, (str, dict))
        }

    vocab_size = property(lambda self: self.base.vocab_size)
    bos_id = property(lambda self: self.base.bos_id)
    eos_id = property(lambda self: self.base.eos_id)
    pad_id = property(lambda self: self.base.pad_id)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text`` (added/special tokens in the text included); ``add_bos`` defaults to the config's."""
        return self.base.encode(text, add_bos=self.add_bos if add_bos is None else add_bos)

    def decode(self, ids) -> str:
        """Text of ``ids`` with special tokens dropped."""
        return self.base.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.base!r}, stop_ids={self.stop_ids})"


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in a checkpoint directory (see the module docstring for what is looked for)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer: {directory} is not a directory (expected a checkpoint directory)")
    config = _read_json(directory / "tokenizer_config.json") or {}
    if (directory / "tokenizer.json").is_file():
        base = HFTokenizer(directory / "tokenizer.json")
        add_bos = config.get("add_bos_token", _post_processor_adds_bos(base))
    elif (directory / "tokenizer.model").is_file():
        base = SentencePieceTokenizer(directory, config)
        add_bos = bool(config.get("add_bos_token", True))
    elif (directory / BYTE_MARKER).is_file():
        base = _byte_tokenizer(directory / BYTE_MARKER)
        add_bos = bool(_read_json(directory / BYTE_MARKER).get("add_bos", False))
    else:
        raise FileNotFoundError(
            f"tokenizer: {directory} has no tokenizer (looked for {', '.join(LOOKED_FOR)}); copy the tokenizer "
            "files of the model into the checkpoint directory"
        )
    return Tokenizer(
        base, directory=directory, config=config, add_bos=bool(add_bos), stop_ids=_stop_ids(directory, base)
    )


def write_byte_tokenizer_marker(directory: str | Path) -> Path:
    """Mark ``directory`` as using the byte-level tokenizer of ``minicpm_jax.data.tokenizer.ByteTokenizer``."""
    tok = ByteTokenizer()
    path = Path(directory) / BYTE_MARKER
    marker = {"type": "byte", "offset": tok.OFFSET, "vocab_size": tok.vocab_size, "add_bos": False}
    marker |= {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    path.write_text(json.dumps(marker, indent=2) + "\n")
    return path


def render_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """``messages`` formatted by the tokenizer's chat template (Jinja2, sandboxed, as ``transformers`` renders it)."""
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tokenizer in {tokenizer.directory} has no chat template (chat_template in tokenizer_config.json or "
            "chat_template.jinja); use plain prompts (--no-chat)"
        )
    from jinja2 import TemplateError

    _check_messages(messages)
    template = _compile(tokenizer.chat_template)
    try:
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens
        )
    except TemplateError as e:
        raise ValueError(f"chat template of {tokenizer.directory} failed on these messages: {e}") from e


def encode_prompt(tokenizer: Tokenizer, text_or_messages: str | list[dict], *, chat: bool) -> list[int]:
    """Ids to feed the model: plain text with the tokenizer's bos rule, or a chat rendered by its template.

    Chat prompts are encoded like ``AutoTokenizer.apply_chat_template(..., tokenize=True)``: no bos is added
    beyond what the template writes. A string is taken as one user message when ``chat`` is set.
    """
    if chat:
        messages = (
            [{"role": "user", "content": text_or_messages}] if isinstance(text_or_messages, str) else text_or_messages
        )
        return tokenizer.encode(render_chat(tokenizer, messages), add_bos=False)
    if not isinstance(text_or_messages, str):
        raise ValueError("prompt: a list of messages needs chat formatting (chat=True)")  # noqa: TRY004 (user input)
    return tokenizer.encode(text_or_messages)


class StreamDecoder:
    """Incremental detokenization: ``push(ids)`` returns only the newly completed text.

    Decodes a sliding window (``decode(window + new) - decode(window)``), so SentencePiece's leading-space
    marker is handled, and holds back a trailing U+FFFD (an incomplete character) until a later token completes it.
    ``flush()`` returns what is still held back. The pieces add up to ``tokenizer.decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this are emitted
        self._extra = 0  # characters emitted beyond decode(ids[prefix:read])
        self.text = ""

    def push(self, ids) -> str:
        self.ids += [int(i) for i in ids]
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if not after.startswith(before):
            return ""
        complete = not after.endswith("\ufffd")
        new = (after if complete else after.rstrip("\ufffd"))[len(before) + self._extra :]
        if complete:  # slide the window: the text up to here is final
            self._prefix, self._read, self._extra = self._read, len(self.ids), 0
        else:  # emit what precedes the incomplete character, keep the window
            self._extra += len(new)
        self.text += new
        return new

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if after.startswith(before):
            new = after[len(before) + self._extra :]
        else:  # the window did not decode consistently: fall back to the full text
            full = self.tokenizer.decode(self.ids)
            new = full[len(self.text) :] if full.startswith(self.text) else ""
        self._prefix = self._read = len(self.ids)
        self._extra = 0
        self.text += new
        return new


def _byte_tokenizer(path: Path) -> ByteTokenizer:
    marker = _read_json(path)
    tok = ByteTokenizer()
    expected = {"type": "byte", "offset": tok.OFFSET, "vocab_size": tok.vocab_size}
    wrong = {k: marker.get(k) for k, v in expected.items() if marker.get(k) != v}
    if wrong:
        raise ValueError(f"tokenizer: {path} has {wrong}; this version reads byte tokenizers with {expected}")
    return tok


def _post_processor_adds_bos(base: HFTokenizer) -> bool:
    ids = base._tok.encode("a", add_special_tokens=True).ids
    return base.bos_id is not None and ids[:1] == [base.bos_id]


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


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ValueError(f"tokenizer: chat template does not compile: {e}") from e


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages: expected a non-empty list of {{'role': ..., 'content': ...}}, got {messages!r}")
    bad = [i for i, m in enumerate(messages) if not isinstance(m, dict) or not {"role", "content"} <= m.keys()]
    if bad:
        raise ValueError(f"messages: entries {bad} lack 'role' and 'content' (each must be a dict with both)")


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
