"""The built-in synthetic corpora: deterministic by seed, short, and with correct answers."""

from __future__ import annotations

import re

import numpy as np
import pytest

from minicpm_jax.data import SyntheticSource


def _docs(task, n=300, seed=0):
    src = SyntheticSource((task,), n, seed)
    return [src[i] for i in range(n)]


def test_deterministic_by_seed_and_random_access():
    src = SyntheticSource(("arithmetic", "kv_recall", "copy"), 100, seed=7)
    docs = [src[i] for i in range(100)]
    assert docs == [SyntheticSource(("arithmetic", "kv_recall", "copy"), 100, 7)[i] for i in range(100)]
    assert src[57] == docs[57] and len(set(docs)) > 95
    assert docs != [SyntheticSource(("arithmetic", "kv_recall", "copy"), 100, 8)[i] for i in range(100)]
    assert all(15 <= len(d.encode()) <= 120 for d in docs)
    with pytest.raises(IndexError):
        src[100]


def test_arithmetic_worked_steps_are_correct():
    for doc in _docs("arithmetic"):
        question, steps = doc.split(": ")
        assert re.fullmatch(r"\d+[-+*]\d+", question)
        assert steps.rsplit("=", 1)[1] == str(eval(question)), doc  # noqa: S307 (digits and one operator)
        for step in steps.split(", "):
            lhs, rhs = step.rsplit("=", 1)
            assert eval(lhs) == int(rhs), doc  # noqa: S307


def test_kv_recall_answers_the_asked_key():
    for doc in _docs("kv_recall"):
        pairs, query = doc.removeprefix("kv ").split(" | ")
        table = dict(p.split("=") for p in pairs.split())
        key, answer = query.split("? ")
        assert table[key] == answer, doc


def test_copy_and_passkey_repeat_their_payload():
    kinds = set()
    for doc in _docs("copy"):
        if doc.startswith("copy: "):
            left, right = doc.removeprefix("copy: ").split(" -> ")
        else:
            m = re.fullmatch(r"passkey (\d+)\. .+ passkey\? (\d+)", doc)
            left, right = m.groups()
        kinds.add(doc.split()[0])
        assert left == right, doc
    assert kinds == {"copy:", "passkey"}


def test_passkey_documents_use_the_evaluation_format_and_fit_a_128_byte_row():
    """``passkey`` documents end with the question of the ``passkey`` evaluation task and its answer;
    the key sentence is the evaluation needle; every document fits one 128-token byte-level row."""
    from minicpm_jax.data.tokenizer import load_tokenizer
    from minicpm_jax.eval.tasks.retrieval import passkey_example

    tok = load_tokenizer(None)
    prompt, answer = passkey_example(tok, np.random.default_rng(0), 80, 0.5, key_length=1)
    question, text = " What is the pass key? #", tok.decode(prompt)
    assert text.endswith(question) and f" The pass key is #{tok.decode(answer)}." in text
    keys = set()
    for doc in _docs("passkey"):
        body, key = doc.rsplit(question, 1)
        assert re.fullmatch(r"[1-9]", key) and body.count(f"The pass key is #{key}.") == 1 and doc.count("#") == 2
        assert len(tok.encode(doc, add_bos=True)) < 128, doc
        keys.add(key)
    assert keys == set("123456789") and len(answer) == 1


def test_bad_tasks_and_sizes():
    with pytest.raises(ValueError, match="synthetic_tasks"):
        SyntheticSource(("sorting",), 10, 0)
    with pytest.raises(ValueError, match="synthetic_documents: 0"):
        SyntheticSource(("copy",), 0, 0)
