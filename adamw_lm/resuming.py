"""Continuing a stopped run: the checkpoint it resumes from, what its saved config may and may not
decide (a checkpoint may come from anyone), the same run again through :func:`adamw_lm.trainer.run`,
and :func:`compare_runs`, which checks that a resumed run is the uninterrupted one, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
from mlx_lm.tuner.callbacks import TrainingCallback

from . import checkpoint
from . import distributed as dist
from .config import ConfigError, HubConfig, TrainConfig, from_dict, set_dotted
from .reports import logged, plot
from .trainer import RunResult, forget_after, run, run_dir_lock


#: What `resume` may change: where things are, how long to go on, how often to report and save.
#: Anything else (batch size, data order, seed, schedule, LoRA shape...) would make it another run.
RESUMABLE_OVERRIDES = (
    "model", "data", "iters", "steps_per_report", "steps_per_eval", "save_every", "val_batches",
    "test", "test_batches", "clear_cache_threshold", "report_to", "project_name", "checkpoint.",
    "optimizer.state_precision", "optimizer.overrides", "optimizer.min_quantize_size",
    "optimizer.memory_budget", "optimizer.weight_update", "optimizer.shard_state", "trust_remote_code",
    "hf_dataset", "hub.",
)

#: Saved settings that can run code or send data out: a checkpoint may come from anyone, so these
#: are taken from it only when the user says so again (the flag that restores each one).
_NEEDS_CONSENT = {
    "trust_remote_code": "--trust-remote-code",
    "report_to": "--report-to NAME",
    "hf_dataset": "--hf-dataset",
}

def _pick_checkpoint(run_dir: Path, step: Optional[int]) -> "checkpoint.VerifiedCheckpoint":
    """The checkpoint to resume from, verified and held open (its files are read once)."""
    if step is not None:
        return checkpoint.open_step(run_dir, step)
    found = checkpoint.open_latest(run_dir)
    if found is None:
        raise checkpoint.NoCheckpointError(f"{run_dir}: {_NOTHING_TO_RESUME}")
    return found


#: Why a run folder cannot be resumed when it holds no checkpoint, and what to do instead.
_NOTHING_TO_RESUME = ("no complete checkpoint to resume from (a run stopped before its first "
                      "checkpoint starts over with `adamw-lm train CONFIG`)")


def _saved_config(found: "checkpoint.VerifiedCheckpoint") -> dict[str, Any]:
    """The run config in a verified checkpoint's trainer state (a copy the caller may change)."""
    config = found.trainer_state.get("config")
    if not isinstance(config, dict):
        raise ConfigError(
            f"{found.path} holds no run config (it was written by CheckpointCallback inside mlx-lm's "
            "own trainer): restore it with adamw_lm.checkpoint.load before calling that trainer again"
        )
    return json.loads(json.dumps(config))


