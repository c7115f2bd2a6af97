"""In-context recall tasks: ``mqar`` (multi-query associative recall) and ``variable_tracking``.

These separate softmax attention (exact lookup of any earlier token) from linear attention (a fixed
state that must hold every pair), which is the retrieval signal layer selection relies on
(spec/sala.md §2.4). Scoring is teacher-forced exact match of each answer span
(``retrieval.score_spans``); examples depend only on ``(seed, setting, index)``.

- ``mqar``: ``kv abc=41 xyz=07 ... | xyz? 07 abc? 41 ...`` (the format of the synthetic ``kv_recall``
  documents, with several queries): ``num_pairs`` distinct keys of ``key_length`` letters (default 3)
  with values of ``value_length`` digits (default 2), then ``num_queries`` distinct keys asked back in
  random order; accuracy (per query) vs number of pairs.
- ``variable_tracking`` (RULER-like): ``VAR QWERT = 48213.`` then ``VAR ASDFG = QWERT.`` ... (a chain
  of ``chain_length`` variables, plus ``num_chains - 1`` distractor chains with other values) spread
  over filler text of ``length`` tokens; the question asks which variables hold the first chain's
  value (answer: the chain's names in order, ``mode="names"``) or the value of the chain's last
  variable (``mode="value"``). Accuracy vs context length.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from minicpm_jax.eval import plots
from minicpm_jax.eval.registry import EvalContext, TaskResult, register
from minicpm_jax.eval.tasks.retrieval import (
    _bos,
    _encode,
    _positive_ints,
    check_options,
    default_lengths,
    haystack,
    score_spans,
)

_LOWER = np.array(list(string.ascii_lowercase))
_UPPER = np.array(list(string.ascii_uppercase))


def _distinct(rng: np.random.Generator, letters: np.ndarray, size: int, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice(letters, size=size))
        if word not in out:
            out.append(word)
    return out


def mqar_example(
    tok, rng: np.random.Generator, num_pairs: int, num_queries: int, key_length: int = 3, value_length: int = 2
) -> tuple[list[int], list[tuple[int, int]]]:
    """``(tokens, answer spans)`` of one MQAR sequence; one span per query (its value's tokens)."""
    keys = _distinct(rng, _LOWER, key_length, num_pairs)
    values = ["".join(str(d) for d in rng.integers(0, 10, size=value_length)) for _ in range(num_pairs)]
    ids = _bos(tok) + _encode(tok, "kv")
    for k, v in zip(keys, values):
        ids += _encode(tok, f" {k}={v}")
    ids += _encode(tok, " |")
    spans = []
    for q in rng.permutation(num_pairs)[:num_queries]:
        ids += _encode(tok, f" {keys[q]}? ")
        answer = _encode(tok, values[q])
        spans.append((len(ids), len(ids) + len(answer)))
        ids += answer
    return ids, spans


def variable_tracking_example(
    tok, rng: np.random.Generator, length: int, num_chains: int, chain_length: int, mode: str
) -> tuple[list[int], list[int]]:
    """``(prompt, answer)``: chains of variable assignments hidden in ``length`` tokens of filler."""
    names = _distinct(rng, _UPPER, 5, num_chains * chain_length)
    values = [str(v) for v in rng.choice(np.arange(10000, 100000), size=num_chains, replace=False)]
    statements = []
    for c in range(num_chains):
        chain = names[c * chain_length : (c + 1) * chain_length]
        depths = np.sort(rng.random(chain_length))
        statements.append((float(depths[0]), _encode(tok, f" VAR {chain[0]} = {values[c]}.")))
        statements += [(float(d), _encode(tok, f" VAR {b} = {a}.")) for a, b, d in zip(chain, chain[1:], depths[1:])]
    first = names[:chain_length]
    if mode == "names":
        question = _encode(tok, f" Question: which variables are assigned the value {values[0]}? Answer: ")
        answer = _encode(tok, " ".join(first))
    else:
        question = _encode(tok, f" Question: what is the value of {first[-1]}? Answer: ")
        answer = _encode(tok, values[0])
    bos = _bos(tok)
    return bos + haystack(tok, rng, length - len(bos) - len(question), statements) + question, answer


def _curve(ctx, task, xs, hits_by_x, xlabel, x_key, samples_key, samples) -> TaskResult:
    accs = [float(np.mean(hits_by_x[x])) for x in xs]
    rows = [{x_key: int(x), "acc": a, samples_key: samples} for x, a in zip(xs, accs)]
    metrics = {"acc": float(np.mean(accs))} | {f"acc_{x_key}_{int(x)}": a for x, a in zip(xs, accs)}
    result = TaskResult(metrics=metrics, rows=rows)
    if ctx.output_dir is not None:
        result.plots.append(
            plots.curves(
                Path(ctx.output_dir) / f"{task}_curve.png",
                [int(x) for x in xs],
                {task: accs},
                title=f"{task}: accuracy",
                xlabel=xlabel,
                logx=True,
            )
        )
    return result


@register("mqar")
def mqar(
    ctx: EvalContext,
    *,
    num_pairs: Sequence[int] = (4, 8, 16, 32),
    num_queries: int = 4,
    key_length: int = 3,
    value_length: int = 2,
    num_samples: int = 16,
    seed: int | None = None,
) -> TaskResult:
    """Accuracy per query vs number of key-value pairs (``min(num_queries, pairs)`` queries per example);
    keys are ``key_length`` lowercase letters, values ``value_length`` digits."""
    num_pairs = list(num_pairs)
    lengths_ok = all(isinstance(v, int) and v > 0 for v in (key_length, value_length))
    most = 26**key_length if lengths_ok else 0
    check_options(
        "mqar",
        key_length=(isinstance(key_length, int) and key_length > 0, f"{key_length} must be a positive int"),
        value_length=(isinstance(value_length, int) and value_length > 0, f"{value_length} must be a positive int"),
        num_pairs=(
            _positive_ints(num_pairs) and max(num_pairs) <= most,
            f"{num_pairs} must be ints in [1, {most}] (26 ** key_length distinct keys)",
        ),
        num_queries=(isinstance(num_queries, int) and num_queries > 0, f"{num_queries} must be a positive int"),
        num_samples=(isinstance(num_samples, int) and num_samples > 0, f"{num_samples} must be a positive int"),
    )
    seed = ctx.seed if seed is None else int(seed)
    sequences, spans, which = [], [], []
    for n in num_pairs:
        for i in range(num_samples):
            rng = np.random.default_rng([seed, int(n), i])
            ids, sp = mqar_example(ctx.tokenizer, rng, int(n), min(num_queries, n), key_length, value_length)
            sequences.append(ids)
            spans.append(sp)
            which.append(n)
    hits: dict = {n: [] for n in num_pairs}
    for n, row in zip(which, score_spans(ctx, sequences, spans)):
        hits[n] += row
    return _curve(ctx, "mqar", num_pairs, hits, "key-value pairs", "pairs", "num_samples", num_samples)


@register("variable_tracking")
def variable_tracking(
    ctx: EvalContext,
    *,
    lengths: Sequence[int] | None = None,
    num_chains: int = 2,
    chain_length: int = 4,
    mode: str = "names",
    num_samples: int = 8,
    seed: int | None = None,
) -> TaskResult:
    """Accuracy (exact answer) vs context length (default: ``retrieval.default_lengths``)."""
    limit = ctx.model.config.max_position_embeddings
    lengths = default_lengths(limit) if lengths is None else list(lengths)
    check_options(
        "variable_tracking",
        lengths=(_positive_ints(lengths), f"{lengths} must be a non-empty list of positive ints"),
        max_length=(
            not _positive_ints(lengths) or max(lengths) < limit,
            f"lengths {lengths} must stay below the model's max_position_embeddings {limit}",
        ),
        num_chains=(isinstance(num_chains, int) and num_chains > 0, f"{num_chains} must be a positive int"),
        chain_length=(isinstance(chain_length, int) and chain_length > 0, f"{chain_length} must be a positive int"),
        mode=(mode in ("names", "value"), f"{mode!r} must be 'names' or 'value'"),
        num_samples=(isinstance(num_samples, int) and num_samples > 0, f"{num_samples} must be a positive int"),
    )
    seed = ctx.seed if seed is None else int(seed)
    sequences, spans, which = [], [], []
    for length in lengths:
        for i in range(num_samples):
            rng = np.random.default_rng([seed, int(length), i])
            try:
                prompt, answer = variable_tracking_example(
                    ctx.tokenizer, rng, int(length), num_chains, chain_length, mode
                )
            except ValueError as e:
                raise ValueError(f"eval task 'variable_tracking': length {length}: {e}") from None
            sequences.append(prompt + answer)
            spans.append([(len(prompt), len(prompt) + len(answer))])
            which.append(length)
    longest = max(len(s) for s in sequences)
    if longest > limit:
        raise ValueError(
            f"eval task 'variable_tracking': prompts + answers reach {longest} tokens > max_position_embeddings {limit}"
        )
    hits: dict = {n: [] for n in lengths}
    for n, row in zip(which, score_spans(ctx, sequences, spans)):
        hits[n] += row
    return _curve(ctx, "variable_tracking", lengths, hits, "context length (tokens)", "len", "num_samples", num_samples)
