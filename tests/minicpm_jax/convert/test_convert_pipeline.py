"""``minicpm-jax convert``: a multi-stage recipe killed in stage 2 resumes there and finishes; the
export imports back bit-exactly; bad recipes fail with one clear line each."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from minicpm_jax.ckpt import load_model, save_model
from minicpm_jax.cli import main
from minicpm_jax.config import load_config
from minicpm_jax.interop import load_hf_checkpoint
from minicpm_jax.model import create_model

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = ROOT / "tests" / "data" / "minicpm4-tokenizer"


def _recipe(tmp_path: Path, teacher: str, **convert) -> Path:
    (tmp_path / "heldout.txt").write_text("kv abc=41 xyz=07 | xyz? 07\n47+38: 40+30=70, 7+8=15, 70+15=85\n")
    recipe = {
        "teacher": teacher,
        "output_dir": str(tmp_path / "run"),
        "dtype": "float32",
        "param_dtype": "float32",
        "data": {"source": "synthetic", "seq_len": 32, "synthetic_documents": 400, "eval_documents": 8},
        "optimizer": {"learning_rate": 0.01, "schedule": "constant"},
        "train": {"global_batch_size": 4, "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1},
        "sparse_config": load_config("tiny-sala").model.sparse_config.model_dump(),  # dense_len 64
        "convert": {
            "softmax_ratio": 0.75,
            "selection": {
                "batch_size": 4,
                "commonsense": [
                    {
                        "task": "perplexity",
                        "metric": "bits_per_byte",
                        "higher_is_better": False,
                        "paths": ["heldout.txt"],
                    }
                ],
                "retrieval": [{"task": "mqar", "metric": "acc", "num_pairs": [2], "num_samples": 2}],
            },
            **convert,
        },
        "stages": [
            {"name": "align", "loss": "align", "train": {"steps": 2}},
            {"name": "distill", "loss": "kl", "train": {"steps": 12}},
            {"name": "continual", "loss": "lm", "sparse": True, "data": {"seq_len": 80}, "train": {"steps": 2}},
        ],
    }
    path = tmp_path / "convert.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _teacher(tmp_path: Path) -> Path:
    cfg = load_config("tiny-minicpm4", ["model.num_hidden_layers=4", "model.vocab_size=320"]).model
    return save_model(create_model(cfg, seed=1, dtype=jnp.float32), cfg, tmp_path / "teacher", tokenizer_source="byte")


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_sigkill_in_stage_two_resumes_there_and_the_export_imports_back(tmp_path):
    recipe = _recipe(tmp_path, str(_teacher(tmp_path)))
    command = [sys.executable, "-m", "minicpm_jax.cli", "convert", "--config", str(recipe)]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "run" / "stage-2-distill" / "checkpoints"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the conversion finished (or failed) before it could be killed"
    assert not (tmp_path / "run" / "stage-2-distill" / "final").exists()
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    out = " ".join(rerun.stdout.split())
    assert "stage 0 transfer: done" in out and "stage 1 align: done" in out and "selection: done" in out
    assert f"resumed from {checkpoints}" in out
    run = tmp_path / "run"
    summary = json.loads((run / "conversion.json").read_text())
    assert summary["stages"]["distill"]["steps"] == 12 and summary["stages"]["continual"]["steps"] == 2
    selection = json.loads((run / "selection" / "selection.json").read_text())
    assert [r["layer"] for r in selection["rows"]] == [1, 2]  # first and last are not candidates
    kinds = summary["mixer_types"]
    assert (
        kinds[0] == kinds[3] == "minicpm4"
        and kinds.count("minicpm4") == 3
        and (run / "selection" / "scores.png").is_file()
    )
    final_cfg, final = load_model(run / "stage-3-continual" / "final", dtype=jnp.float32)
    assert final_cfg.sparse_config is not None and list(final_cfg.layer_mixers) == kinds
    hf_cfg, hf = load_hf_checkpoint(run / "export-hf", dtype=jnp.float32)
    assert hf_cfg.model_type == "minicpm_sala" and list(hf_cfg.layer_mixers) == kinds
    jax.tree.map(np.testing.assert_array_equal, _params(hf), _params(final))


@pytest.mark.parametrize(
    "teacher, overrides, message",
    [
        ("tiny-sala", [], "the teacher is already a hybrid"),
        (
            "tiny-minicpm4",
            ["convert.mixer_types=[minicpm4, lightning-attn, minicpm4]"],
            "has 3 entries, the teacher has 2",
        ),
        ("tiny-minicpm4", ["convert.softmax_ratio=0.1", "convert.keep_first_last=false"], "rounds to 0 softmax layers"),
        (
            "tiny-minicpm4",
            ["convert.mixer_types=[lightning-attn, lightning-attn]"],
            "no softmax ('minicpm4') layer; keep at least one",
        ),
        (
            "tiny-minicpm4",
            [f"data.tokenizer={TOKENIZER}", "convert.mixer_types=[minicpm4, lightning-attn]"],
            "larger than model.vocab_size 512",
        ),
        ("tiny-minicpm4", ["stages.nosuch.train.steps=3"], "no stage named 'nosuch'"),
        ("tiny-minicpm4", ["stages.distill.optimizer.schedule=linear"], "stages.distill: optimizer.schedule"),
    ],
)
def test_bad_recipes_fail_with_one_clear_error(tmp_path, capsys, teacher, overrides, message):
    recipe = _recipe(tmp_path, teacher)
    assert main(["convert", "--config", str(recipe), *overrides]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error:" in err and message in err, err
    assert not (tmp_path / "run" / "stage-0-transfer").exists()


def test_plan_compiles_every_stage_with_the_teacher_as_frozen_state(tmp_path):
    from minicpm_jax.config import MeshConfig
    from minicpm_jax.convert import load_convert_recipe
    from minicpm_jax.convert.plan import plan_conversion

    recipe = load_convert_recipe(_recipe(tmp_path, str(_teacher(tmp_path))))
    rows = plan_conversion(recipe, [MeshConfig(fsdp=4, tensor=2)], [8])
    assert [label for label, _ in rows] == ["1-align (align)", "2-distill (kl)", "3-continual (lm)"]
    resident = {label.split()[0]: row.argument_bytes for label, row in rows}
    assert all(row.temp_bytes > 0 and row.seq_len == s for (_, row), s in zip(rows, (32, 32, 80)))
    # the LM stage has no teacher but trains everything (optimizer moments for all parameters)
    assert resident["3-continual"] > resident["1-align"] and not (tmp_path / "run").exists()


def test_without_keep_first_last_every_layer_is_a_candidate_and_the_budget_is_kept(tmp_path):
    """keep_first_last=false and no mixer_types: stage 1 aligns an all-Lightning model (allowed only
    there), selection scores all 4 layers and keeps exactly round(0.25 * 4) = 1 softmax layer."""
    from minicpm_jax.convert import load_convert_recipe, run_conversion

    path = _recipe(tmp_path, str(_teacher(tmp_path)), softmax_ratio=0.25, keep_first_last=False, export_hf=False)
    recipe = load_convert_recipe(
        path, ["stages=[{name: align, loss: align, train: {steps: 1}}]", "train.global_batch_size=8"]
    )
    summary = run_conversion(recipe)
    aligned = load_model(tmp_path / "run" / "stage-0-transfer")[0]
    assert aligned.layer_mixers == ("lightning-attn",) * 4
    selection = json.loads((tmp_path / "run" / "selection" / "selection.json").read_text())
    assert [r["layer"] for r in selection["rows"]] == [0, 1, 2, 3]
    assert summary["mixer_types"].count("minicpm4") == 1
    kept = [r["layer"] for r in selection["rows"] if r["softmax"]]
    assert summary["mixer_types"][kept[0]] == "minicpm4" and len(kept) == 1
