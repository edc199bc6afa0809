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

``--seeds N`` repeats every run for seeds ``--seed`` .. ``--seed + N - 1`` (each seed its own
model initialisation, data order, LoRA initialisation and stochastic rounding) and reports the
mean final losses and the mean ± standard deviation of the per-seed relative difference to the
baseline, so that a systematic gap can be told from run-to-run noise.

Prints a markdown table; ``--plot`` writes the training-loss curves (of the first seed only; needs
matplotlib, the ``plot`` extra).

Usage: python scripts/bench_quality.py [--size medium] [--steps 300] [--seeds 1]
       [--modes full,lora] [--precisions None,fp32,bf16,int8,int4] [--plot loss.png]
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
    args: argparse.Namespace,
    model_path: Path,
    mode: str,
    precision: str | None,
    seed: int,
    workdir: Path,
) -> dict:
    """One fine-tune; its final losses on the whole training and validation sets, and its curve."""
    # mlx-lm's trainer draws the batch order from np.random and LoRA's initialisation from
    # mx.random, so seeding both here makes every precision see the same run but for its state.
    np.random.seed(seed)
    mx.random.seed(seed)
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
        seed=seed,
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
    """Training-loss curves, one panel per mode; ``results[mode][precision]`` is one run."""
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


def names(
    values: list[str], allowed: list[str], flag: str, parser: argparse.ArgumentParser
) -> list[str]:
    """The names in ``values``, space- or comma-separated, in order and without repeats."""
    given = [name for value in values for name in value.split(",") if name]
    unknown = [name for name in given if name not in allowed]
    if unknown:
        parser.error(f"{flag}: unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return list(dict.fromkeys(given))


def mean_std(values: list[float], fmt: str) -> str:
    """``values`` as ``mean ± std`` (std over seeds, ddof=1), or the bare value for one seed."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(np.mean(values), fmt)} ± {np.std(values, ddof=1):.2f}"


def report(results: dict, seeds: list[int]) -> None:
    """Prints the markdown table; ``results[mode][precision]`` holds one run per seed."""
    several = len(seeds) > 1
    prefix = "mean " if several else ""
    print(
        f"| mode | precision | trainable params | state bytes/param | {prefix}final train loss "
        f"| vs None | {prefix}final valid loss | vs None | {prefix}run (s) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, by_precision in results.items():
        base = by_precision[None]
        for precision, runs in by_precision.items():
            # Paired: each seed is compared with the baseline of the same seed (same model, same
            # batches), which takes the seed-to-seed spread of the losses out of the difference.
            rel = {
                k: [(r[k] - b[k]) / b[k] * 100 for r, b in zip(runs, base)]
                for k in ("train", "valid")
            }
            loss = {k: np.mean([r[k] for r in runs]) for k in ("train", "valid")}
            seconds = np.mean([r["seconds"] for r in runs])
            # State size and parameter count do not depend on the seed.
            first = runs[0]
            print(
                f"| {mode} | {LABEL[precision]} | {first['trainable']:,} "
                f"| {first['bytes_per_param']:.3f} | {loss['train']:.4f} "
                f"| {mean_std(rel['train'], '+.2f')}% | {loss['valid']:.4f} "
                f"| {mean_std(rel['valid'], '+.2f')}% | {seconds:.0f} |"
            )
    if several:
        control = ""
        if any("fp32" in by_precision for by_precision in results.values()):
            control = "; the fp32 (control) row shows the drift from rounding alone"
        print(
            f"\nvs None: the relative difference to the None baseline of the same seed (same model "
            f"initialisation and data order), mean ± standard deviation across the {len(seeds)} "
            f"seeds{control}."
        )


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
    parser.add_argument(
        "--modes", nargs="+", default=["full", "lora"], metavar="MODE",
        help="full and/or lora, space- or comma-separated (default: both)",
    )  # fmt: skip
    parser.add_argument(
        "--precisions", nargs="+", default=["None", *COMPARED[1:]], metavar="PRECISION",
        help="of None, fp32, bf16, int8, int4, space- or comma-separated (default: all); "
        "None, the baseline, is always run",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument(
        "--seeds", type=int, default=1,
        help="how many seeds (--seed, --seed + 1, ...) to run each mode and precision for",
    )  # fmt: skip
    parser.add_argument("--data", type=Path, default=REPO / "recipes" / "data")
    parser.add_argument("--plot", type=Path, help="write the loss curves (first seed) to this PNG")
    args = parser.parse_args()
    if args.steps < 10:
        parser.error("--steps must be >= 10 (losses are reported every 10 steps)")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if not (args.data / "train.jsonl").is_file():
        parser.error(f"--data {args.data}: no train.jsonl there")
    modes = names(args.modes, ["full", "lora"], "--modes", parser)
    chosen = names(args.precisions, ["None", *COMPARED[1:]], "--precisions", parser)
    precisions = [None] + [p for p in COMPARED[1:] if p in chosen]
    seeds = list(range(args.seed, args.seed + args.seeds))

    results: dict[str, dict[str | None, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The seed also initialises the model, so each seed fine-tunes its own one.
        model_paths = {
            seed: build_tiny_model(Path(tmp) / f"model-{seed}", size=args.size, seed=seed)
            for seed in seeds
        }
        for mode in modes:
            results[mode] = {
                precision: [
                    run(args, model_paths[seed], mode, precision, seed, Path(tmp))
                    for seed in seeds
                ]
                for precision in precisions
            }

    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
    setup = (
        f"tiny Llama `{args.size}`, {args.steps} steps, batch {args.batch_size}, "
        f"max length {args.max_seq_length}, lr {args.lr} (full) / {args.lora_lr} (LoRA rank "
        f"{args.lora_rank}), no weight decay, {seed_text}, min_quantize_size "
        f"{args.min_quantize_size}; mlx {mx.__version__} {mx.default_device()}"
    )
    print(setup + "\n")
    report(results, seeds)
    if args.plot:
        title = f"tiny Llama {args.size}: training loss per state precision"
        if len(seeds) > 1:
            # On its own line: one panel (a single mode) is too narrow for the whole title.
            title += f"\nseed {seeds[0]} only, of {len(seeds)} seeds"
        first_seed = {
            mode: {precision: runs[0] for precision, runs in by_precision.items()}
            for mode, by_precision in results.items()
        }
        plot(first_seed, args.plot, title)
        print(f"\nloss curves: {args.plot}")


if __name__ == "__main__":
    main()
