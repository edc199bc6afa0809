"""A resumable fine-tuning loop built from mlx-lm's own parts.

Model loading, LoRA/DoRA layers, datasets, batching, the loss and evaluation are mlx-lm's. What this
module adds is what makes a run *the same run* after a stop: every random draw is a function of
``(seed, iteration)``, the data order of ``(seed, epoch)``, and the whole state — adapters, optimizer
state, position — goes into an atomic checkpoint (:mod:`adamw_lm.checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import CacheDataset, load_dataset
from mlx_lm.tuner.trainer import default_loss, evaluate, grad_checkpoint, iterate_batches
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers
from mlx_lm.utils import save_config

from . import checkpoint
from .config import ConfigError, TrainConfig, from_dict, set_dotted
from .optim import AdamW

METRICS_FILE = "metrics.jsonl"


@dataclass
class RunResult:
    """What a call to :func:`train` or :func:`resume` did."""

    run_dir: Path
    iteration: int
    checkpoint: Optional[Path]
    stop_signal: Optional[int] = None  # SIGINT / SIGTERM when the run was stopped before its end
    losses: list[float] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return self.stop_signal is not None


# -- set-up -------------------------------------------------------------------------------------


def _is_local(spec: str) -> bool:
    """Whether a ``model`` / ``data`` value names a local path rather than a Hub id (``org/name``)."""
    return Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1


def load_model(config: TrainConfig) -> tuple[nn.Module, Any]:
    """``mlx_lm.load`` with a clear error for a model path that does not exist."""
    from mlx_lm import load

    path = Path(config.model).expanduser()
    if _is_local(config.model) and not path.exists():
        raise ConfigError(f"config key 'model': {config.model} does not exist (expected a model folder with config.json)")
    if path.exists() and not (path / "config.json").is_file():
        raise ConfigError(f"config key 'model': {config.model} has no config.json (expected an mlx-lm model folder)")
    try:
        return load(
            str(path) if path.exists() else config.model,
            tokenizer_config={"trust_remote_code": config.trust_remote_code},
            trust_remote_code=config.trust_remote_code,
        )
    except Exception as e:
        if path.exists():
            raise
        # A Hub repo id: not found, offline, gated... say which key and what happened.
        raise ConfigError(f"config key 'model': could not load {config.model!r} from the Hugging Face Hub "
                          f"({type(e).__name__}: {e})") from None


def setup_trainable(model: nn.Module, config: TrainConfig) -> None:
    """Freeze the model and open up what ``fine_tune_type`` trains, exactly as ``mlx_lm lora`` does."""
    model.freeze()
    if config.num_layers > len(model.layers):
        raise ConfigError(
            f"config key 'num_layers' is {config.num_layers} but the model has {len(model.layers)} layers"
        )
    if config.fine_tune_type == "full":
        for layer in model.layers[-max(config.num_layers, 0):]:
            layer.unfreeze()
    else:
        try:
            linear_to_lora_layers(
                model, config.num_layers, config.lora_parameters,
                use_dora=config.fine_tune_type == "dora",
            )
        except KeyError as e:
            raise ConfigError(f"config key 'lora_parameters': {e}") from None


def adapter_config(config: TrainConfig) -> dict[str, Any]:
    """The ``adapter_config.json`` that ``mlx_lm.load(..., adapter_path=...)`` and ``mlx_lm.fuse`` read."""
    data = config.mlx_lm_args().__dict__
    if config.fine_tune_type == "full":
        data["lora_parameters"] = None
    return data


def _format_keys(config: TrainConfig, record: dict[str, Any]) -> tuple[str, ...]:
    """The keys every record needs, in the format mlx-lm's ``create_dataset`` picks from the first."""
    prompt = config.prompt_feature or "prompt"
    completion = config.completion_feature or "completion"
    chat = config.chat_feature or "messages"
    text = config.text_feature or "text"
    for keys in ((prompt, completion), (chat,), (text,)):
        if all(k in record for k in keys):
            return keys
    raise ConfigError(
        f"no known data format: expected keys {text!r} (text), {chat!r} (chat) or {prompt!r} + "
        f"{completion!r} (completions); found {sorted(record)}"
    )


