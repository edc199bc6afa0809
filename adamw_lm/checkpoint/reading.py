"""Verified reading of checkpoints: every file through :mod:`.untrusted`, every field checked.

A checkpoint is opened once: each listed file is opened (inside its folder), hashed, and then
parsed from that same open file, so the bytes loaded are the bytes verified. Nothing changes the
model or the optimizer before every check has passed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from .format import (
    ADAPTER_CONFIG,
    ADAPTERS,
    CHECKPOINTS_DIR,
    LATEST,
    MANIFEST,
    MAX_LISTED,
    STEP_DIR,
    TRAINER_STATE,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    NoCheckpointError,
    check_manifest,
    check_optimizer_metadata,
    check_trainer_state,
    step_dirs,
)
from ..sharding import ShardedOptimizer, owner_of
from .state import fresh_state, restore_state
from .threads import threads
from .untrusted import (
    MAX_JSON_BYTES,
    MAX_LATEST_BYTES,
    MAX_TRAINER_STATE_BYTES,
    Folder,
    OpenFile,
    open_file,
    parse_json,
    read_json,
)

log = logging.getLogger("adamw_lm.checkpoint")

_REQUIRED_STATE = ("step", "learning_rate")
# Caps on the listed files that are parsed whole; safetensors files are read as mlx reads them.
_CAPS = {TRAINER_STATE: MAX_TRAINER_STATE_BYTES, ADAPTER_CONFIG: MAX_JSON_BYTES}


class VerifiedCheckpoint:
    """A checkpoint folder whose every file verified, held open so that loading reads those bytes.

    Use as a context manager (or call :meth:`close`); pass it to :func:`load` to load it without
    hashing it again.

    Attributes:
        path: the checkpoint folder.
        manifest: the manifest, checked (``step``, ``val_loss``, ``files``...).
        trainer_state: the trainer state, checked (``iteration`` equals ``step``...).
        adapter_config: mlx-lm's adapter config (a dict).
        precision_plan: the optimizer's stored precision per parameter path.
        hyperparameters: the optimizer's stored settings (a dict).
        optimizer_class: the stored optimizer's class, ``module.QualName``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], files: dict[str, OpenFile]):
        self.path, self.manifest, self._files = path, manifest, files
        state_file = files[TRAINER_STATE]
        self.trainer_state = check_trainer_state(
            path / TRAINER_STATE,
            parse_json(state_file.read(), str(path / TRAINER_STATE), nonfinite=True),
            manifest["step"],
        )
        self.adapter_config = parse_json(files[ADAPTER_CONFIG].read(), str(path / ADAPTER_CONFIG))
        if not isinstance(self.adapter_config, dict):
            raise CorruptCheckpointError(f"{path / ADAPTER_CONFIG} must hold a JSON object")
        files[ADAPTERS].check_safetensors_header()
        self.precision_plan = {}
        for shard in sorted(manifest["optimizer_shards"], key=lambda s: -s["rank"]):
            name = shard["file"]
            metadata = files[name].check_safetensors_header()
            plan, self.hyperparameters = check_optimizer_metadata(path / name, metadata, parse_json)
            listed = shard.get("parameters", plan)
            if set(plan) != set(listed):
                raise CorruptCheckpointError(
                    f"{path / name}: its precision plan does not name the parameters the manifest lists "
                    f"for rank {shard['rank']}")
            self.precision_plan.update(plan)
            self.optimizer_class = metadata["optimizer"]  # rank 0's, read last

    @property
    def optimizer_file(self) -> str:
        """The file of rank 0's optimizer state (the whole state when unsharded)."""
        return next(s["file"] for s in self.manifest["optimizer_shards"] if s["rank"] == 0)

    def optimizer_state(self) -> dict[str, mx.array]:
        """The whole optimizer state, flat: the scalars from rank 0's file, each parameter's
        state from the file of the shard that lists it."""
        state: dict[str, mx.array] = {}
        for shard in sorted(self.manifest["optimizer_shards"], key=lambda s: -s["rank"]):
            listed = set(shard.get("parameters", self.precision_plan))
            for key, value in self.arrays(shard["file"]).items():
                owner = owner_of(key, self.precision_plan)
                if owner is None and shard["rank"] != 0:
                    continue  # the scalars: every process keeps them alike; rank 0's are used
                if owner is not None and owner not in listed:
                    raise CorruptCheckpointError(
                        f"{self.path / shard['file']}: holds state of {owner}, which the manifest gives "
                        f"to another shard")
                state[key] = value
        return state

    def arrays(self, name: str) -> dict[str, mx.array]:
        """The arrays of one listed safetensors file, read lazily from the verified open file."""
        return self._files[name].load_safetensors()[0]

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> VerifiedCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_verified(checkpoint_dir: str | os.PathLike) -> VerifiedCheckpoint:
    """Verify a checkpoint folder and keep its files open; see :func:`verify` for the errors."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise NoCheckpointError(f"no checkpoint folder at {folder}")
    if not os.path.lexists(folder / MANIFEST):
        if (folder / CHECKPOINTS_DIR).is_dir():
            raise NoCheckpointError(
                f"{folder} is a run directory, not a checkpoint folder; use load_latest / "
                f"latest_checkpoint on it, or pass {folder / CHECKPOINTS_DIR}/step-NNNNNNN"
            )
        raise CorruptCheckpointError(
            f"{folder / MANIFEST} is missing: {folder} is not a complete checkpoint (the manifest "
            f"is written last, so its save was interrupted or the folder was not written by "
            f"adamw_lm)"
        )
    inside = Folder(folder)
    step = STEP_DIR.fullmatch(folder.name)
    manifest = check_manifest(
        folder / MANIFEST,
        read_json(inside, MANIFEST, str(folder / MANIFEST)),
        int(step.group(1)) if step else None,
    )
    records = manifest["files"]

    def check(name: str) -> tuple[OpenFile | None, str | None]:
        try:
            f = open_file(inside, name, name, size=records[name]["size"], max_size=_CAPS.get(name))
        except CorruptCheckpointError as e:
            return None, str(e)
        try:
            found = f.sha256()
        except (CorruptCheckpointError, OSError) as e:
            f.close()
            return None, f"{name} cannot be read ({e})"
        if found != records[name]["sha256"]:
            f.close()
            # Only files inside the folder are ever hashed, so the found hash reveals nothing else.
            return None, (
                f"{name}: checksum mismatch: expected sha256 {records[name]['sha256']}, "
                f"found {found}"
            )
        f.label = str(folder / name)  # from here on, errors name the whole path
        return f, None

    checked = dict(zip(records, threads("hash").map(check, records)))
    files = {name: f for name, (f, _) in checked.items() if f is not None}
    problems = [problem for _, problem in checked.values() if problem is not None]
    try:
        if problems:
            raise CorruptCheckpointError(f"checkpoint {folder} is corrupt: " + "; ".join(problems))
        return VerifiedCheckpoint(folder, manifest, files)
    except BaseException:
        for f in files.values():
            f.close()
        raise


def verify(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint folder completely and return its manifest.

    Every listed file must be a regular file inside the folder (or in the Hugging Face cache's
    blobs the folder is a snapshot of) with the manifest's size and sha256; the manifest, the
    trainer state, the adapter config and the safetensors headers and optimizer metadata must be
    well formed, and the trainer state's ``iteration`` must equal the manifest's ``step`` (and the
    folder's number).

    Raises:
        NoCheckpointError: the folder does not exist, or is a run directory.
        CorruptCheckpointError: a file is missing, truncated, altered, a link out of the folder,
            not a regular file, over its size cap, or malformed (an interrupted save, or not
            written by adamw_lm); the message names each file and the problem.
        IncompatibleCheckpointError: written by a newer adamw_lm, or a precision it lacks.
    """
    with open_verified(checkpoint_dir) as found:
        return found.manifest


