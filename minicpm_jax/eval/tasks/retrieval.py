"""Long-context retrieval tasks: ``passkey`` and ``needle`` (needle in a haystack).

A grid of context lengths x needle depths. Each example is filler sentences with a key sentence
inserted at ``depth`` (0 = start, 1 = just before the question) and a question at the end; the model
must reproduce the key. Scoring is teacher forcing: an example is correct when the argmax of the
logits equals every answer token (exact retrieval), which is what greedy decoding would produce.
Lengths are in tokens of the model's tokenizer (pieces are tokenized separately and concatenated, so a
prompt has exactly ``length`` tokens); lengths beyond ``sparse_config.dense_len`` exercise the InfLLM v2
sparse path and long Lightning recurrences. Examples depend only on ``(seed, length, depth, index)``.

Formats (the answer follows the prompt directly):

- passkey: ``... The pass key is #48213. ... What is the pass key? #`` -> ``48213`` (``key_length``
  distinct digits 1-9, default 5, behind a ``#`` that occurs nowhere else);
- needle: ``... The special magic number for lumen is 730514. ...`` (plus ``num_distractors`` other
  words' numbers) ``... What is the special magic number for lumen? The special magic number for lumen
  is `` -> ``730514``.

``score_spans`` (teacher-forced exact match of token spans, batched and jitted) is shared with
``minicpm_jax.eval.tasks.recall``.
"""

from __future__ import annotations

import contextlib
import functools
import string
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpm_jax.data.synthetic import PASSKEY_FILLER as FILLER
from minicpm_jax.distributed import to_host
from minicpm_jax.eval import plots
from minicpm_jax.eval.registry import EvalContext, TaskResult, register
from minicpm_jax.sharding import mesh_of

_WORDS = np.array(list(string.ascii_lowercase))
PAD_BUCKET = 16  # sequence widths are rounded up to a multiple of this (fewer compilations)


# ----- scoring -----


@functools.partial(jax.jit, static_argnums=0)
def _argmax_at(graphdef, state, ids, gather):
    """Argmax token of the logits at ``gather [B, K]`` positions of ``ids [B, T]``."""
    model = nnx.merge(graphdef, state)
    h = model.hidden_states(ids)
    h = jnp.take_along_axis(h, gather[:, :, None], axis=1)
    return jnp.argmax(model.logits(h), axis=-1).astype(jnp.int32)


