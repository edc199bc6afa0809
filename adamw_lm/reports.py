"""What a run tells the outside: the start-up header, report lines, the metrics log, the loss plot.

The loop calls mlx-lm's ``TrainingCallback`` interface and nothing else, so the metrics log, the
terminal and mlx-lm's ``report_to`` callbacks (wandb, swanlab) are all fed the same records.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.callbacks import TrainingCallback

from .checkpoint.format import CorruptCheckpointError, finite_number
from .checkpoint.untrusted import parse_json
from .runfiles import open_append, read_text_nofollow, replace_file, replace_text

METRICS_FILE = "metrics.jsonl"
#: The loss plot (run folder, and next to the model card on the Hub).
LOSS_PLOT = "loss.png"
_MAX_METRICS_BYTES = 256 << 20
#: Longest line of ``metrics.jsonl`` read back: a record is a few hundred bytes, and a line is
#: parsed whole (a 256 MB array on one line would take gigabytes as Python objects).
_MAX_METRICS_LINE = 64 << 10


class MetricsLog(TrainingCallback):
    """``metrics.jsonl``: one JSON object per report, appended as the run goes (flushed each line).

    The file is opened at the first record, so a run that fails during set-up leaves none behind.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS_FILE
        self._file = None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open_append(self.path)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_loss_report(self, train_info: dict) -> None:
        self.write({
            "iteration": train_info["iteration"], "train_loss": train_info["train_loss"],
            "learning_rate": train_info["learning_rate"],
            "trained_tokens": train_info["trained_tokens"],
            "tokens_per_second": train_info["tokens_per_second"],
            "peak_memory_gb": train_info["peak_memory"],
        })

    def on_val_loss_report(self, val_info: dict) -> None:
        self.write({"iteration": val_info["iteration"], "val_loss": val_info["val_loss"]})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def truncate_metrics(run_dir: Path, iteration: int) -> None:
    """Drop records written after the checkpoint we resume from, so the log reads as one run.

    A line torn by a crash is dropped too. The log is rewritten through a fresh temporary."""
    path = run_dir / METRICS_FILE
    text = read_text_nofollow(path, _MAX_METRICS_BYTES)
    if not text and not path.exists():
        return
    kept = []
    for line in text.splitlines():
        record = _record(line)
        at = finite_number(record.get("iteration")) if record is not None else None
        if at is not None and 0 <= at <= iteration:
            kept.append(line)
    replace_text(path, "".join(line + "\n" for line in kept))


def _record(line: str) -> Optional[dict]:
    """The object on one line of ``metrics.jsonl``, or ``None`` for a line that is not one (torn
    by a crash, or written by someone else: the log is read back from the run folder, untrusted,
    so a line is capped in length and parsed with the checkpoint's limits, nesting included)."""
    if len(line) > _MAX_METRICS_LINE:
        return None
    try:
        record = parse_json(line.encode(), METRICS_FILE, nonfinite=True)
    except CorruptCheckpointError:
        return None
    return record if isinstance(record, dict) else None


