"""Token sampling for the generation engine: per-request parameters, logit processing, draws.

``SamplingParams`` is one request's settings (validated on construction); ``sampling_arrays`` turns
one or ``batch`` of them into ``SamplingArrays``, per-row arrays the jitted engine carries as a pytree.
``process_logits`` applies, in Hugging Face's order, repetition penalty, temperature, top-k, top-p and
min-p, and returns the logits of the sampling distribution (``-inf`` where excluded). ``sample`` draws
one token per row with that row's own PRNG key.

Everything is traced: per-row parameters are arrays, so top-k and top-p compare against a
threshold value found in a descending prefix of each row: its ``CANDIDATES`` largest logits from
``lax.top_k``, or, when that prefix cannot decide some row (``top_k`` beyond it, or a nucleus that it
does not reach), one full descending sort of the batch. A batch of greedy rows needs neither. At the
top-k and top-p boundaries all tokens tied with the boundary token are kept (the kept set can then be
larger than ``k``, or than the smallest nucleus). Greedy rows (``temperature == 0``) get a point mass on
the argmax of the penalised logits (first index on ties).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings; ``__post_init__`` raises ``ValueError`` listing every bad field."""

    temperature: float = 1.0  # 0 = greedy (argmax); >= 0 and finite
    top_k: int = 0  # 0 = off; else keep the k most likely tokens
    top_p: float = 1.0  # nucleus: smallest set of most likely tokens with prob sum >= top_p; (0, 1]
    min_p: float = 0.0  # keep tokens with prob >= min_p * max prob; [0, 1]
    repetition_penalty: float = 1.0  # seen tokens: logit / r if logit > 0 else logit * r; > 0 and finite

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _problems(p: SamplingParams) -> list[str]:
    """Human-readable descriptions of every out-of-range field of ``p``."""
    problems = []

    def check(name: str, ok, accepted: str) -> None:
        value = getattr(p, name)
        try:
            good = _is_number(value) and bool(ok(float(value)))
        except (TypeError, ValueError):
            good = False
        if not good:
            problems.append(f"{name}={value!r} (accepted: {accepted})")

    check("temperature", lambda x: math.isfinite(x) and x >= 0, "finite and >= 0; 0 = greedy")
    check("top_p", lambda x: 0 < x <= 1, "0 < top_p <= 1")
    check("min_p", lambda x: 0 <= x <= 1, "0 <= min_p <= 1")
    check("repetition_penalty", lambda x: math.isfinite(x) and x > 0, "finite and > 0")
    try:
        k_ok = not isinstance(p.top_k, bool) and operator.index(p.top_k) >= 0
    except TypeError:
        k_ok = False
    if not k_ok:
        problems.append(f"top_k={p.top_k!r} (accepted: an integer >= 0; 0 = off)")
    return problems


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters, each ``[B]`` (float32; ``top_k`` int32)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array


def sampling_arrays(params: SamplingParams | Sequence[SamplingParams], batch: int) -> SamplingArrays:
    """Stack one ``SamplingParams`` (used for every row) or exactly ``batch`` of them into ``SamplingArrays``."""
    if isinstance(params, SamplingParams):
        rows = [params] * batch
    else:
        rows = list(params)
        if len(rows) != batch:
            raise ValueError(f"sampling params: got {len(rows)} SamplingParams for a batch of {batch}")
        bad = [i for i, r in enumerate(rows) if not isinstance(r, SamplingParams)]
        if bad:
            raise ValueError(f"sampling params: entries {bad} are not SamplingParams")

    def column(name: str, dtype) -> jax.Array:
        return jnp.asarray([getattr(r, name) for r in rows], dtype=dtype).reshape(batch)

    return SamplingArrays(
        temperature=column("temperature", jnp.float32),
        top_k=column("top_k", jnp.int32),
        top_p=column("top_p", jnp.float32),
        min_p=column("min_p", jnp.float32),
        repetition_penalty=column("repetition_penalty", jnp.float32),
    )


def apply_repetition_penalty(logits: jax.Array, penalty: jax.Array, seen: jax.Array) -> jax.Array:
    """CTRL / Hugging Face penalty on ``seen`` tokens: ``logit / r`` if ``logit > 0`` else ``logit * r``."""
    r = penalty[:, None]
    penalised = jnp.where(logits > 0, logits / r, logits * r)
    return jnp.where(seen, penalised, logits)


CANDIDATES = 64  # the top-k prefilter's width: rows with top_k <= this (or off) and a nucleus within it avoid a sort


def _row_value(sorted_desc: jax.Array, index: jax.Array) -> jax.Array:
    """``sorted_desc[b, index[b]]`` for each row, as ``[B, 1]``."""
    return jnp.take_along_axis(sorted_desc, index[:, None], axis=-1)


