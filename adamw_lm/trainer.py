"""A resumable fine-tuning loop built from mlx-lm's own parts.

Model loading, LoRA/DoRA layers, datasets, batching, the loss and evaluation are mlx-lm's
(:mod:`adamw_lm.loading`, :mod:`adamw_lm.batches`); reports go through ``TrainingCallback`` s
(:mod:`adamw_lm.reports`). :func:`setup` builds what the loop needs, :func:`train_loop` is the loop,
:func:`run` holds the run folder's lock around them (:mod:`adamw_lm.resuming` continues a
stopped run). What this module adds is what makes a run *the same run* after a stop: every random
draw is a function of ``(seed, iteration)``, the data order of ``(seed, epoch)``, and the whole state — adapters, optimizer
state, position — goes into an atomic checkpoint (:mod:`adamw_lm.checkpoint`).
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.datasets import CacheDataset
from mlx_lm.tuner.trainer import default_loss, evaluate, grad_checkpoint, iterate_batches
from mlx_lm.utils import save_config

from . import checkpoint
from . import distributed as dist
from .batches import BatchStream, iteration_seed
from .config import ConfigError, TrainConfig, from_dict
from .fingerprint import changed_inputs, run_inputs
from .loading import adapter_config, build_optimizer, load_data, load_model, setup_trainable
from .optim import AdamW
from .reports import LOSS_PLOT, METRICS_FILE, Fanout, MetricsLog, TerminalReport, plot, truncate_metrics
from .reports import header as reports_header
from .reports import unused_precision_warnings
from .runfiles import remove_temporaries, replace_file, replace_via_path
from .runlock import LOCK_FILE, RunLock
from .sharding import ShardedOptimizer


@dataclass
class RunResult:
    """What a call to :func:`train` or :func:`resume` did."""

    run_dir: Path
    iteration: int
    checkpoint: Optional[Path]
    stop_signal: Optional[int] = None  # SIGINT / SIGTERM when the run was stopped before its end
    losses: list[float] = field(default_factory=list)
    test_loss: Optional[float] = None  # with ``test: true``

    @property
    def interrupted(self) -> bool:
        return self.stop_signal is not None

    def summary(self) -> str:
        """One line for the end of a command: what was done and where the results are."""
        if self.interrupted:
            return f"Stopped at iteration {self.iteration}; resume with: adamw-lm resume {self.run_dir}"
        if self.checkpoint is None and self.test_loss is not None:  # test-only mode: nothing trained
            return f"Test loss {self.test_loss:.3f} of the adapters in {self.run_dir}"
        saved = f"; checkpoint {self.checkpoint}" if self.checkpoint is not None else ""
        return f"Done: iteration {self.iteration}{saved}; adapters in {self.run_dir}"


# -- set-up of a run ----------------------------------------------------------------------------


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


#: The trainer state a run starts from (a new run) and saves in every checkpoint.
#: ``exact`` turns false (and ``changes`` says why) when a resume knowingly accepts another
#: model or data set than the run's fingerprints.
_FRESH_STATE = {"iteration": 0, "epoch": 0, "offset": 0, "losses": [], "val_losses": [],
                "report_start": 0, "trained_tokens": 0, "exact": True, "changes": []}

#: The flag that accepts a changed input on resume, by input.
ACCEPT_FLAGS = {"model": "--accept-changed-model", "data": "--accept-changed-data"}


@dataclass
class Setup:
    """Everything the loop needs, built by :func:`setup`."""

    config: TrainConfig
    model: nn.Module
    optimizer: AdamW | ShardedOptimizer
    train_set: CacheDataset
    valid_set: CacheDataset
    test_set: CacheDataset
    state: dict[str, Any]
    batches: BatchStream
    metrics: MetricsLog
    reports: Fanout
    header: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)  # fingerprints of the model and data
    pusher: Any = None  # an adamw_lm.hub.Pusher when the run pushes to the Hub

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


Checkpoint = Union[Path, "checkpoint.VerifiedCheckpoint"]


def _checkpoint_blocks(model: nn.Module) -> None:
    """mlx-lm's ``grad_checkpoint`` on this model's blocks only.

    It replaces ``__call__`` on the class of the block it is given: on mlx-lm's own class that
    would checkpoint every model of that architecture for the rest of the process, and a later
    run without checkpointing whose LoRA dropout draws random numbers would no longer give the
    results of the same run in a fresh process. So the blocks first move to a subclass of their
    own (same name, same behaviour), which takes the patch.
    """
    block_class = type(model.layers[0])
    scoped = type(block_class.__name__, (block_class,), {"__module__": block_class.__module__})
    for layer in model.layers:
        if type(layer) is block_class:
            layer.__class__ = scoped
    grad_checkpoint(model.layers[0])


def setup(config: TrainConfig, *, resume_from: Optional[Checkpoint] = None, convert_precision: bool = False,
          callback: Optional[TrainingCallback] = None, accept_changed: frozenset[str] = frozenset()) -> Setup:
    """Load the model and data, open the trainable layers, build the optimizer and restore a
    checkpoint (a folder, or one already verified and open), in ``mlx_lm lora``'s order; touches
    nothing in the run folder.

    On resume the model and data must have the fingerprints the checkpoint recorded, unless
    ``accept_changed`` names them (``"model"``, ``"data"``): the run is then marked not exact.
    """
    model, tokenizer = load_model(config)
    train_set, valid_set, test_set = load_data(config, tokenizer)
    inputs = run_inputs(config.model, config.data, config.hf_dataset)
    # Where mlx_lm lora seeds (after loading, before the LoRA layers draw their initial values):
    # the same config gives the same adapters.
    mx.random.seed(config.seed)
    setup_trainable(model, config)
    optimizer = build_optimizer(config)
    try:
        # Decided now, so that an impossible budget or an override pattern that times out is a
        # config error before any checkpoint is read.
        optimizer.plan(model.trainable_parameters())
    except ValueError as e:
        raise ConfigError(f"config section 'optimizer': {e}") from None
    if config.optimizer.shard_state:
        try:
            optimizer = ShardedOptimizer(optimizer)
        except ValueError as e:
            raise ConfigError(f"config key 'optimizer.shard_state': {e}") from None
    state = {k: (list(v) if isinstance(v, list) else v) for k, v in _FRESH_STATE.items()}
    where = getattr(resume_from, "path", resume_from)
    if resume_from is not None:
        recorded = getattr(resume_from, "trainer_state", None)
        if isinstance(recorded, dict):  # another model first: its weights would not fit either
            _refuse_changed_inputs(recorded.get("fingerprints"), inputs, accept_changed, where)
        saved = checkpoint.load(resume_from, model, optimizer, convert_precision=convert_precision)
        state.update({k: saved[k] for k in state if k in saved})
        if "report_start" not in saved:  # written before the window was saved: restart it here
            state["report_start"] = state["iteration"]
        _check_inputs(saved.get("fingerprints"), inputs, state, accept_changed, where)
    elif config.resume_adapter_file:
        try:
            checkpoint.load_adapters_only(config.resume_adapter_file, model)
        except checkpoint.NoCheckpointError as e:
            raise ConfigError(f"config key 'resume_adapter_file': {e}") from None
    optimizer.init(model.trainable_parameters())
    if config.grad_checkpoint:
        _checkpoint_blocks(model)
    batches = BatchStream(train_set, config, state["epoch"], state["offset"], dist.rank(), dist.world_size())
    if state["epoch"] * batches.batches_per_epoch + state["offset"] != state["iteration"]:
        raise ConfigError(
            f"{where}: saved data position (epoch {state['epoch']}, batch {state['offset']}) is not "
            f"iteration {state['iteration']} with {batches.batches_per_epoch} batches per epoch "
            "(was the training set changed?)"
        )
    updates = state["iteration"] // config.grad_accumulation_steps
    if resume_from is not None and optimizer.step.item() != updates:
        raise checkpoint.CorruptCheckpointError(
            f"{where}: the optimizer state's step is {optimizer.step.item()}, but iteration "
            f"{state['iteration']} with grad_accumulation_steps {config.grad_accumulation_steps} "
            f"makes {updates} updates (its schedule and bias correction would not be this run's)")
    window = state["iteration"] - state["report_start"]  # losses since the last report, to average
    if not 0 <= window <= min(state["iteration"], len(state["losses"])):
        raise checkpoint.CorruptCheckpointError(
            f"{where}: report window start {state['report_start']} does not fit iteration "
            f"{state['iteration']} and {len(state['losses'])} logged losses")
    metrics = MetricsLog(config.run_dir)
    reports = Fanout([metrics, _reporting_callback(config), callback])
    lines = [*reports_header(config, model, optimizer), *unused_precision_warnings(config, model, optimizer)]
    if dist.world_size() > 1:
        world = dist.world_size()
        sharded = ", optimizer state sharded (the state above is rank 0's share)"
        lines.append(f"Data parallel: {world} processes, {config.batch_size // world} examples each "
                     f"per batch" + (sharded if config.optimizer.shard_state else ""))
    return Setup(config, model, optimizer, train_set, valid_set, test_set, state, batches, metrics,
                 reports, lines, inputs)


def _refuse_changed_inputs(recorded: Any, current: dict[str, Any], accept_changed: frozenset[str],
                           found: Path) -> dict[str, str]:
    """The inputs that differ from the checkpoint's fingerprints; ``ConfigError`` for one that
    ``accept_changed`` does not name."""
    if not isinstance(recorded, dict):
        return {}  # written before fingerprints were recorded
    changed = changed_inputs(recorded, current)
    for key, what in changed.items():
        if key not in accept_changed:
            where = "--model PATH" if key == "model" else "--data PATH"
            raise ConfigError(
                f"{found}: the {key} differs from the one this run trained on ({what}): give {where} "
                f"to the same {key}, or {ACCEPT_FLAGS[key]} to continue knowingly (the run is then "
                "marked as no longer exact)")
    return changed


def _check_inputs(recorded: Any, current: dict[str, Any], state: dict[str, Any],
                  accept_changed: frozenset[str], found: Path) -> None:
    """Refuse another model or data set than the checkpoint's fingerprints, unless accepted (the
    run is then marked as no longer exact)."""
    for key, what in _refuse_changed_inputs(recorded, current, accept_changed, found).items():
        state["exact"] = False
        state["changes"] = [*state["changes"], f"{key} changed at iteration {state['iteration']}: {what}"[:1024]]


# -- the loop -----------------------------------------------------------------------------------


class _ReportWindow:
    """Tokens and time since the last train-loss report; its start iteration is saved with the run."""

    def __init__(self, state: dict[str, Any]):
        self.state = state
        self.tokens, self.seconds = 0, 0.0
        self.timed_from = state["iteration"]  # the rates count what this process timed

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        # Every step, not at reports: a checkpoint between two reports holds its tokens.
        self.state["trained_tokens"] += tokens

    def report(self, it: int, learning_rate: float) -> dict[str, Any]:
        start = self.state["report_start"]
        info = {
            "iteration": it,
            # The same window as an uninterrupted run, even across a resume.
            "train_loss": float(np.mean(self.state["losses"][start - it:])),
            "learning_rate": learning_rate,
            "iterations_per_second": (it - max(start, self.timed_from)) / max(self.seconds, 1e-9),
            "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
            "trained_tokens": self.state["trained_tokens"],
            "peak_memory": mx.get_peak_memory() / 1e9,
        }
        self.state["report_start"] = self.timed_from = it
        self.tokens, self.seconds = 0, 0.0
        return info


def train_loop(s: Setup, *, progress: bool = True) -> RunResult:
    """The training loop: step, report, validate, checkpoint; stops cleanly on SIGINT / SIGTERM."""
    from tqdm import tqdm

    config, model, optimizer, state, batches = s.config, s.model, s.optimizer, s.state, s.batches
    start = state["iteration"]
    main, world = dist.is_main(), dist.world_size()
    bar = tqdm(total=config.iters, initial=start, disable=not (progress and main), unit="it",
               dynamic_ncols=True, file=sys.stderr)
    # Only rank 0 reports; every process computes the same (summed) numbers.
    reports = Fanout([s.reports, TerminalReport(bar)] if main else [])
    loss_and_grad = nn.value_and_grad(model, default_loss)
    accum = config.grad_accumulation_steps
    compiled_state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def step(batch: mx.array, lengths: mx.array, prev_grad: Any, do_update: bool) -> tuple:
        (loss, toks), grad = loss_and_grad(model, batch, lengths)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            grad = nn.average_gradients(grad)  # a no-op in one process
            if accum > 1:
                grad = tree_map(lambda g: g / accum, grad)
            optimizer.update(model, grad)
            grad = None
        return loss, toks, grad

    def save(it: int, final: bool) -> Path:
        # The run folder's adapters first: once a checkpoint is committed, a kill must not leave
        # them older than it (a resume from it would find the run finished, or not rewrite them).
        if main:
            write_adapters(s.run_dir, model, config)  # the latest, where mlx_lm lora keeps them
        last = state["val_losses"][-1] if state["val_losses"] else None
        trainer_state = {**state, "iteration": it, **batches.position(), "seed": config.seed,
                         "config": config.to_dict(), "fingerprints": s.inputs}
        saved = checkpoint.save(  # every process: the writer knows who writes what
            s.run_dir, it, model, optimizer, trainer_state, adapter_config(config),
            keep_last=config.checkpoint.keep_last, keep_best=config.checkpoint.keep_best,
            # keep_best ranks by a validation loss of exactly these weights, or not at all.
            val_loss=last[1] if last and last[0] == it else None,
            protect=s.pusher.pinned() if s.pusher is not None else (),
        )
        if s.pusher is not None:  # rank 0's alone
            s.pusher.submit(saved, final=final)  # the last one of this process, whatever push_every
        return saved

    def validate(it: int) -> None:
        tic = time.perf_counter()
        with dist.peers_needed(f"validating at iteration {it}"):  # mlx-lm's evaluate sums over processes
            val_loss = evaluate(
                model, s.valid_set, config.batch_size, config.val_batches, config.max_seq_length,
                loss=default_loss, iterate_batches=partial(iterate_batches, seed=config.seed),
            )
        model.train()
        state["val_losses"].append([it, val_loss])
        reports.on_val_loss_report({"iteration": it, "val_loss": val_loss, "val_time": time.perf_counter() - tic})

    validating = len(s.valid_set) > 0 and config.val_batches != 0
    window = _ReportWindow(state)
    grad = None
    last_saved: Optional[Path] = None
    save_due = False
    model.train()
    with _StopRequest() as stop, bar:
        if validating and start == 0:
            validate(0)  # the base model, as mlx-lm reports before its first step
        for it in range(start + 1, config.iters + 1):
            tic = time.perf_counter()
            mx.random.seed(iteration_seed(config.seed, it))
            batch, lengths = next(batches)
            loss, toks, grad = step(batch, lengths, grad, it % accum == 0)
            with dist.peers_needed(f"at iteration {it}"):
                mx.eval(compiled_state, loss, toks, grad)
            # One collective per step: the losses, the tokens, and whether a process was asked to stop.
            loss_sum, tokens, stops = dist.sum_floats(loss, toks, mx.array(stop.signal is not None))
            if mx.get_cache_memory() > config.clear_cache_threshold:  # as mlx-lm's trainer does
                mx.clear_cache()
            # As mlx-lm reports a data-parallel loss: the mean of the processes' losses.
            state["losses"].append(loss_sum / world)
            state["iteration"] = it
            window.add(int(tokens), time.perf_counter() - tic)
            if stops and stop.signal is None:
                stop.signal = signal.SIGTERM  # another process was stopped: all stop, after one save
            bar.update(1)

            if it % config.steps_per_report == 0 or it == config.iters:
                reports.on_train_loss_report(window.report(it, optimizer.learning_rate.item()))
            if validating and (it % config.steps_per_eval == 0 or it == config.iters):
                validate(it)
            # Before a checkpoint of this iteration: a resume from it goes on from the next one.
            if it % config.save_every == 0 and main:  # as mlx_lm lora does, whatever checkpoint.every is
                write_numbered_adapters(s.run_dir, model, it)
            save_due = save_due or it % config.checkpoint_every == 0
            # Checkpoints fall on optimizer updates: an accumulated gradient is never saved.
            if it % accum == 0 and (save_due or stop.signal is not None) or it == config.iters:
                last_saved = save(it, final=it == config.iters or stop.signal is not None)
                save_due = False
            if stop.signal is not None and it % accum == 0 and it < config.iters:
                bar.close()
                if main:
                    print(f"\nStopped at iteration {it}; checkpoint {last_saved}.\n"
                          f"Resume with: adamw-lm resume {s.run_dir}", file=sys.stderr)
                return RunResult(s.run_dir, it, last_saved, stop.signal, state["losses"])
    test_loss = run_test(model, s.test_set, config, s.metrics, state["iteration"]) if config.test else None
    return RunResult(s.run_dir, state["iteration"], last_saved, None, state["losses"], test_loss)


def run_test(model: nn.Module, test_set: Any, config: TrainConfig, metrics: Optional[MetricsLog] = None,
             iteration: int = 0) -> float:
    """mlx_lm lora's ``test: true``: loss and perplexity on the test set."""
    model.eval()
    loss = evaluate(model, test_set, config.batch_size, config.test_batches, config.max_seq_length,
                    iterate_batches=partial(iterate_batches, seed=config.seed))
    if not dist.is_main():  # mlx-lm's evaluate split the test set and summed the losses
        return loss
    if metrics is not None:
        metrics.write({"iteration": iteration, "test_loss": loss})
    print(f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f}.")
    return loss


