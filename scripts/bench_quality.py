#!/usr/bin/env python3
"""Does low-precision optimizer state cost quality? Fine-tune the same tiny model on the same data
with each state precision and compare final losses to the float32 baseline.

Builds the offline tiny Llama (``adamw_lm.tiny``), then for full fine-tuning and for LoRA runs
mlx-lm's own trainer (``mlx_lm.tuner.trainer.train`` with ``TrainingArgs``, ``load_dataset`` and
``linear_to_lora_layers``) with ``adamw_lm.AdamW`` at each precision, from the same seed
(``np.random`` and ``mx.random``, so the same batches), and evaluates the final model on the whole
training and validation sets. The baseline is ``state_precision=None`` (exactly
``mlx.optimizers.AdamW``, float32 moments for this float32 model). ``"fp32"`` is a control: the
same float32 AdamW through this package's fused update, which rounds differently in the last bit;
its gap to the baseline is how far two runs drift apart from rounding alone.

Prints a markdown table; ``--plot`` writes the training-loss curves (needs matplotlib, the ``plot``
extra).

Usage: python scripts/bench_quality.py [--size medium] [--steps 300] [--plot docs/quality_loss.png]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.tuner.datasets import CacheDataset, load_dataset
from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, evaluate, train
from mlx_lm.tuner.utils import linear_to_lora_layers

from adamw_lm import AdamW
from adamw_lm.tiny import TINY_SIZES, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
COMPARED = [None, "fp32", "bf16", "int8", "int4"]
LABEL = {
    None: "None (mlx AdamW)",
    "fp32": "fp32 (control)",
    "bf16": "bf16",
    "int8": "int8",
    "int4": "int4",
}


class Recorder(TrainingCallback):
    """Keeps the training losses mlx-lm reports."""

    def __init__(self):
        self.train: list[tuple[int, float]] = []

    def on_train_loss_report(self, info: dict) -> None:
        self.train.append((info["iteration"], info["train_loss"]))


def run(
    args: argparse.Namespace, model_path: Path, mode: str, precision: str | None, workdir: Path
) -> dict:
    """One fine-tune; its final losses on the whole training and validation sets, and its curve."""
    np.random.seed(args.seed)
    mx.random.seed(args.seed)
    model, tokenizer = load(str(model_path))
    if mode == "lora":
        model.freeze()
        linear_to_lora_layers(
            model, len(model.layers), {"rank": args.lora_rank, "scale": 20.0, "dropout": 0.0}
        )
    data = types.SimpleNamespace(data=str(args.data), train=True, test=False, hf_dataset=False)
    train_set, valid_set, _ = load_dataset(data, tokenizer)
    train_set, valid_set = CacheDataset(train_set), CacheDataset(valid_set)
    opt = AdamW(
        args.lr if mode == "full" else args.lora_lr,
        weight_decay=0.0,
        state_precision=precision,
        min_quantize_size=args.min_quantize_size,
        seed=args.seed,
    )
    training = TrainingArgs(
        batch_size=args.batch_size,
        iters=args.steps,
        val_batches=1,
        steps_per_report=10,
        steps_per_eval=args.steps + 1,
        steps_per_save=args.steps + 1,
        max_seq_length=args.max_seq_length,
        adapter_file=str(workdir / "adapters.safetensors"),
    )
    recorder = Recorder()
    start = time.perf_counter()
    train(model, opt, train_set, valid_set, args=training, training_callback=recorder)
    seconds = time.perf_counter() - start
    model.eval()
    losses = {
        name: evaluate(model, dataset, batch_size=args.batch_size, num_batches=-1,
                       max_seq_length=args.max_seq_length)
        for name, dataset in (("train", train_set), ("valid", valid_set))
    }  # fmt: skip
    trainable = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    moments = {k: v for k, v in opt.state.items() if k not in ("step", "learning_rate")}
    return {
        **losses,
        "curve": recorder.train,
        "seconds": seconds,
        "bytes_per_param": sum(a.nbytes for _, a in tree_flatten(moments)) / trainable,
        "trainable": trainable,
    }


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results)
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for precision, r in results[mode].items():
            steps, losses = zip(*r["curve"])
            style = "--" if precision == "fp32" else "-"
            ax.plot(steps, losses, style, label=LABEL[precision], linewidth=1.2)
        ax.set_title(f"{mode} fine-tune")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean of 10 steps)")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="medium", choices=sorted(TINY_SIZES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="full fine-tune learning rate")
    parser.add_argument("--lora-lr", type=float, default=3e-4, help="LoRA learning rate")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument(
        "--min-quantize-size", type=int, default=512,
        help="tensors smaller than this keep float32 moments (LoRA matrices are small)",
    )  # fmt: skip
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument(
        "--precisions", nargs="+", default=["None", *COMPARED[1:]],
        choices=["None", *COMPARED[1:]], help="None, the baseline, is always run",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=REPO / "recipes" / "data")
    parser.add_argument("--plot", type=Path, help="write the loss curves to this PNG")
    args = parser.parse_args()
    if args.steps < 10:
        parser.error("--steps must be >= 10 (losses are reported every 10 steps)")
    if not (args.data / "train.jsonl").is_file():
        parser.error(f"--data {args.data}: no train.jsonl there")

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_tiny_model(Path(tmp) / "model", size=args.size, seed=args.seed)
        for mode in args.modes:
            results[mode] = {}
            for precision in [None] + [p for p in COMPARED[1:] if p in args.precisions]:
                results[mode][precision] = run(args, model_path, mode, precision, Path(tmp))

    setup = (
        f"tiny Llama `{args.size}`, {args.steps} steps, batch {args.batch_size}, "
        f"max length {args.max_seq_length}, lr {args.lr} (full) / {args.lora_lr} (LoRA rank "
        f"{args.lora_rank}), no weight decay, seed {args.seed}, min_quantize_size "
        f"{args.min_quantize_size}; mlx {mx.__version__} {mx.default_device()}"
    )
    print(setup + "\n")
    print(
        "| mode | precision | trainable params | state bytes/param | final train loss "
        "| vs None | final valid loss | vs None | run (s) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, by_precision in results.items():
        base = by_precision[None]
        for precision, r in by_precision.items():
            rel = {k: (r[k] - base[k]) / base[k] * 100 for k in ("train", "valid")}
            print(
                f"| {mode} | {LABEL[precision]} | {r['trainable']:,} | {r['bytes_per_param']:.3f} "
                f"| {r['train']:.4f} | {rel['train']:+.2f}% | {r['valid']:.4f} "
                f"| {rel['valid']:+.2f}% | {r['seconds']:.0f} |"
            )
    if args.plot:
        plot(results, args.plot, f"tiny Llama {args.size}: training loss per state precision")
        print(f"\nloss curves: {args.plot}")


if __name__ == "__main__":
    main()
