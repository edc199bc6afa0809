"""Durable, atomic checkpoint writing: hashed writes, fsync, temporaries, ``latest``, rotation."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import stat
from concurrent.futures import Future
from importlib.metadata import version as _package_version
from pathlib import Path
from typing import Any, Iterable, Mapping

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from .. import __version__
from .format import (
    ADAPTER_CONFIG,
    ADAPTERS,
    CHECKPOINTS_DIR,
    FORMAT,
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    MAX_COUNT,
    OPTIMIZER,
    TEMPORARY,
    optimizer_shard_name,
    TRAINER_STATE,
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    check_trainer_state,
    dir_name,
    step_dirs,
)
from .. import distributed as dist
from ..sharding import ShardedOptimizer
from .state import optimizer_metadata, plan_of
from .threads import threads
from .untrusted import (
    MAX_JSON_BYTES,
    MAX_TRAINER_STATE_BYTES,
    Folder,
    parse_json,
    read_json,
)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_CREATE_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)
# Below this a buffer is hashed inline: handing it to a thread costs more than hashing it.
_THREADED_HASH_BYTES = 1 << 20


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
            hashed = threads("hash").submit(self.sha256.update, view)
            try:
                self._file.write(view)
            finally:
                hashed.result()
            if self._sync is None or self._sync.done():
                # A failed writeback's error is reported once only, so it is raised here.
                self.wait()
                self._sync = threads("sync").submit(os.fsync, self._file.fileno())
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
    with _create(path) as f:
        out = _HashingFile(f)
        try:
            mx.save_safetensors(out, arrays, metadata=metadata)
        finally:
            out.wait()
        f.flush()
        _fsync(f.fileno())
    return {"size": out.size, "sha256": out.sha256.hexdigest()}


def _create(path: Path) -> io.BufferedWriter:
    """A new file for writing: never an existing entry, never through a link."""
    return os.fdopen(os.open(path, _CREATE_FLAGS, 0o666), "wb")


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    with _create(path) as f:
        f.write(data)
        f.flush()
        _fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_adapter_config(path: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    from mlx_lm.utils import save_config  # imported here: importing mlx_lm.utils takes ~1 s

    # mlx-lm's own writer (save_config pops keys, so it gets a copy): the file is what mlx_lm lora
    # writes. It opens by name, which is safe here: ``path`` is in a folder this save just created
    # under a fresh name. JSON this small is cheap to read back for its checksum.
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


def _loadable(data: bytes, what: str, cap: int, nonfinite: bool = False) -> Any:
    """``data`` parsed as a load parses it: a save never writes what a load would refuse."""
    if len(data) > cap:
        raise ValueError(f"{what} would be {len(data)} bytes; a checkpoint holds at most {cap}")
    try:
        return parse_json(data, what, nonfinite=nonfinite)
    except CorruptCheckpointError as e:
        raise ValueError(f"{e}; a load would refuse it") from None


def _versions() -> dict[str, str]:
    return {"adamw_lm": __version__, "mlx": mx.__version__, "mlx_lm": _package_version("mlx-lm")}


def _temporary(root: Path, kind: str, name: str) -> Path:
    # Unguessable, so nothing can be planted under the name before it is created (exclusively).
    return root / f".{kind}-{name}-{secrets.token_hex(8)}-{os.getpid()}"


def _remove(path: Path) -> None:
    """Delete a file, a link (not what it points to) or a folder tree (without following links)."""
    try:
        is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return
    if is_dir:
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


def _clean_stale(root: Path) -> list[str]:
    """Put back the checkpoint folders that saves killed between their two renames had moved
    aside, then remove the temporaries left by saves that crashed (their writer process is gone);
    return the names put back.

    A save that replaces a step folder moves the old one aside first (no portable atomic swap of
    folders): killed before the new one took its name, it leaves neither under the name, and the
    old one must not go with the leftovers. A folder put back is verified first."""
    from .reading import verify

    restored = []
    for entry in sorted(root.iterdir()):
        match = _ASIDE.fullmatch(entry.name)
        if (match is None or _pid_alive(int(match.group(3))) or entry.is_symlink()
                or os.path.lexists(root / match.group(1))):  # fmt: skip
            continue
        try:
            if verify(entry)["step"] != int(match.group(2)):
                continue
        except CheckpointError:
            continue  # a leftover like the others
        os.rename(entry, root / match.group(1))
        restored.append(match.group(1))
    if restored:
        _fsync_dir(root)
    for entry in root.iterdir():
        match = TEMPORARY.fullmatch(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            _remove(entry)
    return restored


#: A checkpoint folder that :func:`_commit` moved aside (see :func:`_temporary`); :func:`_rotate`
#: moves the ones it deletes to ``.drop-...`` names, which are not put back.
_ASIDE = re.compile(r"\.trash-(step-([0-9]{7,12}))-[0-9a-f]{16}-([0-9]+)")


def recover(run_dir: str | os.PathLike) -> list[str]:
    """What every save does first (:func:`_clean_stale`), for the holder of the run's lock before
    it picks a checkpoint to resume from: put back the checkpoint folders that killed saves had
    moved aside, remove their other leftovers; return the names put back."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_symlink() or not root.is_dir():
        return []
    return _clean_stale(root)


