"""Save a ~200 MB checkpoint again and again until killed; used by tests/test_crash_safety.py.

    python save_forever.py RUN_DIR FIRST_STEP

Before save ``n`` it prints ``start n``, after it ``done n``. Every array of step ``n``'s checkpoint
holds the value ``n`` (see :func:`fill`), so a loaded checkpoint shows which step it is.
"""

from __future__ import annotations

import sys
from itertools import count

import mlx.core as mx
import mlx.nn as nn

from adamw_lm import AdamW, checkpoint

#: 4096 x 4096 float32 weights (67 MB) + float32 m and v (134 MB): 201 MB per checkpoint.
SIZE = 4096


def make() -> tuple[nn.Module, AdamW]:
    model = nn.Linear(SIZE, SIZE, bias=False)
    optimizer = AdamW(1e-3, state_precision="fp32")
    optimizer.init(model.trainable_parameters())
    return model, optimizer


def fill(model: nn.Module, optimizer: AdamW, step: int) -> None:
    value = mx.full((SIZE, SIZE), float(step))
    model.weight = value
    optimizer.state["weight"] = {"m": value + 0.25, "v": value + 0.5}
    optimizer.state["step"] = mx.array(step, mx.uint64)
    mx.eval(model.parameters(), optimizer.state)


def main() -> None:
    run_dir, first = sys.argv[1], int(sys.argv[2])
    model, optimizer = make()
    for step in count(first):
        fill(model, optimizer, step)
        print(f"start {step}", flush=True)
        checkpoint.save(run_dir, step, model, optimizer, {"step": step}, {"fine_tune_type": "full"},
                        keep_last=2)
        print(f"done {step}", flush=True)


if __name__ == "__main__":
    main()
