"""What a background push costs a training run, and how fast it uploads.

1. Step time with a push after every checkpoint ÷ without: the same training loop (a stack of
   ``--width`` x ``--width`` linear layers, all trainable, AdamW with ``--precision`` moments)
   saves a checkpoint every ``--every`` steps; in the "push" runs each saved folder is handed to
   ``adamw_lm.hub.Pusher``. Runs alternate (no push, push, push, no push, ...) ``--rounds`` times;
   the ratio is of the median time per step, saves included, pushes waited for after the clock.
2. Push throughput: one checkpoint folder through ``Pusher`` (one commit, sha256s from the
   manifest) next to a bare ``HfApi.upload_folder`` of the same folder, each to a fresh repo.

Both talk to the local Hub of the tests (``tests/hub_server.py``), run as a subprocess on
127.0.0.1 so that its work is not on this process's interpreter lock. Prints markdown tables.

    python scripts/bench_hub.py [--width 1024] [--layers 4] [--precision none] [--steps 20]
        [--every 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(folder: Path) -> tuple[subprocess.Popen, dict]:
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hub_server.py"), str(folder)],
                              stdout=subprocess.PIPE, text=True)
    return server, json.loads(server.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="none", help="none (mlx-exact), bf16, int8, int4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_hub_"))
    server, hub_info = start_server(work / "server")
    # huggingface_hub reads these when it is imported, below.
    os.environ.update({"HF_TOKEN": hub_info["token"], "HF_HOME": str(work / "hf_home"),
                       "HF_HUB_DISABLE_XET": "1", "HF_ENDPOINT": hub_info["url"]})
    try:
        run(args, work, {**hub_info, "pid": server.pid})
    finally:
        server.terminate()
        server.wait()


def run(args: argparse.Namespace, work: Path, hub_info: dict) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from huggingface_hub import HfApi

    from adamw_lm import AdamW, checkpoint
    from adamw_lm.hub import Pusher

    url, user = hub_info["url"], hub_info["user"]
    mx.random.seed(0)
    model = nn.Sequential(*(nn.Linear(args.width, args.width) for _ in range(args.layers)))
    optimizer = AdamW(1e-4, state_precision=None if args.precision == "none" else args.precision)
    x = mx.random.normal((args.batch, args.width))

    def loss_fn(model):
        return (model(x) ** 2).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def train(run_dir: Path, pusher: Pusher | None) -> tuple[float, float]:
        """Seconds per step (saves included) and the seconds waited for pushes afterwards."""
        tic = time.perf_counter()
        for step in range(1, args.steps + 1):
            loss, grads = loss_and_grad(model)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state)
            if step % args.every == 0:
                folder = checkpoint.save(run_dir, step, model, optimizer, {"iteration": step},
                                         {"fine_tune_type": "full"})
                if pusher is not None:
                    pusher.submit(folder)
        per_step = (time.perf_counter() - tic) / args.steps
        tic = time.perf_counter()
        if pusher is not None:
            assert pusher.wait(progress=False) == [], "a push failed"
        return per_step, time.perf_counter() - tic

    train(work / "warmup", None)
    times: dict[str, list[float]] = {"no push": [], "push": []}
    waits: list[float] = []
    server_cpu: list[float] = []  # the local Hub's work, which a real Hub does elsewhere
    for r in range(args.rounds):
        order = ("no push", "push") if r % 2 == 0 else ("push", "no push")
        for mode in order:
            pusher = Pusher(f"{user}/bench-{r}", endpoint=url) if mode == "push" else None
            cpu = cpu_seconds(hub_info["pid"])
            per_step, waited = train(work / f"run-{r}-{mode.replace(' ', '-')}", pusher)
            times[mode].append(per_step)
            if pusher is not None:
                waits.append(waited)
                server_cpu.append(cpu_seconds(hub_info["pid"]) - cpu)

    folder = checkpoint.latest_checkpoint(work / "run-0-push")
    size = sum(f.stat().st_size for f in folder.iterdir())
    api = HfApi(endpoint=url)
    pushes, bare = [], []
    for r in range(args.rounds):
        pusher = Pusher(f"{user}/throughput-{r}", endpoint=url)
        pusher.prepare()
        tic = time.perf_counter()
        pusher.submit(folder)
        assert pusher.wait(progress=False) == []
        pushes.append(time.perf_counter() - tic)
        repo = f"{user}/bare-{r}"
        api.create_repo(repo, private=True)
        tic = time.perf_counter()
        api.upload_folder(repo_id=repo, folder_path=folder, path_in_repo=f"checkpoints/{folder.name}")
        bare.append(time.perf_counter() - tic)

    no_push, push = statistics.median(times["no push"]), statistics.median(times["push"])
    params = args.layers * (args.width * args.width + args.width)
    print(f"\n{platform.machine()} {platform.system()}, mlx {mx.__version__} ({mx.default_device()}), "
          f"{params / 1e6:.1f}M trainable parameters, {args.precision} moments, checkpoint "
          f"{size / 1e6:.0f} MB every {args.every} of {args.steps} steps, {args.rounds} rounds\n")
    print("| run | time per step (ms), median | ÷ no push | waited for pushes after the last step (s) |")
    print("|---|---:|---:|---:|")
    print(f"| no push | {no_push * 1e3:.1f} | 1.00 | |")
    print(f"| push every checkpoint | {push * 1e3:.1f} | {push / no_push:.3f} | "
          f"{statistics.median(waits):.2f} |")
    paired = [p / n for p, n in zip(times["push"], times["no push"])]
    print(f"\nPaired ratios per round (push ÷ no push): {', '.join(f'{r:.3f}' for r in paired)}")
    pushes_per_run = args.steps // args.every
    print(f"CPU time of the local Hub server per push (on this machine's cores here, on the Hub's "
          f"in real use): {statistics.median(server_cpu) / pushes_per_run:.2f} s; training time "
          f"per push interval: {no_push * args.every:.2f} s")
    adapters = (folder / checkpoint.ADAPTERS).stat().st_size
    print("\n| upload of one checkpoint folder | s, median | folder MB/s | bytes sent MB/s |")
    print("|---|---:|---:|---:|")
    # Pusher also sends the top-level copy of the adapters (an LFS server takes it twice).
    for name, values, sent in (
        ("Pusher (one commit: folder, latest, adapters, card)", pushes, size + adapters),
        ("bare HfApi.upload_folder (folder only)", bare, size),
    ):
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {size / 1e6 / median:.0f} | {sent / 1e6 / median:.0f} |")


if __name__ == "__main__":
    main()