def _check_jsonl(path: Path, config: TrainConfig) -> None:
    """Every line a JSON object in one format, before mlx-lm reads it (it stops at the first bad
    line without saying which, and processes records lazily, mid-run)."""
    keys: Optional[tuple[str, ...]] = None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            where = f"{path}, line {number}"
            if not line.strip():
                raise ConfigError(f"{where}: empty line (every line must be one JSON object)")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
            try:
                keys = keys or _format_keys(config, record)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            missing = [k for k in keys if k not in record]
            if missing:
                raise ConfigError(f"{where}: missing {missing} (line 1 set the format to keys {list(keys)})")


def load_data(config: TrainConfig, tokenizer: Any) -> tuple[Any, Any, Any]:
    """Train/valid/test sets through mlx-lm's ``load_dataset``, after checking local files line by line."""
    data = Path(config.data).expanduser()
    if config.hf_dataset is None:
        if _is_local(config.data):
            if not data.is_dir():
                raise ConfigError(f"config key 'data': folder {config.data} does not exist (expected train.jsonl, valid.jsonl)")
            if not (data / "train.jsonl").is_file():
                raise ConfigError(f"config key 'data': {data / 'train.jsonl'} does not exist")
            for name in ("train", "valid", "test"):
                if (data / f"{name}.jsonl").is_file():
                    _check_jsonl(data / f"{name}.jsonl", config)
    args = config.mlx_lm_args()
    args.data = str(data) if data.exists() else config.data
    try:
        train_set, valid_set, test_set = load_dataset(args, tokenizer)
    except ImportError as e:
        raise ConfigError(f"config key 'data': {config.data!r} is not a local folder, and loading a Hugging "
                          f"Face dataset needs the `datasets` package ({e})") from None
    except (ValueError, KeyError) as e:
        raise ConfigError(f"config key 'data' ({config.data}): {e}") from None
    if len(train_set) < config.batch_size:
        raise ConfigError(
            f"config key 'batch_size' is {config.batch_size} but the training set has only {len(train_set)} examples"
        )
    return CacheDataset(train_set), CacheDataset(valid_set), CacheDataset(test_set)


def build_optimizer(config: TrainConfig) -> AdamW:
    """The run's :class:`~adamw_lm.AdamW`; schedules are rebuilt from the config, never pickled."""
    try:
        lr = build_schedule(config.lr_schedule) if config.lr_schedule else config.learning_rate
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"config key 'lr_schedule' {config.lr_schedule}: {e}") from None
    o = config.optimizer
    try:
        return AdamW(
            lr, o.betas, o.eps, o.weight_decay, o.bias_correction,
            state_precision=o.state_precision, precision_overrides=o.overrides,
            min_quantize_size=o.min_quantize_size, memory_budget=o.memory_budget, seed=config.seed,
            weight_update=o.weight_update,
        )
    except ValueError as e:
        raise ConfigError(f"config section 'optimizer': {e}") from None


# -- data order ---------------------------------------------------------------------------------


class BatchStream:
    """mlx-lm's batches in an order that is a function of ``(seed, epoch)``, with a position to save.

    ``iterate_batches`` seeds NumPy's global RNG and draws its permutation on the first batch; one call
    per epoch with seed ``seed + epoch`` therefore makes the order independent of anything else that
    used NumPy's RNG in between (evaluation does).
    """

    def __init__(self, dataset: Any, config: TrainConfig, epoch: int = 0, offset: int = 0):
        self.dataset, self.config = dataset, config
        self.epoch, self.offset = epoch, 0
        self._it = self._epoch_iter()
        for _ in range(offset):
            next(self)

    def _epoch_iter(self) -> Iterator:
        return iterate_batches(
            self.dataset, self.config.batch_size, self.config.max_seq_length,
            loop=False, seed=self.config.seed + self.epoch,
        )

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> tuple[mx.array, mx.array]:
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.offset = self.epoch + 1, 0
            self._it = self._epoch_iter()
            batch = next(self._it)
        self.offset += 1
        return batch

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


