#!/usr/bin/env python3
"""Does low-precision optimizer state, or bfloat16 weights, cost fine-tuning quality?

The protocol, built so that differences of a fraction of a percent can be seen:

1. A base model is pretrained once: the offline tiny Llama (``adamw_lm.tiny``) trained ``--base-steps``
   steps in float32 with ``mlx.optimizers.AdamW`` on the text of ``recipes/data``. It is cached in
   ``--base-dir`` (default ``runs/bench_quality_base``), one folder per size / steps / lr, and
   reused by later runs.
2. It is fine-tuned on a different set, ``recipes/data/completions`` as plain text (prompt and
   completion on two lines), with mlx-lm's own trainer (``mlx_lm.tuner.trainer.train``,
   ``linear_to_lora_layers`` for LoRA and DoRA), for every seed and every compared setting:
   * the reference: float32 weights, ``state_precision=None`` (exactly ``mlx.optimizers.AdamW``);
   * bfloat16 weights (the model cast as mlx-lm loads a bf16 checkpoint) with mlx's AdamW, and
     with every state precision × ``weight_update``. LoRA adapters (and DoRA's magnitudes) are
     float32 whatever the base's dtype, so for LoRA and DoRA the weight update changes nothing
     and only the state precisions are run.
3. The final model is evaluated on the whole training and validation sets. The seed fixes the
   batch order (``np.random``), the LoRA initialisation (``mx.random``) and the optimizer's
   stochastic rounding (``AdamW(seed=)``); every setting of a seed sees the same batches. "vs
   reference" is the relative difference to the reference *of the same seed*, mean ± standard
   deviation over the seeds.

Prints a markdown table; ``--plot`` writes the validation losses per setting (mean ± std over
seeds; needs matplotlib, the ``plot`` extra).

Usage: python scripts/bench_quality.py [--size small] [--steps 150] [--seeds 3]
       [--modes full,lora,dora] [--precisions None,fp32,bf16,int8,int4]
       [--weight-updates nearest,stochastic,exact] [--plot docs/quality.png]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.tuner.datasets import CacheDataset, load_dataset
from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train
from mlx_lm.tuner.utils import linear_to_lora_layers

from adamw_lm import AdamW
from adamw_lm.tiny import TINY_SIZES, build_tiny_model
from adamw_lm.weight_update import WEIGHT_UPDATES

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ["None", "fp32", "bf16", "int8", "int4"]


@dataclass(frozen=True)
class Setting:
    """One compared fine-tune: weight dtype, state precision and weight update."""

    weights: str  # "float32" or "bfloat16"
    precision: str | None
    weight_update: str | None = None

    @property
    def label(self) -> str:
        if self == REFERENCE:
            return "float32 weights, mlx AdamW (reference)"
        state = "mlx AdamW" if self.precision is None else f"{self.precision} state"
        update = f", {self.weight_update}" if self.weight_update else ""
        return f"{'bf16' if self.weights == 'bfloat16' else 'float32'} weights, {state}{update}"


REFERENCE = Setting("float32", None)


def settings(
    mode: str, weights: list[str], precisions: list[str | None], updates: list[str]
) -> list[Setting]:
    """The reference first, then each weight dtype at every precision (bf16 weights of a full
    fine-tune also × weight update)."""
    out = [REFERENCE]
    for dtype in weights:
        for precision in precisions:
            if dtype == "float32" or precision is None or mode != "full":
                out.append(Setting(dtype, precision))
            else:
                out += [Setting(dtype, precision, u) for u in updates]
    return list(dict.fromkeys(out))


def text_set(source: Path, out: Path) -> Path:
    """``source``'s prompt/completion JSONL files as ``{"text": prompt \\n completion}`` files."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        lines = (source / f"{split}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        text = [json.dumps({"text": f"{r['prompt']}\n{r['completion']}"}) for r in rows]
        (out / f"{split}.jsonl").write_text("\n".join(text) + "\n")
    return out


def datasets(path: Path, tokenizer) -> tuple[CacheDataset, CacheDataset]:
    spec = types.SimpleNamespace(data=str(path), train=True, test=False, hf_dataset=False)
    train_set, valid_set, _ = load_dataset(spec, tokenizer)
    return CacheDataset(train_set), CacheDataset(valid_set)


def training_args(args: argparse.Namespace, steps: int, workdir: Path) -> TrainingArgs:
    return TrainingArgs(
        batch_size=args.batch_size,
        iters=steps,
        val_batches=1,
        steps_per_report=steps + 1,
        steps_per_eval=steps + 1,
        steps_per_save=steps + 1,
        max_seq_length=args.max_seq_length,
        adapter_file=str(workdir / "adapters.safetensors"),
    )


