"""Fingerprints of a base model and of data files: is a resumed run training on the same inputs?

A fingerprint is plain JSON data, recorded in a checkpoint and compared on resume, where the paths
of the first machine mean nothing: it names files by their path relative to the fingerprinted
folder and records their size and sha256, never an absolute path.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from pathlib import Path
from typing import Any

#: What decides a model's outputs: its config and its weights (mlx-lm's layout).
MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")
#: mlx-lm's local data sets.
DATA_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")

_CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            sha.update(view[:n])
    return sha.hexdigest()


def fingerprint(path: str | os.PathLike, patterns: tuple[str, ...] = MODEL_FILES) -> dict[str, Any]:
    """Size and sha256 of a file, or of the files of a folder whose names match ``patterns``.

    Returns ``{"files": {name: {"size": int, "sha256": str}}, "sha256": str}``; the top-level
    ``sha256`` covers every name, size and hash, so two fingerprints match when it does.

    Raises:
        FileNotFoundError: ``path`` does not exist, or a folder has no file matching ``patterns``.
    """
    path = Path(path)
    if path.is_file():
        chosen = {path.name: path}
    elif path.is_dir():
        chosen = {
            entry.name: entry
            for entry in sorted(path.iterdir())
            if entry.is_file() and any(fnmatch.fnmatch(entry.name, p) for p in patterns)
        }
        if not chosen:
            raise FileNotFoundError(
                f"{path}: no file matching {', '.join(patterns)} to fingerprint"
            )
    else:
        raise FileNotFoundError(f"{path} does not exist: nothing to fingerprint")
    files = {name: {"size": p.stat().st_size, "sha256": _sha256(p)} for name, p in chosen.items()}
    combined = hashlib.sha256()
    for name, record in files.items():
        combined.update(f"{name}\0{record['size']}\0{record['sha256']}\n".encode())
    return {"files": files, "sha256": combined.hexdigest()}


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one short phrase per file; empty when they match."""
    old, new = recorded.get("files", {}), current.get("files", {})
    found = []
    for name in sorted(set(old) | set(new)):
        if name not in new:
            found.append(f"{name} is missing")
        elif name not in old:
            found.append(f"{name} is new")
        elif old[name] != new[name]:
            found.append(
                f"{name} differs ({old[name].get('size')} -> {new[name].get('size')} bytes)"
                if old[name].get("size") != new[name].get("size")
                else f"{name} differs (same size, other sha256)"
            )
    return found


def run_inputs(model: str, data: str, hf_dataset: Any = None) -> dict[str, dict[str, Any]]:
    """``{"model": fp, "data": fp}`` of a run's inputs: a local folder's files, or ``{"id": NAME}``
    for a model or data set named by its Hub id (the Hub keeps it; no flag is needed to resume)."""

    def of(value: str, patterns: tuple[str, ...]) -> dict[str, Any]:
        path = Path(value).expanduser()
        return fingerprint(path, patterns) if path.exists() else {"id": value}

    found = {"model": of(model, MODEL_FILES)}
    found["data"] = ({"id": f"hf_dataset:{hf_dataset}"[:1024]} if hf_dataset is not None
                     else of(data, DATA_FILES))
    return found


def changed_inputs(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, str]:
    """``{"model" | "data": what differs}`` between two :func:`run_inputs`; empty when they match."""
    found = {}
    for key in ("model", "data"):
        old, new = recorded.get(key), current.get(key)
        if old is None or old == new or (old.get("sha256") is not None and old.get("sha256") == new.get("sha256")):
            continue
        if "id" in old or "id" in new:
            found[key] = f"{old.get('id', 'local files')} -> {new.get('id', 'local files')}"
        else:
            found[key] = "; ".join(differences(old, new)[:3]) or "other files"
    return found


__all__ = ["DATA_FILES", "MODEL_FILES", "changed_inputs", "differences", "fingerprint", "run_inputs"]