def _check_weights(weights: dict[str, mx.array], params: dict[str, mx.array], path: Path) -> None:
    """Raise unless ``weights`` has exactly the keys, shapes and dtypes of ``params``."""

    def describe(a: mx.array) -> str:
        return f"{tuple(a.shape)} {a.dtype}".replace("mlx.core.", "")

    problems = []
    for key in sorted(set(params) | set(weights)):
        if key not in weights:
            problems.append(
                f"{key}: missing from the file; the model expects {describe(params[key])}"
            )
        elif key not in params:
            problems.append(
                f"{key}: {describe(weights[key])} in the file, but not a trainable parameter"
            )
        elif weights[key].shape != params[key].shape or weights[key].dtype != params[key].dtype:
            problems.append(
                f"{key}: expected {describe(params[key])}, found {describe(weights[key])}"
            )
    if problems:
        raise IncompatibleCheckpointError(
            f"{path} does not fit the model's trainable parameters ({len(problems)} mismatches, "
            f"first {min(len(problems), MAX_LISTED)} listed):\n  "
            + "\n  ".join(problems[:MAX_LISTED])
            + "\nSet up the same trainable parameters on the same base model before loading "
            "(LoRA layers as fine_tune_type, num_layers, lora_parameters of adapter_config.json)."
        )


