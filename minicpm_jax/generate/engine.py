"""Batched generation: prefill of right-padded prompts, then a jit-compiled decode loop.

Prompts of different lengths are right-padded to a common length and each cache row keeps its own
length (``minicpm_jax.model.cache``), so every row computes exactly what it would alone. The prefill
runs in chunks of ``prefill_chunk`` tokens (a long prompt never needs a ``T x T`` intermediate);
models with InfLLM v2 layers prefill in one call, whose sparse kernel is itself memory-safe. The
decode loop is a ``lax.while_loop`` over fixed-size caches (one compilation, no per-token retrace)
that stops once every row has hit a stop id or its length limit; with ``on_tokens`` it returns to
the host every ``stream_every`` tokens so the caller can stream. Parameters sharded over a mesh
(``create_model(mesh=...)`` / ``load_any(mesh=...)``) give sharded caches: rows over the data axes,
Lightning state heads over ``tensor``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpm_jax.distributed import to_host
from minicpm_jax.generate.sampling import SamplingArrays, SamplingParams, sample, sampling_arrays
from minicpm_jax.model.cache import ModelCache
from minicpm_jax.sharding import constrain, mesh_of

PAD_BUCKET = 16  # prompt lengths are padded up to a multiple of this (fewer recompilations)
GREEDY = SamplingParams(temperature=0.0)


@dataclasses.dataclass
class GenerationResult:
    """Per-row outputs; columns past a row's ``lengths`` hold ``pad_id`` / 0."""

    tokens: np.ndarray  # int32 [B, N] generated ids (incl. the stop token)
    lengths: np.ndarray  # int32 [B]
    logprobs: np.ndarray  # float32 [B, N]: the sampled token under the sampling distribution (0 if greedy)
    model_logprobs: np.ndarray  # float32 [B, N]: under the unmodified model distribution (T=1, no truncation)
    finish_reasons: list[str]  # "stop" (hit a stop id) or "length" (max_new_tokens or the context ran out)

    def row_tokens(self, i: int) -> list[int]:
        return self.tokens[i, : self.lengths[i]].tolist()


class _Loop(NamedTuple):
    """Decode-loop carry."""

    cache: ModelCache
    token: jax.Array  # [B] last sampled token
    step: jax.Array  # int32 [], columns filled so far
    tokens: jax.Array  # int32 [B, N]
    logprobs: jax.Array  # f32 [B, N]
    model_logprobs: jax.Array  # f32 [B, N]
    count: jax.Array  # int32 [B] tokens generated per row
    done: jax.Array  # bool [B]
    stopped: jax.Array  # bool [B] finished on a stop id
    seen: jax.Array  # bool [B, V] tokens for the repetition penalty


