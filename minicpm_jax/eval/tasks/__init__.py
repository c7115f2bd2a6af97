"""Evaluation task modules (each registers its tasks in ``minicpm_jax.eval.registry``) and the text
helpers they share: contexts are encoded with a leading bos (as training documents start), and a
continuation is the tokens the context + continuation text adds after the context's tokens.
"""

from __future__ import annotations


def encode_context(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` with a leading bos (or eos when the tokenizer has no bos), never empty."""
    ids = tokenizer.encode(text, add_bos=tokenizer.bos_id is not None)
    if not ids or (tokenizer.bos_id is None and not text):
        ids = [tokenizer.eos_id, *ids]
    return ids


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)``: trailing spaces of the context move to the continuation and
    the whole text is encoded at once, so the split matches how the model reads it (lm-eval's rule)."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    ctx = encode_context(tokenizer, stripped)
    whole = encode_context(tokenizer, stripped + continuation)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tokenizer.encode(continuation, add_bos=False)


def greedy_completions(model, tokenizer, prompts: list[list[int]], budgets: list[int], *, batch_size: int, what: str):
    """Greedy completion texts of ``prompts``: ``completions`` with the engine's greedy decoding."""
    return completions(model, tokenizer, prompts, budgets, batch_size=batch_size, what=what)


def completions(
    model,
    tokenizer,
    prompts: list[list[int]],
    budgets: list[int],
    *,
    batch_size: int,
    what: str,
    sampling=None,
    keys=None,
):
    """Completion texts of ``prompts`` (at most ``budgets[i]`` new tokens each) in full batches of
    ``batch_size`` rows (short batches are filled: one compilation), with a progress bar. ``sampling``:
    a ``SamplingParams`` (default greedy); ``keys``: ``[len(prompts)]`` PRNG keys, one per prompt, so a
    sampled row does not depend on the batch it runs in (default: the engine's seed 0)."""
    import jax.numpy as jnp

    from minicpm_jax.eval.report import progress
    from minicpm_jax.generate.engine import GREEDY, generate

    texts: list[str] = []
    with progress(len(prompts), what) as advance:
        for start in range(0, len(prompts), batch_size):
            batch, budget = prompts[start : start + batch_size], budgets[start : start + batch_size]
            fill = batch_size - len(batch)
            rng = 0
            if keys is not None:
                rng = keys[start : start + batch_size]
                rng = jnp.concatenate([rng, jnp.repeat(rng[:1], fill)])
            result = generate(
                model,
                batch + [batch[0]] * fill,
                max_new_tokens=budget + [1] * fill,
                sampling=sampling or GREEDY,
                stop_token_ids=tokenizer.stop_ids,
                rng=rng,
                pad_id=tokenizer.pad_id,
            )
            texts += [tokenizer.decode(result.row_tokens(i)) for i in range(len(batch))]
            advance(len(batch))
    return texts