def _consent(data: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """Reset the saved settings in :data:`_NEEDS_CONSENT` that ``overrides`` does not give again;
    return what was ignored, with the flag that restores it."""
    ignored = []
    defaults = TrainConfig()
    for key, flag in _NEEDS_CONSENT.items():
        if key in overrides:
            if key == "hf_dataset" and overrides[key] is not True:
                raise ConfigError("--hf-dataset on resume takes no value: it allows the saved hf_dataset")
            continue
        default = getattr(defaults, key)
        if data.get(key, default) != default:
            data[key] = default
            ignored.append(f"{key} ({flag})")
    hub = data.get("hub")
    if "hub.repo_id" in overrides and (not isinstance(hub, dict)
                                       or overrides["hub.repo_id"] != hub.get("repo_id")):  # fmt: skip
        reset = _hub_consent(hub if isinstance(hub, dict) else {}, overrides)
        for key, value in reset.items():
            set_dotted(data, f"hub.{key}", value)
        ignored += [_HUB_CONSENT[key][0] for key in reset]
    return ignored


#: What a run pushed to another repo than its checkpoint's does unless the command line says
#: otherwise: publishing it, deleting step folders there and which branch it writes are the
#: user's choices, not the checkpoint's. ``keep_remote`` 0 keeps every step folder (null would
#: follow checkpoint.keep_last).
_HUB_CONSENT = {"private": ("hub.private (--hub.private false)", True),
                "keep_remote": ("hub.keep_remote (--hub.keep_remote N)", 0),
                "branch": ("hub.branch (--hub.branch NAME)", "main")}


def _hub_consent(saved: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The ``hub`` settings to reset (to :data:`_HUB_CONSENT`'s values) for a push to another repo:
    those the command line does not give whose saved value (default included) differs."""
    defaults = HubConfig()
    return {key: value for key, (_, value) in _HUB_CONSENT.items()
            if f"hub.{key}" not in overrides and saved.get(key, getattr(defaults, key)) != value}


def resume(run_dir: str | Path, *, step: Optional[int] = None, convert_precision: bool = False,
           overrides: Optional[dict[str, Any]] = None, progress: bool = True,
           callback: Optional[TrainingCallback] = None,
           accept_changed: frozenset[str] = frozenset()) -> RunResult:
    """Continue the run in ``run_dir`` from its latest complete checkpoint (or the one at ``step``),
    with its saved config.

    ``overrides`` may change only :data:`RESUMABLE_OVERRIDES` (a new precision also needs
    ``convert_precision``); the folder may have been moved since the run started. The saved
    ``trust_remote_code``, ``report_to`` and ``hf_dataset`` are ignored unless ``overrides`` gives
    them again (``{"hf_dataset": True}`` keeps the saved one). The model and data must match the
    checkpoint's fingerprints unless ``accept_changed`` names them (see :func:`setup`).
    """
    run_dir = Path(run_dir)
    if not (run_dir / checkpoint.CHECKPOINTS_DIR).is_dir():
        raise checkpoint.NoCheckpointError(f"{run_dir}: {_NOTHING_TO_RESUME}")
    # Locked before a checkpoint is chosen: a writer still at work cannot rotate it away meanwhile.
    with run_dir_lock(run_dir):
        return _resume_locked(run_dir, step, convert_precision, dict(overrides or {}), progress, callback,
                              frozenset(accept_changed))


def resume_from_hub(source: str, *, step: Optional[int] = None, run_dir: Optional[str | Path] = None,
                    repo_id: Optional[str] = None, **options: Any) -> RunResult:
    """Continue the Hub run ``source`` (``hub:USER/REPO[@REVISION]``) from its remote latest
    checkpoint (or the one at ``step``), in ``run_dir`` (default ``runs/<repo name>``).

    Only that step folder is downloaded; it is verified like a local checkpoint and copied into
    the run folder, then :func:`resume` takes over (``options`` are its keywords). The run keeps
    pushing to the source repo, or to ``repo_id`` (never to another repo its saved config names);
    pushed elsewhere than the source, it takes the saved ``hub.private``, ``hub.keep_remote`` and
    ``hub.branch`` only if ``options["overrides"]`` gives them again (else private, nothing deleted
    there, on main). A resume that fails before its first checkpoint takes the downloaded one out
    of a run folder that held none, so that it can be retried as its error says.
    """
    from .hub import parse_spec
    from .hub_runs import default_run_dir, fetch_run

    target = Path(run_dir) if run_dir is not None else default_run_dir(parse_spec(source))
    created, had_steps = not target.exists(), bool(checkpoint.steps(target))
    run_dir, step, spec, trainer_state = fetch_run(source, step, target)
    try:
        return _resume_fetched(run_dir, step, spec, trainer_state, repo_id, options)
    except BaseException:
        # A resume that failed before its first checkpoint (a config, access or model problem)
        # leaves no stranger's checkpoint behind to block the retry its error suggests.
        if dist.is_main() and not had_steps and checkpoint.steps(run_dir) == [step]:
            with contextlib.suppress(OSError):
                if created:
                    shutil.rmtree(run_dir)
                else:
                    shutil.rmtree(run_dir / checkpoint.CHECKPOINTS_DIR)
        raise


def _resume_fetched(run_dir: Path, step: int, spec: Any, trainer_state: dict, repo_id: Optional[str],
                    options: dict[str, Any]) -> RunResult:
    """:func:`resume_from_hub` once the checkpoint is in ``run_dir``."""
    overrides = dict(options.pop("overrides", None) or {})
    # The repo it came from (or repo_id), never another one its saved config names: a stranger's
    # checkpoint does not choose which of your repos gets written to.
    overrides["hub.repo_id"] = repo_id if repo_id is not None else spec.repo_id
    if overrides["hub.repo_id"] != spec.repo_id:
        # Pushed elsewhere than where it came from, whatever repo its saved config names.
        saved = trainer_state.get("config")
        hub = saved.get("hub") if isinstance(saved, dict) else None
        ignored = _hub_consent(hub if isinstance(hub, dict) else {}, overrides)
        for key, value in ignored.items():
            overrides[f"hub.{key}"] = value
        if ignored and dist.is_main():
            print(f"Ignored from the checkpoint's config (pushed to another repo than "
                  f"{spec.repo_id}): {', '.join(_HUB_CONSENT[k][0] for k in ignored)}; give the "
                  "flag to use it.", file=sys.stderr)
    return resume(run_dir, step=step, overrides=overrides, **options)


def _missing_inputs(config: TrainConfig) -> None:
    """The model / data folders of another machine: say which option points at them here."""
    from .loading import _is_local

    for key in ("model", "data"):
        value = getattr(config, key)
        if key == "data" and config.hf_dataset is not None:
            continue
        if _is_local(value) and not Path(value).expanduser().exists():
            raise ConfigError(f"the {key} {value} does not exist on this machine: give --{key} PATH "
                              f"to this run's {key} (its fingerprint is checked against the checkpoint's)")


def _resume_locked(run_dir: Path, step: Optional[int], convert_precision: bool, overrides: dict[str, Any],
                   progress: bool, callback: Optional[TrainingCallback],
                   accept_changed: frozenset[str]) -> RunResult:
    if dist.is_main():
        restored = checkpoint.recover(run_dir)
        if restored:
            print(f"Put back {', '.join(restored)}: a save killed while replacing it had moved it "
                  "aside.", file=sys.stderr)
    dist.barrier()  # every process picks the checkpoint once it is back
    with _pick_checkpoint(run_dir, step) as found:
        return _resume_from(run_dir, found, convert_precision, overrides, progress, callback, accept_changed)


def _resume_from(run_dir: Path, found: "checkpoint.VerifiedCheckpoint", convert_precision: bool,
                 overrides: dict[str, Any], progress: bool, callback: Optional[TrainingCallback],
                 accept_changed: frozenset[str]) -> RunResult:
    saved = found.trainer_state
    data = _saved_config(found)
    for key, value in overrides.items():
        if not key.startswith(RESUMABLE_OVERRIDES) or key == "checkpoint.dir":
            raise ConfigError(
                f"--{key} cannot change on resume: the run would no longer be the same run "
                f"(resume may change: {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in RESUMABLE_OVERRIDES)})"
            )
    ignored = _consent(data, overrides)
    for key, value in overrides.items():
        if key != "hf_dataset":
            set_dotted(data, key, value)
    set_dotted(data, "checkpoint.dir", str(run_dir))
    # The checkpoint says this run trained: a saved ``train: false`` (from anyone) would have
    # resume only evaluate adapters read from wherever that config's adapter_path points.
    data["train"] = True
    config = from_dict(data)
    _missing_inputs(config)
    if ignored and dist.is_main():
        print(f"Ignored from the checkpoint's config (a checkpoint may come from anyone): "
              f"{', '.join(ignored)}; give the flag to use it.", file=sys.stderr)
    iteration = saved["iteration"]
    if config.iters < iteration:
        raise ConfigError(f"--iters {config.iters} is lower than the checkpoint's iteration {iteration} "
                          f"({found.path}): a run cannot go back; resume with --step N to restart from an earlier one")
    if config.iters == iteration and config.test and not _tested(run_dir, iteration):
        if dist.is_main():
            print(f"Run {run_dir} is finished at iteration {iteration} but stopped before its test "
                  "set evaluation (test: true); evaluating now.", file=sys.stderr)
        # Nothing is trained or saved, so nothing is pushed: no Hub access for an evaluation.
        set_dotted(data, "hub.repo_id", None)
        result = run(from_dict(data), resume_from=found, convert_precision=convert_precision,
                     progress=progress, callback=callback, accept_changed=accept_changed)
        return dataclasses.replace(result, checkpoint=found.path)
    if config.iters == iteration:
        print(f"Run {run_dir} is finished at iteration {iteration} (iters {config.iters}): nothing to do. "
              f"Train longer with --iters N.", file=sys.stderr)
        if dist.is_main() and iteration == max(checkpoint.steps(run_dir), default=iteration):
            # A longer run (--iters) stopped before its first checkpoint left records and mlx-lm
            # adapters past this one: the folder reads as the finished run again.
            with contextlib.suppress(OSError):  # a link planted at the log stays unread
                forget_after(run_dir, iteration)
        if dist.is_main():  # killed after its last checkpoint, the run did not draw its plot
            with contextlib.suppress(OSError):  # a convenience: a link planted there stays unread
                plot(run_dir)
        return RunResult(run_dir, iteration, found.path, None, list(saved.get("losses") or []))
    if iteration % config.grad_accumulation_steps:
        raise ConfigError(
            f"{found.path}: iteration {iteration} ends inside a gradient accumulation of "
            f"{config.grad_accumulation_steps} steps (the run ended there and its partial gradient "
            "was not applied, as in mlx_lm lora): going on from it would not be the same run; resume "
            "with --step N from a checkpoint on an optimizer update"
        )
    later = [f"step-{n:07d}" for n in checkpoint.steps(run_dir) if n > iteration]
    if dist.is_main():
        print(f"Resuming {run_dir} from iteration {iteration} ({found.path.name})"
              + (f"; the later checkpoints ({', '.join(sorted(later))}) are kept until this run "
                 "overwrites those steps" if later else "") + ".", file=sys.stderr)
    return run(config, resume_from=found, convert_precision=convert_precision, progress=progress,
               callback=callback, accept_changed=accept_changed)


def _tested(run_dir: Path, iteration: int) -> bool:
    """Whether the run's metrics log holds its test loss at ``iteration`` (an unreadable log: no)."""
    try:
        return logged(run_dir, "test_loss", iteration)
    except OSError:
        return False


def compare_runs(run_a: str | Path, run_b: str | Path) -> str:
    """Check that two runs' latest checkpoints hold the same bits; raise ``AssertionError`` if not.

    Compares every adapter and optimizer tensor with ``mx.array_equal`` (the optimizer state merged
    from its shards, whatever the number of processes that wrote it) and every logged loss exactly.
    """
    with contextlib.ExitStack() as stack:
        found = []
        for run_dir in (run_a, run_b):
            opened = checkpoint.open_latest(Path(run_dir))
            if opened is None:
                raise checkpoint.NoCheckpointError(f"{run_dir}: no complete checkpoint")
            found.append(stack.enter_context(opened))
        # The whole optimizer state, merged from its shards: a sharded run compares with an unsharded one.
        arrays = {name: [read(o) for o in found] for name, read in (
            ("adapters.safetensors", lambda o: o.arrays(checkpoint.ADAPTERS)),
            ("optimizer state", lambda o: o.optimizer_state()))}
        mx.eval(arrays)
        paths = [c.path for c in found]
        states = [c.trainer_state for c in found]
    counts = []
    for name, (a, b) in arrays.items():
        if a.keys() != b.keys():
            raise AssertionError(f"{name}: different keys: {sorted(a.keys() ^ b.keys())[:5]}")
        for key in sorted(a):
            if a[key].dtype != b[key].dtype or not mx.array_equal(a[key], b[key]).item():
                raise AssertionError(f"{name}: tensor {key} differs between {paths[0]} and {paths[1]}")
        counts.append(len(a))
    iterations = [s.get("iteration") for s in states]
    if iterations[0] != iterations[1]:
        raise AssertionError(f"iterations differ: {iterations[0]} vs {iterations[1]}")
    losses = [s.get("losses", []) for s in states]
    if losses[0] != losses[1]:
        first = next((i for i, (x, y) in enumerate(zip(*losses)) if x != y), min(map(len, losses)))
        raise AssertionError(f"loss at iteration {first + 1} differs")
    return (
        f"MATCH: {run_a} and {run_b} agree bit for bit at iteration {iterations[0]}: "
        f"{counts[0]} adapter tensors, {counts[1]} optimizer tensors, "
        f"{len(losses[0])} per-iteration losses."
    )


__all__ = ["RESUMABLE_OVERRIDES", "compare_runs", "resume", "resume_from_hub"]
