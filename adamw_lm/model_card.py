"""The model card of a run on the Hub: ``huggingface_hub.ModelCard`` with the run's recipe,
optimizer, losses and the commands to use and continue it, and a loss plot next to it.

Everything here reads finished checkpoint files (no mlx, no network), so it runs on the push
thread of :mod:`adamw_lm.hub`.
"""

from __future__ import annotations

import collections
import io
import json
import math
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .checkpoint import ADAPTER_CONFIG, OPTIMIZER, TRAINER_STATE, CorruptCheckpointError
from .checkpoint.untrusted import MAX_JSON_BYTES, MAX_TRAINER_STATE_BYTES, parse_json
from .reports import LOSS_PLOT  # the loss plot next to the model card


def read_json(path: Path, cap: int, label: str, nonfinite: bool = False) -> Any:
    """Parse a small JSON file like the checkpoint loader does: size cap first, strict parser."""
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise CorruptCheckpointError(f"{label} is over the {cap}-byte limit for this file")
    return parse_json(data, label, nonfinite=nonfinite)


def _is_local_path(value: str) -> bool:
    return (value.startswith(("/", "~", ".", "\\")) or "\\" in value or ":" in value
            or value.count("/") > 1 or Path(value).expanduser().exists())


def _public(value: Any) -> Any:
    """``value`` with every string that looks like a path of this machine replaced."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    if isinstance(value, str) and _is_local_path(value):
        return "<local path>"
    return value


def _loss_rows(state: dict[str, Any], steps: list[int]) -> list[str]:
    """Table rows: mean training loss since the previous row, validation loss at the step."""
    losses = state.get("losses") if isinstance(state.get("losses"), list) else []
    train, previous = {}, 0
    for step in sorted(steps):
        window = losses[previous:step]
        if window and all(isinstance(x, (int, float)) for x in window):
            train[step] = float(sum(window) / len(window))
        previous = step
    val = _val_losses(state)
    return [f"| {s} | {_fmt(train.get(s))} | {_fmt(val.get(s))} |" for s in sorted(steps)]


def _optimizer_line(folder: Path) -> str:
    """The optimizer, its moment precisions and its state size, from the safetensors header."""
    from safetensors import safe_open

    path = folder / OPTIMIZER
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
    plan = json.loads(metadata.get("precision_plan", "{}"))
    counts = collections.Counter(str(p) if p else "param dtype" for p in plan.values())
    return (f"- Optimizer: `{metadata.get('optimizer', '?')}`, moments in "
            + ", ".join(f"{p} x {n} parameters" for p, n in sorted(counts.items()))
            + f"; optimizer state {_size(path.stat().st_size)}")


def _size(n: float) -> str:
    units, k = ("bytes", "KiB", "MiB", "GiB"), 0
    while n >= 1024 and k < len(units) - 1:
        n, k = n / 1024, k + 1
    return f"{n} bytes" if k == 0 else f"{n:.1f} {units[k]}"


def _trainer_state(folder: Path) -> dict[str, Any]:
    state = read_json(folder / TRAINER_STATE, MAX_TRAINER_STATE_BYTES, str(folder / TRAINER_STATE),
                       nonfinite=True)
    return state if isinstance(state, dict) else {}


def loss_plot(folder: Path) -> bytes | None:
    """A PNG of the training and validation losses in ``folder``'s trainer state; ``None`` when
    it has no losses or matplotlib (the ``plot`` extra) is not installed."""
    state = _trainer_state(folder)
    losses = state.get("losses") if isinstance(state.get("losses"), list) else []
    points = [(i + 1, float(x)) for i, x in enumerate(losses)
              if isinstance(x, (int, float)) and math.isfinite(x)]
    if not points:
        return None
    try:
        from matplotlib.figure import Figure  # no pyplot: this runs on the push thread
    except ImportError:
        return None
    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    axes.plot(*zip(*points, strict=True), lw=0.8, label="train")
    val = _val_losses(state)
    if val:
        axes.plot(*zip(*sorted(val.items()), strict=True), "o-", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _val_losses(state: dict[str, Any]) -> dict[int, float]:
    pairs = state.get("val_losses") if isinstance(state.get("val_losses"), list) else []
    return {p[0]: float(p[1]) for p in pairs if isinstance(p, list) and len(p) == 2
            and isinstance(p[0], int) and isinstance(p[1], (int, float))}


def model_card(folder: Path, repo_id: str, steps: list[int], branch: str = "main",
               plot: str | None = None) -> ModelCard:
    """The card of a run whose newest checkpoint is ``folder``; the Hub copy holds ``steps``;
    ``plot`` names a loss plot image next to the card."""
    state = _trainer_state(folder)
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    adapter = read_json(folder / ADAPTER_CONFIG, MAX_JSON_BYTES, str(folder / ADAPTER_CONFIG))
    fine_tune = str(adapter.get("fine_tune_type", "lora")) if isinstance(adapter, dict) else "lora"
    model = config.get("model")
    base_model = model if isinstance(model, str) and not _is_local_path(model) else None
    name = repo_id.split("/")[1]
    revision = "" if branch == "main" else f"@{branch}"
    data = ModelCardData(library_name="mlx", base_model=base_model,
                         tags=["mlx", "adamw-lm", fine_tune])
    recipe = yaml.safe_dump(_public(config), sort_keys=False).strip() if config else "(none)"
    body = f"""
# {name}

A {fine_tune} fine-tuning run of {f"`{base_model}`" if base_model else "a local base model"} with
adamw_lm on MLX. Each `checkpoints/step-NNNNNNN` folder holds the adapters, the optimizer state
and the trainer state with a sha256 manifest, so that the run can be continued exactly; the
top-level adapters are the newest checkpoint's, in mlx-lm's format.

- Checkpoints here: {", ".join(str(s) for s in sorted(steps))}
{_optimizer_line(folder) if (folder / OPTIMIZER).is_file() else ""}
{_exactness(state)}

## Use the adapters

```bash
hf download {repo_id} adapters.safetensors adapter_config.json --local-dir {name}
mlx_lm.generate --model {base_model or "BASE_MODEL"} --adapter-path {name} --prompt "..."
```

## Continue the run

```bash
adamw-lm resume hub:{repo_id}{revision}
```

Add `--step N` for an older checkpoint, and `--model PATH` / `--data PATH` where the base model
or the data were local folders on the first machine.

## Losses

{f"![training and validation loss]({plot})" + chr(10) if plot else ""}
| step | train loss | val loss |
|---:|---:|---:|
{chr(10).join(_loss_rows(state, steps))}

## Recipe

```yaml
{recipe}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _exactness(state: dict[str, Any]) -> str:
    """A run resumed on another model or data set, knowingly, is no longer exact: say so."""
    if state.get("exact") is not False:
        return ""
    changes = [c for c in state.get("changes") or [] if isinstance(c, str)]
    return ("**Not an exact run**: it was resumed on inputs other than those it started with"
            + (": " + "; ".join(changes[:10]) if changes else "") + ".")


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


__all__ = ["LOSS_PLOT", "loss_plot", "model_card", "read_json"]