def iteration_seed(seed: int, iteration: int) -> int:
    """The global mlx seed set before each iteration (dropout draws from it)."""
    return (seed * 1_000_003 + iteration) % (2**63)


# -- the loop -----------------------------------------------------------------------------------


class _StopRequest:
    """Ctrl-C / SIGTERM: finish the current step, save, and stop."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            # ValueError off the main thread: signals stay with whoever owns them.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(run_dir: Path, iteration: int) -> None:
    """Drop records written after the checkpoint we resume from, so the log reads as one run.

    A line torn by a crash is dropped too."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] <= iteration:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _absolute_paths(config: TrainConfig) -> TrainConfig:
    """Local paths made absolute, so that the saved config resumes from any working directory."""
    data = config.to_dict()
    for key in ("model", "data", "resume_adapter_file"):
        if data[key] and Path(data[key]).expanduser().exists():
            data[key] = str(Path(data[key]).expanduser().resolve())
    data["checkpoint"]["dir"] = str(config.run_dir.expanduser().resolve())
    return from_dict(data)


def _reporting_callback(config: TrainConfig) -> Optional[TrainingCallback]:
    """mlx-lm's own ``report_to`` callbacks (wandb, swanlab), fed the same records as in mlx-lm."""
    if not config.report_to:
        return None
    from mlx_lm.tuner.callbacks import get_reporting_callbacks

    try:
        return get_reporting_callbacks(config.report_to, project_name=config.project_name,
                                       log_dir=str(config.run_dir), config=config.to_dict())
    except (ImportError, ValueError) as e:
        raise ConfigError(f"config key 'report_to' ({config.report_to!r}): {e}") from None


