"""Checkpoints on disk: atomic save, checksummed manifest, rotation, verified load.

One run keeps its checkpoints as::

    run_dir/checkpoints/
        step-0000200/
            adapters.safetensors   # the trainable parameters, exactly as mlx_lm lora saves them
            adapter_config.json    # mlx-lm's adapter config: mlx_lm.load(adapter_path=...) and fuse
            optimizer.safetensors  # tree_flatten(optimizer.state); precision plan in metadata
            trainer_state.json     # the caller's state plus package versions
            manifest.json          # size + sha256 of every other file; written last
        latest                     # name of the newest complete checkpoint

A checkpoint is written into a temporary sibling folder; every file and the folder are fsync'ed
before the folder is renamed into place, and ``latest`` is replaced atomically afterwards. A folder
is used only once its manifest verifies, so a save killed at any moment leaves the previous
checkpoint as the latest usable one. Only safetensors and JSON are read back: nothing in a
checkpoint can execute code.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import version as _package_version
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from . import __version__
from .codecs import PRECISIONS
from .optim import AdamW

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

#: The ``format`` field of every manifest.
FORMAT = "adamw_lm.checkpoint"
#: Highest manifest / optimizer file version this package reads; also the version it writes.
FORMAT_VERSION = 1
#: The ``format`` metadata of ``optimizer.safetensors``.
OPTIMIZER_FORMAT = "adamw_lm.optimizer"

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"

_STEP_DIR = re.compile(r"step-(\d{7,})")
# Every temporary entry ends with the writer's pid, so a live writer's work is never cleaned up.
_TEMPORARY = re.compile(r"\.(?:tmp|trash)-.+-(\d+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_LISTED = 5
_READ_CHUNK = 8 << 20
# Below this a buffer is hashed inline: handing it to a thread costs more than hashing it.
_THREADED_HASH_BYTES = 1 << 20


class CheckpointError(Exception):
    """Base class of every checkpoint error."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint folder is damaged or incomplete (checksum, size, missing file, bad manifest)."""


class IncompatibleCheckpointError(CheckpointError):
    """An intact checkpoint that does not fit this model, optimizer or adamw_lm version."""


class NoCheckpointError(CheckpointError):
    """There is no checkpoint where one was asked for."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (run_dir not writable, disk full...); nothing was lost."""


# -- writing ---------------------------------------------------------------------------------


@functools.cache
def _threads(purpose: str) -> ThreadPoolExecutor:
    # Hashing and syncing tasks never wait on other tasks: with one pool per purpose, no task can
    # wait on work queued behind it.
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"adamw_lm-checkpoint-{purpose}")


class _HashingFile(io.RawIOBase):
    """A write-only file that computes the sha256 of what passes through it.

    ``mx.save_safetensors`` writes to file objects, so mlx's own writer is used and a file's
    checksum costs no extra read. Large buffers are hashed on a worker thread while this one writes
    them (hashlib and file writes both release the GIL): max(write, hash) rather than the sum.
    Meanwhile an fsync in the background sends what is written so far to the disk, so that the
    final fsync has little left to do.
    """

    def __init__(self, file: io.BufferedWriter):
        self._file = file
        self._sync: Future | None = None
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes >= _THREADED_HASH_BYTES:
            hashed = _threads("hash").submit(self.sha256.update, view)
            try:
                self._file.write(view)
            finally:
                hashed.result()
            if self._sync is None or self._sync.done():
                # A failed writeback's error is reported once only, so it is raised here.
                self.wait()
                self._sync = _threads("sync").submit(os.fsync, self._file.fileno())
        else:
            self.sha256.update(view)
            self._file.write(view)
        self.size += view.nbytes
        return view.nbytes

    def wait(self) -> None:
        """Wait for the background fsync: it must end before the file is closed."""
        if self._sync is not None:
            self._sync.result()


