#!/usr/bin/env bash
# Install adamw_lm with its test extra into ./.venv (created on first use) and run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_optim.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test,plot]"
exec .venv/bin/python -m pytest -q "$@"