#: mlx_lm lora's adapters of one iteration (``save_every``).
NUMBERED_ADAPTERS = re.compile(r"([0-9]{7,12})_adapters\.safetensors")
#: The run folder's files that a run writes (atomically, see :mod:`adamw_lm.runfiles`).
RUN_FILES = re.compile("|".join(map(re.escape, (checkpoint.ADAPTERS, checkpoint.ADAPTER_CONFIG,
                                                METRICS_FILE, LOSS_PLOT))) + "|" + NUMBERED_ADAPTERS.pattern)


def write_adapters(run_dir: Path, model: nn.Module, config: TrainConfig) -> None:
    """``adapters.safetensors`` + ``adapter_config.json`` in the run folder, where mlx_lm lora puts them."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    replace_file(run_dir / checkpoint.ADAPTERS, lambda f: mx.save_safetensors(f, weights))
    replace_via_path(run_dir / checkpoint.ADAPTER_CONFIG, partial(save_config, adapter_config(config)))


def forget_after(run_dir: Path, iteration: int) -> None:
    """Drop what the run folder holds of iterations after ``iteration`` outside its checkpoints:
    the metrics log's records and mlx-lm's numbered adapters (of a run that went further and was
    stopped before its next checkpoint, or that a resume from an earlier step replaces)."""
    truncate_metrics(run_dir, iteration)
    for entry in run_dir.iterdir():
        match = NUMBERED_ADAPTERS.fullmatch(entry.name)
        if match and int(match.group(1)) > iteration and not entry.is_dir():
            entry.unlink()


def write_numbered_adapters(run_dir: Path, model: nn.Module, iteration: int) -> Path:
    """mlx_lm lora's ``NNNNNNN_adapters.safetensors``, written every ``save_every`` iterations."""
    path = run_dir / f"{iteration:07d}_adapters.safetensors"
    weights = dict(tree_flatten(model.trainable_parameters()))
    replace_file(path, lambda f: mx.save_safetensors(f, weights))
    return path


