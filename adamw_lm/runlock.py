"""One writer per run folder: an exclusive OS lock held for the whole run.

The lock is ``fcntl.flock`` on ``run_dir/.lock``: the kernel drops it when the process dies, even by
SIGKILL, so a crash never leaves a stale lock behind (a PID file would). The holder writes its PID and
command line into the file after locking, so that a refused writer can say who holds the folder.
Readers (``adamw-lm inspect``) never take the lock and so never wait.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows: no flock; the run folder is then not protected
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
_MAX_HOLDER_BYTES = 4096


class RunFolderBusyError(BlockingIOError):
    """Another process is writing to this run folder."""


def _holder(fd: int) -> str:
    """The holder's ``pid N: command``, as it wrote it (bounded, one line, printable)."""
    data = os.pread(fd, _MAX_HOLDER_BYTES, 0).decode("utf-8", "replace")
    line = data.splitlines()[0] if data.strip() else ""
    return "".join(c if c.isprintable() else "?" for c in line)[:300] or "a process that is starting"


class RunLock:
    """``with RunLock(run_dir):`` — the exclusive writer's lock on ``run_dir`` (created if missing).

    Raises :class:`RunFolderBusyError` at once, without waiting, when another process holds it. A
    process that holds it may take it again (``resume`` locks before choosing its checkpoint, then
    ``run`` locks for the run); it is released when the outermost holder releases it.
    """

    #: ``{real path: (fd, holders)}`` of the run folders this process holds.
    _held: dict[str, tuple[int, int]] = {}

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self._key: Optional[str] = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.run_dir.is_symlink() or not self.run_dir.is_dir():
            raise NotADirectoryError(f"run folder {self.run_dir} is not a folder")
        key = os.path.realpath(self.run_dir)
        if key in RunLock._held:
            fd, holders = RunLock._held[key]
            RunLock._held[key] = (fd, holders + 1)
            self._key = key
            return self
        path = self.run_dir / LOCK_FILE
        try:
            # O_NOFOLLOW: a lock file that is a link (planted in a shared folder) is refused,
            # never followed to truncate or create a file elsewhere.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise OSError(f"cannot open the run folder's lock file {path}: {e.strerror or e}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunFolderBusyError(
                    f"run folder {self.run_dir} is in use by another process ({holder}); "
                    "one writer per run folder: wait for it to end, or stop it first"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join([sys.executable, *sys.argv])}\n".encode(), 0)
        RunLock._held[key] = (fd, 1)
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        fd, holders = RunLock._held.pop(self._key)
        if holders > 1:
            RunLock._held[self._key] = (fd, holders - 1)
        else:
            os.close(fd)  # closing drops the flock
        self._key = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.release()