def run(
    config: TrainConfig,
    *,
    resume_from: Optional[Path] = None,
    convert_precision: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callback: Optional[TrainingCallback] = None,
) -> RunResult:
    """Train ``config``, checkpointing as configured; continue from the checkpoint ``resume_from``.

    A new run refuses a run folder that already holds checkpoints unless ``overwrite`` (which then
    removes them and the metrics log). ``callback`` is an mlx-lm ``TrainingCallback``.
    """
    if mx.distributed.init().size() > 1:
        raise ConfigError("several processes (mx.distributed) are not supported yet: run one process")
    config = _absolute_paths(config)
    run_dir = config.run_dir
    replace_old_run = resume_from is None and (run_dir / checkpoint.CHECKPOINTS_DIR).exists()
    if replace_old_run and not overwrite:
        raise ConfigError(
            f"{run_dir} already holds checkpoints: continue it with `adamw-lm resume {run_dir}`, "
            "or start over with --overwrite"
        )
    np.random.seed(config.seed)
    mx.random.seed(config.seed)
    model, tokenizer = load_model(config)
    train_set, valid_set, test_set = load_data(config, tokenizer)
    setup_trainable(model, config)
    optimizer = build_optimizer(config)
    reporter = _reporting_callback(config)
    callbacks = [c for c in (callback, reporter) if c is not None]

    state: dict[str, Any] = {"iteration": 0, "epoch": 0, "offset": 0, "losses": [], "val_losses": []}
    if resume_from is not None:
        saved = checkpoint.load(resume_from, model, optimizer, convert_precision=convert_precision)
        state.update({k: saved[k] for k in state})
        _truncate_metrics(run_dir, state["iteration"])
    elif config.resume_adapter_file:
        checkpoint.load_adapters_only(config.resume_adapter_file, model)
    if replace_old_run:  # only now that model, data and optimizer have all been set up without error
        shutil.rmtree(run_dir / checkpoint.CHECKPOINTS_DIR)
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer.init(model.trainable_parameters())
    if config.grad_checkpoint:
        grad_checkpoint(model.layers[0])

    batches = BatchStream(train_set, config, state["epoch"], state["offset"])
    loss_and_grad = nn.value_and_grad(model, default_loss)
    accum = config.grad_accumulation_steps
    compiled_state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def step(batch: mx.array, lengths: mx.array, prev_grad: Any, do_update: bool) -> tuple:
        (loss, toks), grad = loss_and_grad(model, batch, lengths)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            if accum > 1:
                grad = tree_map(lambda g: g / accum, grad)
            optimizer.update(model, grad)
            grad = None
        return loss, toks, grad

    def save(iteration: int) -> Path:
        last = state["val_losses"][-1] if state["val_losses"] else None
        trainer_state = {
            **state, "iteration": iteration, **batches.position(), "seed": config.seed,
            "config": config.to_dict(),
        }
        return checkpoint.save(
            run_dir, iteration, model, optimizer, trainer_state, adapter_config(config),
            keep_last=config.checkpoint.keep_last, keep_best=config.checkpoint.keep_best,
            # keep_best ranks by a validation loss of exactly these weights, or not at all.
            val_loss=last[1] if last and last[0] == iteration else None,
        )

    def validate(iteration: int) -> None:
        tic = time.perf_counter()
        val_loss = evaluate(
            model, valid_set, config.batch_size, config.val_batches, config.max_seq_length,
            loss=default_loss, iterate_batches=partial(iterate_batches, seed=config.seed),
        )
        model.train()
        state["val_losses"].append([iteration, val_loss])
        _append_metrics(run_dir, {"iteration": iteration, "val_loss": val_loss})
        info = {"iteration": iteration, "val_loss": val_loss, "val_time": time.perf_counter() - tic}
        for c in callbacks:
            c.on_val_loss_report(info)

    from tqdm import tqdm

    validating = len(valid_set) > 0 and config.val_batches != 0
    model.train()
    grad = None
    last_saved: Optional[Path] = None
    start = state["iteration"]
    window_tokens, window_time, window_start = 0, 0.0, start
    trained_tokens = 0
    save_due = False
    bar = tqdm(total=config.iters, initial=start, disable=not progress, unit="it", dynamic_ncols=True)
    with _StopRequest() as stop, bar:
        if validating and start == 0:
            validate(0)  # the base model, as mlx-lm reports before its first step
        for it in range(start + 1, config.iters + 1):
            tic = time.perf_counter()
            mx.random.seed(iteration_seed(config.seed, it))
            batch, lengths = next(batches)
            loss, toks, grad = step(batch, lengths, grad, it % accum == 0)
            mx.eval(compiled_state, loss, toks, grad)
            if mx.get_cache_memory() > config.clear_cache_threshold:  # as mlx-lm's trainer does
                mx.clear_cache()
            window_time += time.perf_counter() - tic
            window_tokens += toks.item()
            state["losses"].append(loss.item())
            state["iteration"] = it
            bar.update(1)

            if it % config.steps_per_report == 0 or it == config.iters:
                trained_tokens += window_tokens
                record = {
                    "iteration": it,
                    "train_loss": float(np.mean(state["losses"][-(it - window_start):])),
                    "learning_rate": optimizer.learning_rate.item(),
                    "tokens_per_second": window_tokens / max(window_time, 1e-9),
                    "peak_memory_gb": mx.get_peak_memory() / 1e9,
                }
                _append_metrics(run_dir, record)
                bar.set_postfix(
                    loss=f"{record['train_loss']:.3f}", lr=f"{record['learning_rate']:.2e}",
                    tok_s=f"{record['tokens_per_second']:.0f}", peak=f"{record['peak_memory_gb']:.2f}GB",
                )
                info = {
                    "iteration": it, "train_loss": record["train_loss"],
                    "learning_rate": record["learning_rate"],
                    "iterations_per_second": (it - window_start) / max(window_time, 1e-9),
                    "tokens_per_second": record["tokens_per_second"], "trained_tokens": trained_tokens,
                    "peak_memory": record["peak_memory_gb"],
                }
                for c in callbacks:
                    c.on_train_loss_report(info)
                window_tokens, window_time, window_start = 0, 0.0, it

            if validating and (it % config.steps_per_eval == 0 or it == config.iters):
                validate(it)
            save_due = save_due or it % config.checkpoint_every == 0
            # Checkpoints fall on optimizer updates: an accumulated gradient is never saved.
            if it % accum == 0 and (save_due or stop.signal is not None) or it == config.iters:
                last_saved = save(it)
                save_due = False
            if stop.signal is not None and it % accum == 0 and it < config.iters:
                bar.close()
                print(
                    f"\nStopped at iteration {it}; checkpoint {last_saved}.\n"
                    f"Resume with: adamw-lm resume {run_dir}",
                    file=sys.stderr,
                )
                return RunResult(run_dir, it, last_saved, stop.signal, state["losses"])

    _write_final_adapters(run_dir, model, config)
    if config.test:
        _test(model, test_set, config, run_dir, state["iteration"])
    _plot(run_dir)
    return RunResult(run_dir, state["iteration"], last_saved, None, state["losses"])


