"""A custom ``BatchSource`` whose batches depend on the current parameters: its state is checkpointed
with the train state, so a SIGKILL and resume ends bit-identical to the uninterrupted run; the
loss's aux metrics reach metrics.jsonl."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from minicpm_jax.ckpt import load_model
from minicpm_jax.train.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS = 24


def _command(out):
    return [sys.executable, os.path.join(HERE, "train_source_run.py"), str(out), str(STEPS)]


def _env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}


def test_param_dependent_source_resumes_bit_exact_after_sigkill(tmp_path):
    subprocess.run(_command(tmp_path / "clean"), cwd=ROOT, env=_env(), check=True, capture_output=True)
    kill_at = int(np.random.default_rng().integers(4, 10))
    proc = subprocess.Popen(
        _command(tmp_path / "crash"), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [r["step"] for r in read_metrics(tmp_path / "crash") if "loss" in r]
        checkpoints = tmp_path / "crash" / "checkpoints"
        if (
            done
            and done[-1] >= kill_at
            and checkpoints.is_dir()
            and any(p.name.isdigit() for p in checkpoints.iterdir())
        ):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(
        _command(tmp_path / "crash"), cwd=ROOT, env=_env(), check=True, capture_output=True, text=True
    )
    assert "resumed from" in resumed.stdout
    clean, crash = (jax.tree.leaves(load_model(tmp_path / run / "final")[1]) for run in ("clean", "crash"))
    for a, b in zip(clean, crash, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    records = {r["step"]: r for r in read_metrics(tmp_path / "clean") if "loss" in r}
    assert sorted(records) == list(range(1, STEPS + 1))
    for r in records.values():  # aux: a token sum normalised like the loss, and a per-row mean
        np.testing.assert_allclose(r["loss_copy"], r["loss"], rtol=1e-6)
        assert 3 <= r["mean_first_id"] < 259