def _top_k_threshold(desc: jax.Array, top_k: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
    """Smallest kept logit under top-k (``-inf`` where off: ``top_k == 0`` or ``>= vocab``, which keep
    everything), ``[B, 1]``, and whether the descending prefix ``desc`` holds the k-th logit, ``[B]``."""
    on = (top_k > 0) & (top_k < vocab)
    kth = _row_value(desc, jnp.clip(top_k - 1, 0, desc.shape[-1] - 1))
    return jnp.where(on[:, None], kth, -jnp.inf), ~on | (top_k <= desc.shape[-1])


def _top_p_threshold(desc: jax.Array, log_z: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Smallest kept logit under top-p, ``[B, 1]``, from a descending prefix ``desc`` of the (top-k
    filtered) row whose log-normaliser is ``log_z [B, 1]``, and whether the prefix decides it, ``[B]``.

    A token is kept while the probability mass strictly before it is below ``top_p``, which gives the
    smallest prefix whose mass reaches ``top_p``. ``top_p >= 1`` keeps everything.
    """
    probs = jnp.exp(desc - log_z)
    cum = jnp.cumsum(probs, axis=-1)
    mass_before = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)
    n_keep = jnp.sum(mass_before < top_p[:, None], axis=-1)  # >= 1: the first token has 0 mass before it
    last = _row_value(desc, jnp.maximum(n_keep - 1, 0))
    off = top_p >= 1.0
    return jnp.where(off[:, None], -jnp.inf, last), off | (n_keep < desc.shape[-1])


def _truncation(scaled: jax.Array, desc: jax.Array, params: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """The top-k / top-p / min-p threshold ``[B, 1]`` from a descending prefix ``desc`` of ``scaled``
    (or all of it, sorted), and whether the prefix decides it, per row ``[B]``."""
    k_thr, k_fits = _top_k_threshold(desc, params.top_k, scaled.shape[-1])
    log_z = jax.nn.logsumexp(jnp.where(scaled >= k_thr, scaled, -jnp.inf), axis=-1, keepdims=True)
    p_thr, p_fits = _top_p_threshold(jnp.where(desc >= k_thr, desc, -jnp.inf), log_z, params.top_p)
    m_thr = _min_p_threshold(desc[:, :1], params.min_p)
    return jnp.maximum(jnp.maximum(k_thr, p_thr), m_thr), k_fits & p_fits


def _threshold(scaled: jax.Array, params: SamplingArrays, greedy: jax.Array) -> jax.Array:
    """``_truncation`` from the ``CANDIDATES`` largest logits, or from a full sort if they do not decide
    it for some sampled (not ``greedy``) row."""
    width = min(CANDIDATES, scaled.shape[-1])
    threshold, fits = _truncation(scaled, jax.lax.top_k(scaled, width)[0], params)
    full = lambda: _truncation(scaled, -jnp.sort(-scaled, axis=-1), params)[0]
    return jax.lax.cond((fits | greedy).all(), lambda: threshold, full)


def _min_p_threshold(max_logit: jax.Array, min_p: jax.Array) -> jax.Array:
    """Smallest kept logit under min-p: ``p >= min_p * p_max`` iff ``logit >= max_logit + log(min_p)``."""
    return max_logit + jnp.log(min_p[:, None])  # log(0) = -inf: min-p off


def _point_mass(logits: jax.Array) -> jax.Array:
    """``logits`` at each row's argmax, ``-inf`` elsewhere."""
    hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.bool_)
    return jnp.where(hot, logits, -jnp.inf)


def process_logits(logits: jax.Array, params: SamplingArrays, seen: jax.Array) -> jax.Array:
    """Logits of each row's sampling distribution, ``[B, V]`` fp32 with ``-inf`` where excluded.

    Order as Hugging Face: repetition penalty (on ``seen``, bool ``[B, V]``), temperature, top-k, top-p,
    min-p. Greedy rows (``temperature == 0``) get the penalised logits as a point mass on their argmax.
    Ties at the top-k / top-p boundary are all kept.
    """
    logits = logits.astype(jnp.float32)
    penalised = apply_repetition_penalty(logits, params.repetition_penalty, seen)
    greedy = params.temperature == 0
    scaled = penalised / jnp.where(greedy, 1.0, params.temperature)[:, None]

    b = scaled.shape[0]
    threshold = jax.lax.cond(
        greedy.all(), lambda: jnp.full((b, 1), -jnp.inf), lambda: _threshold(scaled, params, greedy)
    )
    sampled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    return jnp.where(greedy[:, None], _point_mass(penalised), sampled)


def _typed_keys(keys: jax.Array) -> jax.Array:
    """Typed PRNG keys from typed keys or raw ``uint32 [B, 2]`` key data."""
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        return keys
    return jax.random.wrap_key_data(keys)


def _logprob_at(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log_softmax(logits)[b, tokens[b]]``, ``[B]`` fp32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def sample(
    logits: jax.Array, params: SamplingArrays, seen: jax.Array, keys: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw one token per row; returns ``(tokens int32 [B], logprob [B], model_logprob [B])``.

    ``keys`` are one PRNG key per row (typed ``[B]`` or raw ``uint32 [B, 2]``), so a row's draw does not
    depend on the other rows. ``logprob`` is the chosen token's log-prob under the sampling distribution
    (0 for greedy rows); ``model_logprob`` is ``log_softmax`` of the unmodified ``logits`` at the token.
    """
    processed = process_logits(logits, params, seen)
    greedy = params.temperature == 0
    argmax = jnp.argmax(processed, axis=-1)
    draw = lambda: jax.vmap(jax.random.categorical)(_typed_keys(keys), processed)
    tokens = jnp.where(greedy, argmax, jax.lax.cond(greedy.all(), lambda: argmax, draw)).astype(jnp.int32)
    logprob = jnp.where(greedy, 0.0, _logprob_at(processed, tokens))
    return tokens, logprob, _logprob_at(logits, tokens)
