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
checkpoint as the latest usable one. Only safetensors and JSON are read back, each file once,
through :mod:`.untrusted` (inside its folder, size-capped, schema- and finiteness-checked): a
checkpoint is input from a stranger, and nothing in it can execute code.

To read a checkpoint's trainer state before the model exists (e.g. to rebuild it from the saved
config) and then load the very bytes that were verified, hashing once::

    with checkpoint.open_latest(run_dir) as found:      # or open_verified(folder)
        config = found.trainer_state["config"]
        model, optimizer = ...                           # built from config
        checkpoint.load(found, model, optimizer)

Modules: :mod:`.format` (names, limits, schemas, errors), :mod:`.untrusted` (how one file is
read), :mod:`.writing` (atomic save, ``latest``, rotation), :mod:`.reading` (verified load,
``latest``, describe), :mod:`.state` (the optimizer's state: metadata, restore, precision
conversion).
"""

from __future__ import annotations

from .format import (
    ADAPTER_CONFIG,
    ADAPTERS,
    CHECKPOINTS_DIR,
    FORMAT,
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    OPTIMIZER,
    OPTIMIZER_FORMAT,
    TRAINER_STATE,
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    NoCheckpointError,
)
from .reading import (
    VerifiedCheckpoint,
    describe,
    latest_checkpoint,
    load,
    load_adapters_only,
    load_latest,
    open_latest,
    open_step,
    open_verified,
    steps,
    verify,
)
from .writing import import_folder, point_latest, recover, save

__all__ = [
    "ADAPTERS",
    "ADAPTER_CONFIG",
    "CHECKPOINTS_DIR",
    "FORMAT",
    "FORMAT_VERSION",
    "LATEST",
    "MANIFEST",
    "OPTIMIZER",
    "OPTIMIZER_FORMAT",
    "TRAINER_STATE",
    "CheckpointError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "NoCheckpointError",
    "VerifiedCheckpoint",
    "import_folder",
    "describe",
    "latest_checkpoint",
    "load",
    "load_adapters_only",
    "load_latest",
    "open_latest",
    "open_step",
    "open_verified",
    "point_latest",
    "recover",
    "save",
    "steps",
    "verify",
]