def base_model(args: argparse.Namespace) -> Path:
    """The pretrained base model's folder, made on the first call and cached in ``--base-dir``."""
    folder = args.base_dir / f"{args.size}-steps{args.base_steps}-lr{args.base_lr:g}"
    if (folder / "done").is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "model", size=args.size, seed=0)
        np.random.seed(0)
        mx.random.seed(0)
        model, tokenizer = load(str(path))
        train_set, valid_set = datasets(args.data, tokenizer)
        start = time.perf_counter()
        train(
            model, optim.AdamW(args.base_lr, weight_decay=0.0), train_set, valid_set,
            args=training_args(args, args.base_steps, Path(tmp)),
        )  # fmt: skip
        print(f"pretrained the base model in {time.perf_counter() - start:.0f} s: {folder}")
        mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(path, folder)
    (folder / "done").write_text("")
    return folder


def run(args, base: Path, data: Path, mode: str, setting: Setting, seed: int, tmp: Path) -> dict:
    """One fine-tune: its final losses on the whole training and validation sets."""
    np.random.seed(seed)
    mx.random.seed(seed)
    model, tokenizer = load(str(base))
    if setting.weights != "float32":
        model.set_dtype(getattr(mx, setting.weights))
    if mode != "full":
        model.freeze()
        linear_to_lora_layers(
            model, len(model.layers), {"rank": args.lora_rank, "scale": 20.0, "dropout": 0.0},
            use_dora=mode == "dora",
        )  # fmt: skip
    before = dict(tree_flatten(model.trainable_parameters()))
    train_set, valid_set = datasets(data, tokenizer)
    opt = AdamW(
        args.lr if mode == "full" else args.lora_lr,
        weight_decay=0.0,
        state_precision=setting.precision,
        weight_update=setting.weight_update,
        min_quantize_size=args.min_quantize_size,
        seed=seed,
    )
    start = time.perf_counter()
    train(model, opt, train_set, valid_set, args=training_args(args, args.steps, tmp))
    seconds = time.perf_counter() - start
    model.eval()
    losses = {
        name: evaluate(model, dataset, batch_size=args.batch_size, num_batches=-1,
                       max_seq_length=args.max_seq_length)
        for name, dataset in (("train", train_set), ("valid", valid_set))
    }  # fmt: skip
    after = dict(tree_flatten(model.trainable_parameters()))
    trainable = sum(p.size for p in after.values())
    moved = sum(mx.sum(after[k] != before[k]).item() for k in after)
    scalars = ("step", "learning_rate", "key", "skipped_steps")
    state = {k: v for k, v in opt.state.items() if k not in scalars}
    return {
        **losses,
        "seconds": seconds,
        "moved": moved / trainable,
        "bytes_per_param": sum(a.nbytes for _, a in tree_flatten(state)) / trainable,
        "trainable": trainable,
    }