def _fsync(fd: int) -> None:
    # On macOS fsync leaves data in the drive's cache; F_FULLFSYNC is the durable flush there.
    if fcntl is not None and hasattr(fcntl, "F_FULLFSYNC"):
        # File systems without F_FULLFSYNC raise OSError: fall back to fsync below.
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (created / renamed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _write_safetensors(
    path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None
) -> dict[str, Any]:
    with open(path, "wb") as f:
        out = _HashingFile(f)
        try:
            mx.save_safetensors(out, arrays, metadata=metadata)
        finally:
            out.wait()
        f.flush()
        _fsync(f.fileno())
    return {"size": out.size, "sha256": out.sha256.hexdigest()}


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        _fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_adapter_config(path: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    from mlx_lm.utils import save_config  # imported here: importing mlx_lm.utils takes ~1 s

    # mlx-lm's own writer (save_config pops keys, so it gets a copy): the file is what mlx_lm lora
    # writes. JSON this small is cheap to read back for its checksum.
    save_config(dict(config), path)
    data = path.read_bytes()
    with open(path, "rb") as f:
        _fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _to_json(obj: Any, what: str) -> bytes:
    try:
        return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serializable (dict, list, str, number): {e}") from e


def _versions() -> dict[str, str]:
    return {"adamw_lm": __version__, "mlx": mx.__version__, "mlx_lm": _package_version("mlx-lm")}


def _dir_name(step: int) -> str:
    return f"step-{step:07d}"


def _temporary(root: Path, kind: str, name: str) -> Path:
    return root / f".{kind}-{name}-{os.getpid()}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of this process: saves of one run_dir do not overlap
    if os.name != "posix":
        return False  # os.kill(pid, 0) would signal the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(root: Path) -> None:
    """Remove temporaries left by saves that crashed (their writer process is gone)."""
    for entry in root.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            _remove(entry)


def _open_root(run_dir: Path) -> Path:
    root = run_dir / CHECKPOINTS_DIR
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = _temporary(root, "tmp", "probe")
        probe.mkdir(exist_ok=True)
        probe.rmdir()
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot write checkpoints under run_dir {str(run_dir)!r}: {e.strerror or e} "
            f"({e.filename or root}); expected a writable directory"
        ) from e
    return root


def _optimizer_metadata(optimizer: optim.Optimizer, plan: dict[str, str | None]) -> dict[str, str]:
    names = (
        "betas", "eps", "weight_decay", "bias_correction", "state_precision",
        "precision_overrides", "min_quantize_size", "seed",
    )  # fmt: skip
    hyper = {name: getattr(optimizer, name) for name in names if hasattr(optimizer, name)}
    return {
        "format": OPTIMIZER_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "precision_plan": json.dumps(plan, sort_keys=True),
        "hyperparameters": json.dumps(hyper, sort_keys=True),
    }


def _plan_of(optimizer: optim.Optimizer, parameters: dict) -> dict[str, str | None]:
    if isinstance(optimizer, AdamW):
        return optimizer.plan(parameters)
    # mlx's own optimizers keep raw moments in the parameter dtype, which is precision None.
    return {path: None for path, _ in tree_flatten(parameters)}


def save(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: optim.Optimizer,
    trainer_state: Mapping[str, Any],
    adapter_config: Mapping[str, Any],
    *,
    keep_last: int | None = None,
    keep_best: int | None = None,
    val_loss: float | None = None,
) -> Path:
    """Write a checkpoint of ``step`` atomically and return its folder.

    Args:
        run_dir: the run's folder; checkpoints go to ``run_dir/checkpoints/step-NNNNNNN``.
        step: the training step (``>= 0``); saving a step that exists replaces it.
        model: its trainable parameters are saved as ``adapters.safetensors``.
        optimizer: its state is saved as ``optimizer.safetensors`` (initialized first if needed).
        trainer_state: JSON-serializable; saved with the versions of adamw_lm, mlx and mlx_lm
            added to its ``versions``.
        adapter_config: mlx-lm's adapter config (``fine_tune_type``, ``num_layers``,
            ``lora_parameters``, ...).
        keep_last: keep this many newest checkpoints (by step).
        keep_best: also keep this many with the lowest ``val_loss``.
        val_loss: recorded in the manifest for ``keep_best``; a non-finite one is recorded as null.

    Rotation runs when ``keep_last`` or ``keep_best`` is given; the checkpoint just written (the one
    ``latest`` names) is never deleted. Temporaries of crashed saves are removed first.

    Raises:
        CheckpointWriteError: ``run_dir`` is not writable or a write failed; nothing was lost.
        ValueError, TypeError: bad arguments, raised before anything is written.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0; got {step!r}")
    for name, keep in (("keep_last", keep_last), ("keep_best", keep_best)):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"{name} must be None or an int >= 1; got {keep!r}")
    if val_loss is not None and not math.isfinite(float(val_loss)):
        val_loss = None
    versions = {**trainer_state.get("versions", {}), **_versions()}
    state_bytes = _to_json({**trainer_state, "versions": versions}, "trainer_state")
    if not isinstance(adapter_config, Mapping):
        raise TypeError(f"adapter_config must be a dict; got {type(adapter_config).__name__}")
    _to_json(dict(adapter_config), "adapter_config")
    trainable = model.trainable_parameters()
    adapters = dict(tree_flatten(trainable))
    if not adapters:
        raise ValueError("model has no trainable parameters; apply LoRA layers or unfreeze some")
    optimizer.init(trainable)  # what its first update would do; makes a step-0 state complete
    state = dict(tree_flatten(optimizer.state))
    for key, value in state.items():
        if not isinstance(value, mx.array):
            raise TypeError(
                f"optimizer.state[{key!r}] is a {type(value).__name__}; expected arrays only"
            )
    plan = _plan_of(optimizer, trainable)

    root = _open_root(Path(run_dir))
    _clean_stale(root)
    name = _dir_name(step)
    tmp = _temporary(root, "tmp", name)
    try:
        tmp.mkdir()
        files = _write_checkpoint_files(tmp, adapters, state, _optimizer_metadata(optimizer, plan))
        files[ADAPTER_CONFIG] = _write_adapter_config(tmp / ADAPTER_CONFIG, adapter_config)
        files[TRAINER_STATE] = _write_bytes(tmp / TRAINER_STATE, state_bytes)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "val_loss": None if val_loss is None else float(val_loss),
            "adamw_lm_version": __version__,
            "files": dict(sorted(files.items())),
            # One entry per rank once optimizer state is sharded; "parameters" will then name each
            # shard's part of the precision plan.
            "optimizer_shards": [{"file": OPTIMIZER, "rank": 0, "world_size": 1}],
        }
        _write_bytes(tmp / MANIFEST, _to_json(manifest, "manifest"))
        _fsync_dir(tmp)
        _commit(root, tmp, name)
        _point_latest(root, name)
    except OSError as e:
        _remove(tmp)
        raise CheckpointWriteError(
            f"could not write checkpoint {name} under {root}: {e.strerror or e} "
            f"({e.filename or tmp}); the previous checkpoints are untouched"
        ) from e
    except BaseException:
        _remove(tmp)
        raise
    if keep_last is not None or keep_best is not None:
        _rotate(root, keep_last or 0, keep_best or 0, keep=name)
    return root / name


def _write_checkpoint_files(
    folder: Path, adapters: dict, state: dict, metadata: dict[str, str]
) -> dict[str, dict[str, Any]]:
    # mlx calls stay on this thread: on Metal and CUDA, mlx's streams belong to the thread that
    # made them. Only hashing and fsync (no mlx) run on worker threads.
    mx.eval(adapters, state)
    return {
        ADAPTERS: _write_safetensors(folder / ADAPTERS, adapters, None),
        OPTIMIZER: _write_safetensors(folder / OPTIMIZER, state, metadata),
    }


def _commit(root: Path, tmp: Path, name: str) -> None:
    final = root / name
    trash = None
    if final.exists():
        # No portable atomic swap of folders: move the old one aside first. A crash in between
        # loses only the replaced copy; latest_checkpoint then falls back to an older checkpoint.
        trash = _temporary(root, "trash", name)
        _remove(trash)
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync_dir(root)
    if trash is not None:
        _remove(trash)


def _point_latest(root: Path, name: str) -> None:
    tmp = _temporary(root, "tmp", LATEST)
    _write_bytes(tmp, (name + "\n").encode("ascii"))
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-*`` folder, newest first."""
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def _rotate(root: Path, keep_last: int, keep_best: int, keep: str) -> None:
    complete = []
    for step, folder in _step_dirs(root):
        try:
            manifest = json.loads((folder / MANIFEST).read_bytes())
        except (OSError, ValueError):
            continue  # not a checkpoint this package wrote: not ours to delete
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
            complete.append((step, folder, manifest.get("val_loss")))
    kept = {keep} | {folder.name for _, folder, _ in complete[:keep_last]}
    scored = [c for c in complete if isinstance(c[2], (int, float)) and math.isfinite(c[2])]
    best = sorted(scored, key=lambda c: (c[2], -c[0]))[:keep_best]
    kept |= {folder.name for _, folder, _ in best}
    for _, folder, _ in complete:
        if folder.name not in kept:
            # Renamed first so a crash mid-delete never leaves a half-deleted step-* folder.
            trash = _temporary(root, "trash", folder.name)
            os.rename(folder, trash)
            _remove(trash)


# -- verifying -------------------------------------------------------------------------------


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
    _check_manifest_fields(path, manifest)
    return manifest


def _check_manifest_fields(path: Path, manifest: dict[str, Any]) -> None:
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CorruptCheckpointError(f"{path}: step must be an int >= 0; found {step!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CorruptCheckpointError(f"{path}: 'files' must map file names to size and sha256")
    for name, record in files.items():
        # A name must stay inside the folder: checkpoints may come from the Hub.
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise CorruptCheckpointError(f"{path}: file name {name!r} is not a plain file name")
        if (
            not isinstance(record, dict)
            or isinstance(record.get("size"), bool)
            or not isinstance(record.get("size"), int)
            or record["size"] < 0
            or not isinstance(record.get("sha256"), str)
            or not _SHA256.fullmatch(record["sha256"])
        ):
            raise CorruptCheckpointError(
                f"{path}: entry for {name} must be {{'size': int, 'sha256': 64 hex digits}}; "
                f"found {record!r}"
            )
    shards = manifest.get("optimizer_shards")
    if not isinstance(shards, list) or not shards:
        raise CorruptCheckpointError(f"{path}: 'optimizer_shards' must be a non-empty list")
    for shard in shards:
        if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) or (
            shard["file"] not in files
        ):
            raise CorruptCheckpointError(
                f"{path}: optimizer shard {shard!r} must name a file listed in 'files'"
            )
    for required in (ADAPTERS, ADAPTER_CONFIG, TRAINER_STATE):
        if required not in files:
            raise CorruptCheckpointError(f"{path}: 'files' does not list {required}")


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
    checked = _threads("hash").map(lambda name: _file_problem(folder, name, files[name]), files)
    problems = [p for p in checked if p is not None]
    if problems:
        raise CorruptCheckpointError(f"checkpoint {folder} is corrupt: " + "; ".join(problems))
    return manifest


# -- loading ---------------------------------------------------------------------------------


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
            f"first {min(len(problems), _MAX_LISTED)} listed):\n  "
            + "\n  ".join(problems[:_MAX_LISTED])
            + "\nSet up the same trainable parameters on the same base model before loading "
            "(LoRA layers as fine_tune_type, num_layers, lora_parameters of adapter_config.json)."
        )


