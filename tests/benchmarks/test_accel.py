"""benchmarks/accel.py in its CPU smoke mode: every row kind measured, the table printed, the JSON written."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"dense", "infllm", "lightning", "mfu", "prefill", "decode"}
HEADER = "| row | T | mode | impl | status | time ms | TFLOP/s | % roofline | speedup | note |"


def test_accel_cpu_smoke(tmp_path):
    out = tmp_path / "accel.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accel.py"), "--cpu-smoke", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert HEADER in proc.stdout
    result = json.loads(out.read_text())
    assert result["cpu_smoke"] and result["backend"] == "cpu"
    assert {r["kind"] for r in result["rows"]} == KINDS
    for r in result["rows"]:
        assert r["status"] == "ok", r
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0, r
        assert f"| {r['kind']} | {r['T']} | {r['mode']} | {r['impl']} | ok |" in proc.stdout
    modes = {(r["kind"], r["mode"]) for r in result["rows"]}
    assert {(k, m) for k in ("dense", "infllm", "lightning") for m in ("fwd", "fwd+bwd")} <= modes
    mfu = next(r for r in result["rows"] if r["kind"] == "mfu")
    assert 0 < mfu["mfu"] and mfu["tokens_per_s"] > 0
    assert all(r["speedup"] > 0 for r in result["rows"] if r["kind"] in ("prefill", "decode"))
