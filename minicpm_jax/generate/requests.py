"""Text-in, text-out generation requests (what ``minicpm-jax generate`` runs).

A request is a plain prompt or a chat (``messages``), an id, sampling settings and a token budget.
``read_jsonl`` reads them from a file (errors name the line), ``build_requests`` encodes and checks them
against the model, ``run_requests`` generates in batches and yields one output record per request.
Sampling defaults come from the checkpoint's ``generation_config.json`` (``do_sample: false`` = greedy),
then the command line, then each JSONL line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from minicpm_jax.generate.engine import generate
from minicpm_jax.generate.sampling import SamplingParams
from minicpm_jax.generate.text import StreamDecoder, Tokenizer, encode_prompt

SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingParams))
LINE_KEYS = ("id", "prompt", "messages", "max_new_tokens", *SAMPLING_KEYS)


@dataclasses.dataclass
class Request:
    id: Any
    prompt: str | list[dict]
    ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int


def read_jsonl(
    path: str | Path,
    *,
    what: str = "--input",
    required: tuple[str, ...] = (),
    empty: str = "no prompts (expected JSON lines with 'prompt' or 'messages')",
) -> list[dict]:
    """The JSON objects of a JSONL file (blank lines skipped, ``_line`` added); errors name ``what``,
    the file and the line (a line that is not an object, or lacks a ``required`` key)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path}: cannot read: {e}") from e
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {path} line {number}: not valid JSON ({e})") from e
        if not isinstance(record, dict):
            raise ValueError(f"{what} {path} line {number}: expected a JSON object, got {type(record).__name__}")  # noqa: TRY004
        missing = [k for k in required if k not in record]
        if missing:
            raise ValueError(
                f"{what} {path} line {number}: missing key(s) {missing} (each line needs {list(required)})"
            )
        records.append(record | {"_line": number})
    if not records:
        raise ValueError(f"{what} {path}: {empty}")
    return records


def generation_defaults(directory: str | Path) -> dict[str, Any]:
    """Sampling settings of ``generation_config.json`` in ``directory`` (greedy when absent or ``do_sample: false``)."""
    path = Path(directory) / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if not config.get("do_sample", False):
        return {"temperature": 0.0}
    return {k: config[k] for k in SAMPLING_KEYS if config.get(k) is not None}


def build_requests(
    records: list[dict],
    tokenizer: Tokenizer,
    *,
    chat: bool,
    defaults: dict[str, Any],
    max_new_tokens: int,
    context: int,
    vocab_size: int,
) -> list[Request]:
    """Encode and check every record (``{"prompt": ...}`` or ``{"messages": [...]}`` + overrides)."""
    requests = []
    for index, record in enumerate(records):
        where = f"line {record['_line']}" if "_line" in record else f"prompt {index + 1}"
        try:
            requests.append(_request(record, index, tokenizer, chat, defaults, max_new_tokens))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        request = requests[-1]
        if len(request.ids) >= context:
            raise ValueError(
                f"{where} (id {request.id!r}): prompt has {len(request.ids)} tokens; the model's context "
                f"(max_position_embeddings) is {context}, leaving no room to generate"
            )
        if max(request.ids) >= vocab_size:
            raise ValueError(
                f"{where}: token id {max(request.ids)} is outside the model's vocab_size {vocab_size}; "
                "the tokenizer does not belong to this model"
            )
    return requests


def _request(record: dict, index: int, tokenizer, chat: bool, defaults: dict, max_new_tokens: int) -> Request:
    unknown = sorted(k for k in record if k not in LINE_KEYS and k != "_line")
    if unknown:
        raise ValueError(f"unknown keys {unknown} (accepted: {list(LINE_KEYS)})")
    if ("prompt" in record) == ("messages" in record):
        raise ValueError("give exactly one of 'prompt' (text) or 'messages' (a chat)")
    prompt = record.get("prompt", record.get("messages"))
    if isinstance(prompt, str) and not prompt:
        raise ValueError("empty prompt")
    if "messages" in record and not chat:
        raise ValueError("'messages' needs a chat template (this run is --no-chat)")
    if not isinstance(prompt, (str, list)):
        raise ValueError(f"'prompt' must be a string and 'messages' a list, got {type(prompt).__name__}")  # noqa: TRY004
    sampling = SamplingParams(**(defaults | {k: record[k] for k in SAMPLING_KEYS if k in record}))
    budget = record.get("max_new_tokens", max_new_tokens)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"max_new_tokens={budget!r} (accepted: an integer >= 1)")
    ids = encode_prompt(tokenizer, prompt, chat=chat)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return Request(record.get("id", index), prompt, ids, sampling, budget)


def run_requests(
    model,
    tokenizer: Tokenizer,
    requests: list[Request],
    *,
    batch_size: int,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> Iterator[dict]:
    """Generate for ``requests`` in batches; yields one output record each, in order.

    Request ``i`` samples with key ``fold_in(key(seed), i)``, so results do not depend on ``batch_size``.
    ``on_text`` streams the decoded text of the first request as it is produced.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size} (accepted: an integer >= 1)")
    root = jax.random.key(seed)
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(np.arange(start, start + len(batch)))
        stream = StreamDecoder(tokenizer) if on_text is not None and start == 0 else None
        result = generate(
            model,
            [r.ids for r in batch],
            max_new_tokens=[r.max_new_tokens for r in batch],
            sampling=[r.sampling for r in batch],
            stop_token_ids=tokenizer.stop_ids,
            rng=keys,
            pad_id=tokenizer.pad_id,
            on_tokens=None if stream is None else _streamer(stream, on_text),
        )
        if stream is not None:
            on_text(stream.flush())
        for i, request in enumerate(batch):
            yield _record(request, result, i, tokenizer)


def _streamer(stream: StreamDecoder, on_text: Callable[[str], None]):
    def on_tokens(tokens: np.ndarray, valid: np.ndarray) -> None:
        text = stream.push(tokens[0][valid[0]])
        if text:
            on_text(text)

    return on_tokens


def _record(request: Request, result, i: int, tokenizer: Tokenizer) -> dict:
    n = int(result.lengths[i])
    tokens = result.tokens[i, :n].tolist()
    return {
        "id": request.id,
        "prompt": request.prompt,
        "completion": tokenizer.decode(tokens),
        "token_ids": tokens,
        "logprobs": result.logprobs[i, :n].tolist(),
        "model_logprobs": result.model_logprobs[i, :n].tolist(),
        "finish_reason": result.finish_reasons[i],
        "prompt_tokens": len(request.ids),
    }
