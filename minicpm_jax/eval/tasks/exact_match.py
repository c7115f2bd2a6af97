"""``exact_match``: generation scored by exact match of the answer: greedy, or avg@k of ``num_samples``
sampled completions per example (``temperature`` > 0, ``top_p``; the OPD paper's avg@16 uses 0.7 / 0.95).

Data: the built-in synthetic ``arithmetic`` or ``copy`` documents of ``minicpm_jax.data.synthetic``
(what the tiny models are trained on), split into a prompt and its answer (``47+38:`` ->
`` 40+30=70, 7+8=15, 70+15=85``; ``copy: abc ->`` -> `` abc``; ``passkey 12345. ... passkey?`` ->
`` 12345``), drawn deterministically from the seed; or a user JSONL file of ``{"prompt", "answer"}``.
A completion is cut at the first ``until`` string and matches when it equals the answer, both
stripped of surrounding whitespace. Sampled: ``exact_match`` is avg@k (mean over an example's samples,
then over examples), ``pass_at_k`` the fraction of examples with a correct sample; sample ``s`` of
example ``i`` draws with ``fold_in(fold_in(key(seed), i), s)``, so it does not depend on the batching.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from minicpm_jax.data.synthetic import SyntheticSource
from minicpm_jax.eval.loading import read_jsonl
from minicpm_jax.eval.registry import EvalContext, TaskResult, register
from minicpm_jax.eval.tasks import completions, encode_context
from minicpm_jax.generate.sampling import SamplingParams

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
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> TaskResult:
    """``path``: JSONL of ``{"prompt", "answer"}`` (replaces ``dataset``); ``max_new_tokens``: default
    the answer's token count + 1 per example; ``num_samples`` > 1 and ``top_p`` < 1 need ``temperature``
    > 0 (0 = greedy)."""
    check_sampling(num_samples, temperature, top_p)
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
    if temperature == 0:
        texts = completions(ctx.model, tok, prompts, budgets, batch_size=ctx.batch_size, what="exact_match")
        rows = []
        for (prompt, answer), completion in zip(examples, texts):
            text = cut_at(completion, until)
            correct = text.strip() == answer.strip()
            rows.append({"prompt": prompt, "answer": answer, "completion": text, "correct": correct})
        score = sum(r["correct"] for r in rows) / max(len(rows), 1)
        return TaskResult(metrics={"exact_match": score, "examples": float(len(rows))}, rows=rows)
    return sampled(ctx, examples, prompts, budgets, until, num_samples, SamplingParams(temperature, top_p=top_p))


def check_sampling(num_samples, temperature, top_p) -> None:
    """One ``ValueError`` naming every bad sampling option."""

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    problems = []
    if not (isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1):
        problems.append(f"num_samples={num_samples!r} (accepted: an integer >= 1)")
    if not (number(temperature) and temperature >= 0):
        problems.append(f"temperature={temperature!r} (accepted: finite and >= 0; 0 = greedy)")
    if not (number(top_p) and 0 < top_p <= 1):
        problems.append(f"top_p={top_p!r} (accepted: 0 < top_p <= 1)")
    if not problems and temperature == 0 and (num_samples != 1 or top_p != 1):
        problems.append(
            f"num_samples={num_samples}, top_p={top_p} need temperature > 0 (temperature=0 is greedy "
            "decoding, one fixed completion; the OPD paper's avg@16 samples at temperature 0.7, top_p 0.95)"
        )
    if problems:
        raise ValueError("exact_match: " + "; ".join(problems))


def sampled(ctx: EvalContext, examples, prompts, budgets, until, k: int, sampling) -> TaskResult:
    """avg@k / pass@k of ``k`` samples per example (example-major rows, one key per sample)."""
    base = jax.random.key(ctx.seed)
    flat = jnp.arange(len(examples) * k)
    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(base, j // k), j % k))(flat)
    texts = completions(
        ctx.model,
        ctx.tokenizer,
        [p for p in prompts for _ in range(k)],
        [b for b in budgets for _ in range(k)],
        batch_size=ctx.batch_size,
        what="exact_match",
        sampling=sampling,
        keys=keys,
    )
    rows = []
    for i, (prompt, answer) in enumerate(examples):
        cut = [cut_at(t, until) for t in texts[i * k : (i + 1) * k]]
        correct = [t.strip() == answer.strip() for t in cut]
        rows.append(
            {"prompt": prompt, "answer": answer, "completions": cut, "correct": correct, "num_correct": sum(correct)}
        )
    n = max(len(rows), 1)
    metrics = {
        "exact_match": sum(r["num_correct"] / k for r in rows) / n,
        "pass_at_k": sum(r["num_correct"] > 0 for r in rows) / n,
        "num_samples": float(k),
        "examples": float(len(rows)),
    }
    return TaskResult(metrics=metrics, rows=rows)
