"""Run metrics: JSONL file + TensorBoard (tensorboardX), appended across resumes (``rewind`` first drops
the records of steps after the resumed one, so ``metrics.jsonl`` never repeats a step). A logger made with
``enabled=False`` (every process but the first of a multi-host run) writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from tensorboardX import SummaryWriter


class MetricsLogger:
    """``log(step, {name: value})`` to ``metrics.jsonl`` and TensorBoard under ``directory``."""

    def __init__(self, directory: str | Path, *, enabled: bool = True):
        self.directory, self.enabled = Path(directory), enabled
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.directory / "metrics.jsonl", "a", buffering=1)
        self.tb = SummaryWriter(str(self.directory / "tensorboard"))

    def rewind(self, step: int) -> None:
        """Drop the JSONL records of steps after ``step`` (rewritten via a temp file)."""
        if not self.enabled:
            return
        path = self.directory / "metrics.jsonl"
        self.jsonl.close()
        kept = [r for r in read_metrics(self.directory) if r.get("step", 0) <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
        self.jsonl = open(path, "a", buffering=1)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items() if v is not None}
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        self.tb.close()


def read_metrics(directory: str | Path) -> list[dict]:
    """All records of a run's ``metrics.jsonl``."""
    path = Path(directory) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
