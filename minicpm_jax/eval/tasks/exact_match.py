"""``exact_match``: greedy generation scored by exact match of the answer.

Data: the built-in synthetic ``arithmetic`` or ``copy`` documents of ``minicpm_jax.data.synthetic``
(what the tiny models are trained on), split into a prompt and its answer (``47+38:`` ->
`` 40+30=70, 7+8=15, 70+15=85``; ``copy: abc ->`` -> `` abc``; ``passkey 12345. ... passkey?`` ->
`` 12345``), drawn deterministically from the seed; or a user JSONL file of ``{"prompt", "answer"}``.
A completion is cut at the first ``until`` string and matches when it equals the answer, both
stripped of surrounding whitespace.
"""

from __future__ import annotations

from minicpm_jax.data.synthetic import SyntheticSource
from minicpm_jax.eval.loading import read_jsonl
from minicpm_jax.eval.registry import EvalContext, TaskResult, register
from minicpm_jax.eval.tasks import encode_context, greedy_completions

SYNTHETIC = ("arithmetic", "copy")
SEED_OFFSET = 7919  # eval documents come from a different stream than a training run with the same seed


def split_document(doc: str) -> tuple[str, str]:
    """``(prompt, answer)`` of a synthetic arithmetic / copy / passkey document."""
    if doc.startswith("copy: "):
        cut = doc.index(" -> ") + 3
    elif doc.startswith("passkey "):
        cut = doc.index("passkey?") + len("passkey?")
    else:
        cut = doc.index(":") + 1
    return doc[:cut], doc[cut:]


def synthetic_examples(dataset: str, num_examples: int, seed: int) -> list[tuple[str, str]]:
    """``num_examples`` (prompt, answer) pairs of ``dataset``; the same for the same seed."""
    if dataset not in SYNTHETIC:
        raise ValueError(f"exact_match: dataset={dataset!r} (accepted: {list(SYNTHETIC)}, or give 'path')")
    source = SyntheticSource((dataset,), num_examples, seed + SEED_OFFSET)
    return [split_document(source[i]) for i in range(num_examples)]


def cut_at(text: str, until) -> str:
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


@register("exact_match")
def exact_match(
    ctx: EvalContext,
    *,
    dataset: str = "arithmetic",
    path: str | None = None,
    num_examples: int = 32,
    max_new_tokens: int | None = None,
    until: list[str] = ("\n",),
) -> TaskResult:
    """``path``: JSONL of ``{"prompt", "answer"}`` (replaces ``dataset``); ``max_new_tokens``: default
    the answer's token count + 1 per example."""
    if path is not None:
        records = read_jsonl(path, ("prompt", "answer"), what="exact_match data")[:num_examples]
        examples = [(str(r["prompt"]), str(r["answer"])) for r in records]
    else:
        examples = synthetic_examples(dataset, num_examples, ctx.seed)
    until = [until] if isinstance(until, str) else list(until)
    if num_examples < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise ValueError(f"exact_match: num_examples={num_examples}, max_new_tokens={max_new_tokens} (need >= 1)")
    tok = ctx.tokenizer
    prompts = [encode_context(tok, p) for p, _ in examples]
    budgets = [max_new_tokens or len(tok.encode(a, add_bos=False)) + 1 for _, a in examples]
    context = ctx.model.config.max_position_embeddings
    for i, ids in enumerate(prompts):
        if len(ids) >= context:
            where = f"exact_match data {path} line {records[i]['_line']}" if path is not None else f"example {i}"
            raise ValueError(
                f"{where}: prompt is {len(ids)} tokens; the model's context (max_position_embeddings) is "
                f"{context}, leaving no room to generate"
            )
    completions = greedy_completions(ctx.model, tok, prompts, budgets, batch_size=ctx.batch_size, what="exact_match")
    rows = []
    for (prompt, answer), completion in zip(examples, completions):
        text = cut_at(completion, until)
        rows.append({"prompt": prompt, "answer": answer, "completion": text, "correct": text.strip() == answer.strip()})
    score = sum(r["correct"] for r in rows) / max(len(rows), 1)
    return TaskResult(metrics={"exact_match": score, "examples": float(len(rows))}, rows=rows)
