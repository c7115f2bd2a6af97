"""``minicpm-jax distill plot RUN_DIR``: the OPD paper's diagnostic panels from a run's ``metrics.jsonl``
(spec/opd.md 6): overlap ratio, overlap-token advantage (both definitions), entropy gap with both
entropies, overlap and top-k mass, all vs step; and, when per-position-chunk entropies were logged
(``opd/<student|teacher>_entropy_chunk_<i>``), a response position x step heat map of each entropy.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from minicpm_jax.eval import plots
from minicpm_jax.train.metrics import read_metrics

PANELS = {
    "overlap_ratio": (["overlap_ratio"], "top-k overlap ratio", (0.0, 1.02)),
    "overlap_advantage": (["overlap_token_adv", "overlap_token_adv_code"], "overlap-token advantage", None),
    "entropy": (["entropy_gap", "student_entropy", "teacher_entropy"], "entropy (nats)", None),
    "overlap_mass": (
        ["overlap_mass_student", "overlap_mass_teacher", "topk_mass_student", "topk_mass_teacher"],
        "probability mass",
        (0.0, 1.02),
    ),
}
MAX_COLUMNS = 16  # steps shown in the heat maps
_CHUNK = re.compile(r"^opd/(student|teacher)_entropy_chunk_(\d+)$")


def plot_run(run_dir: str | Path) -> list[str]:
    """Writes ``RUN_DIR/plots/*.png``; returns their paths."""
    records = [r for r in read_metrics(run_dir) if "opd/overlap_ratio" in r]
    if not records:
        raise FileNotFoundError(f"distill plot: no distillation metrics in {Path(run_dir) / 'metrics.jsonl'}")
    out, steps, written = Path(run_dir) / "plots", [r["step"] for r in records], []
    for name, (keys, ylabel, ylim) in PANELS.items():
        series = {k: [r.get(f"opd/{k}", np.nan) for r in records] for k in keys if f"opd/{k}" in records[-1]}
        if series:
            written.append(
                plots.curves(
                    out / f"{name}.png",
                    steps,
                    series,
                    title=name.replace("_", " "),
                    xlabel="step",
                    ylabel=ylabel,
                    ylim=ylim,
                )
            )
    for who in ("student", "teacher"):
        chunks = sorted({int(m.group(2)) for k in records[-1] if (m := _CHUNK.match(k)) and m.group(1) == who})
        if chunks:
            picked = [records[i] for i in np.unique(np.linspace(0, len(records) - 1, MAX_COLUMNS).astype(int))]
            grid = np.array([[r.get(f"opd/{who}_entropy_chunk_{c}", np.nan) for r in picked] for c in chunks])
            written.append(
                plots.heatmap(
                    out / f"{who}_entropy_by_position.png",
                    grid,
                    [f"{c}/{len(chunks)}" for c in chunks],
                    [r["step"] for r in picked],
                    title=f"{who} entropy: response position x step",
                    xlabel="step",
                    ylabel="response position chunk",
                    vmin=float(np.nanmin(grid)),
                    vmax=float(np.nanmax(grid)),
                )
            )
    return written