class TerminalReport(TrainingCallback):
    """mlx-lm's report lines (``Iter N: Train loss ...``); above the progress bar when there is one."""

    def __init__(self, bar: Any = None):
        self.bar = bar

    def _print(self, line: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def on_train_loss_report(self, train_info: dict) -> None:
        self._print(
            f"Iter {train_info['iteration']}: Train loss {train_info['train_loss']:.3f}, "
            f"Learning Rate {train_info['learning_rate']:.3e}, "
            f"It/sec {train_info['iterations_per_second']:.3f}, "
            f"Tokens/sec {train_info['tokens_per_second']:.3f}, "
            f"Trained Tokens {train_info['trained_tokens']}, "
            f"Peak mem {train_info['peak_memory']:.3f} GB"
        )

    def on_val_loss_report(self, val_info: dict) -> None:
        self._print(f"Iter {val_info['iteration']}: Val loss {val_info['val_loss']:.3f}, "
                    f"Val took {val_info['val_time']:.3f}s")


class Fanout(TrainingCallback):
    """Several callbacks as one, called in order."""

    def __init__(self, callbacks: Iterable[Optional[TrainingCallback]]):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_train_loss_report(self, train_info: dict) -> None:
        for c in self.callbacks:
            c.on_train_loss_report(train_info)

    def on_val_loss_report(self, val_info: dict) -> None:
        for c in self.callbacks:
            c.on_val_loss_report(val_info)


# -- the header -----------------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _kind(path: str) -> str:
    """A parameter's kind: its path with layer numbers folded (``layers.*.self_attn.q_proj.lora_a``)."""
    return re.sub(r"\.\d+\.", ".*.", path)


def precision_rows(model: nn.Module, optimizer: Any) -> list[tuple[str, str, int, int]]:
    """``(kind, precision, tensors, state bytes)`` per kind of trainable tensor, from the initialised
    optimizer's plan and state."""
    trainable = dict(tree_flatten(model.trainable_parameters()))
    plan = optimizer.precision_plan
    per_param: dict[str, int] = defaultdict(int)
    for key, array in tree_flatten(optimizer.state):
        parts = key.split(".")
        owner = next((p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if p in trainable), None)
        if owner is not None:
            per_param[owner] += array.nbytes
    groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for path in trainable:
        group = groups[(_kind(path), str(plan.get(path) or "none (parameter dtype)"))]
        group[0] += 1
        group[1] += per_param[path]
    return [(kind, precision, n, nbytes) for (kind, precision), (n, nbytes) in sorted(groups.items())]


def header(config: Any, model: nn.Module, optimizer: Any) -> list[str]:
    """The lines printed before training: model, trainable parameters, the precision plan."""
    from mlx_lm.utils import get_total_parameters  # counts a quantized layer's logical weights

    total = get_total_parameters(model)
    trainable = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    lines = [
        f"Model: {config.model}",
        f"Fine-tune: {config.fine_tune_type}, {config.num_layers} layers"
        + (f", rank {config.lora_parameters.get('rank')}" if config.fine_tune_type != "full" else ""),
        f"Trainable parameters: {trainable * 100 / max(total, 1):.3f}% ({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)",
        f"Optimizer state: {_human(optimizer.state_nbytes())} "
        f"(state_precision {config.optimizer.state_precision})",
    ]
    for kind, precision, n, nbytes in precision_rows(model, optimizer):
        lines.append(f"  {kind:<48} {precision:<22} x{n:<4} {_human(nbytes):>10}")
    return lines


def unused_precision_warnings(config: Any, model: nn.Module, optimizer: Any) -> list[str]:
    """A warning for each requested low precision that no trainable tensor ended up with."""
    got = set(optimizer.precision_plan.values())
    o = config.optimizer
    warnings = []
    if o.state_precision not in (None, "fp32", "auto") and o.state_precision not in got:
        warnings.append(
            f"warning: state precision {o.state_precision} applies to no tensor: every trainable tensor "
            f"it would cover has fewer than optimizer.min_quantize_size={o.min_quantize_size} elements "
            f"or is named by an override, and keeps other moments (lower min_quantize_size to quantize them)"
        )
    deciding = {optimizer.override_pattern(path) for path in optimizer.precision_plan}
    for pattern, precision in o.overrides.items():
        if pattern not in deciding:
            warnings.append(f"warning: optimizer.overrides pattern {pattern!r} ({precision}) decides no "
                            "trainable tensor's precision (it matches none, or an earlier pattern does)")
    return warnings


# -- the loss plot ------------------------------------------------------------------------------


def _records(run_dir: Path) -> list[dict]:
    """The objects of ``metrics.jsonl`` (none if it is missing). The log is read back from the run
    folder, so it is untrusted: size-limited, not followed through a link, malformed lines left out."""
    lines = read_text_nofollow(run_dir / METRICS_FILE, _MAX_METRICS_BYTES).splitlines()
    return [record for record in map(_record, lines) if record is not None]


def logged(run_dir: Path, key: str, iteration: int) -> bool:
    """Whether ``metrics.jsonl`` holds a number under ``key`` for ``iteration``."""
    return any(finite_number(r.get("iteration")) == iteration and finite_number(r.get(key)) is not None
               for r in _records(run_dir))  # fmt: skip


def plot(run_dir: Path) -> Optional[Path]:
    """``loss.png`` from metrics.jsonl when matplotlib is installed (the ``plot`` extra).

    matplotlib is imported here only, at the end of a run: start-up does not pay for it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = _records(run_dir)

    def points(key: str) -> list[tuple[float, float]]:
        return [(r["iteration"], r[key]) for r in records
                if all(finite_number(r.get(k)) is not None for k in ("iteration", key))]  # fmt: skip

    train, val = points("train_loss"), points("val_loss")
    if not train and not val:
        return None  # nothing to draw (a run folder fetched from the Hub has no log)
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(*zip(*points), label=label, marker="." if len(points) < 50 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    out = run_dir / LOSS_PLOT
    replace_file(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out