def _open_root(run_dir: Path) -> Path:
    """The real ``run_dir/checkpoints`` folder, created if needed; writes happen only there."""
    root = run_dir / CHECKPOINTS_DIR
    try:
        root.mkdir(parents=True, exist_ok=True)
        real = Path(os.path.realpath(root))
        if not real.is_relative_to(os.path.realpath(run_dir)):
            raise CheckpointWriteError(
                f"{root} is a link that leads out of the run folder {run_dir}; checkpoints are "
                f"written only inside the run folder (remove the link or name another run_dir)"
            )
        probe = _temporary(real, "tmp", "probe")
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot write checkpoints under run_dir {str(run_dir)!r}: {e.strerror or e} "
            f"({e.filename or root}); expected a writable directory"
        ) from e
    return real


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
    protect: Iterable[str | os.PathLike] = (),
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
        protect: checkpoint folders rotation never deletes (e.g. ``Pusher.pinned()``: not yet on
            the Hub).

    Rotation runs when ``keep_last`` or ``keep_best`` is given; the checkpoint just written (the one
    ``latest`` names) is never deleted. Temporaries of crashed saves are removed first.

    In a data-parallel run (``mlx.launch``) every process calls ``save`` with the same arguments,
    and all return once the checkpoint is committed (or all raise). With a
    :class:`~adamw_lm.sharding.ShardedOptimizer` each process writes its own
    ``optimizer-RRRRR-of-NNNNN.safetensors`` into rank 0's temporary folder, and the manifest lists
    every shard with its parameters; otherwise rank 0 writes the whole checkpoint. The run folder
    must be the same folder for every process.

    Raises:
        CheckpointWriteError: ``run_dir`` is not writable or a write failed; nothing was lost.
        ValueError, TypeError: bad arguments, raised before anything is written; this includes a
            trainer state or adapter config that a load would refuse (e.g. an ``iteration`` other
            than ``step``, NaN outside the loss lists, deeper than the JSON depth limit).
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_COUNT:
        raise ValueError(f"step must be an int from 0 to {MAX_COUNT}; got {step!r}")
    for name, keep in (("keep_last", keep_last), ("keep_best", keep_best)):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"{name} must be None or an int >= 1; got {keep!r}")
    if val_loss is not None and not math.isfinite(float(val_loss)):
        val_loss = None
    versions = {**trainer_state.get("versions", {}), **_versions()}
    state_bytes = _to_json({**trainer_state, "versions": versions}, "trainer_state")
    try:
        check_trainer_state(
            Path(TRAINER_STATE),
            _loadable(state_bytes, TRAINER_STATE, MAX_TRAINER_STATE_BYTES, nonfinite=True),
            step,
        )
    except CorruptCheckpointError as e:
        raise ValueError(f"trainer_state would not load back: {e}") from None
    if not isinstance(adapter_config, Mapping):
        raise TypeError(f"adapter_config must be a dict; got {type(adapter_config).__name__}")
    _loadable(_to_json(dict(adapter_config), "adapter_config"), ADAPTER_CONFIG, MAX_JSON_BYTES)
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
    # Every process of a data-parallel run calls save. Sharded, each writes its own share of the
    # state and rank 0 writes the rest; unsharded, rank 0 writes everything. Rank 0 writes the
    # manifest (the commit marker) last, once every share is on disk, and tells the others.
    together = dist.world_size() > 1
    sharded = isinstance(optimizer, ShardedOptimizer)
    rank = optimizer.rank if sharded else dist.rank()
    if sharded:
        world = optimizer.world_size
        plan = plan_of(optimizer.inner, optimizer.owned(trainable))
        metadata = optimizer_metadata(optimizer.inner, plan)
        state_file = optimizer_shard_name(rank, world)
        shards = [{"file": optimizer_shard_name(r, world), "rank": r, "world_size": world,
                   "parameters": sorted(p for p, o in optimizer.owners.items() if o == r)}
                  for r in range(world)]
    else:
        metadata = optimizer_metadata(optimizer, plan_of(optimizer, trainable))
        state_file = OPTIMIZER
        shards = [{"file": OPTIMIZER, "rank": 0, "world_size": 1}]
    name = dir_name(step)
    if rank != 0 and not sharded:
        return _await_commit(Path(run_dir), name)
    root, tmp = _shared_temporary(Path(run_dir), name, rank, sharded, together)
    committed = False
    try:
        mx.eval(adapters, state)
        try:
            files = {state_file: _write_safetensors(tmp / state_file, state, metadata)}
        except OSError as e:
            if not sharded:
                raise
            files, failure = {}, e  # the others must hear of it before anyone gives up
        else:
            failure = None
        if sharded:
            files = _gather_records(files, shards)
            if failure is not None:
                raise failure
            if files is None:
                raise CheckpointWriteError(f"checkpoint {name} under {root} was not written (another "
                                           f"process could not write its shard); the previous "
                                           f"checkpoints are untouched")
        if rank != 0:
            return _await_commit(Path(run_dir), name)
        files[ADAPTERS] = _write_safetensors(tmp / ADAPTERS, adapters, None)
        files[ADAPTER_CONFIG] = _write_adapter_config(tmp / ADAPTER_CONFIG, adapter_config)
        files[TRAINER_STATE] = _write_bytes(tmp / TRAINER_STATE, state_bytes)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "val_loss": None if val_loss is None else float(val_loss),
            "adamw_lm_version": __version__,
            "files": dict(sorted(files.items())),
            "optimizer_shards": shards,
        }
        _write_bytes(tmp / MANIFEST, _to_json(manifest, "manifest"))
        _fsync_dir(tmp)
        _commit(root, tmp, name)
        committed = True
        _point_latest(root, name)
        if together:
            _committed(True)
    except OSError as e:
        if rank == 0:
            _remove(tmp)
            if together:
                with contextlib.suppress(dist.PeerLostError):
                    _committed(False)
        if committed:
            raise CheckpointWriteError(
                f"checkpoint {name} was written under {root}, but {LATEST} could not be pointed "
                f"at it: {e.strerror or e} ({e.filename or root / LATEST}); a resume continues from "
                f"the checkpoint {LATEST} still names, and replaces {name} when it saves that step"
            ) from e
        raise CheckpointWriteError(
            f"could not write checkpoint {name} under {root}: {e.strerror or e} "
            f"({e.filename or tmp}); the previous checkpoints are untouched"
        ) from e
    except BaseException:
        if rank == 0:
            _remove(tmp)
            if together:
                with contextlib.suppress(dist.PeerLostError):
                    _committed(False)
        raise
    if keep_last is not None or keep_best is not None:
        _rotate(root, keep_last or 0, keep_best or 0, keep=name, protect=_names_in(root, protect))
    return Path(run_dir) / CHECKPOINTS_DIR / name


