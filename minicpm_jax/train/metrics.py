"""Run metrics: JSONL file + TensorBoard (tensorboardX), appended across resumes (``rewind`` first drops
the records of steps after the resumed one, so ``metrics.jsonl`` never repeats a step). A logger made with
``enabled=False`` (every process but the first of a multi-host run) writes nothing.

The directory goes through ``minicpm_jax.paths``. Locally ``metrics.jsonl`` is appended line by line.
On a remote store (``gs://``, ``s3://``, ``memory://``), which cannot append, the logger keeps the
records and rewrites the whole object after every ``log`` (each write is atomic; its cost grows with the
file), and TensorBoard event files are written through the same layer (rewritten on each flush).
"""

from __future__ import annotations

import json
from pathlib import Path

from tensorboardX import SummaryWriter, record_writer

from minicpm_jax.paths import as_path, is_remote, replace


class _RecordWriter:
    """A tensorboardX record writer on a remote path: buffers the event file, rewrites it on flush."""

    def __init__(self, path: str):
        self.path, self.data = as_path(path), bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def flush(self) -> None:
        self.path.write_bytes(bytes(self.data))

    def close(self) -> None:
        self.flush()


class _RecordWriterFactory:
    def open(self, path: str) -> _RecordWriter:
        return _RecordWriter(path)

    def directory_check(self, path: str) -> None:
        as_path(path).mkdir(parents=True, exist_ok=True)


for _scheme in ("gs", "s3", "memory"):  # one path layer for events too (gcsfs / s3fs, not boto3 / google-cloud)
    record_writer.register_writer_factory(_scheme, _RecordWriterFactory())


class MetricsLogger:
    """``log(step, {name: value})`` to ``metrics.jsonl`` and TensorBoard under ``directory``."""

    def __init__(self, directory: str | Path, *, enabled: bool = True):
        self.directory, self.enabled = as_path(directory), enabled
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.records: list[str] | None = None  # remote: every line, rewritten on each log
        self._open()
        self.tb = SummaryWriter(str(self.directory / "tensorboard"))

    def _open(self) -> None:
        path = self.directory / "metrics.jsonl"
        if is_remote(path):
            self.records = [json.dumps(r) + "\n" for r in read_metrics(self.directory)]
        else:
            self.jsonl = open(path, "a", buffering=1)  # noqa: SIM115 - held open across log calls

    def rewind(self, step: int) -> None:
        """Drop the JSONL records of steps after ``step`` (rewritten via a temp file)."""
        if not self.enabled:
            return
        path = self.directory / "metrics.jsonl"
        if self.records is None:
            self.jsonl.close()
        kept = [r for r in read_metrics(self.directory) if r.get("step", 0) <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        replace(tmp, path)
        self._open()

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items() if v is not None}
        line = json.dumps({"step": step, **values}) + "\n"
        if self.records is None:
            self.jsonl.write(line)
        else:
            self.records.append(line)
            (self.directory / "metrics.jsonl").write_text("".join(self.records))
        for k, v in values.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.records is None:
            self.jsonl.close()
        self.tb.close()


def read_metrics(directory: str | Path) -> list[dict]:
    """All records of a run's ``metrics.jsonl``."""
    path = as_path(directory) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
