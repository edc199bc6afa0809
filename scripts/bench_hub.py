"""What a background push costs a training run, and how fast it uploads.

1. Step time with a push running ÷ without, in one training run: a stack of ``--width`` x
   ``--width`` linear layers, all trainable (as in a full fine-tune), AdamW with ``--precision``
   moments, saves a checkpoint every ``--every`` steps. After each save the run either hands the
   folder to ``adamw_lm.hub.Pusher`` (and trains on while it uploads) or not, in the order
   no push, push, push, no push, ... for ``--intervals`` intervals; the ratio is of the median
   time of the ``--every`` steps that follow a save. Saves are outside the clock, and before a
   "no push" interval the previous push is waited for (outside the clock too).
2. Push throughput: one checkpoint folder through ``Pusher`` (one commit, sha256s from the
   manifest) next to a bare ``HfApi.upload_folder`` of the same folder, each to a fresh repo.

Both talk to the local Hub of the tests (``tests/hub_server.py``), run as a subprocess on
127.0.0.1 so that its work is not on this process's interpreter lock. It still runs on this
machine's cores, which a real Hub does not: by default at nice 19, so that it takes them only
when training leaves them idle (``--server-nice 0`` to compete as an equal). Prints markdown
tables, with the CPU time each side spent per push.

    python scripts/bench_hub.py [--width 1024] [--layers 4] [--precision none] [--every 5]
        [--intervals 24] [--rounds 3] [--server-nice 19]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(folder: Path, niceness: int) -> tuple[subprocess.Popen, dict]:
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "hub_server.py"), str(folder)],
        stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(niceness),
    )
    return server, json.loads(server.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="none", help="none (mlx-exact), bf16, int8, int4")
    parser.add_argument("--every", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--intervals", type=int, default=24, help="checkpoint intervals timed")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of the throughput test")
    parser.add_argument("--server-nice", type=int, default=19,
                        help="niceness of the local Hub: a real Hub's work is not on our cores")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_hub_"))
    server, hub_info = start_server(work / "server", args.server_nice)
    # huggingface_hub reads these when it is imported, below.
    os.environ.update({"HF_TOKEN": hub_info["token"], "HF_HOME": str(work / "hf_home"),
                       "HF_HUB_DISABLE_XET": "1", "HF_ENDPOINT": hub_info["url"]})
    try:
        run(args, work, {**hub_info, "pid": server.pid})
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


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

    losses: list[float] = []  # in the trainer state, as the trainer's: the card plots them

    def steps() -> float:
        tic = time.perf_counter()
        for _ in range(args.every):
            loss, grads = loss_and_grad(model)
            optimizer.update(model, grads)
            mx.eval(loss, model.parameters(), optimizer.state)
            losses.append(loss.item())
        return (time.perf_counter() - tic) / args.every

    run_dir = work / "run"
    pusher = Pusher(f"{user}/bench", endpoint=url)
    pusher.prepare()
    steps()  # warm-up
    losses.clear()
    times: dict[str, list[float]] = {"no push": [], "push": []}
    server_cpu = []  # the local Hub's work per push, which a real Hub does on its own machines
    pattern = ("no push", "push", "push", "no push")
    for i in range(args.intervals):
        mode = pattern[i % len(pattern)]
        if mode == "no push":
            assert pusher.wait(progress=False) == [], "a push failed"
        step = len(losses)
        folder = checkpoint.save(run_dir, step, model, optimizer,
                                 {"iteration": step, "losses": list(losses)},
                                 {"fine_tune_type": "full"},
                                 keep_last=2 if mode == "no push" else None)
        cpu = cpu_seconds(hub_info["pid"])
        if mode == "push":
            pusher.submit(folder)
        times[mode].append(steps())
        if mode == "push":
            assert pusher.wait(progress=False) == [], "a push failed"
            server_cpu.append(cpu_seconds(hub_info["pid"]) - cpu)

    folder = checkpoint.latest_checkpoint(run_dir)
    size = sum(f.stat().st_size for f in folder.iterdir())
    api = HfApi(endpoint=url)
    # name -> [(wall s, client CPU s, server CPU s)]
    uploads: dict[str, list[tuple[float, float, float]]] = {"pusher": [], "bare": []}

    def timed(name: str, upload) -> None:
        tic, cpu, server = time.perf_counter(), own_cpu_seconds(), cpu_seconds(hub_info["pid"])
        upload()
        uploads[name].append((time.perf_counter() - tic, own_cpu_seconds() - cpu,
                              cpu_seconds(hub_info["pid"]) - server))

    def push_once(pusher: Pusher) -> None:
        pusher.submit(folder)
        assert pusher.wait(progress=False) == []

    for r in range(args.rounds):
        pusher = Pusher(f"{user}/throughput-{r}", endpoint=url)
        pusher.prepare()
        api.create_repo(f"{user}/bare-{r}", private=True)
        timed("pusher", lambda p=pusher: push_once(p))
        timed("bare", lambda r=r: api.upload_folder(repo_id=f"{user}/bare-{r}", folder_path=folder,
                                                    path_in_repo=f"checkpoints/{folder.name}"))

    no_push, push = statistics.median(times["no push"]), statistics.median(times["push"])
    params = args.layers * (args.width * args.width + args.width)
    print(f"\n{platform.machine()} {platform.system()}, mlx {mx.__version__} "
          f"({mx.default_device()}), "
          f"{params / 1e6:.1f}M trainable parameters, {args.precision} moments, checkpoint "
          f"{size / 1e6:.0f} MB every {args.every} steps, {args.intervals} intervals, local Hub at "
          f"nice {args.server_nice}, load average {os.getloadavg()[0]:.1f}\n")
    print("| steps after a checkpoint | time per step (ms), median | ÷ no push | intervals |")
    print("|---|---:|---:|---:|")
    print(f"| no push | {no_push * 1e3:.1f} | 1.00 | {len(times['no push'])} |")
    print(f"| a push running in the background | {push * 1e3:.1f} | {push / no_push:.3f} | "
          f"{len(times['push'])} |")
    print(f"\nCPU time of the local Hub server per push: {statistics.median(server_cpu):.2f} s, "
          f"against {no_push * args.every:.2f} s of training per interval")
    print("\n| upload of one checkpoint folder | s | MB/s | client CPU (s) | local Hub CPU (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, label in (
        ("pusher", "Pusher (one commit: folder, latest, top-level adapters, card)"),
        ("bare", "bare HfApi.upload_folder (the folder only)"),
    ):
        wall, cpu, server = (statistics.median(v) for v in zip(*uploads[name], strict=True))
        print(f"| {label} | {wall:.2f} | {size / 1e6 / wall:.0f} | {cpu:.2f} | {server:.2f} |")
    print("\nMedians; the run's Pusher is set up before the clock, both repos exist beforehand.")


if __name__ == "__main__":
    main()
