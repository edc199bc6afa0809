"""`adamw-lm train` against `mlx_lm lora` on the same YAML, side by side: per-step time and the whole
command's wall time. Prints a markdown table with the ratios (ours / mlx-lm).

Runs alternate between the two trainers (ABBA order per round), so slow drifts of a shared machine
hit both alike. The per-step time is the difference between a long and a short run of the same
config divided by the difference in iterations: start-up, the first validation and the final save
cancel out, and each step's share of checkpointing and reporting stays in.

    python scripts/bench_trainer.py [--rounds 3] [--short 10] [--long 110] [--size small]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def config(model: Path, iters: int, args: argparse.Namespace) -> dict:
    return {
        "model": str(model), "train": True, "data": str(REPO / "recipes" / "data"), "fine_tune_type": "lora",
        "num_layers": 2, "lora_parameters": {"rank": 8, "scale": 10.0, "dropout": 0.0},
        "batch_size": 4, "iters": iters, "val_batches": 2, "learning_rate": 1e-3, "steps_per_report": 10,
        "steps_per_eval": 1000, "save_every": args.save_every, "max_seq_length": 128, "seed": 0,
    }


def timed(command: list[str], env: dict) -> float:
    tic = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - tic
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--short", type=int, default=10, help="iterations of the short run")
    parser.add_argument("--long", type=int, default=110, help="iterations of the long run")
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--size", choices=["small", "medium"], default="small", help="tiny model size")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "adamw_lm.cli", "tiny-model", str(tmp / "model"), "--size",
                        args.size], check=True, capture_output=True, env=env)
        commands = {}
        for iters in (args.short, args.long):
            path = tmp / f"config-{iters}.yaml"
            path.write_text(yaml.safe_dump(config(tmp / "model", iters, args)))
            commands[("mlx_lm", iters)] = lambda run, p=path: [
                sys.executable, "-m", "mlx_lm", "lora", "--config", str(p), "--adapter-path", str(run)]
            commands[("adamw_lm", iters)] = lambda run, p=path: [
                sys.executable, "-m", "adamw_lm.cli", "train", str(p), "--no-progress", f"--adapter-path={run}"]
        times: dict[tuple[str, int], list[float]] = {key: [] for key in commands}
        for r in range(args.rounds):
            order = ("mlx_lm", "adamw_lm") if r % 2 == 0 else ("adamw_lm", "mlx_lm")
            for tool in (*order, *reversed(order)):
                for iters in (args.short, args.long):
                    run = tmp / f"run-{tool}-{iters}-{len(times[(tool, iters)])}"
                    times[(tool, iters)].append(timed(commands[(tool, iters)](run), env))
    rows = []
    per_step, whole = {}, {}
    for tool in ("mlx_lm", "adamw_lm"):
        steps = [(b - a) / (args.long - args.short)
                 for a, b in zip(times[(tool, args.short)], times[(tool, args.long)])]
        per_step[tool] = statistics.median(steps)
        whole[tool] = statistics.median(times[(tool, args.long)])
        rows.append((tool, per_step[tool] * 1e3, whole[tool], statistics.median(times[(tool, args.short)])))
    print(f"tiny model {args.size}, batch 4, max_seq_length 128, LoRA rank 8 on 2 layers, save_every "
          f"{args.save_every}; {args.rounds} rounds x 2 runs per trainer and length (medians)\n")
    print(f"| trainer | per step (ms) | whole command, {args.long} its (s) | whole command, {args.short} its (s) |")
    print("|---|---:|---:|---:|")
    for tool, step_ms, long_s, short_s in rows:
        print(f"| {tool} | {step_ms:.1f} | {long_s:.2f} | {short_s:.2f} |")
    print(f"| **ratio adamw_lm / mlx_lm** | **{per_step['adamw_lm'] / per_step['mlx_lm']:.3f}** | "
          f"**{whole['adamw_lm'] / whole['mlx_lm']:.3f}** | "
          f"**{statistics.median(times[('adamw_lm', args.short)]) / statistics.median(times[('mlx_lm', args.short)]):.3f}** |")


if __name__ == "__main__":
    main()
