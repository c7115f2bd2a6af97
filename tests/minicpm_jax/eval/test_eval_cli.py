"""``minicpm-jax eval`` on a saved tiny checkpoint with the shipped recipe: report.json and report.md."""

import json

import jax.numpy as jnp
import pytest

from minicpm_jax import cli
from minicpm_jax.ckpt import save_model
from minicpm_jax.config import CONFIG_DIR, load_config
from minicpm_jax.model import create_model

RECIPE = CONFIG_DIR / "recipes" / "eval-tiny.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config("tiny-minicpm4").model
    model = create_model(cfg, seed=0, dtype=jnp.float32)
    return save_model(model, cfg, tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer_source="byte")


def test_eval_cli_writes_reports(checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["eval", "--checkpoint", str(checkpoint), "--config", str(RECIPE), "--output", str(out)]
    argv += ["tasks.arithmetic.num_examples=3", "tasks.copy.num_examples=3", "dtype=float32"]
    assert cli.main(argv) == 0, capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    results = report["results"]
    assert set(results) == {"perplexity", "multiple_choice", "arithmetic", "copy"}
    ppl = results["perplexity"]["metrics"]
    assert ppl["documents"] == 24 and ppl["perplexity"] > 1 and ppl["bits_per_byte"] > 0
    assert results["multiple_choice"]["metrics"]["examples"] == 16 and len(results["copy"]["rows"]) == 3
    assert results["arithmetic"]["options"]["num_examples"] == 3 and report["source"] == str(checkpoint)
    assert report["config"]["run"]["dtype"] == "float32" and report["config"]["batch_size"] == 8
    md = (out / "report.md").read_text()
    assert "| perplexity | bits_per_byte |" in md and "## copy" in md
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_eval_cli_errors(checkpoint, tmp_path, capsys):
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--tasks", "nope"]) == 2
    assert "unknown eval task(s) ['nope']" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--config", str(tmp_path / "no.yaml")]) == 2
    assert "--config: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("taskz: {}\n")
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--config", str(bad)]) == 2
    assert "taskz: unknown key" in capsys.readouterr().err
