"""``multiple_choice``: log-likelihood multiple choice from JSONL (``{"context", "choices", "gold"}``).

Each choice is scored as the continuation of its context (``scoring.loglikelihood``). ``acc``: the
choice with the highest log-likelihood is the gold one; ``acc_norm``: the same with log-likelihoods
divided by the UTF-8 byte length of each choice (lm-evaluation-harness's ``acc_norm``).
"""

from __future__ import annotations

import numpy as np

from minicpm_jax.eval.loading import read_jsonl
from minicpm_jax.eval.registry import EvalContext, TaskResult, register
from minicpm_jax.eval.report import progress
from minicpm_jax.eval.scoring import loglikelihood
from minicpm_jax.eval.tasks import encode_pair


def _gold(record: dict, choices: list, where: str, gold_field: str) -> int:
    gold = record[gold_field]
    if isinstance(gold, str) and gold in choices:
        return choices.index(gold)
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"{where}: {gold_field!r}={gold!r} (accepted: an index in [0, {len(choices)}) or a choice)")
    return gold


@register("multiple_choice")
def multiple_choice(
    ctx: EvalContext,
    *,
    path: str | None = None,
    context_field: str = "context",
    choices_field: str = "choices",
    gold_field: str = "gold",
    num_examples: int | None = None,
) -> TaskResult:
    if path is None:
        raise ValueError("multiple_choice: option 'path' (a JSONL file with context, choices, gold) is required")
    keys = (context_field, choices_field, gold_field)
    records = read_jsonl(path, keys, what="multiple_choice data")[:num_examples]
    pairs, spans, golds = [], [], []
    for r in records:
        where = f"multiple_choice data {path} line {r['_line']}"
        choices = r[choices_field]
        if not isinstance(r[context_field], str):
            raise ValueError(f"{where}: {context_field!r} must be a string")  # noqa: TRY004
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: {choices_field!r} must be a list of at least 2 non-empty strings")
        golds.append(_gold(r, choices, where, gold_field))
        spans.append((len(pairs), len(choices)))
        encoded = [encode_pair(ctx.tokenizer, r[context_field], c) for c in choices]
        longest = max(len(a) + len(b) - 1 for a, b in encoded)
        if longest > ctx.model.config.max_position_embeddings:
            raise ValueError(
                f"{where}: context + choice is {longest} tokens; the model's context (max_position_embeddings) "
                f"is {ctx.model.config.max_position_embeddings}"
            )
        pairs += encoded
    with progress(len(pairs), "multiple_choice") as advance:
        scores = loglikelihood(ctx.model, pairs, ctx.batch_size, on_batch=advance)
    rows, acc, acc_norm = [], [], []
    for r, (start, n), gold in zip(records, spans, golds):
        lls = np.array([s for s, _ in scores[start : start + n]])
        lengths = np.array([len(c.encode("utf-8")) for c in r[choices_field]])
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / lengths))
        acc.append(pred == gold)
        acc_norm.append(pred_norm == gold)
        rows.append(
            {"line": r["_line"], "gold": gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls.tolist()}
        )
    metrics = {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "examples": float(len(records))}
    return TaskResult(metrics=metrics, rows=rows)