def _check_run_dir(config: TrainConfig) -> None:
    run_dir = config.run_dir
    if (run_dir.exists() or run_dir.is_symlink()) and not run_dir.is_dir():
        raise ConfigError(f"config key 'adapter_path': {run_dir} exists and is not a folder "
                          "(the run folder holds checkpoints, metrics and adapters)")


def _replaces_old_run(config: TrainConfig, resume_from: Optional[Checkpoint], overwrite: bool) -> bool:
    """Whether a new run is about to replace the checkpoints of an old one (refused without
    ``overwrite``)."""
    run_dir = config.run_dir
    # Step folders, not the checkpoints folder: a run killed before its first checkpoint left
    # nothing to resume from, and is started again by train.
    replace_old_run = resume_from is None and bool(checkpoint.steps(run_dir))
    if replace_old_run and not overwrite:
        raise ConfigError(
            f"{run_dir} already holds checkpoints: continue it with `adamw-lm resume {run_dir}`, "
            "or start over with --overwrite"
        )
    return replace_old_run


def run(
    config: TrainConfig,
    *,
    resume_from: Optional[Checkpoint] = None,
    convert_precision: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callback: Optional[TrainingCallback] = None,
    accept_changed: frozenset[str] = frozenset(),
) -> RunResult:
    """Train ``config``, checkpointing as configured; continue from the checkpoint ``resume_from``.

    A new run refuses a run folder that already holds checkpoints unless ``overwrite`` (which then
    removes them and the metrics log). ``callback`` is an mlx-lm ``TrainingCallback``. The run
    folder is locked for the whole run (:class:`~adamw_lm.runlock.RunLock`): a second writer is
    refused. With ``train: false`` and ``test: true`` the adapters in ``adapter_path`` are only
    evaluated on the test set, as ``mlx_lm lora`` does. With ``hub.repo_id`` each checkpoint is
    pushed in the background (:mod:`adamw_lm.hub_runs`) and the end waits for the pushes.

    Under ``mlx.launch`` every process calls this with the same config (and the same run folder,
    which they must all see): each trains on its share of every batch, and rank 0 alone holds the
    lock, prints, writes metrics and adapters, and pushes (see :mod:`adamw_lm.distributed`).
    """
    if not config.train:
        if not config.test:
            raise ConfigError("config keys 'train' and 'test' are both false: nothing to do")
        return evaluate_adapters(config)
    config = _absolute_paths(config)
    run_dir = config.run_dir
    _check_run_dir(config)
    main = dist.is_main()
    created = main and not run_dir.exists()
    lock = run_dir_lock(run_dir).acquire()
    try:
        try:
            replace_old_run = _replaces_old_run(config, resume_from, overwrite)
            dist.barrier()  # every process has looked at the old run before rank 0 removes it
            # A token or access problem ends the run before it starts.
            pusher = _start_pushing(config) if main else None
            s = setup(config, resume_from=resume_from, convert_precision=convert_precision,
                      callback=callback, accept_changed=accept_changed)
            s.pusher = pusher
        except BaseException:
            if created:  # leave no trace of a run that never started
                lock.release()
                with contextlib.suppress(OSError):
                    (run_dir / LOCK_FILE).unlink()
                    run_dir.rmdir()
            raise
        if main:  # what writes of the run folder's files killed before their rename left
            remove_temporaries(run_dir, RUN_FILES)
        # Only now that model, data and optimizer have all been set up: a new run's log starts
        # empty (an old run that crashed before its first checkpoint leaves one behind).
        if main and replace_old_run:
            # Its adapters (mlx-lm's numbered ones would otherwise pass for this run's) and plot
            # first: its checkpoints mark the folder as an old run's until they are gone, so an
            # --overwrite killed in between is done again in full.
            for entry in run_dir.iterdir():
                if RUN_FILES.fullmatch(entry.name) and not entry.is_dir():
                    entry.unlink()
            shutil.rmtree(run_dir / checkpoint.CHECKPOINTS_DIR)
        if main and resume_from is None:
            (run_dir / METRICS_FILE).unlink(missing_ok=True)
        elif main:
            # The run goes on from this checkpoint (with --step, an earlier one than latest named):
            # latest names it, and what was logged or saved as mlx-lm adapters after it is dropped,
            # so that a kill from here on resumes from it with a log that reads as one run.
            checkpoint.point_latest(run_dir, getattr(resume_from, "path", resume_from))
            forget_after(run_dir, s.state["iteration"])
        for line in s.header if main else []:
            print(line, flush=True)
        try:
            result = train_loop(s, progress=progress)
        finally:
            s.metrics.close()
        if pusher is not None:
            from .hub_runs import finish_pushing

            finish_pushing(pusher, run_dir, progress)
        if main and not result.interrupted:
            plot(run_dir)
        return result
    finally:
        lock.release()


