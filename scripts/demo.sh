#!/usr/bin/env bash
# The whole product in about a minute: install, build the offline tiny model, fine-tune it with an
# 8-bit-state AdamW, interrupt the run half way (as Ctrl-C would), resume it in a new process, and
# check that the result is bit-for-bit the run that was never interrupted.
set -euo pipefail
if [ $# -gt 0 ]; then  # it takes no options: say what it does instead of doing it
    sed -n '2,4s/^# \{0,1\}//p' "$0"
    echo "usage: bash scripts/demo.sh   (writes runs/tiny-model, runs/tiny-lora, runs/tiny-lora-uninterrupted)"
    exit 2
fi
source "$(dirname "$0")/venv.sh" plot

RUN=runs/tiny-lora
REF=runs/tiny-lora-uninterrupted
rm -rf "$RUN" "$REF"
adamw-lm tiny-model runs/tiny-model

echo "== 1. train, interrupted with SIGINT half way =="
adamw-lm train recipes/tiny-lora.yaml --no-progress &
PID=$!
# Interrupt once the run has logged iteration 70 (metrics.jsonl is written as it goes).
until [ -f "$RUN/metrics.jsonl" ] && grep -q '"iteration": 70,' "$RUN/metrics.jsonl"; do
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.05
done
kill -INT "$PID" 2>/dev/null || true
status=0; wait "$PID" || status=$?
[ "$status" -eq 130 ] || { echo "expected the interrupted run to exit 130, got $status"; exit 1; }

echo "== 2. resume in a new process =="
adamw-lm resume "$RUN" --no-progress

echo "== 3. the same run, never interrupted, for comparison =="
adamw-lm train recipes/tiny-lora.yaml --no-progress --adapter-path "$REF"

python - "$RUN" "$REF" <<'PY'
import sys
from adamw_lm.resuming import compare_runs
print(compare_runs(sys.argv[1], sys.argv[2]))
PY
adamw-lm inspect "$RUN"
echo "Checkpoints are in $RUN/checkpoints; adapters for mlx_lm in $RUN (mlx_lm.generate --adapter-path $RUN)."
