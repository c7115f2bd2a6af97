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