class _Request(NamedTuple):
    """Per-row constants of a call (a pytree)."""

    sampling: SamplingArrays
    keys: jax.Array  # [B] PRNG keys
    limits: jax.Array  # int32 [B] most tokens each row may generate
    stop_ids: jax.Array  # int32 [S]


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
    stop_token_ids: Sequence[int] = (),
    rng: int | jax.Array = 0,
    prefill_chunk: int = 512,
    pad_id: int = 0,
    on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None,
    stream_every: int = 8,
) -> GenerationResult:
    """Generates up to ``max_new_tokens`` (one for all rows or one per prompt) after each prompt (lists
    of token ids of any lengths).

    ``sampling``: one ``SamplingParams`` for all rows or one per prompt. ``rng``: a seed, one PRNG key
    (row i draws with ``fold_in(key, i)``) or ``[B]`` keys (one per row: a row's draws then do not
    depend on the batch). A row stops at any of ``stop_token_ids`` (kept as its last token), after
    ``max_new_tokens`` or at the model's context (``max_position_embeddings``). ``on_tokens(tokens
    [B, k], valid [B, k])`` is called with each run of new tokens, for streaming.
    """
    cfg = model.config
    lengths = _check_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings)
    budgets = _budgets(max_new_tokens, len(prompts))
    max_new_tokens = int(budgets.max())
    graphdef, state = nnx.split(model)
    mesh = mesh_of(state)
    batch = len(prompts)
    rows = -(-batch // _data_parallel(mesh)) * _data_parallel(mesh)  # pad the batch to fill the data axes
    lengths, budgets = (np.concatenate([a, np.full(rows - batch, a[0])]) for a in (lengths, budgets))
    prompts = list(prompts) + [prompts[0]] * (rows - batch)
    sparse = cfg.sparse_config is not None and "minicpm4" in cfg.layer_mixers
    width, chunk = _prefill_shape(int(lengths.max()), prefill_chunk, one_call=sparse)
    ids = np.full((rows, width), pad_id, np.int32)
    seen = np.zeros((rows, cfg.vocab_size), bool)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
        seen[i, np.asarray(p)] = True
    request = _Request(
        sampling_arrays(_per_row(sampling, batch, rows), rows),
        _row_keys(rng, batch, rows),
        jnp.asarray(np.minimum(budgets, cfg.max_position_embeddings - lengths), jnp.int32),
        jnp.asarray(list(stop_token_ids) or [-1], jnp.int32),
    )
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        cache = _new_cache(graphdef, state, rows, width + max_new_tokens)
        last_h = jnp.zeros((rows, cfg.hidden_size), model.dtype)
        for start in range(0, width, chunk):
            valid = np.clip(lengths - start, 0, chunk).astype(np.int32)
            ends_here = (lengths > start) & (lengths <= start + chunk)
            last_h, cache = _prefill_chunk(
                graphdef, state, ids[:, start : start + chunk], cache, valid, ends_here, last_h
            )
        loop = _start(graphdef, state, last_h, cache, jnp.asarray(seen), request, pad_id, max_new_tokens)
        if on_tokens:
            _emit(on_tokens, loop, 0, 1, batch)
        while int(loop.step) < max_new_tokens and not bool(loop.done.all()):
            step = int(loop.step)
            until = min(step + stream_every, max_new_tokens) if on_tokens else max_new_tokens
            loop = _decode(graphdef, state, loop, request, until, pad_id)
            if on_tokens:
                _emit(on_tokens, loop, step, int(loop.step), batch)
    out = jax.tree.map(to_host, loop._replace(cache=None, seen=None))  # only what the result holds
    return GenerationResult(
        tokens=np.asarray(out.tokens[:batch]),
        lengths=np.asarray(out.count[:batch]),
        logprobs=np.asarray(out.logprobs[:batch]),
        model_logprobs=np.asarray(out.model_logprobs[:batch]),
        finish_reasons=["stop" if s else "length" for s in out.stopped[:batch]],
    )


def _budgets(max_new_tokens, batch: int) -> np.ndarray:
    """Per-row token budgets from one int or one per prompt."""
    budgets = [max_new_tokens] * batch if isinstance(max_new_tokens, (int, np.integer)) else list(max_new_tokens)
    if len(budgets) != batch or any(
        isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in budgets
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1, or one per prompt ({batch})")
    return np.asarray(budgets, np.int32)


def _check_prompts(prompts, vocab: int, context: int) -> np.ndarray:
    """Prompt lengths; one ValueError naming every bad prompt."""
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    errors = []
    for i, p in enumerate(prompts):
        a = np.asarray(p)
        if a.ndim != 1 or not len(a) or not np.issubdtype(a.dtype, np.integer):
            errors.append(f"prompt {i} is empty or not a list of token ids")
        elif a.min() < 0 or a.max() >= vocab:
            errors.append(f"prompt {i} has ids outside [0, {vocab}) (the model's vocab_size)")
        elif len(a) >= context:
            errors.append(
                f"prompt {i} has {len(a)} tokens; the model's context (max_position_embeddings) is {context}, "
                "leaving no room to generate"
            )
    if errors:
        raise ValueError("; ".join(errors))
    return np.asarray([len(p) for p in prompts], np.int32)


def _prefill_shape(longest: int, chunk: int, one_call: bool) -> tuple[int, int]:
    """``(padded prompt width, chunk)``: one call for short prompts or InfLLM v2 models, else chunks."""
    if chunk < PAD_BUCKET or chunk % PAD_BUCKET:
        raise ValueError(f"prefill_chunk={chunk}: must be a positive multiple of {PAD_BUCKET}")
    width = -(-longest // PAD_BUCKET) * PAD_BUCKET
    if one_call or width <= chunk:
        return width, width
    return -(-longest // chunk) * chunk, chunk


def _per_row(sampling, batch: int, rows: int):
    if isinstance(sampling, SamplingParams):
        return sampling
    sampling = list(sampling)
    if len(sampling) != batch:
        raise ValueError(
            f"sampling: got {len(sampling)} SamplingParams for {batch} prompts (give one or one per prompt)"
        )
    return sampling + [sampling[0]] * (rows - batch)


def _row_keys(rng, batch: int, rows: int) -> jax.Array:
    """One PRNG key per row."""
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(int(rng))
    elif not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 0:
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))
    elif rng.shape == (batch,):
        keys = rng
    else:
        raise ValueError(f"rng: expected a seed, one key or {batch} keys, got key array of shape {rng.shape}")
    return jnp.concatenate([keys, jnp.repeat(keys[:1], rows - batch)])


def _data_parallel(mesh) -> int:
    return 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)


def _emit(on_tokens, loop: _Loop, start: int, stop: int, batch: int) -> None:
    tokens, count = to_host(loop.tokens[:batch, start:stop]), to_host(loop.count[:batch])
    on_tokens(np.asarray(tokens), np.arange(start, stop)[None, :] < np.asarray(count)[:, None])


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _new_cache(graphdef, state, batch: int, capacity: int) -> ModelCache:
    return nnx.merge(graphdef, state).init_cache(batch, capacity)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(3, 6))