def _check_finite(arrays: dict[str, mx.array], path: Path, moments: bool = False) -> None:
    """Raise unless every floating-point array in ``arrays`` is finite (this evaluates them); with
    ``moments``, a second moment stored as floats (``...v``) must be >= 0 and may hold +inf, which
    mlx's AdamW leaves where a gradient's square overflowed (the element is frozen), and a block's
    scale (``...scales``, its largest magnitude) must be >= 0."""
    floating = [(k, a) for k, a in arrays.items() if mx.issubdtype(a.dtype, mx.floating)]
    second = {k for k, _ in floating if moments and (k == "v" or k.endswith(".v"))}
    signs = {k: mx.all(a >= 0) for k, a in floating
             if k in second or (moments and k.endswith(".scales"))}  # fmt: skip
    # A finite sum proves every element finite (NaN and inf propagate), and a sum is cheaper than
    # isfinite on every element; only a sum that overflowed needs the element-wise check.
    sums = {k: mx.isfinite(mx.sum(a)) for k, a in floating if k not in second}
    mx.eval(signs, sums)
    bad = [
        key for key, a in floating
        if (key in signs and not signs[key].item())
        or (key in sums and not sums[key].item() and not mx.all(mx.isfinite(a)).item())
    ]
    if bad:
        raise CorruptCheckpointError(
            f"{path}: {len(bad)} arrays hold NaN or infinite values"
            f"{' (or negative second moments or block scales)' if signs else ''} "
            f"(first: {bad[0]})"
        )


def _check_state_layout(
    state: dict, optimizer: optim.Optimizer, trainable: dict, path: Path
) -> None:
    """Raise unless ``state`` has the keys, shapes and dtypes of a fresh state of ``optimizer``."""
    fresh = fresh_state(optimizer, trainable)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in tree_flatten(fresh)}
    found = {k: (tuple(v.shape), v.dtype) for k, v in tree_flatten(state)}
    wrong = [k for k in expected if found.get(k) != expected[k]] + [
        k for k in found if k not in expected
    ]
    if wrong:
        key = wrong[0]
        shown = lambda layout: "absent" if layout is None else (  # noqa: E731
            f"{layout[0]} {layout[1]}".replace("mlx.core.", "")
        )
        raise IncompatibleCheckpointError(
            f"{path}: optimizer state {key} is {shown(found.get(key))}; this optimizer expects "
            f"{shown(expected.get(key))} ({len(wrong)} entries differ)"
        )


