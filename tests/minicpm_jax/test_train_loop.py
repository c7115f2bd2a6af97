"""The training loop: loss falls, crash-safe bit-exact resume, checkpoint fallback, mesh change, divergence."""

import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_testutil import SMALL_RUN

from minicpm_jax.ckpt import load_model
from minicpm_jax.config import load_recipe
from minicpm_jax.interop import save_hf_checkpoint
from minicpm_jax.train.loop import TrainingDiverged, run_training
from minicpm_jax.train.metrics import read_metrics

RECIPE = "configs/recipes/pretrain-tiny.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(out, *overrides):
    return load_recipe(os.path.join(ROOT, RECIPE), [f"train.output_dir={out}", *SMALL_RUN, *overrides])


def _final_params(out):
    _, model = load_model(os.path.join(out, "final"))
    return [np.asarray(x) for x in jax.tree.leaves(model)]


def test_loss_falls_on_synthetic_corpus(tmp_path):
    summary = run_training(
        _cfg(tmp_path / "run", "train.steps=80", "optimizer.decay_steps=20", "train.checkpoint_every=80")
    )
    assert summary["steps"] == 80 and summary["skipped_steps"] == 0
    assert summary["last_loss"] < 0.6 * summary["first_loss"], summary
    assert summary["eval_loss"] < 0.6 * summary["first_loss"], summary
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 81))
    assert all(k in records[-1] for k in ("grad_norm", "learning_rate", "tokens_per_s", "skipped_steps"))
    assert (tmp_path / "run" / "tensorboard").is_dir() and (tmp_path / "run" / "final" / "model.yaml").is_file()


def _train_command(out, steps):
    return [
        sys.executable,
        "-m",
        "minicpm_jax.cli",
        "train",
        "--config",
        RECIPE,
        f"train.output_dir={out}",
        f"train.steps={steps}",
        "train.checkpoint_every=3",
        *SMALL_RUN,
    ]


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    steps = 40
    subprocess.run(_train_command(tmp_path / "clean", steps), cwd=ROOT, env=env, check=True, capture_output=True)
    kill_at = int(np.random.default_rng().integers(5, 12))
    proc = subprocess.Popen(
        _train_command(tmp_path / "crash", steps),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [r["step"] for r in read_metrics(tmp_path / "crash") if "loss" in r]
        checkpoints = tmp_path / "crash" / "checkpoints"
        finalized = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
        if done and done[-1] >= kill_at and finalized:  # async saves may still be in flight: fine
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "crash" / "final").exists()
    resumed = subprocess.run(
        _train_command(tmp_path / "crash", steps), cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    assert "resumed from" in resumed.stdout
    for a, b in zip(_final_params(tmp_path / "clean"), _final_params(tmp_path / "crash")):
        np.testing.assert_array_equal(a, b)


def test_corrupted_newest_checkpoint_falls_back(tmp_path, caplog):
    out = tmp_path / "run"
    run_training(_cfg(out, "train.steps=6", "train.checkpoint_every=3"))
    newest = out / "checkpoints" / "6" / "state"
    victims = [p for p in newest.rglob("*") if p.is_file() and p.stat().st_size > 0]
    for p in victims:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])  # truncate every file of step 6
    with caplog.at_level(logging.WARNING):
        summary = run_training(_cfg(out, "train.steps=8", "train.checkpoint_every=3"))
    assert "skipping checkpoint step 6" in caplog.text
    assert summary["steps"] == 8
    assert [r["step"] for r in read_metrics(out) if "loss" in r][-5:] == [4, 5, 6, 7, 8]  # redone from step 3


def test_resume_on_a_different_mesh(tmp_path):
    out = tmp_path / "run"
    run_training(_cfg(out, "train.steps=3", "train.checkpoint_every=3", "mesh.fsdp=8", "optimizer.decay_steps=1"))
    summary = run_training(
        _cfg(
            out,
            "train.steps=5",
            "train.checkpoint_every=3",
            "mesh.data=2",
            "mesh.fsdp=2",
            "optimizer.decay_steps=1",
            "mesh.tensor=2",
        )
    )
    assert summary["steps"] == 5 and np.isfinite(summary["last_loss"])


def test_consecutive_non_finite_steps_stop_the_run(tmp_path):
    out = tmp_path / "run"
    run_training(
        _cfg(out, "train.steps=2", "train.checkpoint_every=2", "optimizer.warmup_steps=0", "optimizer.decay_steps=0")
    )

    def nan_loss(model, frozen, batch):
        from minicpm_jax.train.loss import next_token_loss

        loss_sum, aux = next_token_loss(model, frozen, batch)
        return loss_sum * np.nan, aux

    with pytest.raises(TrainingDiverged, match=r"3 consecutive non-finite steps .* at step 5"):
        run_training(
            _cfg(out, "train.steps=10", "train.max_consecutive_nonfinite=3", "train.checkpoint_every=100"),
            loss_fn=nan_loss,
        )
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    skipped = [r["skipped_steps"] for r in read_metrics(out) if "skipped_steps" in r]
    assert skipped[-2:] == [1.0, 2.0]


def test_init_from_exported_checkpoint(tmp_path):
    """Continue from a Hugging Face export: the first loss is the exported model's loss, not a fresh one's."""
    first = run_training(
        _cfg(tmp_path / "a", "train.steps=40", "optimizer.decay_steps=10", "train.checkpoint_every=40")
    )
    cfg, model = load_model(tmp_path / "a" / "final")
    save_hf_checkpoint(model, cfg, tmp_path / "hf", dtype="float32")
    second = run_training(
        _cfg(
            tmp_path / "b",
            "train.steps=2",
            "optimizer.warmup_steps=0",
            "optimizer.decay_steps=0",
            f"train.init_from={tmp_path / 'hf'}",
            "train.checkpoint_every=2",
        )
    )
    assert second["first_loss"] < 0.8 * first["first_loss"]
