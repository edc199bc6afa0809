#!/usr/bin/env python3
"""Optimizer state size, step time and step memory of each state precision on one parameter tree.

Builds a stack of Llama-like layers (attention and MLP matrices plus a norm vector each, ~51M
parameters by default), a fixed gradient, and times one ``apply_gradients`` + ``mx.eval`` per
optimizer, interleaving the optimizers step by step so machine noise hits them alike; the ratio is
to ``mlx.optimizers.AdamW`` measured in the same run. Memory is then measured for one optimizer at
a time: the peak of a step (``mx.get_peak_memory``) against what it holds (weights + gradients +
state) and the size of the largest tensor in float32.

Prints one markdown table. ``--hidden 64 --layers 1`` runs in seconds (tests, CI).
``--weight-dtype bfloat16`` stores the weights in bfloat16 and compares the ``weight_update`` modes
(nearest / stochastic / exact) at every state precision instead of the stream counts.
``--lora-rank R`` times the LoRA adapters of the tree's matrices instead (many small tensors,
where each operation's dispatch counts more than its arithmetic). ``--against REV`` also times
the package as of git revision REV (imported under another name), interleaved with this one: a
change to a hot path measured side by side.

Usage: python scripts/bench_optimizer.py [--hidden 1024] [--layers 4] [--steps 7] [--warmup 2]
                                        [--breakdown] [--weight-dtype float32]
                                        [--against REV] [--lora-rank R]
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from adamw_lm import AdamW
from adamw_lm.optim import default_streams
from adamw_lm.codecs import PRECISIONS
from adamw_lm.weight_update import DEFAULT_WEIGHT_UPDATE, WEIGHT_UPDATES

MB = 2**20
MLX = "mlx.optimizers.AdamW"


def llama_like_tree(
    hidden: int, layers: int, seed: int = 0, dtype=mx.float32, lora_rank: int = 0
) -> dict:
    """``layers`` blocks of q/k/v/o (hidden²), gate/up/down (hidden × 2.75·hidden) and a norm;
    with ``lora_rank``, the LoRA adapters of those matrices instead (mlx-lm's shapes: ``lora_a``
    in × rank, ``lora_b`` rank × out), many small tensors."""
    inter = int(2.75 * hidden)
    shapes = {
        "q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
        "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter), "norm": (hidden,),
    }  # fmt: skip
    if lora_rank:
        matrices = {name: shape for name, shape in shapes.items() if len(shape) == 2}
        shapes = {
            f"{name}.{part}": shape
            for name, (out, inp) in matrices.items()
            for part, shape in (("lora_a", (inp, lora_rank)), ("lora_b", (lora_rank, out)))
        }  # fmt: skip
    keys = iter(mx.random.split(mx.random.key(seed), layers * len(shapes)))
    tree = {
        "layers": [
            {
                name: (0.02 * mx.random.normal(shape, key=next(keys))).astype(dtype)
                for name, shape in shapes.items()
            }
            for _ in range(layers)
        ]
    }
    mx.eval(tree)
    return tree


def gradient_like(tree: dict, seed: int = 1) -> dict:
    flat = tree_flatten(tree)
    keys = iter(mx.random.split(mx.random.key(seed), len(flat)))
    grads = tree_map(
        lambda p: (1e-3 * mx.random.normal(p.shape, key=next(keys))).astype(p.dtype), tree
    )
    mx.eval(grads)
    return grads


def nbytes(tree) -> int:
    return sum(a.nbytes for _, a in tree_flatten(tree))


def package_at(revision: str) -> tuple[ModuleType, str]:
    """``adamw_lm`` as of git ``revision`` of this repository, imported as ``adamw_lm_<sha>``
    from a temporary folder (its modules import each other relatively), and the short sha."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> bytes:
        done = subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)
        return done.stdout

    sha = git("rev-parse", "--short", revision).decode().strip()
    folder = Path(tempfile.mkdtemp(prefix="bench_optimizer_"))
    atexit.register(shutil.rmtree, folder, True)
    with tarfile.open(fileobj=io.BytesIO(git("archive", "--format=tar", sha, "adamw_lm"))) as tar:
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(folder, **extra)
    name = f"adamw_lm_{sha}"
    (folder / "adamw_lm").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name), sha