def _prefill_chunk(graphdef, state, ids, cache: ModelCache, valid, ends_here, last_h):
    """Appends one chunk of right-padded prompts (``valid [B]`` real tokens per row) to the cache and
    keeps the hidden state of each row whose last prompt token is in this chunk (``ends_here``)."""
    h, cache = nnx.merge(graphdef, state).extend(ids, cache, valid)
    here = jnp.take_along_axis(h, jnp.maximum(valid - 1, 0)[:, None, None], axis=1)[:, 0]
    return jnp.where(ends_here[:, None], here, last_h), cache


def _record(loop: _Loop, logits, request: _Request, pad_id: int) -> _Loop:
    """Samples one token per row from ``logits [B, V]`` and appends it to the rows still running."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(request.keys, loop.step)
    token, logprob, model_logprob = sample(logits, request.sampling, loop.seen, keys)
    live = ~loop.done
    col = lambda buf, x, fill: buf.at[:, loop.step].set(jnp.where(live, x, fill))
    count = loop.count + live
    stop = live & jnp.isin(token, request.stop_ids)
    seen = loop.seen | (live[:, None] & jax.nn.one_hot(token, loop.seen.shape[1], dtype=bool))
    return loop._replace(
        token=token,
        step=loop.step + 1,
        tokens=col(loop.tokens, token, pad_id),
        logprobs=col(loop.logprobs, logprob, 0.0),
        model_logprobs=col(loop.model_logprobs, model_logprob, 0.0),
        count=count,
        done=loop.done | stop | (count >= request.limits),
        stopped=loop.stopped | stop,
        seen=constrain(seen, ("batch", None)),
    )


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(3,))
def _start(graphdef, state, last_h, cache, seen, request: _Request, pad_id: int, max_new_tokens: int) -> _Loop:
    """The first generated token, sampled from the prefill's last hidden states."""
    model = nnx.merge(graphdef, state)
    logits = model.logits(last_h[:, None])[:, 0]
    b = last_h.shape[0]
    zeros = jnp.zeros((b, max_new_tokens), jnp.float32)
    loop = _Loop(
        cache=cache,
        token=jnp.zeros((b,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        logprobs=zeros,
        model_logprobs=zeros,
        count=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        stopped=jnp.zeros((b,), bool),
        seen=seen,
    )
    return _record(loop, logits, request, pad_id)


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(2,))
def _decode(graphdef, state, loop: _Loop, request: _Request, until, pad_id: int) -> _Loop:
    """Decode steps until column ``until`` or until every row is done."""
    model = nnx.merge(graphdef, state)

    def body(loop: _Loop) -> _Loop:
        logits, cache = model.decode_step(loop.token, loop.cache)
        return _record(loop._replace(cache=cache), logits, request, pad_id)

    return jax.lax.while_loop(lambda c: (c.step < until) & ~c.done.all(), body, loop)
