"""Verified reading of checkpoints: manifest checks, checksums, load, latest, describe."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
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
    FORMAT,
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    MAX_LISTED,
    STEP_DIR,
    TRAINER_STATE,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    NoCheckpointError,
    check_manifest_fields,
    step_dirs,
)
from .state import restore_state
from .threads import threads

_READ_CHUNK = 8 << 20


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            sha.update(view[:n])
    return sha.hexdigest()


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / CHECKPOINTS_DIR).is_dir():
            raise NoCheckpointError(
                f"{folder} is a run directory, not a checkpoint folder; use load_latest / "
                f"latest_checkpoint on it, or pass {folder / CHECKPOINTS_DIR}/step-NNNNNNN"
            )
        raise CorruptCheckpointError(
            f"{path} is missing: {folder} is not a complete checkpoint (the manifest is written "
            f"last, so its save was interrupted or the folder was not written by adamw_lm)"
        )
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(
            f"{path} is not valid JSON ({e}): not a complete checkpoint"
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CorruptCheckpointError(
            f"{path} is not an adamw_lm checkpoint manifest: expected format {FORMAT!r}, "
            f"found {found!r}"
        )
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CorruptCheckpointError(
            f"{path}: format_version must be an int >= 1; found {version!r}"
        )
    if version > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{path}: written by a newer adamw_lm (format {version} > supported {FORMAT_VERSION}); "
            f"upgrade adamw_lm to load it"
        )
    check_manifest_fields(path, manifest)
    return manifest



def _file_problem(folder: Path, name: str, record: dict[str, Any]) -> str | None:
    path = folder / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{name} is missing (the manifest lists {record['size']} bytes)"
    if size != record["size"]:
        return f"{name} is truncated or altered: expected {record['size']} bytes, found {size}"
    found = _sha256_file(path)
    if found != record["sha256"]:
        return f"{name}: checksum mismatch: expected sha256 {record['sha256']}, found {found}"
    return None


def verify(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """Check every file the manifest lists (present, size, sha256) and return the manifest.

    Raises:
        NoCheckpointError: the folder does not exist, or is a run directory.
        CorruptCheckpointError: a file is missing, truncated or altered, or the manifest is
            missing or invalid (an interrupted save); the message names each file and what was
            expected.
        IncompatibleCheckpointError: the manifest was written by a newer adamw_lm.
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise NoCheckpointError(f"no checkpoint folder at {folder}")
    manifest = _read_manifest(folder)
    files = manifest["files"]
    checked = threads("hash").map(lambda name: _file_problem(folder, name, files[name]), files)
    problems = [p for p in checked if p is not None]
    if problems:
        raise CorruptCheckpointError(f"checkpoint {folder} is corrupt: " + "; ".join(problems))
    return manifest



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


