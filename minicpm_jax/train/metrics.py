"""Run metrics: JSONL file + TensorBoard (tensorboardX), appended across resumes."""

from __future__ import annotations

import json
from pathlib import Path

from tensorboardX import SummaryWriter


class MetricsLogger:
    """``log(step, {name: value})`` to ``metrics.jsonl`` and TensorBoard under ``directory``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.directory / "metrics.jsonl", "a", buffering=1)
        self.tb = SummaryWriter(str(self.directory / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None}
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def read_metrics(directory: str | Path) -> list[dict]:
    """All records of a run's ``metrics.jsonl``."""
    path = Path(directory) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
