#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the end-to-end demo (`minicpm-jax demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/minicpm-jax demo "$@"