def _load_verified(
    found: VerifiedCheckpoint,
    model: nn.Module,
    optimizer: optim.Optimizer,
    convert_precision: bool,
) -> dict[str, Any]:
    # A sharded optimizer restores the whole state, then keeps its own share: the checkpoint may
    # come from any number of processes.
    sharded = isinstance(optimizer, ShardedOptimizer)
    whole = optimizer.inner if sharded else optimizer
    trainable = model.trainable_parameters()
    params = dict(tree_flatten(trainable))
    adapters = found.arrays(ADAPTERS)
    _check_weights(adapters, params, found.path / ADAPTERS)
    optimizer_path = found.path / found.optimizer_file
    flat = found.optimizer_state()
    # Every mlx optimizer keeps these; a fresh value in place of a missing one would restart the
    # bias correction and the schedule silently.
    for key in _REQUIRED_STATE:
        if key not in flat:
            raise CorruptCheckpointError(f"{optimizer_path}: optimizer state has no {key!r}")
    # As stored, before a conversion decodes and encodes it again (a NaN or a negative moment
    # need not survive that as such); below, what the conversion made.
    _check_finite(flat, optimizer_path, moments=True)
    state = restore_state(
        flat, found.precision_plan, optimizer_path, trainable, whole, convert_precision,
        found.hyperparameters,
    )
    _check_state_layout(state, whole, trainable, optimizer_path)
    _check_finite(adapters, found.path / ADAPTERS)
    # What a conversion (or a fresh entry) made: the arrays kept as stored are checked above.
    as_stored = {id(a) for a in flat.values()}
    made = {k: a for k, a in tree_flatten(state) if id(a) not in as_stored}
    _check_finite(made, optimizer_path, moments=True)

    # Every check has passed: only now are the model and the optimizer changed.
    model.load_weights(list(adapters.items()), strict=False)
    if sharded:
        optimizer.set_full_state(state, trainable)
    else:
        optimizer.state = state
        optimizer.init(trainable)
    # Read everything now: a rotation may delete this folder while the run goes on.
    mx.eval(model.trainable_parameters(), optimizer.state)
    return found.trainer_state


def load(
    checkpoint: str | os.PathLike | VerifiedCheckpoint,
    model: nn.Module,
    optimizer: optim.Optimizer,
    *,
    convert_precision: bool = False,
) -> dict[str, Any]:
    """Verify a checkpoint, load it into ``model`` and ``optimizer``, and return its trainer state.

    The model's trainable parameters must be set up (LoRA layers applied, the rest frozen) as
    when the checkpoint was saved. ``optimizer.state`` is replaced by a plain tree of arrays, so
    load before compiling a training step over it. ``checkpoint`` is a folder, or a
    :class:`VerifiedCheckpoint` (then not hashed again; it stays open).

    Args:
        convert_precision: when the checkpoint's per-parameter moment precisions differ from what
            ``optimizer`` asks for, convert them (decode, then encode) instead of raising.

    Raises:
        CorruptCheckpointError, NoCheckpointError: see :func:`verify`; also a floating-point
            array (adapters, moments, scales, step, learning rate...) that is not finite.
        IncompatibleCheckpointError: the adapters do not fit the model (first mismatches
            listed), the optimizer state does not fit the optimizer (entries, shapes, dtypes),
            or the precisions differ without ``convert_precision``. Nothing is changed when an
            error is raised.
    """
    if isinstance(checkpoint, VerifiedCheckpoint):
        return _load_verified(checkpoint, model, optimizer, convert_precision)
    with open_verified(checkpoint) as found:
        return _load_verified(found, model, optimizer, convert_precision)


