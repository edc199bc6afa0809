"""`adamw-lm train` against `mlx_lm lora` on the same YAML, side by side: per-step time and the whole
command's wall time. Prints a markdown table with the ratios (ours / mlx-lm).

Runs alternate between the two trainers (ABBA order per round), so slow drifts of a shared machine
hit both alike. The per-step time is the difference between a long and a short run of the same
config divided by the difference in iterations: start-up, the first validation and the final save
cancel out, and each step's share of checkpointing and reporting stays in.

    python scripts/bench_trainer.py [--rounds 3] [--short 10] [--long 90] [--size small]
"""

from __future__ import annotations

import argparse
import os
import resource
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


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tic = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--short", type=int, default=10, help="iterations of the short run")
    parser.add_argument("--long", type=int, default=90, help="iterations of the long run")
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
        times: dict[tuple[str, int], list[tuple[float, float]]] = {key: [] for key in commands}
        for r in range(args.rounds):
            order = ("mlx_lm", "adamw_lm") if r % 2 == 0 else ("adamw_lm", "mlx_lm")
            for tool in (*order, *reversed(order)):
                for iters in (args.short, args.long):
                    run = tmp / f"run-{tool}-{iters}-{len(times[(tool, iters)])}"
                    times[(tool, iters)].append(timed(commands[(tool, iters)](run), env))

    def median(tool: str, iters: int, which: int) -> float:
        return statistics.median(t[which] for t in times[(tool, iters)])

    def per_step(tool: str, which: int) -> float:
        return statistics.median((b[which] - a[which]) / (args.long - args.short)
                                 for a, b in zip(times[(tool, args.short)], times[(tool, args.long)]))

    print(f"tiny model {args.size}, batch 4, max_seq_length 128, LoRA rank 8 on 2 layers, save_every "
          f"{args.save_every}; {args.rounds} rounds x 2 runs per trainer and length (medians; CPU = user + "
          "system time of the command)\n")
    print(f"| trainer | per step, wall (ms) | per step, CPU (ms) | {args.long} its, wall (s) | "
          f"{args.long} its, CPU (s) | {args.short} its, wall (s) | {args.short} its, CPU (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    columns = {tool: [per_step(tool, 0) * 1e3, per_step(tool, 1) * 1e3, median(tool, args.long, 0),
                      median(tool, args.long, 1), median(tool, args.short, 0), median(tool, args.short, 1)]
               for tool in ("mlx_lm", "adamw_lm")}
    for tool, values in columns.items():
        print(f"| {tool} | " + " | ".join(f"{v:.{1 if i < 2 else 2}f}" for i, v in enumerate(values)) + " |")
    ratios = [a / b for a, b in zip(columns["adamw_lm"], columns["mlx_lm"])]
    print("| **ratio adamw_lm / mlx_lm** | " + " | ".join(f"**{r:.3f}**" for r in ratios) + " |")


if __name__ == "__main__":
    main()
