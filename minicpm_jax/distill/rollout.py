"""On-policy batches (spec/opd.md 5 steps 1-5): the engine's ``BatchSource`` that, at every step, rolls
out ``n`` responses per prompt from the *current* student parameters, scores them with the student
(no gradient) and the frozen teacher, and returns the rows with every stored array.

Prompts of step s are ``prompts[(s-1)·P : s·P]`` (cyclic) and the sampling key is
``fold_in(key(seed), s)``: a batch depends only on the step and the parameters, so a resumed run
rebuilds exactly the batches it would have seen (the source has no state to checkpoint). With
``lmbda < 1`` (GKD's mixing) a step samples from the teacher instead with probability ``1 - lmbda``.
With ``teacher`` given, the teacher lives on its own devices (not in the engine's frozen state) and
only token ids and ``[B, T, k]`` arrays move between the two meshes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jax
import numpy as np

from minicpm_jax.distill.scores import score_on_two_meshes, score_rollouts
from minicpm_jax.generate.engine import generate
from minicpm_jax.generate.sampling import SamplingParams
from minicpm_jax.train.sources import global_batch

_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]  # chat-formatted prompt token ids
    answer: str | None = None  # reference answer for the verifiable reward (None: no reward)


def final_number_reward(completion: str, answer: str) -> float:
    """1.0 when the last integer of the completion equals the last integer of the answer (the synthetic
    arithmetic task's verifiable reward), else 0.0."""
    got, want = _NUMBER.findall(completion), _NUMBER.findall(answer)
    return float(bool(got) and bool(want) and got[-1] == want[-1])


def group_advantages(rewards: np.ndarray, n: int) -> np.ndarray:
    """GRPO outcome advantages: rewards standardised within each group of ``n`` rollouts of a prompt."""
    r = rewards.reshape(-1, n)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)).reshape(-1)


class RolloutSource:
    """``prompts_per_step x n`` rows of ``max_prompt_tokens + max_new_tokens`` tokens per step."""

    def __init__(
        self,
        prompts: list[Prompt],
        *,
        tokenizer,
        n: int,
        prompts_per_step: int,
        max_prompt_tokens: int,
        max_new_tokens: int,
        k: int,
        seed: int = 0,
        chunk_tokens: int = 1024,
        lmbda: float = 1.0,
        teacher=None,
    ):
        long = [i for i, p in enumerate(prompts) if len(p.ids) > max_prompt_tokens]
        if long:
            raise ValueError(
                f"distill: prompt {long[0]} has {len(prompts[long[0]].ids)} tokens > rollout.max_prompt_tokens "
                f"{max_prompt_tokens} ({len(long)} prompt(s) too long)"
            )
        if not prompts:
            raise ValueError("distill: no prompts")
        self.prompts, self.tok = prompts, tokenizer
        self.n, self.per_step, self.k, self.seed, self.chunk = n, prompts_per_step, k, seed, chunk_tokens
        self.width = max_prompt_tokens + max_new_tokens
        self.max_new_tokens = max_new_tokens
        self.lmbda, self.teacher = lmbda, teacher

    @property
    def rows(self) -> int:
        return self.n * self.per_step

    def prompts_of(self, step: int) -> list[Prompt]:
        return [self.prompts[((step - 1) * self.per_step + j) % len(self.prompts)] for j in range(self.per_step)]

    def rollout(self, step: int, model) -> tuple[dict[str, np.ndarray], list[str]]:
        """The rows of ``step`` sampled from ``model`` at temperature 1 (no scores yet) and the decoded responses."""
        rows = [p for p in self.prompts_of(step) for _ in range(self.n)]
        result = generate(
            model,
            [list(p.ids) for p in rows],
            max_new_tokens=self.max_new_tokens,
            sampling=SamplingParams(temperature=1.0),
            stop_token_ids=self.tok.stop_ids,
            rng=jax.random.fold_in(jax.random.key(self.seed), step),
            pad_id=self.tok.pad_id,
        )
        tokens = np.full((len(rows), self.width), self.tok.pad_id, np.int32)
        mask = np.zeros((len(rows), self.width - 1), np.float32)
        for i, p in enumerate(rows):
            response = result.row_tokens(i)
            tokens[i, : len(p.ids) + len(response)] = list(p.ids) + response
            mask[i, len(p.ids) - 1 : len(p.ids) - 1 + len(response)] = 1.0  # logits at i score token i+1
        texts = [self.tok.decode(result.row_tokens(i)) for i in range(len(rows))]
        rewards = np.array(
            [final_number_reward(t, p.answer) if p.answer is not None else 0.0 for t, p in zip(texts, rows)]
        )
        batch = {
            "input_ids": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "loss_mask": mask,
            "response_length": mask.sum(1),
            "truncated": np.array([r == "length" for r in result.finish_reasons], np.float32),
            "reward": rewards.astype(np.float32),
            "grpo_adv": np.repeat(group_advantages(rewards, self.n)[:, None], self.width - 1, 1).astype(np.float32),
        }
        return batch, texts

    def on_policy(self, step: int) -> bool:
        """GKD's mixing: step ``step`` samples from the student with probability ``lmbda``, else from the teacher."""
        draw = jax.random.uniform(jax.random.fold_in(jax.random.key(self.seed + 1), step))
        return self.lmbda >= 1.0 or float(draw) < self.lmbda

    def next_batch(self, step: int, trainer) -> dict:
        on_policy = self.on_policy(step)
        teacher = self.teacher
        if not on_policy and teacher is None:
            teacher = trainer.frozen.value()["teacher"]
        batch, _ = self.rollout(step, trainer.model() if on_policy else teacher)
        batch["on_policy"] = np.full(len(batch["reward"]), float(on_policy), np.float32)
        placed = global_batch(trainer.mesh, batch)
        ids = {"input_ids": placed["input_ids"], "targets": placed["targets"]}
        params = trainer.state["params"]
        if self.teacher is not None:  # the teacher on its own devices
            scores = score_on_two_meshes(trainer.graphdef, params, self.teacher, ids, self.k, self.chunk, trainer.mesh)
        else:
            f = trainer.frozen
            scores = score_rollouts(trainer.graphdef, f.graphdef, params, f.arrays, ids, self.k, self.chunk)
        return {**placed, **scores}

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        del state