def make_optimizers(
    weight_updates: bool = False, against: tuple[ModuleType, str] | None = None
) -> dict[str, Callable[[], optim.Optimizer]]:
    """The optimizers to time, by row name: mlx's AdamW, ours at each state precision (and, with
    ``weight_updates``, each weight update), each followed by its twin at ``against``."""
    lr = 1e-3
    makers: dict[str, Callable[[], optim.Optimizer]] = {
        MLX: lambda: optim.AdamW(lr),
        "None (bit-exact mlx)": lambda: AdamW(lr),
    }

    def add(name: str, **kwargs) -> None:
        makers[name] = lambda: AdamW(lr, **kwargs)
        if against:
            package, sha = against
            makers[f"{name} @ {sha}"] = lambda: package.AdamW(lr, **kwargs)

    # Without weight updates, no weight_update argument: a revision from before them takes none.
    modes = [{"weight_update": mode} for mode in WEIGHT_UPDATES] if weight_updates else [{}]
    for name in PRECISIONS:
        for mode in modes:
            add(", ".join([name, *mode.values()]), state_precision=name, **mode)
    if (os.cpu_count() or 1) > 1 and mx.default_device() == mx.cpu:
        # The default is one stream (more cost memory in a training step: bench_memory.py); the
        # 2-stream rows show what spreading the update over two CPU cores buys in time (with the
        # default weight update, for bfloat16 weights).
        mode = {"weight_update": DEFAULT_WEIGHT_UPDATE} if weight_updates else {}
        for name in PRECISIONS:
            add(", ".join([name, *mode.values(), "2 streams"]), state_precision=name, streams=2,
                **mode)  # fmt: skip
    return makers


def time_in_phases(
    makers: dict[str, Callable[[], optim.Optimizer]], weights: dict, grads: dict, warmup: int,
    steps: int,
) -> dict[str, tuple[list[float], list[float]]]:
    """Step times (s) of each optimizer but mlx's AdamW (``MLX``), with those of the mlx AdamW
    timed beside it.

    Each optimizer, with its ``@ REV`` twins if any, is timed in a phase of its own, interleaved
    step by step with a fresh mlx AdamW (so that machine noise hits them alike). All of them
    interleaved at once (as this script did until session 12) slowed mlx's step by half and ours
    by a sixth on the 12.8M tree, ~18 trees resident, which made the ratios too low
    (docs/benchmarks.md, "Timed in phases").
    """
    timed = {}
    for name in makers:
        if name == MLX or " @ " in name:
            continue
        phase = [name] + [other for other in makers if other.startswith(f"{name} @ ")]
        runners = {n: Runner(makers[n], weights, grads) for n in [MLX, *phase]}
        for _ in range(warmup):
            for r in runners.values():
                r.step()
        times: dict[str, list[float]] = {n: [] for n in runners}
        for _ in range(steps):
            for n, r in runners.items():
                times[n].append(r.step())
        timed.update({n: (times[n], times[MLX]) for n in phase})
        del runners
        gc.collect()
        mx.clear_cache()
    return timed


class Runner:
    """One optimizer with its own copy of the weights."""

    def __init__(self, make: Callable[[], optim.Optimizer], weights: dict, grads: dict):
        self.opt = make()
        self.params = tree_map(lambda p: mx.array(p), weights)
        self.grads = grads
        self.opt.init(self.params)
        mx.eval(self.params, self.opt.state)

    def step(self) -> float:
        start = time.perf_counter()
        self.params = self.opt.apply_gradients(self.grads, self.params)
        mx.eval(self.params, self.opt.state)
        return time.perf_counter() - start


