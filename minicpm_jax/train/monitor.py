"""Step metrics without a host sync per step: buffered on device, fetched every ``log_every`` steps.

``push`` keeps each step's (tiny, on-device) metrics; ``flush`` fetches them in one transfer,
reports skipped (non-finite) steps, raises ``TrainingDiverged`` at the exact step where the run of
non-finite steps reached the limit, logs the newest step's values (engine metrics, loss ``aux``
scalars, tokens/s, MFU) to JSONL / TensorBoard and the progress bar. The skip itself happens on
device (``train.step``), so between flushes the host only enqueues work and prepares input.
"""

from __future__ import annotations

import time

import jax
from rich.console import Console

from minicpm_jax.train.metrics import MetricsLogger

LOGGED = ("loss", "grad_norm", "learning_rate", "skipped_steps")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps."""


class StepMonitor:
    """Buffers per-step metrics and flushes them to the logger."""

    def __init__(
        self,
        logger: MetricsLogger,
        console: Console,
        *,
        max_consecutive_nonfinite: int,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ):
        self.logger, self.console = logger, console
        self.max_consecutive = max_consecutive_nonfinite
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.pending: list[tuple[int, dict, int]] = []
        self.losses: list[float] = []  # finite steps' losses, in order
        self.tick = time.perf_counter()

    def push(self, step: int, metrics: dict, tokens: int) -> None:
        self.pending.append((step, metrics, tokens))

    def flush(self) -> dict | None:
        """Fetch, check and log the buffered steps; returns the newest step's host values (or None),
        with ``aux_summary``, a short text of the first aux metrics for the progress bar."""
        if not self.pending:
            return None
        steps, fetched, tokens = zip(*self.pending)
        fetched = jax.device_get(list(fetched))
        self.pending = []
        now = time.perf_counter()
        elapsed, self.tick = now - self.tick, now
        for step, m in zip(steps, fetched):
            if bool(m["finite"]):
                self.losses.append(float(m["loss"]))
                continue
            n, total = int(m["consecutive_nonfinite"]), int(m["skipped_steps"])
            self.console.print(
                f"[yellow]step {step}: non-finite loss/gradient, update skipped ({n} in a row, {total} total)[/]"
            )
            if n >= self.max_consecutive:
                raise TrainingDiverged(
                    f"{n} consecutive non-finite steps (train.max_consecutive_nonfinite={self.max_consecutive}) "
                    f"at step {step}; stopping"
                )
        newest = fetched[-1]
        tokens_per_s = sum(tokens) / elapsed
        values = {k: float(newest[k]) for k in LOGGED}
        aux = {k: float(v) for k, v in newest["aux"].items()}
        values.update(aux)
        values["tokens_per_s"] = tokens_per_s
        if self.peak and self.flops_per_token:
            values["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * jax.device_count())
        self.logger.log(steps[-1], values)
        values["aux_summary"] = "  ".join(f"{k} {v:.4g}" for k, v in list(aux.items())[:3])
        return values
