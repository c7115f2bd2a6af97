"""Log-likelihood scoring: ``loglikelihood`` of continuations given contexts, and the rolling
(strided sliding-window) log-likelihood of long token sequences that perplexity is built on.

Requests are sorted by length and right-padded into batches whose length is rounded up to a power of
two (at least ``MIN_BUCKET``), and every batch has ``batch_size`` rows, so a run compiles once per
length bucket. The forward pass is one ``jax.jit`` per bucket: final hidden states, then fp32
log-softmax over token chunks of ``chunk_tokens`` tokens (all rows together), so ``[B, T, V]``
logits never exist at once. Parameters sharded over a mesh are used where they are (the batch is
padded to fill the data axes and its rows laid over ``data x fsdp``). With several processes
(``minicpm_jax.distributed``) a model over all of them scores each batch together, each process
feeding its devices' rows; a model of each process alone scores every ``process_count``-th batch,
and the scores are gathered, so every process returns the same list.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from minicpm_jax import distributed
from minicpm_jax.sharding import mesh_of

MIN_BUCKET = 16
Pair = tuple[Sequence[int], Sequence[int]]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _token_scores(graphdef, state, ids, targets, chunk_tokens: int):
    """Per-token ``(log p(target), target is the argmax)`` for ``ids``/``targets`` ``[B, T]``."""
    model = nnx.merge(graphdef, state)
    h = model.hidden_states(ids)
    b, t = ids.shape
    c = max(1, min(t, chunk_tokens // b))
    while t % c:  # t is a power of two times MIN_BUCKET or the full length: find a divisor
        c -= 1
    hs = jnp.moveaxis(h.reshape(b, t // c, c, h.shape[-1]), 1, 0)
    ts = jnp.moveaxis(targets.reshape(b, t // c, c), 1, 0)

    def chunk(xs):
        h_c, t_c = xs
        logits = model.logits(h_c).astype(jnp.float32)  # [B, c, V]
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, t_c[..., None], axis=-1)[..., 0]
        return picked, jnp.argmax(logits, axis=-1) == t_c

    lp, greedy = jax.lax.map(chunk, (hs, ts))
    return jnp.moveaxis(lp, 0, 1).reshape(b, t), jnp.moveaxis(greedy, 0, 1).reshape(b, t)


def _bucket(n: int, cap: int) -> int:
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return max(n, min(size, cap))


def check_pairs(pairs: Sequence[Pair], max_positions: int, vocab_size: int) -> None:
    """One clear error for the first empty, out-of-vocabulary or too-long request."""
    for i, (ctx, cont) in enumerate(pairs):
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError(
                f"request {i}: context and continuation need at least one token each (got {len(ctx)} and {len(cont)})"
            )
        length = len(ctx) + len(cont) - 1
        if length > max_positions:
            raise ValueError(
                f"request {i}: context + continuation is {length} tokens; the model's context "
                f"(max_position_embeddings) is {max_positions}: shorten the input or lower max_length"
            )
        top = max(max(ctx), max(cont))
        if top >= vocab_size or min(min(ctx), min(cont)) < 0:
            raise ValueError(f"request {i}: token id {top} is outside the model's vocab_size {vocab_size}")


def loglikelihood(
    model,
    pairs: Sequence[Pair],
    batch_size: int = 8,
    *,
    chunk_tokens: int = 2048,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """``(sum of log p(continuation | context), continuation is the greedy decode)`` per pair of token
    id lists; the model reads ``context + continuation[:-1]``. ``on_batch(n)`` is called after each
    batch of ``n`` requests (progress)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} (accepted: an integer >= 1)")
    cfg = model.config
    check_pairs(pairs, cfg.max_position_embeddings, cfg.vocab_size)
    graphdef, state = nnx.split(model)
    mesh = mesh_of(state)
    dp = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    rows = -(-batch_size // dp) * dp
    # a model over several processes runs every batch on all of them (rows over data x fsdp); a model
    # of this process alone scores its share of the batches, and the scores are gathered afterwards
    shared = distributed.spans_processes(mesh)
    lengths = [len(c) + len(x) - 1 for c, x in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
    sums, greedy_all = np.zeros(len(pairs), np.float64), np.zeros(len(pairs), np.bool_)
    owner = np.zeros(len(pairs), np.int32)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for index, start in enumerate(range(0, len(order), batch_size)):
            batch = order[start : start + batch_size]
            owner[batch] = index % jax.process_count()
            if not (shared or distributed.owned(index)):
                continue
            width = _bucket(lengths[batch[0]], cfg.max_position_embeddings)
            ids = np.zeros((rows, width), np.int32)
            targets = np.zeros((rows, width), np.int32)
            for r, i in enumerate(batch):
                seq = list(pairs[i][0]) + list(pairs[i][1])
                ids[r, : len(seq) - 1] = seq[:-1]
                targets[r, : len(seq) - 1] = seq[1:]
            if mesh is not None:
                ids, targets = _rows_over(mesh, ids), _rows_over(mesh, targets)
            lp, greedy = _token_scores(graphdef, state, ids, targets, chunk_tokens)
            lp, greedy = distributed.to_host(lp), distributed.to_host(greedy)
            for r, i in enumerate(batch):
                n_ctx, n = len(pairs[i][0]), lengths[i]
                sums[i] = np.sum(lp[r, n_ctx - 1 : n], dtype=np.float64)
                greedy_all[i] = greedy[r, n_ctx - 1 : n].all()
            if on_batch is not None:
                on_batch(len(batch))
    if not shared:
        sums, greedy_all = distributed.gather_owned(sums, owner), distributed.gather_owned(greedy_all, owner)
    return [(float(s), bool(g)) for s, g in zip(sums, greedy_all)]


def _rows_over(mesh, x: np.ndarray) -> jax.Array:
    """``x`` (the same on every process) with its rows over the mesh's ``data x fsdp`` axes."""
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def rolling_windows(tokens: Sequence[int], max_length: int, stride: int) -> list[Pair]:
    """Strided sliding windows over ``tokens`` as ``(context, continuation)`` pairs.

    Window k covers ``tokens[k*stride : k*stride + max_length]``; it scores the tokens after the
    previous window's end, so every token but the first is scored exactly once, with the window's
    earlier tokens as context (at least one token: with ``stride == max_length`` a window borrows
    the token before it). The model reads at most ``max_length`` tokens per window.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} (accepted: an integer >= 2)")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride={stride} (accepted: 1 <= stride <= max_length={max_length})")
    tokens = list(tokens)
    pairs: list[Pair] = []
    prev_end, begin = 1, 0  # token 0 has no context: never scored
    while prev_end < len(tokens):
        end = min(begin + max_length, len(tokens))
        if end > prev_end:
            first = min(begin, prev_end - 1)
            pairs.append((tokens[first:prev_end], tokens[prev_end:end]))
            prev_end = end
        begin += stride
    return pairs


def loglikelihood_rolling(
    model,
    sequences: Sequence[Sequence[int]],
    *,
    max_length: int,
    stride: int,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """``(sum of log p, tokens scored)`` per sequence (every token after the first is scored once, with
    up to ``max_length`` tokens of context window: the standard strided perplexity). Windows of all
    sequences are batched together."""
    windows = [rolling_windows(s, max_length, stride) for s in sequences]
    flat = [p for w in windows for p in w]
    scores = loglikelihood(model, flat, batch_size, on_batch=on_batch)
    out, k = [], 0
    for w in windows:
        out.append((sum(s for s, _ in scores[k : k + len(w)]), sum(len(c) for _, c in w)))
        k += len(w)
    return out


def num_windows(length: int, max_length: int, stride: int) -> int:
    """How many requests ``rolling_windows`` makes for a sequence of ``length`` tokens (for progress)."""
    return len(rolling_windows(range(length), max_length, stride))