def breakdown(tree: dict, steps: int) -> list[tuple[str, float]]:
    """Medians (s) over the tensors of ``tree`` (all evaluated together, as in a step) of each
    codec's encode and decode, compiled, next to the element-wise and table-lookup costs they are
    built from."""
    moments = [1e-3 * p for _, p in tree_flatten(tree)]
    squares = [mx.square(m) for m in moments]
    key = mx.random.key(4)
    table = mx.random.normal((256,))
    codes = [mx.random.randint(0, 256, m.shape, key=key).astype(mx.uint8) for m in moments]
    mx.eval(moments, squares, codes)
    twice, draw = mx.compile(lambda a: a * 2), lambda a: mx.random.uniform(shape=a.shape, key=key)
    cases: dict[str, Callable[[], list]] = {
        "reference: x * 2 (one element-wise pass)": lambda: [twice(m) for m in moments],
        "reference: mx.take from a 256-entry table": lambda: [mx.take(table, c) for c in codes],
        "reference: mx.random.uniform": lambda: [draw(m) for m in moments],
    }
    for name in ("bf16", "int8", "int4"):
        for moment, data in (("m", moments), ("v", squares)):
            codec = getattr(PRECISIONS[name], moment)
            k = key if codec.stochastic else None
            encode = mx.compile(lambda a, c=codec, k=k: c.encode(a, k))
            stored = [encode(a) for a in data]
            mx.eval(stored)
            decode = mx.compile(lambda s, a, c=codec: c.decode(s, a.shape))
            cases[f"{name} {moment}: encode"] = lambda e=encode, d=data: [e(a) for a in d]
            cases[f"{name} {moment}: decode"] = lambda f=decode, s=stored, d=data: [
                f(x, a) for x, a in zip(s, d)
            ]
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(steps + 1):  # the first round compiles
        for name, fn in cases.items():
            start = time.perf_counter()
            mx.eval(fn())
            times[name].append(time.perf_counter() - start)
    return [(name, statistics.median(t[1:])) for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of each layer")
    parser.add_argument("--layers", type=int, default=4, help="number of layers")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles)")
    parser.add_argument(
        "--breakdown", action="store_true",
        help="also time each codec's encode and decode alone, on every tensor of the tree",
    )  # fmt: skip
    parser.add_argument("--weight-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--lora-rank", type=int, default=0, metavar="R",
        help="time the LoRA adapters (rank R) of the tree's matrices instead: many small tensors",
    )  # fmt: skip
    parser.add_argument(
        "--against", metavar="REV",
        help="also time each state precision as of this git revision, interleaved",
    )  # fmt: skip
    args = parser.parse_args()
    if min(args.hidden, args.layers, args.steps) < 1 or min(args.warmup, args.lora_rank) < 0:
        parser.error("--hidden, --layers and --steps must be >= 1, --warmup and --lora-rank >= 0")

    weights = llama_like_tree(
        args.hidden, args.layers, dtype=getattr(mx, args.weight_dtype), lora_rank=args.lora_rank
    )
    grads = gradient_like(weights)
    n_params = sum(p.size for _, p in tree_flatten(weights))
    largest = max(p.size for _, p in tree_flatten(weights)) * 4
    against = None
    if args.against:
        try:
            against = package_at(args.against)
        except subprocess.CalledProcessError as err:
            parser.error(f"--against {args.against}: {err.stderr.decode().strip()}")
    makers = make_optimizers(weight_updates=args.weight_dtype != "float32", against=against)

    timed = time_in_phases(makers, weights, grads, args.warmup, args.steps)
    median = {name: statistics.median(t) for name, (t, _) in timed.items()}
    ratio = {name: median[name] / statistics.median(base) for name, (_, base) in timed.items()}
    median[MLX] = statistics.median([statistics.median(base) for _, base in timed.values()])
    ratio[MLX] = 1.0

    memory, state_bytes = {}, {}
    for name, make in makers.items():
        r = Runner(make, weights, grads)
        state_bytes[name] = nbytes(
            {k: v for k, v in r.opt.state.items() if k not in ("step", "learning_rate")}
        )
        r.step()
        held = nbytes(r.params) + nbytes(r.grads) + nbytes(r.opt.state)
        # Everything alive before the step (this runner's weights, gradients and state, and the
        # script's own copy of the weights) is the floor the step's peak is measured from.
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        r.step()
        memory[name] = (mx.get_peak_memory() - before, held)
        del r
        gc.collect()

    print(
        f"{n_params / 1e6:.1f}M {args.weight_dtype} parameters ({args.layers} layers, hidden "
        f"{args.hidden}{f', LoRA rank {args.lora_rank}' if args.lora_rank else ''}), "
        f"{len(tree_flatten(weights))} tensors, largest {largest / MB:.1f} MB in float32; median "
        f"of {args.steps} steps after {args.warmup} warm-up, each optimizer (with its `@` twin) "
        f"in a phase of its own, interleaved with a fresh mlx AdamW, its ratio to that one's "
        f"median; mlx {mx.__version__}, {mx.default_device()}, "
        f"{platform.machine()}, {os.cpu_count()} cores; adamw_lm rows without a stream count use "
        f"{default_streams()} stream(s).\n"
    )
    print(
        "| precision | state bytes/param | step time ÷ mlx AdamW | step (ms) "
        "| weights + grads + state (MB) | step peak above them (MB) "
        "| step peak above them, in largest tensors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in makers:
        above, held = memory[name]
        print(
            f"| {name} | {state_bytes[name] / n_params:.4f} | {ratio[name]:.2f} "
            f"| {median[name] * 1e3:.0f} | {held / MB:.0f} | {above / MB:.0f} "
            f"| {above / largest:.2f} |"
        )
    if args.breakdown:
        print("\n| operation, on every tensor of the tree | ms |\n|---|---:|")
        for name, seconds in breakdown(weights, args.steps):
            print(f"| {name} | {seconds * 1e3:.0f} |")


if __name__ == "__main__":
    main()
