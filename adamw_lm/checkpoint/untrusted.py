"""The one way a file of a checkpoint is read: every byte in a run folder is a stranger's.

A file is opened once, by its resolved path, only if that path stays inside its folder (or inside
the ``blobs`` folder of the Hugging Face cache the folder is a snapshot of: ``snapshot_download``
links snapshot files to ``../../blobs/<hash>``). The open is non-blocking (a FIFO cannot hang it)
and does not follow a link swapped in since the path was resolved; the open file must be a regular
file of the expected size under a cap. Hashing and parsing then read that same open file. Errors
name the file and the problem, never what the file holds or where a refused link points.

JSON is parsed as safetensors parses its header: size limit first, then parse, then check (UTF-8,
no duplicate keys, no NaN/Infinity unless asked, bounded nesting).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import mlx.core as mx

from .format import PARAMETER_PATH, CorruptCheckpointError

#: Caps on files that are parsed whole.
MAX_JSON_BYTES = 1 << 20
MAX_TRAINER_STATE_BYTES = 64 << 20
MAX_LATEST_BYTES = 64
#: Deepest nesting of a JSON document (the deepest this package writes is well below it).
MAX_JSON_DEPTH = 32
#: Objects and arrays a JSON file may open: each costs ~100 bytes parsed, so a file within its
#: size cap made of ``{}`` alone would take gigabytes. A run's state has one per evaluation.
MAX_JSON_CONTAINERS = 2_000_000
#: Cap on the JSON header of a safetensors file. safetensors allows 100 MB; a checkpoint's headers
#: take ~150 bytes per array (a 70B model's int8 state: under 1 MB), and 100 MB of JSON parses
#: into many times that in Python objects.
MAX_SAFETENSORS_HEADER = 16 << 20

_READ_CHUNK = 8 << 20
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
_HUB_REPO = re.compile(r"(?:models|datasets|spaces)--.+")
# The dtypes mlx reads from safetensors (its F8 types load as uint8: not ours), with their sizes.
_DTYPE_SIZES = {
    "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8,
}  # fmt: skip
_MAX_DIMS = 8


class Folder:
    """A folder whose files are read: resolved once; where links inside it may point."""

    def __init__(self, path: Path):
        self.path = path
        self.real = Path(os.path.realpath(path))
        self.blobs = _hub_blobs(self.real)

    def resolve(self, name: str) -> Path | None:
        """The real path of ``name`` in this folder, or ``None`` if it leads out of the folder."""
        real = Path(os.path.realpath(self.path / name))
        if real != self.real and real.is_relative_to(self.real):
            return real
        if self.blobs is not None and real.parent == self.blobs:
            return real
        return None


def _hub_blobs(real: Path) -> Path | None:
    """``<cache>/<repo>/blobs`` when ``real`` lies in ``<cache>/<repo>/snapshots/<revision>``."""
    for snapshot in (real, *real.parents):
        if snapshot.parent.name == "snapshots" and _HUB_REPO.fullmatch(snapshot.parent.parent.name):
            return snapshot.parent.parent / "blobs"
    return None


class OpenFile:
    """A regular file of a checkpoint, open for reading; use as a context manager."""

    def __init__(self, fd: int, size: int, label: str, real: Path):
        self.fd, self.size, self.label, self.real = fd, size, label, real

    def __enter__(self) -> OpenFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _chunks(self):
        os.lseek(self.fd, 0, os.SEEK_SET)
        raw = io.FileIO(self.fd, closefd=False)
        buffer = bytearray(min(_READ_CHUNK, max(self.size, 1)))
        view = memoryview(buffer)
        total = 0
        while n := raw.readinto(buffer):
            total += n
            if total > self.size:
                break
            yield view[:n]
        if total != self.size:
            raise CorruptCheckpointError(f"{self.label} changed size while it was being read")

    def read(self) -> bytes:
        """The whole file (callers cap its size when opening it)."""
        return b"".join(bytes(chunk) for chunk in self._chunks())

    def sha256(self) -> str:
        sha = hashlib.sha256()
        for chunk in self._chunks():
            sha.update(chunk)
        return sha.hexdigest()

    def load_safetensors(self) -> tuple[dict[str, mx.array], dict[str, str]]:
        """The arrays (lazy) and metadata; the header is checked before mlx sees the file."""
        metadata = self.check_safetensors_header()
        try:
            arrays = mx.load(self._same_file_path(), format="safetensors")
        except (RuntimeError, ValueError, OSError) as e:
            raise CorruptCheckpointError(f"{self.label} is not a readable safetensors file") from e
        return arrays, metadata

    def _same_file_path(self) -> str:
        # mx.load of a Python file object leaves arrays that abort the interpreter at exit (mlx
        # 0.32), so mlx gets a path that names this open file itself: /proc/self/fd (Linux) or
        # /dev/fd (macOS) reopen the very inode checked and hashed, whatever its name points to now.
        here = os.fstat(self.fd)
        for candidate in (f"/proc/self/fd/{self.fd}", f"/dev/fd/{self.fd}", str(self.real)):
            try:
                there = os.stat(candidate)
            except OSError:
                continue
            # The resolved path comes last: between this check and mlx's open only a concurrent
            # writer in the folder could swap it, and that writer could rewrite the file anyway.
            if (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino):
                return candidate
        raise CorruptCheckpointError(f"{self.label} was replaced while it was being read")

    def check_safetensors_header(self) -> dict[str, str]:
        """Check the header as the safetensors library does; return its ``__metadata__``."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        raw = io.FileIO(self.fd, closefd=False)
        prefix = raw.read(8) or b""
        if len(prefix) != 8:
            raise CorruptCheckpointError(f"{self.label} is not a safetensors file (too short)")
        length = int.from_bytes(prefix, "little")
        if not 2 <= length <= min(MAX_SAFETENSORS_HEADER, self.size - 8):
            raise CorruptCheckpointError(
                f"{self.label} is not a safetensors file (header length out of range)"
            )
        header = parse_json(raw.read(length), f"{self.label} (safetensors header)")
        if not isinstance(header, dict):
            raise CorruptCheckpointError(f"{self.label}: the safetensors header is not an object")
        metadata = header.pop("__metadata__", None)
        if metadata is None:  # mlx writes null when there is none
            metadata = {}
        if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()
        ):
            raise CorruptCheckpointError(
                f"{self.label}: safetensors __metadata__ must map names to strings"
            )
        end = 0
        spans = []
        for name, info in header.items():
            nbytes = _tensor_bytes(name, info, self.label)
            begin, stop = info["data_offsets"]
            if stop - begin != nbytes:
                raise CorruptCheckpointError(
                    f"{self.label}: tensor {name} has data offsets that do not fit its shape"
                )
            spans.append((begin, stop))
        for begin, stop in sorted(spans):
            if begin != end:
                raise CorruptCheckpointError(
                    f"{self.label}: tensor data overlaps or leaves gaps (offset {begin}, "
                    f"expected {end})"
                )
            end = stop
        if 8 + length + end != self.size:
            raise CorruptCheckpointError(
                f"{self.label}: tensor data covers {end} bytes, but the file holds "
                f"{self.size - 8 - length} after the header"
            )
        return metadata


