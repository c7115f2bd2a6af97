"""Trainable subsets: which parameters a run differentiates and gives optimizer moments.

Parameters are named by their checkpoint keys (``model.layers.0.self_attn.q_proj.kernel``). A
``train.trainable`` pattern (shell-style, ``*`` also crosses dots) selects a parameter when it
matches its path or a dotted prefix of it, so ``model.layers.*.self_attn`` selects every mixer
weight. No patterns means everything is trained. The parameter tree is split into the trainable
part and the fixed rest (two disjoint nested dicts); the step differentiates only the first and
passes the second through untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

import jax

Selector = Sequence[str] | Callable[[str], bool]


def dotted(path) -> str:
    """``model.layers.0.mlp.up_proj.kernel`` from a pytree key path."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _matches(path: str, pattern: str) -> bool:
    parts = path.split(".")
    return any(fnmatchcase(".".join(parts[:n]), pattern) for n in range(1, len(parts) + 1))


def selected(paths: Sequence[str], selector: Selector | None) -> set[str]:
    """The dotted ``paths`` that ``selector`` trains: patterns (empty or None: all) or a predicate.

    Patterns that select nothing raise, naming a few existing paths.
    """
    if not selector:
        chosen = set(paths)
    elif callable(selector):
        chosen = {p for p in paths if selector(p)}
    else:
        unmatched = [pat for pat in selector if not any(_matches(p, pat) for p in paths)]
        if unmatched:
            raise ValueError(
                f"train.trainable: pattern(s) {unmatched} match no parameter; parameter paths look like "
                f"{list(paths[:3]) + list(paths[-2:])}"
            )
        chosen = {p for p in paths if any(_matches(p, pat) for pat in selector)}
    if not chosen:
        raise ValueError("train.trainable selects no parameter: nothing would be trained")
    return chosen


def trainable_mask(params, selector: Selector | None):
    """A tree of bools like ``params``: True where ``selected`` trains the leaf."""
    chosen = selected([dotted(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)], selector)
    return jax.tree_util.tree_map_with_path(lambda p, _: dotted(p) in chosen, params)


def split(params, mask) -> tuple[dict, dict]:
    """``(trainable, fixed)``: two disjoint nested dicts (empty branches dropped) that ``merge`` rejoins."""

    def part(tree, m, keep):
        if isinstance(tree, dict):
            out = {k: part(tree[k], m[k], keep) for k in tree}
            return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}
        return tree if bool(m) == keep else None

    return part(params, mask, True), part(params, mask, False)


def merge(a: dict, b: dict) -> dict:
    """Deep union of two disjoint nested dicts."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def count(tree) -> tuple[int, int]:
    """``(leaves, bytes)`` of an array tree."""
    leaves = jax.tree.leaves(tree)
    return len(leaves), sum(x.size * x.dtype.itemsize for x in leaves)