def _shared_temporary(
    run_dir: Path, name: str, rank: int, sharded: bool, together: bool
) -> tuple[Path, Path]:
    """The checkpoints folder and the temporary folder of this save: rank 0 makes it and, in a
    sharded save, tells the other processes its (unguessable) name (an empty one if it failed)."""
    tmp_name = ""
    error: BaseException | None = None
    root = run_dir / CHECKPOINTS_DIR
    if rank == 0:
        try:
            root = _open_root(run_dir)
            _clean_stale(root)
            tmp = _temporary(root, "tmp", name)
            tmp.mkdir()
            tmp_name = tmp.name
        except OSError as e:
            error = CheckpointWriteError(f"could not write checkpoint {name} under {root}: "
                                         f"{e.strerror or e} ({e.filename or root}); the previous "
                                         f"checkpoints are untouched")
        except CheckpointWriteError as e:
            error = e
    if sharded:
        tmp_name = dist.broadcast_bytes(tmp_name.encode(), 256).decode()
    elif together and error is not None:
        _committed(False)  # the others wait for rank 0's word on the checkpoint
    if error is not None:
        raise error
    if not tmp_name:
        raise CheckpointWriteError(f"checkpoint {name} under {root} was not written (rank 0 could not "
                                   f"create its folder); the previous checkpoints are untouched")
    if rank != 0:
        root = Path(os.path.realpath(root))
    return root, root / tmp_name


def _gather_records(
    files: dict[str, dict[str, Any]], shards: list[dict[str, Any]]
) -> dict[str, dict[str, Any]] | None:
    """Every shard's size and sha256, from the process that wrote it (on every process); ``None``
    when a process wrote none (``files`` empty)."""
    data = bytes(41)
    for record in files.values():
        data = b"\1" + record["size"].to_bytes(8, "big") + bytes.fromhex(record["sha256"])
    gathered = dist.gather_bytes(data, 41)
    if any(g[0] != 1 for g in gathered):
        return None
    return {shard["file"]: {"size": int.from_bytes(g[1:9], "big"), "sha256": g[9:].hex()}
            for shard, g in zip(shards, gathered)}


