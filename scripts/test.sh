#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the default test suite on 8 fake CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 -q "$@"
