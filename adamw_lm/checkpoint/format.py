"""The checkpoint format: file names, limits, the manifest's schema and the error classes."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..codecs import PRECISIONS

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

#: A step folder's name as :func:`dir_name` writes it, and only that: ASCII digits (``\d`` takes any
#: script's, which int() reads too), no extra leading zero (one folder per step), at most
#: MAX_COUNT's 12 digits (a name from anyone never reaches int()'s digit limit).
STEP_DIR = re.compile(r"step-([0-9]{7}|[1-9][0-9]{7,11})")
# Every temporary entry ends with the writer's pid, so a live writer's work is never cleaned up.
TEMPORARY = re.compile(r"\.(?:tmp|trash|drop)-.+-(\d+)")
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_LISTED = 5
#: Parameter and state paths as mlx names them: printable, so that messages may show them.
PARAMETER_PATH = re.compile(r"[A-Za-z0-9_.\-]{1,512}")
#: Bounds of the counts a checkpoint records (steps, epochs, data offsets): far above any run.
MAX_COUNT = 10**12
MAX_FILES = 64
MAX_SHARDS = 1024
# File names a manifest may list, and short labels (versions, class names) that may be printed.
_FILE_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")
_LABEL = re.compile(r"[A-Za-z0-9_.+\-]{1,64}")
_QUALNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,199}")
_VERSION = re.compile(r"[0-9]{1,6}")


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
    """``(step, folder)`` of every ``step-*`` folder, newest first; links are not folders here."""
    found = []
    for entry in os.scandir(root):
        match = STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir(follow_symlinks=False):
            found.append((int(match.group(1)), root / entry.name))
    return sorted(found, reverse=True)


def _is_int(value: Any, low: int = 0, high: int = MAX_COUNT) -> bool:
    return type(value) is int and low <= value <= high


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else ``None``: for numbers
    read back from files, where anything may stand."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def check_manifest(path: Path, manifest: Any, folder_step: int | None) -> dict[str, Any]:
    """Return ``manifest`` if it is a valid manifest (of step ``folder_step`` when given).

    Raises:
        CorruptCheckpointError: it is not; the message names the field and what was expected.
        IncompatibleCheckpointError: it was written by a newer adamw_lm.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptCheckpointError(
            f"{path} is not an adamw_lm checkpoint manifest: expected format {FORMAT!r}"
        )
    version = manifest.get("format_version")
    if not _is_int(version, 1):
        raise CorruptCheckpointError(f"{path}: format_version must be an int >= 1")
    if version > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{path}: written by a newer adamw_lm (format {version} > supported {FORMAT_VERSION}); "
            f"upgrade adamw_lm to load it"
        )
    step = manifest.get("step")
    if not _is_int(step):
        raise CorruptCheckpointError(f"{path}: step must be an int from 0 to {MAX_COUNT}")
    if folder_step is not None and step != folder_step:
        raise CorruptCheckpointError(
            f"{path}: step {step} is not the step of its folder ({dir_name(folder_step)})"
        )
    val_loss = manifest.get("val_loss")
    if val_loss is not None and not (_is_number(val_loss) and math.isfinite(val_loss)):
        raise CorruptCheckpointError(f"{path}: val_loss must be a finite number or null")
    if not isinstance(manifest.get("adamw_lm_version"), str) or not _LABEL.fullmatch(
        manifest["adamw_lm_version"]
    ):
        raise CorruptCheckpointError(f"{path}: adamw_lm_version must be a version string")
    files = manifest.get("files")
    if not isinstance(files, dict) or not 0 < len(files) <= MAX_FILES:
        raise CorruptCheckpointError(
            f"{path}: 'files' must map up to {MAX_FILES} file names to size and sha256"
        )
    for name, record in files.items():
        # A name must stay inside the folder: checkpoints may come from the Hub.
        if not _FILE_NAME.fullmatch(name) or name == MANIFEST:
            raise CorruptCheckpointError(f"{path}: a listed file name is not a plain file name")
        if (
            not isinstance(record, dict)
            or set(record) != {"size", "sha256"}
            or not _is_int(record["size"], 0, 2**62)
            or not isinstance(record["sha256"], str)
            or not SHA256.fullmatch(record["sha256"])
        ):
            raise CorruptCheckpointError(
                f"{path}: entry for {name} must be {{'size': int >= 0, 'sha256': 64 hex digits}}"
            )
    for required in (ADAPTERS, ADAPTER_CONFIG, TRAINER_STATE):
        if required not in files:
            raise CorruptCheckpointError(f"{path}: 'files' does not list {required}")
    shards = manifest.get("optimizer_shards")
    if not isinstance(shards, list) or not 0 < len(shards) <= MAX_SHARDS:
        raise CorruptCheckpointError(
            f"{path}: 'optimizer_shards' must be a list of 1 to {MAX_SHARDS} shards"
        )
    for shard in shards:
        if (
            not isinstance(shard, dict)
            or shard.get("file") not in files
            or not _is_int(shard.get("world_size"), 1, MAX_SHARDS)
            or not _is_int(shard.get("rank"), 0, shard["world_size"] - 1)
        ):
            raise CorruptCheckpointError(
                f"{path}: each optimizer shard must name a listed file, with int rank < world_size"
            )
    _check_shards(path, shards)
    return manifest