def score_spans(
    ctx: EvalContext, sequences: Sequence[Sequence[int]], spans: Sequence[Sequence[tuple[int, int]]]
) -> list[list[bool]]:
    """For each sequence and each ``(start, end)`` span of it: whether the model, fed the sequence,
    predicts every token ``seq[start:end]`` (argmax at positions ``start-1 .. end-2``).

    Rows are right-padded to a multiple of ``PAD_BUCKET`` and run ``ctx.batch_size`` at a time (the last
    batch padded with copies), longest first; the sequences must fit ``max_position_embeddings``.
    """
    model, tok = ctx.model, ctx.tokenizer
    limit = model.config.max_position_embeddings
    too_long = [i for i, s in enumerate(sequences) if len(s) > limit]
    if too_long:
        raise ValueError(
            f"eval: {len(too_long)} sequence(s) longer than the model's max_position_embeddings {limit} "
            f"(longest {max(len(sequences[i]) for i in too_long)} tokens); use shorter lengths"
        )
    if any(s <= 0 or e <= s or e > len(q) for q, sp in zip(sequences, spans) for s, e in sp):
        raise ValueError("eval: answer spans must satisfy 0 < start < end <= len(sequence)")
    graphdef, state = nnx.split(model)
    mesh = mesh_of(state)
    parallel = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    rows = -(-max(1, ctx.batch_size) // parallel) * parallel
    pad = tok.pad_id if tok.pad_id is not None else 0
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list[list[bool]] = [[] for _ in sequences]
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for b in range(0, len(order), rows):
            chunk = order[b : b + rows]
            chunk = chunk + [chunk[0]] * (rows - len(chunk))
            width = min(limit, -(-len(sequences[chunk[0]]) // PAD_BUCKET) * PAD_BUCKET)
            k = max(sum(e - s for s, e in spans[i]) for i in chunk)
            ids = np.full((rows, width), pad, np.int32)
            gather = np.zeros((rows, k), np.int32)
            for r, i in enumerate(chunk):
                ids[r, : len(sequences[i])] = sequences[i]
                pos = [p for s, e in spans[i] for p in range(s - 1, e - 1)]
                gather[r, : len(pos)] = pos
            pred = to_host(_argmax_at(graphdef, state, jnp.asarray(ids), jnp.asarray(gather)))
            for r, i in enumerate(chunk[: min(rows, len(order) - b)]):
                offset, row = 0, []
                for s, e in spans[i]:
                    row.append(bool(np.array_equal(pred[r, offset : offset + e - s], ids[r, s:e])))
                    offset += e - s
                results[i] = row
    return results


# ----- examples -----


def _encode(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_bos=False))


def _bos(tok) -> list[int]:
    return [tok.bos_id] if getattr(tok, "add_bos", False) and tok.bos_id is not None else []


def haystack(tok, rng: np.random.Generator, budget: int, inserts: Sequence[tuple[float, list[int]]]) -> list[int]:
    """``budget`` tokens of filler sentences with each ``(depth, tokens)`` inserted at the sentence
    boundary nearest ``depth`` of the filler (inserts keep their order); the last sentence is cut to fit."""
    need = budget - sum(len(t) for _, t in inserts)
    if need < 0:
        raise ValueError(
            f"context too short: {budget} tokens for filler and needles, the needles alone take {budget - need}"
        )
    sentences, total = [], 0
    while total < need:
        s = _encode(tok, " " + FILLER[int(rng.integers(len(FILLER)))])
        sentences.append(s)
        total += len(s)
    filler = [t for s in sentences for t in s][:need]
    bounds = np.cumsum([0] + [len(s) for s in sentences])
    bounds = np.minimum(bounds, need)
    out, last = [], 0
    for depth, tokens in sorted(inserts, key=lambda x: x[0]):
        cut = int(bounds[np.argmin(np.abs(bounds - depth * need))])
        cut = max(cut, last)
        out += filler[last:cut] + tokens
        last = cut
    return out + filler[last:]


def passkey_example(
    tok, rng: np.random.Generator, length: int, depth: float, key_length: int = 5
) -> tuple[list[int], list[int]]:
    """``(prompt, answer)``: a ``length``-token prompt hiding a pass key of ``key_length`` distinct digits."""
    key = "".join(str(d) for d in rng.permutation(np.arange(1, 10))[:key_length])
    needle = _encode(tok, f" The pass key is #{key}.")
    question = _encode(tok, " What is the pass key? #")
    bos = _bos(tok)
    body = haystack(tok, rng, length - len(bos) - len(question), [(depth, needle)])
    return bos + body + question, _encode(tok, key)


def _word(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        word = "".join(rng.choice(_WORDS, size=5))
        if word not in taken:
            taken.add(word)
            return word


def needle_example(
    tok, rng: np.random.Generator, length: int, depth: float, num_distractors: int = 0
) -> tuple[list[int], list[int]]:
    """``(prompt, answer)``: a key-value needle at ``depth`` (+ distractor needles at random depths)."""
    taken: set[str] = set()
    words = [_word(rng, taken) for _ in range(1 + num_distractors)]
    values = [str(int(v)) for v in rng.integers(100000, 1000000, size=len(words))]
    inserts = [(depth, _encode(tok, f" The special magic number for {words[0]} is {values[0]}."))]
    for w, v in zip(words[1:], values[1:]):
        inserts.append((float(rng.random()), _encode(tok, f" The special magic number for {w} is {v}.")))
    question = _encode(
        tok, f" What is the special magic number for {words[0]}? The special magic number for {words[0]} is "
    )
    bos = _bos(tok)
    body = haystack(tok, rng, length - len(bos) - len(question), inserts)
    return bos + body + question, _encode(tok, values[0])


# ----- the grid -----


def check_options(task: str, **checks: tuple[bool, str]) -> None:
    """Raise one error listing every failed ``name=(ok, what is accepted)`` check."""
    bad = [f"{name}: {why}" for name, (ok, why) in checks.items() if not ok]
    if bad:
        raise ValueError(f"eval task {task!r}: " + "; ".join(bad))


def _positive_ints(values) -> bool:
    return len(values) > 0 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in values
    )


def default_lengths(limit: int, longest: int = 16384) -> list[int]:
    """Powers of two from 256 up to ``min(limit - 16, longest)`` (room for the answer); ``[limit - 16]``
    for models shorter than that."""
    out = [n for n in (2**k for k in range(8, 31)) if n <= min(limit - 16, longest)]
    return out or [max(1, limit - 16)]


def _grid(ctx, task, make, lengths, depths, num_samples, seed) -> TaskResult:
    limit = ctx.model.config.max_position_embeddings
    lengths = default_lengths(limit) if lengths is None else list(lengths)
    depths = [float(d) for d in depths]
    check_options(
        task,
        lengths=(_positive_ints(lengths), f"{lengths} must be a non-empty list of positive ints"),
        depths=(len(depths) > 0 and all(0.0 <= d <= 1.0 for d in depths), f"{depths} must be fractions in [0, 1]"),
        num_samples=(isinstance(num_samples, int) and num_samples > 0, f"{num_samples} must be a positive int"),
        max_length=(
            not lengths or max(lengths) < limit,
            f"lengths {lengths} must stay below the model's max_position_embeddings {limit}",
        ),
    )
    seed = ctx.seed if seed is None else int(seed)
    cells, sequences, spans = [], [], []
    for length in lengths:
        for depth in depths:
            for i in range(num_samples):
                rng = np.random.default_rng([seed, int(length), round(depth * 1000), i])
                try:
                    prompt, answer = make(ctx.tokenizer, rng, int(length), depth)
                except ValueError as e:
                    raise ValueError(f"eval task {task!r}: length {length}: {e}") from None
                cells.append((length, depth))
                sequences.append(prompt + answer)
                spans.append([(len(prompt), len(prompt) + len(answer))])
    too_long = max(len(s) for s in sequences)
    if too_long > limit:
        raise ValueError(
            f"eval task {task!r}: prompts + answers reach {too_long} tokens > max_position_embeddings {limit}"
        )
    hits = [r[0] for r in score_spans(ctx, sequences, spans)]
    acc = np.zeros((len(lengths), len(depths)))
    for (length, depth), hit in zip(cells, hits):
        acc[lengths.index(length), depths.index(depth)] += hit / num_samples
    sparse = getattr(ctx.model.config, "sparse_config", None)
    dense_len = getattr(sparse, "dense_len", None)
    rows = [
        {
            "length": int(length),
            "depth": depth,
            "acc": float(acc[a, b]),
            "num_samples": num_samples,
            "beyond_dense_len": bool(dense_len is not None and length > dense_len),
        }
        for a, length in enumerate(lengths)
        for b, depth in enumerate(depths)
    ]
    metrics = {"acc": float(acc.mean())} | {f"acc_len_{int(n)}": float(acc[a].mean()) for a, n in enumerate(lengths)}
    result = TaskResult(metrics=metrics, rows=rows)
    if ctx.output_dir is not None:
        result.plots.append(
            plots.heatmap(
                Path(ctx.output_dir) / f"{task}_heatmap.png",
                acc,
                [int(n) for n in lengths],
                [f"{d:g}" for d in depths],
                title=f"{task}: exact retrieval accuracy",
                xlabel="needle depth",
                ylabel="context length (tokens)",
            )
        )
    return result


@register("passkey")
def passkey(
    ctx: EvalContext,
    *,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    num_samples: int = 4,
    key_length: int = 5,
    seed: int | None = None,
) -> TaskResult:
    """Pass-key retrieval accuracy per (length, depth); ``key_length`` digits (1-9, distinct); ``lengths``
    default to ``default_lengths(max_position_embeddings)``; ``seed`` defaults to ``ctx.seed``."""
    check_options(
        "passkey",
        key_length=(isinstance(key_length, int) and 1 <= key_length <= 9, f"{key_length} must be an int in [1, 9]"),
    )
    make = functools.partial(passkey_example, key_length=key_length)
    return _grid(ctx, "passkey", make, lengths, depths, num_samples, seed)


@register("needle")
def needle(
    ctx: EvalContext,
    *,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    num_samples: int = 4,
    num_distractors: int = 0,
    seed: int | None = None,
) -> TaskResult:
    """Needle-in-a-haystack (key-value needle, optional distractor needles) accuracy per (length, depth)."""
    check_options(
        "needle",
        num_distractors=(
            isinstance(num_distractors, int) and num_distractors >= 0,
            f"{num_distractors} must be an int >= 0",
        ),
    )
    make = functools.partial(needle_example, num_distractors=num_distractors)
    return _grid(ctx, "needle", make, lengths, depths, num_samples, seed)