def _test(model: nn.Module, test_set: Any, config: TrainConfig, run_dir: Path, iteration: int) -> float:
    """mlx_lm lora's ``test: true``: loss and perplexity on the test set after training."""
    model.eval()
    loss = evaluate(model, test_set, config.batch_size, config.test_batches, config.max_seq_length,
                    iterate_batches=partial(iterate_batches, seed=config.seed))
    _append_metrics(run_dir, {"iteration": iteration, "test_loss": loss})
    print(f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f}.")
    return loss


def _write_final_adapters(run_dir: Path, model: nn.Module, config: TrainConfig) -> None:
    """``adapters.safetensors`` + ``adapter_config.json`` in the run folder, where mlx_lm lora puts them."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    tmp = run_dir / ".adapters.tmp.safetensors"
    mx.save_safetensors(str(tmp), weights)
    os.replace(tmp, run_dir / "adapters.safetensors")
    tmp_config = run_dir / ".adapter_config.tmp.json"
    save_config(adapter_config(config), tmp_config)
    os.replace(tmp_config, run_dir / "adapter_config.json")


def _plot(run_dir: Path) -> Optional[Path]:
    """A loss-curve PNG from metrics.jsonl, when matplotlib is installed (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line]
    train = [(r["iteration"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["iteration"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(*zip(*points), label=label, marker="." if len(points) < 50 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


#: What `resume` may change: where things are, how long to go on, how often to report and save.
#: Anything else (batch size, data order, seed, schedule, LoRA shape...) would make it another run.
RESUMABLE_OVERRIDES = (
    "model", "data", "iters", "steps_per_report", "steps_per_eval", "save_every", "val_batches",
    "test", "test_batches", "clear_cache_threshold", "report_to", "project_name", "checkpoint.",
    "optimizer.state_precision", "optimizer.overrides", "optimizer.min_quantize_size",
    "optimizer.memory_budget", "optimizer.weight_update",
)


def resume(run_dir: str | Path, *, convert_precision: bool = False, overrides: Optional[dict[str, Any]] = None,
           progress: bool = True, callback: Optional[TrainingCallback] = None) -> RunResult:
    """Continue the run in ``run_dir`` from its latest complete checkpoint, with its saved config.

    ``overrides`` may change only :data:`RESUMABLE_OVERRIDES` (a new precision also needs
    ``convert_precision``); the folder may have been moved since the run started.
    """
    run_dir = Path(run_dir)
    found = checkpoint.latest_checkpoint(run_dir)
    if found is None:
        raise checkpoint.NoCheckpointError(f"{run_dir}: no complete checkpoint to resume from")
    saved = json.loads((found / checkpoint.TRAINER_STATE).read_text())
    if "config" not in saved:
        raise ConfigError(
            f"{found} holds no run config (it was written by CheckpointCallback inside mlx-lm's own "
            "trainer): restore it with adamw_lm.checkpoint.load before calling that trainer again"
        )
    data = saved["config"]
    for key, value in (overrides or {}).items():
        if not key.startswith(RESUMABLE_OVERRIDES) or key == "checkpoint.dir":
            raise ConfigError(
                f"--{key} cannot change on resume: the run would no longer be the same run "
                f"(resume may change: {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in RESUMABLE_OVERRIDES)})"
            )
        set_dotted(data, key, value)
    data["checkpoint"]["dir"] = str(run_dir)
    config = from_dict(data)
    return run(config, resume_from=found, convert_precision=convert_precision, progress=progress,
               callback=callback)


def compare_runs(run_a: str | Path, run_b: str | Path) -> str:
    """Check that two runs' latest checkpoints hold the same bits; raise ``AssertionError`` if not.

    Compares every adapter and optimizer tensor with ``mx.array_equal`` and every logged loss exactly.
    """
    found = [checkpoint.latest_checkpoint(Path(r)) for r in (run_a, run_b)]
    for run_dir, ckpt in zip((run_a, run_b), found):
        if ckpt is None:
            raise checkpoint.NoCheckpointError(f"{run_dir}: no complete checkpoint")
    counts = []
    for name in ("adapters.safetensors", "optimizer.safetensors"):
        a, b = (mx.load(str(c / name)) for c in found)
        if a.keys() != b.keys():
            raise AssertionError(f"{name}: different keys: {sorted(a.keys() ^ b.keys())[:5]}")
        for key in sorted(a):
            if a[key].dtype != b[key].dtype or not mx.array_equal(a[key], b[key]).item():
                raise AssertionError(f"{name}: tensor {key} differs between {found[0]} and {found[1]}")
        counts.append(len(a))
    states = [json.loads((c / "trainer_state.json").read_text()) for c in found]
    if states[0]["iteration"] != states[1]["iteration"]:
        raise AssertionError(f"iterations differ: {states[0]['iteration']} vs {states[1]['iteration']}")
    if states[0]["losses"] != states[1]["losses"]:
        first = next(i for i, (x, y) in enumerate(zip(*(s["losses"] for s in states))) if x != y)
        raise AssertionError(f"loss at iteration {first + 1} differs")
    return (
        f"MATCH: {run_a} and {run_b} agree bit for bit at iteration {states[0]['iteration']}: "
        f"{counts[0]} adapter tensors, {counts[1]} optimizer tensors, "
        f"{len(states[0]['losses'])} per-iteration losses."
    )


class CheckpointCallback(TrainingCallback):
    """Full checkpoints (optimizer state included) from inside ``mlx_lm.tuner.trainer.train``.

    mlx-lm's loop calls back only when it reports, after the step's arrays are evaluated, so a
    checkpoint is written at the first report at or after every ``every`` iterations. mlx-lm's
    ``train`` cannot start at a later iteration and does not seed its data order; restore the model
    and optimizer with :func:`adamw_lm.checkpoint.load` before calling it again, and the schedule and
    moments continue, but the batch order does not repeat. For exact resume use :func:`run`.
    """

    def __init__(self, run_dir: str | Path, model: nn.Module, optimizer: AdamW,
                 adapter_config: dict[str, Any], every: int = 100, keep_last: Optional[int] = 3,
                 keep_best: Optional[int] = None, start_iteration: int = 0):
        self.run_dir, self.model, self.optimizer = Path(run_dir), model, optimizer
        self.adapter_config, self.every = adapter_config, every
        self.keep_last, self.keep_best = keep_last, keep_best
        self.start = start_iteration
        self.losses: list[list[float]] = []
        self.val_losses: list[list[float]] = []
        self._next = start_iteration + every
        self.saved: list[Path] = []

    def on_val_loss_report(self, val_info: dict) -> None:
        self.val_losses.append([self.start + val_info["iteration"], val_info["val_loss"]])

    def on_train_loss_report(self, train_info: dict) -> None:
        iteration = self.start + train_info["iteration"]
        self.losses.append([iteration, train_info["train_loss"]])
        if iteration < self._next:
            return
        self._next = iteration + self.every
        trainer_state = {
            "iteration": iteration, "reported_losses": self.losses, "val_losses": self.val_losses,
            "source": "mlx_lm.tuner.trainer.train",
        }
        self.saved.append(checkpoint.save(
            self.run_dir, iteration, self.model, self.optimizer, trainer_state, self.adapter_config,
            keep_last=self.keep_last, keep_best=self.keep_best,
            val_loss=self.val_losses[-1][1] if self.val_losses else None,
        ))


__all__ = [
    "CheckpointCallback", "RunResult", "BatchStream", "run", "resume", "compare_runs",
    "load_model", "load_data", "setup_trainable", "build_optimizer", "adapter_config",
]