def optimizer_shard_name(rank: int, world_size: int) -> str:
    """The file of one process's optimizer state in a sharded checkpoint."""
    return f"optimizer-{rank:05d}-of-{world_size:05d}.safetensors"


def _check_shards(path: Path, shards: list[dict[str, Any]]) -> None:
    """One shard per rank of one world size, distinct files; a sharded checkpoint's entries name
    disjoint parameter paths (``parameters``), each shard the part of the state its file holds."""
    world = shards[0]["world_size"]
    ranks = sorted(s["rank"] for s in shards)
    if ranks != list(range(world)) or any(s["world_size"] != world for s in shards):
        raise CorruptCheckpointError(
            f"{path}: 'optimizer_shards' must hold one entry for each rank 0 to world_size - 1 "
            f"of one world_size"
        )
    if len({s["file"] for s in shards}) != len(shards):
        raise CorruptCheckpointError(f"{path}: two optimizer shards name the same file")
    if len(shards) == 1 and "parameters" not in shards[0]:
        return  # an unsharded checkpoint: its one file holds the whole state
    seen: set[str] = set()
    for shard in shards:
        names = shard.get("parameters")
        if (not isinstance(names, list) or len(names) > MAX_COUNT
                or not all(isinstance(n, str) and PARAMETER_PATH.fullmatch(n) for n in names)):
            raise CorruptCheckpointError(
                f"{path}: optimizer shard of rank {shard['rank']}: 'parameters' must be a list "
                f"of parameter paths"
            )
        if seen & set(names):
            raise CorruptCheckpointError(
                f"{path}: optimizer shard of rank {shard['rank']} names parameters another shard names too"
            )
        seen |= set(names)


# Keys of a trainer state that hold losses: the only numbers that may be NaN or infinite (a run
# records a diverged loss as it was).
_LOSS_LISTS = ("losses", "val_losses", "reported_losses")


def check_trainer_state(path: Path, state: Any, step: int) -> dict[str, Any]:
    """Return ``state`` if its known fields are valid for a checkpoint of ``step``.

    The state is the caller's; the fields :mod:`adamw_lm.trainer` writes are checked where present.

    Raises:
        CorruptCheckpointError: naming the field and what was expected.
    """

    def fail(problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: {problem}")

    if not isinstance(state, dict):
        raise fail("must hold a JSON object")
    if "iteration" in state:
        if not _is_int(state["iteration"]):
            raise fail(f"iteration must be an int from 0 to {MAX_COUNT}")
        if state["iteration"] != step:
            raise fail(f"iteration {state['iteration']} is not the checkpoint's step {step}")
    for key in ("epoch", "offset", "trained_tokens"):
        if key in state and not _is_int(state[key]):
            raise fail(f"{key} must be an int from 0 to {MAX_COUNT}")
    if "report_start" in state and not _is_int(state["report_start"], 0, step):
        raise fail(f"report_start must be an int from 0 to the step {step}")
    if "seed" in state and not _is_int(state["seed"], 0, 2**64 - 1):
        raise fail("seed must be an int from 0 to 2**64 - 1")
    if "losses" in state and not (
        isinstance(state["losses"], list)
        and len(state["losses"]) <= step
        and all(_is_number(x) for x in state["losses"])
    ):
        raise fail(f"losses must be a list of at most {step} numbers (one per step)")
    for key in ("val_losses", "reported_losses"):
        if key in state and not (
            isinstance(state[key], list)
            and len(state[key]) <= step + 1
            and all(
                isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0], 0, step)
                and _is_number(pair[1])
                for pair in state[key]
            )
        ):
            raise fail(f"{key} must be a list of [iteration <= {step}, loss] pairs")
    if "config" in state and not isinstance(state["config"], dict):
        raise fail("config must be a JSON object")
    for section in ("checkpoint", "optimizer", "lora_parameters"):
        value = state.get("config", {}).get(section)
        if value is not None and not isinstance(value, dict):
            raise fail(f"config.{section} must be a JSON object")
    if "fingerprints" in state:
        problem = _fingerprints_problem(state["fingerprints"])
        if problem:
            raise fail(f"fingerprints {problem}")
    if "exact" in state and not isinstance(state["exact"], bool):
        raise fail("exact must be true or false")
    if "changes" in state and not (
        isinstance(state["changes"], list) and len(state["changes"]) <= MAX_CHANGES
        and all(isinstance(c, str) and len(c) <= MAX_TEXT for c in state["changes"])
    ):
        raise fail(f"changes must be a list of at most {MAX_CHANGES} strings of at most {MAX_TEXT} "
                   "characters")
    versions = state.get("versions", {})
    if not isinstance(versions, dict) or not all(
        isinstance(v, str) and _LABEL.fullmatch(k) and _LABEL.fullmatch(v)
        for k, v in versions.items()
    ):
        raise fail("versions must map package names to version strings")
    others = [v for k, v in state.items() if k not in _LOSS_LISTS]
    if not _all_finite(others):
        raise fail("holds NaN or an infinite number outside its loss lists")
    return state


