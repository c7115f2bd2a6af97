#!/usr/bin/env bash
# Install everything (scripts/setup.sh), then run the default test suite on 8 fake CPU devices. The suite
# includes the wheel check (tests/test_wheel.py, ~40 s): it builds the wheel with the installed setuptools,
# installs it with --no-deps into a fresh venv outside the checkout and runs `info` and a 5-step `train` there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 -q "$@"