def mean_std(values: list[float], fmt: str) -> str:
    """``values`` as ``mean ± std`` (ddof=1), or the bare value for one seed."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(np.mean(values), fmt)} ± {np.std(values, ddof=1):.2f}"


def report(results: dict) -> None:
    """Prints the markdown table; ``results[mode][setting]`` holds one run per seed."""
    print(
        "| mode | setting | state bytes/param | weights moved | final train loss | vs reference "
        "| final valid loss | vs reference | run (s) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, by_setting in results.items():
        base = by_setting[REFERENCE]
        for setting, runs in by_setting.items():
            rel = {
                k: [(r[k] - b[k]) / b[k] * 100 for r, b in zip(runs, base)]
                for k in ("train", "valid")
            }
            print(
                f"| {mode} | {setting.label} | {runs[0]['bytes_per_param']:.3f} "
                f"| {100 * np.mean([r['moved'] for r in runs]):.0f} % "
                f"| {mean_std([r['train'] for r in runs], '.4f')} "
                f"| {mean_std(rel['train'], '+.2f')} % "
                f"| {mean_std([r['valid'] for r in runs], '.4f')} "
                f"| {mean_std(rel['valid'], '+.2f')} % "
                f"| {np.mean([r['seconds'] for r in runs]):.0f} |"
            )


def plot(results: dict, path: Path, title: str) -> None:
    """Final validation loss per setting, mean ± std over seeds, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results)
    fig, axes = plt.subplots(
        len(modes), 1, figsize=(9, 0.9 + 0.32 * sum(len(r) for r in results.values())),
        squeeze=False, gridspec_kw={"height_ratios": [len(results[m]) for m in modes]},
    )  # fmt: skip
    for ax, mode in zip(axes[:, 0], modes):
        by_setting = results[mode]
        labels = [s.label for s in by_setting]
        means = [np.mean([r["valid"] for r in runs]) for runs in by_setting.values()]
        stds = [np.std([r["valid"] for r in runs], ddof=1) if len(runs) > 1 else 0 for runs in
                by_setting.values()]  # fmt: skip
        y = np.arange(len(labels))[::-1]
        ax.errorbar(means, y, xerr=stds, fmt="o", capsize=3)
        ax.axvline(means[0], color="grey", linestyle="--", linewidth=1)
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_title(f"{mode} fine-tune", fontsize=10)
        ax.set_xlabel("final validation loss (mean ± std over seeds; dashed: reference)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def names(values: list[str], allowed: list[str], flag: str, parser) -> list[str]:
    """The names in ``values``, space- or comma-separated, in order and without repeats."""
    given = [name for value in values for name in value.split(",") if name]
    unknown = [name for name in given if name not in allowed]
    if unknown:
        parser.error(f"{flag}: unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return list(dict.fromkeys(given))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=sorted(TINY_SIZES))
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--base-lr", type=float, default=1e-3)
    parser.add_argument("--base-dir", type=Path, default=REPO / "runs" / "bench_quality_base")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-5, help="full fine-tune learning rate")
    parser.add_argument("--lora-lr", type=float, default=1e-4, help="LoRA / DoRA learning rate")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA / DoRA rank")
    parser.add_argument(
        "--min-quantize-size", type=int, default=512,
        help="tensors smaller than this keep float32 moments (LoRA matrices are small)",
    )  # fmt: skip
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], metavar="MODE")
    parser.add_argument("--precisions", nargs="+", default=PRECISIONS, metavar="PRECISION")
    parser.add_argument(
        "--weight-updates", nargs="+", default=list(WEIGHT_UPDATES), metavar="MODE"
    )
    parser.add_argument(
        "--weights", nargs="+", default=["bfloat16"], metavar="DTYPE",
        help="weight dtypes to fine-tune at each precision: bfloat16 (default) and/or float32 "
        "(controls: the state precision's own effect)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=REPO / "recipes" / "data")
    parser.add_argument("--plot", type=Path, help="write the final validation losses to this PNG")
    args = parser.parse_args()
    if args.seeds < 1 or args.steps < 1 or args.base_steps < 1:
        parser.error("--seeds, --steps and --base-steps must be >= 1")
    for folder in (args.data, args.data / "completions"):
        if not (folder / "train.jsonl").is_file():
            parser.error(f"--data {args.data}: no {folder / 'train.jsonl'}")
    modes = names(args.modes, ["full", "lora", "dora"], "--modes", parser)
    precisions = [
        None if p == "None" else p
        for p in names(args.precisions, PRECISIONS, "--precisions", parser)
    ]
    updates = names(args.weight_updates, list(WEIGHT_UPDATES), "--weight-updates", parser)
    dtypes = names(args.weights, ["bfloat16", "float32"], "--weights", parser)
    seeds = list(range(args.seed, args.seed + args.seeds))

    base = base_model(args)
    results: dict[str, dict[Setting, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = text_set(args.data / "completions", Path(tmp) / "completions-text")
        for mode in modes:
            results[mode] = {
                s: [run(args, base, data, mode, s, seed, Path(tmp)) for seed in seeds]
                for s in settings(mode, dtypes, precisions, updates)
            }

    print(
        f"tiny Llama `{args.size}` pretrained {args.base_steps} steps (lr {args.base_lr:g}, "
        f"float32) "
        f"on recipes/data, fine-tuned {args.steps} steps on recipes/data/completions as text, "
        f"batch {args.batch_size}, max length {args.max_seq_length}, lr {args.lr:g} (full) / "
        f"{args.lora_lr:g} (LoRA / DoRA rank {args.lora_rank}), no weight decay, seeds "
        f"{seeds[0]}-{seeds[-1]}, min_quantize_size {args.min_quantize_size}; "
        f"mlx {mx.__version__} {mx.default_device()}\n"
    )
    report(results)
    if args.plot:
        plot(results, args.plot, f"tiny Llama {args.size}: {len(seeds)} seeds, lr {args.lr:g}")
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