class _NoLock:
    """Processes other than rank 0 of a data-parallel run: rank 0 holds the run folder's lock."""

    def acquire(self) -> "_NoLock":
        return self

    def release(self) -> None:
        """Nothing to release: this process never held the lock."""

    def __enter__(self) -> "_NoLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def run_dir_lock(run_dir: Path) -> RunLock | _NoLock:
    """The run folder's lock, held by rank 0 of a data-parallel run (the others get a stand-in)."""
    return RunLock(run_dir) if dist.is_main() else _NoLock()


def _start_pushing(config: TrainConfig) -> Any:
    if config.hub.repo_id is None:
        return None  # huggingface_hub is imported only by runs that push
    from .hub_runs import start_pushing

    return start_pushing(config)


def evaluate_adapters(config: TrainConfig) -> RunResult:
    """``train: false``, ``test: true``: the test loss of the adapters in ``adapter_path`` (none if
    ``adapter_path`` is empty), as ``mlx_lm lora`` computes it."""
    from mlx_lm.tuner.utils import load_adapters

    model, tokenizer = load_model(config)
    _, _, test_set = load_data(config, tokenizer, need_train=False)
    if len(test_set) == 0:
        raise ConfigError(f"config key 'test' is true but {config.data} has no test set (test.jsonl)")
    if config.adapter_path:
        path = Path(config.adapter_path)
        for name in (checkpoint.ADAPTERS, checkpoint.ADAPTER_CONFIG):
            if not (path / name).is_file():
                raise ConfigError(f"config key 'adapter_path': {path / name} does not exist "
                                  "(test-only mode evaluates the adapters found there)")
        try:
            load_adapters(model, str(path))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"config key 'adapter_path': cannot load the adapters in {path}: {e}") from None
    loss = run_test(model, test_set, config)
    return RunResult(Path(config.adapter_path), 0, None, None, [], loss)


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
    "CheckpointCallback", "RunResult", "BatchStream", "run", "run_dir_lock",
    "load_model", "load_data", "setup_trainable", "build_optimizer", "adapter_config",
    "Setup", "setup", "train_loop", "evaluate_adapters",
]
