"""Text side of generation: chat templates, prompts, streaming decode.

Tokenizers are loaded by ``minicpm_jax.data.tokenizer`` (``load_tokenizer``: ``tokenizer.json``, SentencePiece
``tokenizer.model`` with added tokens, or the byte-level tokenizer of training runs); its names are re-exported
here for generation code.
"""

from __future__ import annotations

import json

from minicpm_jax.data.tokenizer import Tokenizer, load_tokenizer, write_byte_tokenizer_marker

__all__ = [
    "StreamDecoder",
    "Tokenizer",
    "encode_prompt",
    "load_tokenizer",
    "render_chat",
    "write_byte_tokenizer_marker",
]


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
