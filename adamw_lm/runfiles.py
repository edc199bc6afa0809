"""Writing the run folder's own files (metrics log, top-level adapters, loss plot) safely.

A run folder may come from someone else, so names in it may be links planted to make us write
elsewhere. Every file is written to a temporary created exclusively inside the folder
(``tempfile.mkstemp``: ``O_CREAT | O_EXCL``, a fresh random name) and renamed over its name: a link
at that name is replaced, never followed. Appends go through ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Callable, IO

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: mkstemp makes 0600 files; the run's files get the mode an ordinary open() would give them.
_FILE_MODE = 0o666 & ~_umask()


#: ``.NAME.XXXXXXXX.tmp``: what :func:`_temporary` makes (mkstemp's 8 random characters).
_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


def _temporary(path: Path) -> tuple[int, str]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _FILE_MODE)
    return fd, tmp


def replace_file(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary in the same folder, then it is renamed."""
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            # Renamed only once on disk: after a power loss the name holds the old or the new file.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def replace_via_path(path: Path, write: Callable[[Path], None]) -> None:
    """As :func:`replace_file`, for writers that take a path (``write(tmp)`` writes the fresh,
    exclusively created temporary ``tmp``)."""
    fd, tmp = _temporary(path)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_temporaries(folder: Path, names: re.Pattern[str]) -> list[str]:
    """Remove the temporaries that :func:`replace_file` / :func:`replace_via_path` left in
    ``folder`` when killed, for the files whose names ``names`` matches; return what was removed.
    Only for whoever holds the folder's lock: another writer's temporaries look the same."""
    removed = []
    for entry in folder.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match and names.fullmatch(match.group(1)):
            with contextlib.suppress(OSError):  # a regular file only, not a link's target
                if stat.S_ISREG(os.lstat(entry).st_mode):
                    entry.unlink()
                    removed.append(entry.name)
    return removed


def replace_text(path: Path, text: str) -> None:
    replace_file(path, lambda f: f.write(text.encode("utf-8")))


def open_append(path: Path) -> IO[str]:
    """Open ``path`` for appending, created if missing; a link or anything but a regular file
    there is refused (``OSError``)."""
    # O_NONBLOCK: opening a FIFO for writing would otherwise wait for a reader forever.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC | _NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if path.is_symlink():
            raise OSError(f"{path} is a link; refusing to write through it (remove it)") from None
        raise OSError(f"{path}: cannot open for appending: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file; refusing to write to it (remove it)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")


def read_text_nofollow(path: Path, limit: int) -> str:
    """A run folder's own text file, not through a link, at most ``limit`` bytes ('' if missing)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK)
    except FileNotFoundError:
        return ""
    except OSError:
        if path.is_symlink():
            raise OSError(f"{path} is a link; refusing to read through it (remove it)") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read(limit).decode("utf-8", "replace")