def _load_safetensors(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    try:
        return mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file: {e}") from e



def _load_verified(
    folder: Path,
    manifest: dict[str, Any],
    model: nn.Module,
    optimizer: optim.Optimizer,
    convert_precision: bool,
) -> dict[str, Any]:
    shards = manifest["optimizer_shards"]
    if len(shards) != 1 or shards[0].get("world_size", 1) != 1:
        raise IncompatibleCheckpointError(
            f"{folder / MANIFEST}: optimizer state is sharded over {len(shards)} files "
            f"(world_size {shards[0].get('world_size')}); this adamw_lm reads one unsharded file"
        )
    trainable = model.trainable_parameters()
    params = dict(tree_flatten(trainable))
    adapters, _ = _load_safetensors(folder / ADAPTERS)
    _check_weights(adapters, params, folder / ADAPTERS)
    optimizer_path = folder / shards[0]["file"]
    flat, metadata = _load_safetensors(optimizer_path)
    state = restore_state(flat, metadata, optimizer_path, trainable, optimizer, convert_precision)
    try:
        trainer_state = json.loads((folder / TRAINER_STATE).read_bytes())
    except ValueError as e:
        raise CorruptCheckpointError(f"{folder / TRAINER_STATE} is not valid JSON: {e}") from e

    # Every check has passed: only now are the model and the optimizer changed.
    model.load_weights(list(adapters.items()), strict=False)
    optimizer.state = state
    optimizer.init(trainable)
    # Read everything now: a rotation may delete this folder while the run goes on.
    mx.eval(model.trainable_parameters(), optimizer.state)
    return trainer_state


def load(
    checkpoint_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: optim.Optimizer,
    *,
    convert_precision: bool = False,
) -> dict[str, Any]:
    """Verify a checkpoint, load it into ``model`` and ``optimizer``, and return its trainer state.

    The model's trainable parameters must be set up (LoRA layers applied, the rest frozen) as
    when the checkpoint was saved. ``optimizer.state`` is replaced by a plain tree of arrays, so
    load before compiling a training step over it.

    Args:
        convert_precision: when the checkpoint's per-parameter moment precisions differ from what
            ``optimizer`` asks for, convert them (decode, then encode) instead of raising.

    Raises:
        CorruptCheckpointError, NoCheckpointError: see :func:`verify`.
        IncompatibleCheckpointError: the adapters do not fit the model (first mismatches
            listed), the optimizer state does not fit the optimizer, or the precisions differ
            without ``convert_precision``. Nothing is changed when an error is raised.
    """
    folder = Path(checkpoint_dir)
    return _load_verified(folder, verify(folder), model, optimizer, convert_precision)


def _find_latest(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    named = None
    try:
        text = (root / LATEST).read_text("ascii").strip()
    except FileNotFoundError:
        text = ""  # the first save was killed before it wrote latest
    except (OSError, UnicodeDecodeError):
        text = "(unreadable)"
    if text and not STEP_DIR.fullmatch(text):
        warnings.warn(f"{root / LATEST} holds {text!r}, not a checkpoint name; ignoring it",
                      stacklevel=3)
    elif text:
        named = root / text
        try:
            return named, verify(named)
        except (CorruptCheckpointError, NoCheckpointError) as e:
            warnings.warn(
                f"{root / LATEST} names an unusable checkpoint ({e}); falling back to the "
                f"newest checkpoint that verifies",
                stacklevel=3,
            )
    for _, folder in step_dirs(root):
        if folder == named:
            continue
        try:
            return folder, verify(folder)
        except CorruptCheckpointError as e:
            warnings.warn(f"skipping {folder}: {e}", stacklevel=3)
    return None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, verified; ``None`` if there is none.

    That is the folder ``checkpoints/latest`` names if it verifies, otherwise (``latest`` missing,
    stale or corrupt) the highest-step ``step-*`` folder that verifies, with a warning. Temporary
    folders of interrupted saves are never returned.

    Raises:
        IncompatibleCheckpointError: the checkpoint to resume from was written by a newer adamw_lm
            (falling back to an older one would silently lose training).
    """
    found = _find_latest(run_dir)
    return None if found is None else found[0]


def load_latest(
    run_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: optim.Optimizer,
    *,
    convert_precision: bool = False,
) -> tuple[Path, dict[str, Any]] | None:
    """:func:`load` the :func:`latest_checkpoint` of ``run_dir``; ``None`` if it has none."""
    found = _find_latest(run_dir)
    if found is None:
        return None
    folder, manifest = found
    return folder, _load_verified(folder, manifest, model, optimizer, convert_precision)


def describe(path: str | os.PathLike) -> str:
    """A readable summary of a checkpoint folder, or of a run directory's checkpoints, verified.

    Shows the step, validation loss, versions, moment precisions, the last logged losses and each
    file's size and sha256. Raises like :func:`verify` when the checkpoint does not verify.
    """
    path = Path(path)
    lines = []
    if (path / CHECKPOINTS_DIR).is_dir() and not (path / MANIFEST).is_file():
        found = _find_latest(path)
        if found is None:
            raise NoCheckpointError(f"no complete checkpoint under {path / CHECKPOINTS_DIR}")
        folder, manifest = found
        steps = [d.name for _, d in step_dirs(path / CHECKPOINTS_DIR)]
        lines.append(f"run {path}: {len(steps)} checkpoint folder(s): {', '.join(steps)}")
    else:
        folder, manifest = path, verify(path)
    files = manifest["files"]
    lines.append(f"checkpoint {folder}: step {manifest['step']}, verified (size and sha256 of "
                 f"{len(files)} files)")
    if manifest.get("val_loss") is not None:
        lines.append(f"  val_loss: {manifest['val_loss']}")
    state = json.loads((folder / TRAINER_STATE).read_bytes())
    versions = state.get("versions", {})
    lines.append("  written by " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    losses = state.get("losses")
    if isinstance(losses, list) and losses:
        lines.append(f"  losses: {len(losses)} logged, last {losses[-3:]}")
    _, metadata = _load_safetensors(folder / manifest["optimizer_shards"][0]["file"])
    plan = json.loads(metadata.get("precision_plan", "{}"))
    counts: dict[str, int] = {}
    for precision in plan.values():
        counts[str(precision)] = counts.get(str(precision), 0) + 1
    lines.append("  moment precisions: "
                 + ", ".join(f"{p} x {n} parameters" for p, n in sorted(counts.items())))
    lines.append(f"  optimizer: {metadata.get('optimizer')} {metadata.get('hyperparameters')}")
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
        weights_file = path
    else:
        if (path / MANIFEST).is_file():
            verify(path)
        for required in (ADAPTERS, ADAPTER_CONFIG):
            if not (path / required).is_file():
                raise NoCheckpointError(
                    f"{path / required} not found: expected an adapter folder written by mlx_lm "
                    f"lora ({ADAPTERS} + {ADAPTER_CONFIG}), an adamw_lm checkpoint, or a "
                    f"{ADAPTERS} file"
                )
        try:
            config = json.loads((path / ADAPTER_CONFIG).read_bytes())
        except ValueError as e:
            raise CorruptCheckpointError(f"{path / ADAPTER_CONFIG} is not valid JSON: {e}") from e
        weights_file = path / ADAPTERS
    weights, _ = _load_safetensors(weights_file)
    _check_weights(weights, dict(tree_flatten(model.trainable_parameters())), weights_file)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.trainable_parameters())
    return config