def _tensor_bytes(name: str, info: Any, label: str) -> int:
    if not PARAMETER_PATH.fullmatch(name):
        raise CorruptCheckpointError(f"{label}: a tensor name is not a plain parameter path")
    if (
        not isinstance(info, dict)
        or info.get("dtype") not in _DTYPE_SIZES
        or not _int_list(info.get("shape"), _MAX_DIMS, 2**31 - 1)
        or not _int_list(info.get("data_offsets"), 2, 2**63 - 1)
        or len(info["data_offsets"]) != 2
    ):
        raise CorruptCheckpointError(
            f"{label}: tensor {name} needs a known dtype, a shape of at most {_MAX_DIMS} "
            "non-negative ints and two data offsets"
        )
    return math.prod(info["shape"]) * _DTYPE_SIZES[info["dtype"]]


def _int_list(value: Any, max_len: int, max_value: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= max_len
        and all(type(v) is int and 0 <= v <= max_value for v in value)
    )


def open_file(
    folder: Folder, name: str, label: str, *, size: int | None = None, max_size: int | None = None
) -> OpenFile:
    """Open ``folder/name`` under the rules above; ``label`` names it in errors.

    ``size`` is the exact size the file must have (from the manifest), ``max_size`` a cap.

    Raises:
        CorruptCheckpointError: missing, a link out of the folder, not a regular file, or the
            wrong size.
    """
    expected = "" if size is None else f" (the manifest lists {size} bytes)"
    if not os.path.lexists(folder.path / name):
        raise CorruptCheckpointError(f"{label} is missing{expected}")
    real = folder.resolve(name)
    if real is None:
        raise CorruptCheckpointError(f"{label} is a link that leads out of {folder.path}")
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{label} is missing{expected}") from None
    except OSError as e:
        raise CorruptCheckpointError(f"{label} cannot be opened: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CorruptCheckpointError(f"{label} is not a regular file")
        if size is not None and info.st_size != size:
            raise CorruptCheckpointError(
                f"{label} is truncated or altered: expected {size} bytes, found {info.st_size}"
            )
        if max_size is not None and info.st_size > max_size:
            raise CorruptCheckpointError(
                f"{label} is {info.st_size} bytes, over the {max_size}-byte limit for this file"
            )
    except BaseException:
        os.close(fd)
        raise
    return OpenFile(fd, info.st_size, label, real)


def read_json(folder: Folder, name: str, label: str, *, max_size: int = MAX_JSON_BYTES) -> Any:
    """Open, read and parse one JSON file of at most ``max_size`` bytes (no NaN / Infinity)."""
    with open_file(folder, name, label, max_size=max_size) as f:
        return parse_json(f.read(), label)


class _Refused(ValueError):
    """A JSON construct this reader refuses (a duplicate key, NaN...), raised while parsing."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Refused("has a duplicate key in an object")
    return result


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused("holds a number too large for a float")
    return value


def _no_constant(name: str) -> float:
    raise _Refused(f"holds {name}, which JSON does not allow here")


def parse_json(data: bytes, label: str, *, nonfinite: bool = False) -> Any:
    """Parse untrusted JSON; ``nonfinite`` accepts NaN / Infinity (Python's json writes them)."""
    # Counted in the raw bytes (brackets in strings too: an over-count), before anything is built.
    if data.count(b"{") + data.count(b"[") > MAX_JSON_CONTAINERS:
        raise CorruptCheckpointError(f"{label} opens more than {MAX_JSON_CONTAINERS} objects and arrays")
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            **({} if nonfinite else {"parse_constant": _no_constant, "parse_float": _finite_float}),
        )
    except UnicodeDecodeError:
        raise CorruptCheckpointError(f"{label} is not UTF-8 text") from None
    except RecursionError:
        raise CorruptCheckpointError(
            f"{label} is nested deeper than {MAX_JSON_DEPTH} levels"
        ) from None
    except _Refused as e:
        raise CorruptCheckpointError(f"{label} {e}") from None
    except ValueError as e:
        # JSONDecodeError's message is a position (never the text); int() overflow's is a limit.
        where = f"line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else (
            "a number with too many digits"
        )
        raise CorruptCheckpointError(f"{label} is not valid JSON ({where})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise CorruptCheckpointError(f"{label} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (
                item.values() if isinstance(item, dict) else item
            ))
    return deepest