def _checkpoints_root(run_dir: Path) -> Path | None:
    """``run_dir/checkpoints`` if it is a folder; refused if it is a link out of ``run_dir``."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    run_real = Path(os.path.realpath(run_dir))
    if not Path(os.path.realpath(root)).is_relative_to(run_real):
        raise CorruptCheckpointError(f"{root} is a link that leads out of the run folder {run_dir}")
    return root


def _read_latest(root: Path) -> str | None:
    """The checkpoint name ``latest`` holds; ``None`` (with a warning if it is bad) otherwise."""
    path = root / LATEST
    if not os.path.lexists(path):
        return None  # the first save was killed before it wrote latest
    try:
        with open_file(Folder(root), LATEST, str(path), max_size=MAX_LATEST_BYTES) as f:
            text = f.read().decode("ascii").strip()
    except CorruptCheckpointError as e:
        log.warning("ignoring %s: %s", path, e)
        return None
    except UnicodeDecodeError:
        text = ""
    if not STEP_DIR.fullmatch(text):
        log.warning("ignoring %s: it does not hold a checkpoint name", path)
        return None
    return text


def open_latest(run_dir: str | os.PathLike) -> VerifiedCheckpoint | None:
    """:func:`open_verified` the :func:`latest_checkpoint` of ``run_dir``; ``None`` if none."""
    run_dir = Path(run_dir)
    root = _checkpoints_root(run_dir)
    if root is None:
        return None
    run_real = Path(os.path.realpath(run_dir))
    named = _read_latest(root)
    if named is not None:
        try:
            if not Path(os.path.realpath(root / named)).is_relative_to(run_real):
                raise CorruptCheckpointError(f"{root / named} is a link out of the run folder")
            return open_verified(root / named)
        except (CorruptCheckpointError, NoCheckpointError) as e:
            log.warning(
                "%s names an unusable checkpoint (%s); falling back to the newest checkpoint "
                "that verifies", root / LATEST, e,
            )
    for _, folder in step_dirs(root):
        if folder.name == named:
            continue
        try:
            return open_verified(folder)
        except CorruptCheckpointError as e:
            log.warning("skipping %s: %s", folder, e)
    return None


def steps(run_dir: str | os.PathLike) -> list[int]:
    """The steps of ``run_dir``'s checkpoint folders, newest first (unverified; links left out)."""
    root = _checkpoints_root(Path(run_dir))
    return [] if root is None else [step for step, _ in step_dirs(root)]


