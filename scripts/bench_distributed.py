"""Data-parallel step time and optimizer state bytes per process: 1 and 2 processes, state sharded
(ZeRO-1) or not, and the two exchanges of updated parameters side by side, in one run. Prints a
markdown table.

    python scripts/bench_distributed.py [--steps 20] [--size medium]

Each configuration runs under ``mlx.launch --backend ring`` on this machine (local processes); a
process here times the AdamW update on the real LoRA trainable tree of the tiny model with random
gradients, averaged over the processes first, as the trainer does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = """
import json, sys, time
import mlx.core as mx, mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from adamw_lm.config import from_dict
from adamw_lm.loading import build_optimizer, load_model, setup_trainable
from adamw_lm.sharding import EXCHANGES, ShardedOptimizer

model_path, precision, shard, exchange, steps = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], int(sys.argv[5])
config = from_dict({"model": model_path, "num_layers": -1, "lora_parameters": {"rank": 64, "scale": 10.0, "dropout": 0.0},
                    "optimizer": {"state_precision": None if precision == "none" else precision, "min_quantize_size": 64}})
model, _ = load_model(config)
setup_trainable(model, config)
optimizer = build_optimizer(config)
if shard:
    optimizer = ShardedOptimizer(optimizer, exchange=exchange)
group = mx.distributed.init()
params = model.trainable_parameters()
optimizer.init(params)
mx.random.seed(group.rank())
grads = tree_map(lambda p: mx.random.normal(p.shape, dtype=p.dtype) * 1e-3, params)

def step():
    optimizer.update(model, nn.average_gradients(grads))
    mx.eval(model.trainable_parameters(), optimizer.state)

def timed(fn):
    mx.eval(mx.distributed.all_sum(mx.array(0), stream=mx.cpu))  # start together
    tic = time.perf_counter()
    fn()
    return (time.perf_counter() - tic) * 1e3

for _ in range(3):
    step()
times = sorted(timed(step) for _ in range(steps))
result = {"ms": times[len(times) // 2], "state_bytes": optimizer.state_nbytes(),
          "params": sum(a.nbytes for _, a in tree_flatten(params))}
if shard and group.size() > 1:
    # The two exchanges of updated parameters side by side, interleaved, on this tree.
    flat = dict(tree_flatten(params))
    shapes, dtypes = {p: a.shape for p, a in flat.items()}, {p: a.dtype for p, a in flat.items()}
    runs = {name: [] for name in EXCHANGES}
    for _ in range(steps):
        for name, exchange in EXCHANGES.items():
            runs[name].append(timed(lambda: mx.eval(exchange(flat, optimizer.owners, shapes, dtypes, group))))
    result["exchange_ms"] = {name: sorted(t)[len(t) // 2] for name, t in runs.items()}
if group.rank() == 0:
    print("RESULT " + json.dumps(result))
"""


def run(n: int, model: Path, precision: str, shard: bool, exchange: str, steps: int, worker: Path) -> dict:
    """One configuration in its own processes; rank 0's measurements."""
    python = sys.executable
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [str(worker), str(model), precision, "1" if shard else "0", exchange, str(steps)]
    if n == 1:
        command = [python, *args]
    else:
        command = [str(Path(python).parent / "mlx.launch"), "-n", str(n), "--backend", "ring", "--python", python, *args]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", choices=["small", "medium"], default="medium")
    parser.add_argument("--precision", default="none", help="state_precision (none, fp32, bf16, int8, int4)")
    args = parser.parse_args()
    from adamw_lm.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model", size=args.size, seed=0)
        worker = Path(tmp) / "worker.py"
        worker.write_text(WORKER)
        rows = []
        for n, shard, exchange in ((1, False, "-"), (2, False, "-"), (2, True, "all_gather")):
            tic = time.perf_counter()
            r = run(n, model, args.precision, shard, exchange if shard else "all_gather", args.steps, worker)
            rows.append((n, shard, exchange, r, time.perf_counter() - tic))
    print(f"tiny {args.size} model, LoRA rank 64 on every layer, state_precision {args.precision}, "
          f"{args.steps} timed steps (after 3 warm-up; each started together), ring backend on one machine\n")
    print("| processes | shard_state | step, median (ms) | optimizer state per process | trainable |")
    print("|---:|---|---:|---:|---:|")
    for n, shard, exchange, r, _ in rows:
        print(f"| {n} | {shard} | {r['ms']:.2f} | {r['state_bytes'] / 1e6:.3f} MB | {r['params'] / 1e6:.3f} MB |")
    exchanges = rows[-1][3]["exchange_ms"]
    print("\nExchange of the updated parameters (2 processes, interleaved, median ms): "
          + ", ".join(f"{name} {ms:.2f}" for name, ms in exchanges.items()))


if __name__ == "__main__":
    main()
