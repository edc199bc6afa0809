"""The checkpoint format: file names, limits, the manifest's schema and the error classes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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

STEP_DIR = re.compile(r"step-(\d{7,})")
# Every temporary entry ends with the writer's pid, so a live writer's work is never cleaned up.
TEMPORARY = re.compile(r"\.(?:tmp|trash)-.+-(\d+)")
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_LISTED = 5


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



def dir_name(step: int) -> str:
    return f"step-{step:07d}"



def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-*`` folder, newest first."""
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)



def check_manifest_fields(path: Path, manifest: dict[str, Any]) -> None:
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
            or not SHA256.fullmatch(record["sha256"])
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

