"""Off-policy cold start (spec/opd.md 8.1): teacher rollouts with rejection filters, then SFT of the
student on them through the engine; on-policy distillation then starts from the SFT checkpoint.

Rejection (the released rollout script's rules, up to ``max_attempts`` samples per prompt): the
response is incomplete (no stop token), lacks the ``require`` pattern (``\\boxed`` for math), repeats
a line of >= 20 characters >= 5 times, repeats a 100-character window >= 3 times (stride 10), or, above
5,000 characters, holds a 50-character block repeated >= 3 times in a row.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import jax
import numpy as np

from minicpm_jax.generate.engine import generate
from minicpm_jax.generate.sampling import SamplingParams


def degenerate(text: str) -> bool:
    """True for the repetitive responses the cold start rejects (rules (b)-(d) of the module docstring)."""
    lines = Counter(line for line in text.splitlines() if len(line) >= 20)
    if any(n >= 5 for n in lines.values()):
        return True
    windows = Counter(text[i : i + 100] for i in range(0, max(len(text) - 99, 0), 10))
    if any(n >= 3 for n in windows.values()):
        return True
    return len(text) > 5000 and re.search(r"(.{50})\1\1", text, flags=re.DOTALL) is not None


def rejection(text: str, finish_reason: str, require: str | None) -> str | None:
    """Why a teacher response is rejected (None: accepted)."""
    if finish_reason != "stop":
        return "incomplete"
    if require and re.search(require, text) is None:
        return "missing pattern"
    return "repetitive" if degenerate(text) else None


def teacher_rollouts(teacher, prompts, tokenizer, *, cfg, seed: int) -> tuple[list[tuple[tuple, list[int]]], dict]:
    """``([(prompt ids, response ids)], stats)``: one accepted teacher response per prompt where any of
    ``cfg.max_attempts`` samples passes the filters."""
    accepted: dict[int, list[int]] = {}
    pending = list(range(len(prompts)))
    rejected = Counter()
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p)
    for attempt in range(cfg.max_attempts):
        if not pending:
            break
        result = generate(
            teacher,
            [list(prompts[i].ids) for i in pending],
            max_new_tokens=cfg.max_new_tokens,
            sampling=sampling,
            stop_token_ids=tokenizer.stop_ids,
            rng=jax.random.fold_in(jax.random.key(seed), attempt),
            pad_id=tokenizer.pad_id,
        )
        still = []
        for row, i in enumerate(pending):
            reason = rejection(tokenizer.decode(result.row_tokens(row)), result.finish_reasons[row], cfg.require)
            if reason is None:
                accepted[i] = result.row_tokens(row)
            else:
                rejected[reason] += 1
                still.append(i)
        pending = still
    pairs = [(prompts[i].ids, accepted[i]) for i in sorted(accepted)]
    return pairs, {"accepted": len(pairs), "prompts": len(prompts), **{f"rejected_{k}": v for k, v in rejected.items()}}


class SFTSource:
    """Rows ``prompt + response`` (right-padded to ``width``) with the loss on the response tokens only;
    step s takes rows ``(s-1)·B .. s·B`` cyclically (stateless, resumable)."""

    def __init__(self, pairs, *, rows: int, width: int, pad_id: int):
        if not pairs:
            raise ValueError("distill.cold_start: no teacher rollout passed the filters; nothing to fine-tune on")
        self.pairs, self.rows, self.width, self.pad = pairs, rows, width, pad_id

    def next_batch(self, step: int, trainer) -> dict:
        tokens = np.full((self.rows, self.width + 1), self.pad, np.int32)
        mask = np.zeros((self.rows, self.width), np.float32)
        for r in range(self.rows):
            prompt, response = self.pairs[((step - 1) * self.rows + r) % len(self.pairs)]
            seq = (list(prompt) + list(response))[: self.width + 1]
            tokens[r, : len(seq)] = seq
            mask[r, len(prompt) - 1 : len(seq) - 1] = 1.0
        return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        del state


def write_rollouts(path: Path, pairs, tokenizer) -> None:
    """The accepted teacher rollouts as JSONL (``prompt``, ``response`` text and ids): the cold start's
    cache (a resumed SFT reads them back) and something to inspect."""
    import json

    from minicpm_jax.eval.report import atomic_write_text

    lines = [
        json.dumps(
            {
                "prompt": tokenizer.decode(p),
                "response": tokenizer.decode(r),
                "prompt_ids": list(map(int, p)),
                "response_ids": list(map(int, r)),
            }
        )
        for p, r in pairs
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")
