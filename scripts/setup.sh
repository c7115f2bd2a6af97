#!/usr/bin/env bash
# Create .venv in the repo (if missing) and install minicpm_jax with its test extra (CPU JAX, CPU PyTorch).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
