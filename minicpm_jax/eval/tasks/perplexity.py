"""``perplexity``: strided sliding-window perplexity and bits-per-byte of text files.

Each document (a ``.txt`` file, a JSONL line's ``text_field``, a Parquet row) is encoded with a
leading bos and every text token is scored once, with up to ``max_length`` tokens of window
(``minicpm_jax.eval.scoring.rolling_windows``). ``perplexity = exp(-sum log p / tokens)``,
``bits_per_byte = -sum log p / (ln 2 * UTF-8 bytes)``.
"""

from __future__ import annotations

import math

from minicpm_jax.eval.loading import read_texts
from minicpm_jax.eval.registry import EvalContext, TaskResult, register
from minicpm_jax.eval.report import progress
from minicpm_jax.eval.scoring import loglikelihood_rolling, num_windows
from minicpm_jax.eval.tasks import encode_context


@register("perplexity")
def perplexity(
    ctx: EvalContext,
    *,
    paths: list[str] | str = (),
    text_field: str = "text",
    max_length: int | None = None,
    stride: int | None = None,
    max_documents: int | None = None,
) -> TaskResult:
    """``max_length``: window in tokens (default: the model's max_position_embeddings); ``stride``:
    tokens the window moves (default: ``max_length``, disjoint windows with one token of overlap)."""
    texts = read_texts(paths, text_field)[:max_documents]
    max_length = max_length or ctx.model.config.max_position_embeddings
    stride = stride or max_length
    if max_length > ctx.model.config.max_position_embeddings:
        raise ValueError(
            f"perplexity: max_length={max_length} exceeds the model's context (max_position_embeddings) "
            f"{ctx.model.config.max_position_embeddings}"
        )
    seqs = [encode_context(ctx.tokenizer, t) for t in texts]
    total = sum(num_windows(len(s), max_length, stride) for s in seqs)
    with progress(total, "perplexity") as advance:
        scores = loglikelihood_rolling(
            ctx.model, seqs, max_length=max_length, stride=stride, batch_size=ctx.batch_size, on_batch=advance
        )
    logprob = sum(s for s, _ in scores)
    tokens = sum(n for _, n in scores)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    rows = [
        {
            "document": i,
            "tokens": n,
            "bytes": len(t.encode("utf-8")),
            "logprob": s,
            "perplexity": math.exp(-s / max(n, 1)),
        }
        for i, (t, (s, n)) in enumerate(zip(texts, scores))
    ]
    metrics = {
        "perplexity": math.exp(-logprob / max(tokens, 1)),
        "bits_per_byte": -logprob / (math.log(2) * max(n_bytes, 1)),
        "logprob": logprob,
        "tokens": float(tokens),
        "bytes": float(n_bytes),
        "documents": float(len(texts)),
    }
    return TaskResult(metrics=metrics, rows=rows)