def _load_safetensors(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    try:
        return mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def _group_by_parameter(
    flat: dict[str, mx.array], params: dict[str, mx.array]
) -> tuple[dict[str, dict[str, mx.array]], dict[str, mx.array]]:
    """Split flat state keys into ``{parameter: {suffix: array}}`` and the other (top) keys."""
    groups: dict[str, dict[str, mx.array]] = {}
    top = {}
    for key, value in flat.items():
        owner, suffix = key, ""
        while owner not in params and "." in owner:
            owner, last = owner.rsplit(".", 1)
            suffix = f"{last}.{suffix}" if suffix else last
        if owner in params and suffix:
            groups.setdefault(owner, {})[suffix] = value
        else:
            top[key] = value
    return groups, top


def _layout(arrays: dict[str, mx.array]) -> dict[str, tuple]:
    return {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}


def _moments(precision: str | None, parameter: mx.array) -> dict[str, mx.array]:
    """The flat stored moments of AdamW for ``parameter`` at ``precision`` (all zero, lazily)."""
    if precision is None:
        moments = {"m": mx.zeros_like(parameter), "v": mx.zeros_like(parameter)}
    else:
        codecs = PRECISIONS[precision]
        moments = {"m": codecs.m.zeros(parameter.shape), "v": codecs.v.zeros(parameter.shape)}
    return dict(tree_flatten(moments))


def _convert(
    stored: dict[str, mx.array],
    old: str | None,
    new: str | None,
    parameter: mx.array,
    key: mx.array,
) -> dict[str, mx.array]:
    """Re-store AdamW's moments of one parameter from precision ``old`` in precision ``new``."""
    tree = tree_unflatten(list(stored.items()))
    converted = {}
    for moment, moment_key in zip(("m", "v"), mx.random.split(key)):
        if old is None:
            x = tree[moment].astype(mx.float32)
        else:
            x = getattr(PRECISIONS[old], moment).decode(tree[moment], parameter.shape)
        if new is None:
            converted[moment] = x.astype(parameter.dtype)
        else:
            codec = getattr(PRECISIONS[new], moment)
            converted[moment] = codec.encode(x, moment_key if codec.stochastic else None)
    return dict(tree_flatten(converted))


def _restore_state(
    flat: dict[str, mx.array],
    metadata: dict[str, str],
    path: Path,
    trainable: dict,
    optimizer: optim.Optimizer,
    convert_precision: bool,
) -> dict:
    """The state tree stored in ``flat``, checked against (and converted for) ``optimizer``."""
    if metadata.get("format") != OPTIMIZER_FORMAT:
        raise CorruptCheckpointError(
            f"{path}: metadata 'format' must be {OPTIMIZER_FORMAT!r}; "
            f"found {metadata.get('format')!r}"
        )
    try:
        file_version = int(metadata.get("format_version", ""))
        stored_plan = json.loads(metadata["precision_plan"])
    except (KeyError, ValueError) as e:
        raise CorruptCheckpointError(
            f"{path}: metadata needs an int 'format_version' and a JSON 'precision_plan' ({e})"
        ) from e
    if file_version > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{path}: written by a newer adamw_lm (format {file_version} > supported "
            f"{FORMAT_VERSION}); upgrade adamw_lm to load it"
        )
    if not isinstance(stored_plan, dict):
        raise CorruptCheckpointError(f"{path}: metadata 'precision_plan' must be a JSON object")
    params = dict(tree_flatten(trainable))
    requested = _plan_of(optimizer, trainable)
    missing = [p for p in params if p not in stored_plan]
    if missing:
        raise IncompatibleCheckpointError(
            f"{path}: the precision plan has no entry for {', '.join(missing[:_MAX_LISTED])}"
        )
    unknown = [(p, stored_plan[p]) for p in params if stored_plan[p] not in (None, *PRECISIONS)]
    if unknown:
        raise IncompatibleCheckpointError(
            f"{path}: parameter {unknown[0][0]} is stored in precision {unknown[0][1]!r}, which "
            f"this adamw_lm does not have (known: None, {', '.join(map(repr, PRECISIONS))}); "
            f"upgrade adamw_lm"
        )
    changed = [p for p in params if stored_plan[p] != requested[p]]
    if changed and not convert_precision:
        first = changed[0]
        raise IncompatibleCheckpointError(
            f"{path}: parameter {first} has optimizer state in precision "
            f"{stored_plan[first]!r}, but this optimizer asks for {requested[first]!r} "
            f"({len(changed)} of {len(params)} parameters differ); pass convert_precision=True "
            f"(adamw-lm resume --convert-precision) to convert the moments"
        )

    # A shallow copy initialized from scratch shows the state this optimizer expects, without
    # touching the optimizer itself before every check has passed.
    probe = copy.copy(optimizer)
    probe.state = {k: v for k, v in optimizer.state.items() if k not in trainable}
    probe.init(trainable)
    expected, _ = _group_by_parameter(dict(tree_flatten(probe.state)), params)
    stored, stored_top = _group_by_parameter(flat, params)

    keys = {}
    if changed:
        # Rounding keys for stochastic codecs come from the optimizer's seed: a conversion is
        # reproducible.
        seed = getattr(optimizer, "seed", 0)
        keys = dict(zip(changed, mx.random.split(mx.random.key(seed), len(changed))))
    problems = []
    restored = {}
    for name, parameter in params.items():
        entries = stored.get(name, {})
        if name in keys:
            old_layout = _layout(_moments(stored_plan[name], parameter))
            if _layout(entries) != old_layout:
                problems.append(f"{name}: expected {old_layout}, found {_layout(entries)}")
                continue
            entries = _convert(entries, stored_plan[name], requested[name], parameter, keys[name])
        if _layout(entries) != _layout(expected.get(name, {})):
            problems.append(
                f"{name}: expected {_layout(expected.get(name, {}))}, found {_layout(entries)}"
            )
            continue
        # In the fresh state's order, so the tree flattens exactly like a never-saved optimizer's.
        restored[name] = tree_unflatten([(k, entries[k]) for k in expected[name]])
    if problems:
        raise IncompatibleCheckpointError(
            f"{path}: optimizer state does not fit this optimizer and model ({len(problems)} "
            f"parameters; first {min(len(problems), _MAX_LISTED)} listed as "
            f"{{key: (shape, dtype)}}):\n  "
            + "\n  ".join(problems[:_MAX_LISTED])
        )
    per_parameter = tree_map_with_path(lambda path, _: restored[path], trainable)
    # The fresh state's key order, with stored values (step, learning rate, RNG key, ...) where the
    # checkpoint has them; entries of the old precision that the new one lacks are dropped.
    return {
        k: per_parameter[k] if k in trainable else stored_top.get(k, v)
        for k, v in probe.state.items()
    }


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
    state = _restore_state(flat, metadata, optimizer_path, trainable, optimizer, convert_precision)
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
    if text and not _STEP_DIR.fullmatch(text):
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
    for _, folder in _step_dirs(root):
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
        steps = [d.name for _, d in _step_dirs(path / CHECKPOINTS_DIR)]
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
    ``.safetensors`` file alone (mlx-lm's ``resume_adapter_file``; its config is then ``{}``). Use it
    to seed a new run; the model's trainable parameters must match the file's keys, shapes and
    dtypes exactly.

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


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "NoCheckpointError",
    "describe",
    "latest_checkpoint",
    "load",
    "load_adapters_only",
    "load_latest",
    "save",
    "verify",
]