#: Caps of the fingerprints in a trainer state (adamw_lm.fingerprint): files per fingerprint, the
#: length of a name / id / change note, and how many accepted changes a run records.
MAX_FINGERPRINT_FILES = 10_000
MAX_TEXT = 1024
MAX_CHANGES = 1000
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _fingerprints_problem(value: Any) -> str | None:
    """What is wrong with ``{"model": fp, "data": fp}``, or ``None``; ``fp`` is a file fingerprint
    (``files`` + ``sha256``) or ``{"id": NAME}`` for inputs that came from the Hub by id."""
    if not isinstance(value, dict) or not set(value) <= {"model", "data"}:
        return "must be an object with keys model and data"
    for key, fp in value.items():
        if not isinstance(fp, dict):
            return f"{key} must be an object"
        if set(fp) == {"id"}:
            if not isinstance(fp["id"], str) or not 0 < len(fp["id"]) <= MAX_TEXT:
                return f"{key}.id must be a string of at most {MAX_TEXT} characters"
            continue
        files = fp.get("files")
        if set(fp) != {"files", "sha256"} or not isinstance(fp["sha256"], str) or not _SHA256.fullmatch(fp["sha256"]):
            return f"{key} must hold files and a sha256 (64 hex digits), or an id"
        if not isinstance(files, dict) or len(files) > MAX_FINGERPRINT_FILES:
            return f"{key}.files must be an object of at most {MAX_FINGERPRINT_FILES} files"
        for name, record in files.items():
            if not (len(name) <= MAX_TEXT and isinstance(record, dict) and set(record) == {"size", "sha256"}
                    and _is_int(record["size"]) and isinstance(record["sha256"], str)
                    and _SHA256.fullmatch(record["sha256"])):
                return f"{key}.files: each file must have a size and a sha256"
    return None


def _all_finite(values: list[Any]) -> bool:
    stack = list(values)
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def check_optimizer_metadata(
    path: Path, metadata: dict[str, str], parse: Callable[[bytes, str], Any]
) -> tuple[dict[str, str | None], dict[str, Any]]:
    """The precision plan and hyper-parameters of ``optimizer.safetensors``, checked.

    ``parse(data, label)`` parses untrusted JSON (:func:`.untrusted.parse_json`, passed in
    because that module builds on this one).

    Raises:
        CorruptCheckpointError: a field is missing or malformed.
        IncompatibleCheckpointError: a newer format, or a precision this adamw_lm does not have.
    """
    if metadata.get("format") != OPTIMIZER_FORMAT:
        raise CorruptCheckpointError(f"{path}: metadata 'format' must be {OPTIMIZER_FORMAT!r}")
    if not _VERSION.fullmatch(metadata.get("format_version", "")):
        raise CorruptCheckpointError(f"{path}: metadata 'format_version' must be an int")
    version = int(metadata["format_version"])
    if version > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{path}: written by a newer adamw_lm (format {version} > supported "
            f"{FORMAT_VERSION}); upgrade adamw_lm to load it"
        )
    if not _QUALNAME.fullmatch(metadata.get("optimizer", "")):
        raise CorruptCheckpointError(f"{path}: metadata 'optimizer' must be a class name")
    for key in ("precision_plan", "hyperparameters"):
        if not isinstance(metadata.get(key), str):
            raise CorruptCheckpointError(f"{path}: metadata {key!r} is missing")
    plan = parse(metadata["precision_plan"].encode(), f"{path}: metadata 'precision_plan'")
    hyper = parse(metadata["hyperparameters"].encode(), f"{path}: metadata 'hyperparameters'")
    if not isinstance(plan, dict) or not isinstance(hyper, dict):
        raise CorruptCheckpointError(
            f"{path}: metadata 'precision_plan' and 'hyperparameters' must be JSON objects"
        )
    eps = hyper.get("eps")
    if eps is not None and (
        isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf
    ):
        # int4's first moment is stored relative to it (codecs.Precision.m_over_root_v).
        raise CorruptCheckpointError(
            f"{path}: metadata 'hyperparameters' has eps {eps!r}; expected a number > 0"
        )
    for name, precision in plan.items():
        if not PARAMETER_PATH.fullmatch(name):
            raise CorruptCheckpointError(
                f"{path}: the precision plan names something that is not a parameter path"
            )
        if precision is not None and precision not in PRECISIONS:
            raise IncompatibleCheckpointError(
                f"{path}: parameter {name} is stored in a precision this adamw_lm does not have "
                f"(known: None, {', '.join(map(repr, PRECISIONS))}); upgrade adamw_lm"
            )
    if eps is None and any(p is not None and PRECISIONS[p].m_over_root_v for p in plan.values()):
        raise CorruptCheckpointError(
            f"{path}: metadata 'hyperparameters' has no eps, which int4 state is stored relative to"
        )
    return plan, hyper
