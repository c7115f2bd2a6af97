"""The wheel: built from this checkout and installed outside it, it finds its presets and recipes and trains.

The wheel is built from a copy of the sources (no stale ``build/`` of the checkout can leak into it). The fresh
environment is a venv without pip whose only extra path is this environment's site-packages (a
``.pth`` file), for the dependencies; the wheel goes in with ``pip install --no-deps --target`` (which ignores
the editable install here) and every command runs from a directory outside the checkout.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "configs", "minicpm_jax", "pallas_kernels")


def _run(*argv, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")} | {"JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_wheel_installs_and_trains_outside_the_checkout(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if d == str(ROOT) and n not in SOURCES])
    _run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", src, cwd=tmp_path
    )
    (wheel,) = (tmp_path / "dist").glob("minicpm_jax-*.whl")
    _run(sys.executable, "-m", "venv", "--without-pip", "venv", cwd=tmp_path)
    python = tmp_path / "venv" / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel, cwd=tmp_path)

    where = _run(python, "-c", "import minicpm_jax.config as c; print(c.__file__); print(c.CONFIG_DIR)", cwd=tmp_path)
    module, configs = where.split()
    assert Path(module).is_relative_to(site) and Path(configs) == site / "minicpm_jax" / "_configs", where

    cli = site / "bin" / "minicpm-jax"
    assert "tiny-minicpm4" in _run(cli, "info", "tiny-minicpm4", cwd=tmp_path)
    train = ("train.steps=5", "optimizer.warmup_steps=1", "optimizer.decay_steps=2", "train.global_batch_size=4")
    train += ("data.seq_len=32", "data.synthetic_documents=200")
    out = _run(
        cli, "train", "--config", "pretrain-tiny", "train.output_dir=run", "train.eval_every=0", *train, cwd=tmp_path
    )  # a shipped recipe by name
    assert (tmp_path / "run" / "final" / "model.yaml").is_file(), out
