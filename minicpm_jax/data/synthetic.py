"""Built-in synthetic corpora for tests and the demo: short text documents a tiny model learns fast.

Document ``i`` depends only on ``(seed, i)``, so the corpus is random access (a grain data source)
and identical on every host and run. Tasks (each document ~30-120 bytes):

- ``arithmetic``: two-digit addition / subtraction / multiplication with worked steps,
  e.g. ``47+38: 40+30=70, 7+8=15, 70+15=85``;
- ``kv_recall``: a few key=value pairs, then one key is asked back, e.g. ``kv abc=41 xyz=07 | xyz? 07``;
- ``copy``: copy a random string (``copy: qmxra -> qmxra``) or recall a passkey after filler text;
- ``passkey``: the format of the ``passkey`` evaluation task (``minicpm_jax.eval.tasks.retrieval``) with a
  one-digit key: ``The sky is blue. The pass key is #7. Here we go. What is the pass key? #7``
  (15-50 bytes of filler or a sentence more, the key sentence at a random sentence boundary: the document fits a 128-token row).
"""

from __future__ import annotations

import string

import numpy as np

TASKS = ("arithmetic", "kv_recall", "copy", "passkey")
_LETTERS = np.array(list(string.ascii_lowercase))
_FILLER = ("the grass is green.", "the sky is blue.", "the sun is warm.", "water is wet.", "birds can fly.")
PASSKEY_FILLER = (  # also the haystack of the passkey / needle evaluation tasks
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "The river flows to the sea.",
    "Birds sing in the morning.",
)


def _arithmetic(rng: np.random.Generator) -> str:
    op = rng.integers(3)
    if op == 0:
        a, b = rng.integers(10, 100, size=2)
        (ta, ua), (tb, ub) = divmod(a, 10), divmod(b, 10)
        return f"{a}+{b}: {ta}0+{tb}0={10 * (ta + tb)}, {ua}+{ub}={ua + ub}, {10 * (ta + tb)}+{ua + ub}={a + b}"
    if op == 1:
        a, b = sorted(rng.integers(10, 100, size=2), reverse=True)
        step = a - b // 10 * 10
        return f"{a}-{b}: {a}-{b // 10 * 10}={step}, {step}-{b % 10}={a - b}"
    a, b = rng.integers(2, 10), rng.integers(10, 100)
    hi, lo = a * (b // 10 * 10), a * (b % 10)
    return f"{a}*{b}: {a}*{b // 10 * 10}={hi}, {a}*{b % 10}={lo}, {hi}+{lo}={a * b}"


def _kv_recall(rng: np.random.Generator) -> str:
    n = int(rng.integers(3, 7))
    keys: list[str] = []
    while len(keys) < n:
        key = "".join(rng.choice(_LETTERS, size=3))
        if key not in keys:
            keys.append(key)
    values = [f"{v:02d}" for v in rng.integers(0, 100, size=n)]
    asked = int(rng.integers(n))
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    return f"kv {pairs} | {keys[asked]}? {values[asked]}"


def _copy(rng: np.random.Generator) -> str:
    if rng.integers(2) == 0:
        text = "".join(rng.choice(_LETTERS, size=int(rng.integers(5, 21))))
        return f"copy: {text} -> {text}"
    key = f"{int(rng.integers(10000, 100000))}"
    filler = " ".join(rng.choice(_FILLER, size=int(rng.integers(1, 4))))
    return f"passkey {key}. {filler} passkey? {key}"


def _passkey(rng: np.random.Generator) -> str:
    sentences, budget = [], int(rng.integers(15, 51))
    while sum(len(x) + 1 for x in sentences) < budget:
        sentences.append(PASSKEY_FILLER[int(rng.integers(len(PASSKEY_FILLER)))])
    key = int(rng.integers(1, 10))
    sentences.insert(int(rng.integers(len(sentences) + 1)), f"The pass key is #{key}.")
    return " ".join(sentences) + f" What is the pass key? #{key}"


_GENERATORS = {"arithmetic": _arithmetic, "kv_recall": _kv_recall, "copy": _copy, "passkey": _passkey}


class SyntheticSource:
    """Random-access corpus of ``num_documents`` text documents drawn from ``tasks`` (a grain source)."""

    def __init__(self, tasks: tuple[str, ...], num_documents: int, seed: int):
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown or not tasks:
            raise ValueError(f"data.synthetic_tasks: {list(tasks)} must be a non-empty subset of {list(TASKS)}")
        if num_documents <= 0:
            raise ValueError(f"data.synthetic_documents: {num_documents} documents; need at least 1")
        self._tasks, self._n, self._seed = tuple(tasks), num_documents, seed

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < self._n:
            raise IndexError(f"synthetic document {index} out of range [0, {self._n})")
        rng = np.random.default_rng([self._seed, index])
        task = self._tasks[int(rng.integers(len(self._tasks)))]
        return _GENERATORS[task](rng)

    def __repr__(self) -> str:
        return f"SyntheticSource(tasks={self._tasks}, num_documents={self._n}, seed={self._seed})"