def open_step(run_dir: str | os.PathLike, step: int) -> VerifiedCheckpoint:
    """:func:`open_verified` the checkpoint of ``step`` in ``run_dir``; a step folder (or
    ``checkpoints``) that is a link is refused, as by :func:`open_latest`.

    Raises:
        NoCheckpointError: ``run_dir`` has no checkpoint folder of that step (the steps it has are
            listed).
        CorruptCheckpointError, IncompatibleCheckpointError: see :func:`verify`.
    """
    run_dir = Path(run_dir)
    root = _checkpoints_root(run_dir)
    found = dict(step_dirs(root)) if root is not None else {}
    if step not in found:
        raise NoCheckpointError(
            f"{run_dir}: no checkpoint at step {step} (checkpoints: "
            f"{', '.join(map(str, sorted(found))) or 'none'})"
        )
    return open_verified(found[step])


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, verified; ``None`` if there is none.

    That is the folder ``checkpoints/latest`` names if it verifies, otherwise (``latest`` missing,
    stale or corrupt) the highest-step ``step-*`` folder that verifies, with a warning logged to
    the ``adamw_lm.checkpoint`` logger. Temporary folders of interrupted saves, and step folders
    that are links, are never returned.

    Raises:
        IncompatibleCheckpointError: the checkpoint to resume from was written by a newer adamw_lm
            (falling back to an older one would silently lose training).
        CorruptCheckpointError: ``checkpoints`` is a link out of ``run_dir``.
    """
    found = open_latest(run_dir)
    if found is None:
        return None
    found.close()
    return found.path


def load_latest(
    run_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: optim.Optimizer,
    *,
    convert_precision: bool = False,
) -> tuple[Path, dict[str, Any]] | None:
    """:func:`load` the :func:`latest_checkpoint` of ``run_dir`` (hashed once); ``None`` if none."""
    found = open_latest(run_dir)
    if found is None:
        return None
    with found:
        return found.path, _load_verified(found, model, optimizer, convert_precision)


def describe(path: str | os.PathLike) -> str:
    """A readable summary of a checkpoint folder, or of a run directory's checkpoints, verified.

    Shows the step, validation loss, versions, moment precisions, the last logged losses and each
    file's size and sha256. Raises like :func:`verify` when the checkpoint does not verify.
    """
    path = Path(path)
    lines = []
    if (path / CHECKPOINTS_DIR).is_dir() and not os.path.lexists(path / MANIFEST):
        found = open_latest(path)
        if found is None:
            raise NoCheckpointError(f"no complete checkpoint under {path / CHECKPOINTS_DIR}")
        steps = [d.name for _, d in step_dirs(path / CHECKPOINTS_DIR)]
        lines.append(f"run {path}: {len(steps)} checkpoint folder(s): {', '.join(steps)}")
    else:
        found = open_verified(path)
    found.close()
    manifest, state = found.manifest, found.trainer_state
    files = manifest["files"]
    lines.append(f"checkpoint {found.path}: step {manifest['step']}, verified (size and sha256 "
                 f"of {len(files)} files)")
    if manifest["val_loss"] is not None:
        lines.append(f"  val_loss: {manifest['val_loss']}")
    versions = state.get("versions", {})
    lines.append("  written by " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    losses = state.get("losses")
    if isinstance(losses, list) and losses:
        lines.append(f"  losses: {len(losses)} logged, last {losses[-3:]}")
    counts: dict[str, int] = {}
    for precision in found.precision_plan.values():
        counts[str(precision)] = counts.get(str(precision), 0) + 1
    lines.append("  moment precisions: "
                 + ", ".join(f"{p} x {n} parameters" for p, n in sorted(counts.items())))
    # Re-encoded (ASCII, escaped), not echoed: nothing from the file reaches the terminal raw.
    hyper = json.dumps(found.hyperparameters, sort_keys=True)
    lines.append(f"  optimizer: {found.optimizer_class} {hyper}")
    world = manifest["optimizer_shards"][0]["world_size"]
    if world > 1:
        lines.append(f"  optimizer state sharded over {world} processes (one file each); loads at any number")
    for name, record in files.items():
        lines.append(f"  {name:<24} {record['size']:>14,d} bytes  sha256 {record['sha256']}")
    return "\n".join(lines)


def load_adapters_only(adapter_path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Load adapter weights into ``model`` (no optimizer state); return their adapter config.

    ``adapter_path`` is a folder written by ``mlx_lm lora`` (``adapters.safetensors`` +
    ``adapter_config.json``), an adamw_lm checkpoint (then verified first), or an adapters
    ``.safetensors`` file alone (mlx-lm's ``resume_adapter_file``; its config is then ``{}``).
    Use it to seed a new run; the model's trainable parameters must match the file's keys, shapes
    and dtypes exactly.

    Raises:
        NoCheckpointError: a file is missing.
        CorruptCheckpointError: an unreadable file, or a checkpoint that does not verify.
        IncompatibleCheckpointError: the weights do not fit the model.
    """
    path = Path(adapter_path)
    config: dict[str, Any] = {}
    if path.is_file():
        # A file the user named: its own folder confines it (their link is their choice).
        real = Path(os.path.realpath(path))
        folder, name, label = Folder(real.parent), real.name, str(path)
    elif os.path.lexists(path / MANIFEST):
        with open_verified(path) as found:
            weights = found.arrays(ADAPTERS)
            return _load_adapters(weights, found.path / ADAPTERS, model, found.adapter_config)
    elif not path.is_dir():
        raise NoCheckpointError(
            f"{path} not found: expected an adapter folder written by mlx_lm lora ({ADAPTERS} + "
            f"{ADAPTER_CONFIG}), an adamw_lm checkpoint, or a {ADAPTERS} file")
    else:
        for required in (ADAPTERS, ADAPTER_CONFIG):
            if not os.path.lexists(path / required):
                raise NoCheckpointError(
                    f"{path / required} not found: expected an adapter folder written by mlx_lm "
                    f"lora ({ADAPTERS} + {ADAPTER_CONFIG}), an adamw_lm checkpoint, or a "
                    f"{ADAPTERS} file"
                )
        folder, name, label = Folder(path), ADAPTERS, str(path / ADAPTERS)
        config = read_json(folder, ADAPTER_CONFIG, str(path / ADAPTER_CONFIG))
        if not isinstance(config, dict):
            raise CorruptCheckpointError(f"{path / ADAPTER_CONFIG} must hold a JSON object")
    with open_file(folder, name, label) as f:
        weights, _ = f.load_safetensors()
        return _load_adapters(weights, Path(label), model, config)


def _load_adapters(
    weights: dict[str, mx.array], path: Path, model: nn.Module, config: dict[str, Any]
) -> dict[str, Any]:
    _check_weights(weights, dict(tree_flatten(model.trainable_parameters())), path)
    _check_finite(weights, path)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.trainable_parameters())
    return config
