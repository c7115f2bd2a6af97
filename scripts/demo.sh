#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the end-to-end demo: `minicpm-jax demo` (short), or
# `bash scripts/demo.sh --full [--output DIR] [--smoke]` for the three papers at toy scale (report.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/minicpm-jax demo "$@"
