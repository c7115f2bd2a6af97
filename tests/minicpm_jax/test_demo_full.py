"""``minicpm-jax demo --full --smoke``: every step runs and writes its artefacts with finite numbers, and
the report is exactly ``render_report`` of the run's JSON (no number in it that the run did not produce)."""

import json
import math

import pytest

from minicpm_jax import cli
from minicpm_jax.demo_report import render_report

PNGS = [
    "pretrain_loss.png",
    "passkey_dense.png",
    "passkey_sparse.png",
    "selection_scores.png",
    "opd_accuracy.png",
    "opd_overlap.png",
    "opd_0_overlap_ratio.png",
    "opd_1_overlap_ratio.png",
]
EXPORTS = ["hybrid-minicpm", "student-minicpm", "student-llama"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("demo-full")
    assert cli.main(["demo", "--full", "--smoke", "--output", str(out)]) == 0
    return out


def _numbers(node):
    if isinstance(node, dict):
        return [x for v in node.values() for x in _numbers(v)]
    if isinstance(node, list):
        return [x for v in node for x in _numbers(v)]
    return [node] if isinstance(node, (int, float)) and not isinstance(node, bool) else []


@pytest.mark.torch
def test_smoke_writes_every_artefact_with_finite_numbers(smoke):
    report = json.loads((smoke / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["pretrain", "sparse", "conversion", "opd", "evaluate_all", "export"]
    for png in PNGS:
        assert (smoke / png).stat().st_size > 0, png
    for name in EXPORTS:
        assert (smoke / "export" / name / "config.json").is_file(), name
    numbers = _numbers(report)
    assert len(numbers) > 50 and all(math.isfinite(x) for x in numbers)
    assert len(report["eval"]) == 9 and report["conversion"]["mixer_types"].count("minicpm4") == 3
    assert all(v < 1e-3 for v in report["export"]["max_abs_logit_diff"].values()), report["export"]


@pytest.mark.torch
def test_report_is_rendered_from_the_json(smoke):
    report = json.loads((smoke / "report.json").read_text())
    text = (smoke / "report.md").read_text()
    assert render_report(report) == text
    assert f"{report['sparse']['prefill_ratio']:.2f}" in text and all(png in text for png in PNGS)
