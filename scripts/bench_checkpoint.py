"""Time checkpoint save / load against bare mx.save_safetensors / mx.load of the same arrays.

A 50M-parameter model (all weights trainable, as in a full fine-tune) with AdamW state in each
precision of ``--precisions`` that exists in ``adamw_lm.codecs.PRECISIONS``. Every timing is the
median of ``--repeats`` runs in this process, so the ratios compare like with like. Prints a
markdown table.

    python scripts/bench_checkpoint.py [--dir DIR] [--params 50e6] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from adamw_lm import AdamW, checkpoint
from adamw_lm.codecs import PRECISIONS

WIDTH = 2048


def make_model(params: float) -> nn.Module:
    layers = max(1, round(params / (WIDTH * WIDTH + WIDTH)))
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(layers)))


def trained_state(model: nn.Module, precision: str) -> AdamW:
    """An optimizer after one step, so moments (and quantization scales) are not all zero."""
    optimizer = AdamW(1e-4, state_precision=precision)
    params = model.trainable_parameters()
    keys = iter(mx.random.split(mx.random.key(0), len(tree_flatten(params))))
    grads = tree_map(lambda p: 1e-3 * mx.random.normal(p.shape, key=next(keys)), params)
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)
    return optimizer


def fsync_files(*paths: Path) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def median_time(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(model: nn.Module, precision: str, work: Path, repeats: int) -> dict:
    optimizer = trained_state(model, precision)
    adapters = dict(tree_flatten(model.trainable_parameters()))
    state = dict(tree_flatten(optimizer.state))
    bare_a, bare_o = work / "bare_adapters.safetensors", work / "bare_optimizer.safetensors"
    run_dir = work / "run"

    def clean():
        for path in (bare_a, bare_o):
            path.unlink(missing_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)

    def bare_save():
        mx.save_safetensors(str(bare_a), adapters)
        mx.save_safetensors(str(bare_o), state)

    def bare_save_fsync():
        bare_save()
        fsync_files(bare_a, bare_o)

    def save():
        checkpoint.save(run_dir, 1, model, optimizer, {"step": 1}, {"fine_tune_type": "full"})

    def sha256_only():
        sha = hashlib.sha256()
        for a in (*adapters.values(), *state.values()):
            sha.update(memoryview(a).cast("B"))

    def bare_load():
        mx.eval(mx.load(str(bare_a)), mx.load(str(bare_o)))

    def load():
        checkpoint.load(run_dir / "checkpoints" / "step-0000001", model, optimizer)

    row = {
        "precision": precision,
        "mb": sum(a.nbytes for a in (*adapters.values(), *state.values())) / 1e6,
        "bare_save": median_time(bare_save, repeats, clean),
        "bare_save_fsync": median_time(bare_save_fsync, repeats, clean),
        "save": median_time(save, repeats, clean),
        "sha256": median_time(sha256_only, repeats),
    }
    bare_save()
    save()
    row["bare_load"] = median_time(bare_load, repeats)
    row["load"] = median_time(load, repeats)
    clean()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="folder to write in (default: a temporary folder)")
    parser.add_argument("--params", type=float, default=50e6, help="model size in parameters")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    args = parser.parse_args()

    model = make_model(args.params)
    n_params = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    precisions = [p for p in args.precisions if p in PRECISIONS]
    skipped = sorted(set(args.precisions) - set(precisions))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = [bench(model, p, Path(tmp), args.repeats) for p in precisions]

    print(
        f"{n_params / 1e6:.1f}M parameters (float32, all trainable), median of {args.repeats}; "
        f"mlx {mx.__version__}, {mx.default_device()}, {platform.platform()}"
        + (f"; precisions not available: {', '.join(skipped)}" if skipped else "")
    )
    print()
    print(
        "| state | MB | bare save (s) | sha256 alone, 1 thread (s) | bare save + fsync (s) "
        "| checkpoint.save (s) | ratio to bare | ratio to bare + fsync | bare load (s) "
        "| checkpoint.load (s) | load ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['precision']} | {r['mb']:.0f} | {r['bare_save']:.3f} | {r['sha256']:.3f} "
            f"| {r['bare_save_fsync']:.3f} | {r['save']:.3f} | {r['save'] / r['bare_save']:.2f}x "
            f"| {r['save'] / r['bare_save_fsync']:.2f}x | {r['bare_load']:.3f} | {r['load']:.3f} "
            f"| {r['load'] / r['bare_load']:.2f}x |"
        )


if __name__ == "__main__":
    main()