def _await_commit(run_dir: Path, name: str) -> Path:
    """A process other than rank 0: the checkpoint once rank 0 says it is committed."""
    if not _committed():
        raise CheckpointWriteError(f"checkpoint {name} under {run_dir / CHECKPOINTS_DIR} was not written "
                                   f"(rank 0 failed); the previous checkpoints are untouched")
    return run_dir / CHECKPOINTS_DIR / name


def _committed(ok: bool = False) -> bool:
    """Rank 0 tells (``ok``) every other process whether the checkpoint was committed."""
    return dist.broadcast_bytes(b"ok" if ok else b"no", 2) == b"ok"


def _commit(root: Path, tmp: Path, name: str) -> None:
    final = root / name
    trash = None
    if os.path.lexists(final):
        # No portable atomic swap of folders: move the old one aside first. A crash in between
        # loses only the replaced copy; latest_checkpoint then falls back to an older checkpoint.
        trash = _temporary(root, "trash", name)
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync_dir(root)
    if trash is not None:
        _remove(trash)


def point_latest(run_dir: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Point ``run_dir``'s ``latest`` at its checkpoint ``folder`` (a resume from an earlier step
    than ``latest`` names: the run now goes on from there, so a later plain resume does too). A
    folder outside ``run_dir/checkpoints`` is no checkpoint of this run: ``latest`` stays."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = Path(folder).name
    try:  # replaced, never written through: a link planted at latest stays unread
        real = _open_root(Path(run_dir))
        if _names_in(real, [folder]):
            _point_latest(real, name)
    except OSError as e:
        raise CheckpointWriteError(f"could not point {root / LATEST} at {name}: {e.strerror or e}") from e


def _point_latest(root: Path, name: str) -> None:
    tmp = _temporary(root, "tmp", LATEST)
    _write_bytes(tmp, (name + "\n").encode("ascii"))
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _names_in(root: Path, folders: Iterable[str | os.PathLike]) -> set[str]:
    """The names of those ``folders`` that are checkpoint folders of ``root``."""
    real = root.resolve()
    return {Path(f).name for f in folders if Path(f).parent.resolve() == real}


def _rotate(root: Path, keep_last: int, keep_best: int, keep: str, protect: set[str]) -> None:
    complete = []
    for step, folder in step_dirs(root):
        try:
            manifest = read_json(Folder(folder), MANIFEST, str(folder / MANIFEST))
        except CheckpointError:
            continue  # not a checkpoint this package wrote: not ours to delete
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
            complete.append((step, folder, manifest.get("val_loss")))
    kept = {keep} | protect | {folder.name for _, folder, _ in complete[:keep_last]}
    scored = [c for c in complete if isinstance(c[2], (int, float)) and math.isfinite(c[2])]
    best = sorted(scored, key=lambda c: (c[2], -c[0]))[:keep_best]
    kept |= {folder.name for _, folder, _ in best}
    for _, folder, _ in complete:
        if folder.name not in kept:
            # Renamed first so a crash mid-delete never leaves a half-deleted step-* folder.
            trash = _temporary(root, "drop", folder.name)
            os.rename(folder, trash)
            _remove(trash)


def import_folder(run_dir: str | os.PathLike, folder: str | os.PathLike,
                  files: Iterable[str]) -> Path:
    """Copy the checkpoint ``folder`` (e.g. one pulled from the Hub, whose files may be links into
    the Hugging Face cache) into ``run_dir/checkpoints`` under its own name, atomically.

    Only ``files`` (the names its manifest lists, and the manifest) are copied, as regular files;
    an existing folder of that step is replaced. ``latest`` is pointed at it only when the run
    folder has none. Verify the result with :func:`verify` before use.

    Raises:
        CheckpointWriteError: ``run_dir`` is not writable or a copy failed; nothing was replaced.
    """
    folder = Path(folder)
    root = _open_root(Path(run_dir))
    _clean_stale(root)
    name = folder.name
    tmp = _temporary(root, "tmp", name)
    try:
        tmp.mkdir()
        for entry in files:
            with open(folder / entry, "rb") as src, _create(tmp / entry) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
                dst.flush()
                _fsync(dst.fileno())
        _fsync_dir(tmp)
        _commit(root, tmp, name)
        if not os.path.lexists(root / LATEST):
            _point_latest(root, name)
    except OSError as e:
        _remove(tmp)
        raise CheckpointWriteError(
            f"could not copy checkpoint {name} into {root}: {e.strerror or e} ({e.filename or tmp})"
        ) from e
    except BaseException:
        _remove(tmp)
        raise
    return Path(run_dir) / CHECKPOINTS_DIR / name
