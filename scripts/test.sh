#!/usr/bin/env bash
# Install adamw_lm with its test extra into ./.venv (created on first use) and run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_optim.py -x`.
set -euo pipefail
source "$(dirname "$0")/venv.sh" test,plot
# One worker per core, each test file whole on one worker (its module fixtures are built once, and
# the data-parallel tests' local ports stay within one worker): ~1.5x faster on 2 cores.
exec python -m pytest -q -n auto --dist loadfile "$@"
