#!/usr/bin/env bash
# Install adamw_lm with its test extra into ./.venv (created on first use) and run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_optim.py -x`.
set -euo pipefail
source "$(dirname "$0")/venv.sh" test,plot
exec python -m pytest -q "$@"
