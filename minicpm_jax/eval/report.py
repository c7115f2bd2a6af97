"""Evaluation reports and progress: ``report.json`` (every number, the options, the config, the model
source), ``report.md`` (a Markdown table of metrics per task, then each task's rows), both written
atomically (locally a temp file, then rename; on ``gs://`` / ``s3://`` / ``memory://`` through
``minicpm_jax.paths`` one object write, which those stores make atomic); ``progress`` is a rich progress bar with ETA over requests.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from minicpm_jax.paths import as_path, is_remote

MAX_MD_ROWS = 50  # rows shown per task in report.md (report.json keeps them all)


@contextlib.contextmanager
def progress(total: int, description: str) -> Iterator:
    """``with progress(n, "task") as advance: ... advance(k)``: a progress bar with ETA (off when
    ``MINICPM_JAX_NO_PROGRESS`` is set or stdout is not a terminal)."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        transient=True,
        disable=bool(os.environ.get("MINICPM_JAX_NO_PROGRESS")) or not Console().is_terminal,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory, then rename (a remote path:
    one object write, atomic on object stores)."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        path.write_text(text, encoding="utf-8")
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy / jax scalars
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"
    text = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)
    return text.replace("|", "\\|").replace("\n", "\\n")


def markdown(report: dict) -> str:
    """The Markdown text of a report (see ``write_report``)."""
    lines = [f"# Evaluation of `{report.get('source', '?')}`", ""]
    results = report["results"]
    lines += ["| task | metric | value |", "|---|---|---|"]
    for name, res in results.items():
        for metric, value in res["metrics"].items():
            lines.append(f"| {name} | {metric} | {_fmt(value)} |")
    for name, res in results.items():
        lines += ["", f"## {name}", "", f"options: `{json.dumps(res.get('options', {}), sort_keys=True)}`"]
        lines += [f"time: {res.get('seconds', 0.0):.1f} s"]
        for plot in res.get("plots", []):
            lines += ["", f"![{name}]({plot})"]
        rows = res.get("rows", [])
        if rows:
            cols = list(dict.fromkeys(k for row in rows for k in row))
            lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for row in rows[:MAX_MD_ROWS]:
                lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
            if len(rows) > MAX_MD_ROWS:
                lines.append(f"\n({len(rows) - MAX_MD_ROWS} more rows in report.json)")
    return "\n".join(lines) + "\n"


def write_report(output_dir: str | Path, results: dict, *, source: str, config: dict | None = None) -> dict:
    """Write ``report.json`` and ``report.md`` into ``output_dir``; returns the report dict.

    ``results``: ``{task label: {"task", "options", "metrics", "rows", "plots", "seconds"}}`` (what
    ``minicpm_jax.eval.evaluate`` returns). Only process 0 writes."""
    report = _jsonable({"source": source, "config": config or {}, "results": results})
    if jax.process_index() != 0:  # multi-host: process 0 alone writes
        return report
    out = as_path(output_dir)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "report.md", markdown(report))
    return report
