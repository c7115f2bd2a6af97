"""PNG plots of evaluation results (matplotlib, Agg backend): accuracy heatmaps and line curves.

Every writer renders into a temporary file beside the target and renames it into place, so a plot
appears complete or not at all. Returns the path written (a string, for ``TaskResult.plots``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _figure().close(fig)
    return str(path)


def heatmap(
    path: str | Path,
    values: np.ndarray,
    row_labels: Sequence,
    col_labels: Sequence,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> str:
    """A ``[rows, cols]`` grid of values in [vmin, vmax] (e.g. accuracy per length x depth), annotated."""
    values = np.asarray(values, dtype=float)
    if values.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"heatmap: values {values.shape} vs {len(row_labels)} row and {len(col_labels)} column labels")
    plt = _figure()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(col_labels), 1.0 + 0.5 * len(row_labels)))
    im = ax.imshow(values, cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def curves(
    path: str | Path,
    x: Sequence,
    series: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "accuracy",
    logx: bool = False,
    ylim: tuple[float, float] | None = (0.0, 1.02),
) -> str:
    """One line per ``series`` entry (label -> y values at ``x``), with markers."""
    bad = {k: len(v) for k, v in series.items() if len(v) != len(x)}
    if bad:
        raise ValueError(f"curves: series lengths {bad} differ from len(x) = {len(x)}")
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, y in series.items():
        ax.plot(list(x), list(y), marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 or any(series):
        ax.legend()
    return _save(fig, path)


def bars(
    path: str | Path,
    labels: Sequence,
    values: Sequence[float],
    *,
    highlight: Sequence[bool] = (),
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
) -> str:
    """A bar per label (e.g. a score per layer); ``highlight``ed bars are drawn in a second colour."""
    if len(labels) != len(values):
        raise ValueError(f"bars: {len(labels)} labels vs {len(values)} values")
    plt = _figure()
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(labels), 3.5))
    marked = list(highlight) or [False] * len(labels)
    ax.bar([str(x) for x in labels], list(values), color=["tab:orange" if m else "tab:blue" for m in marked])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
