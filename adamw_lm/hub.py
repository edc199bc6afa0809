"""Runs on the Hugging Face Hub: push finished checkpoints in the background, pull one back.

The only module of adamw_lm that talks to the network, through the real ``huggingface_hub``
client. A Hub repo mirrors a run folder::

    checkpoints/step-NNNNNNN/...   # each pushed checkpoint, byte for byte as on disk
    checkpoints/latest             # the newest pushed checkpoint's name
    adapters.safetensors           # the newest adapters, in mlx-lm's format, so that
    adapter_config.json            #   mlx_lm.generate --adapter-path <snapshot> works
    README.md, loss.png            # the model card and its plot (adamw_lm.model_card)

:class:`Pusher` uploads on one worker thread that only reads finished folders (no mlx calls).
:func:`pull` downloads one step folder into the Hugging Face cache; it is then loaded like any
local checkpoint (``checkpoint.load`` verifies it): nothing from the Hub is trusted more than a
local folder. The token comes from ``HF_TOKEN`` or ``hf auth login`` (huggingface_hub's own
resolution) on every request; this module never stores or writes it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    get_token,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)
from tqdm.auto import tqdm

try:  # huggingface_hub 2.x sends its requests with httpx2, 1.x with httpx
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - depends on the installed client
    from httpx import TransportError

from .checkpoint import (
    ADAPTER_CONFIG,
    ADAPTERS,
    CHECKPOINTS_DIR,
    LATEST,
    MANIFEST,
    TRAINER_STATE,
    CheckpointError,
    CorruptCheckpointError,
)
from .checkpoint.format import STEP_DIR, check_manifest, dir_name, finite_number
from .checkpoint.untrusted import MAX_JSON_BYTES, MAX_LATEST_BYTES, MAX_TRAINER_STATE_BYTES
from .model_card import LOSS_PLOT, loss_plot, model_card, read_json

log = logging.getLogger("adamw_lm.hub")

_REPO_ID = re.compile(r"[\w][\w.-]*/[\w][\w.-]*")
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_RETRY_AFTER = 900.0
_T = TypeVar("_T")


class HubError(CheckpointError):
    """A Hub operation failed; the message is one line saying what and what to do."""


class HubAuthError(HubError):
    """No token, a token the Hub refuses, or no write access to the repo."""


class HubNotFoundError(HubError):
    """The repo, revision or step does not exist (or is private and not readable)."""


@dataclass(frozen=True)
class HubSpec:
    """``USER/REPO[@REVISION]``: where a run lives on the Hub."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_spec(text: str) -> HubSpec:
    """Parse ``[hub:]USER/REPO[@REVISION]`` (revision: a branch, tag or commit sha)."""
    spec = text.removeprefix("hub:")
    repo_id, _, revision = spec.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or (
        "@" in spec and not revision
    ):
        raise HubError(
            f"{text!r} is not a Hub run: expected hub:USER/REPO or hub:USER/REPO@REVISION "
            f"(a branch, tag or commit sha)"
        )
    return HubSpec(repo_id, revision or None)


def check_repo_id(text: str) -> str:
    """``text`` if it is a repo to push to, ``USER/REPO`` (no ``hub:``, no ``@revision``)."""
    if text.startswith("hub:") or "@" in text or not _REPO_ID.fullmatch(text) or (
        "--" in text or ".." in text
    ):
        raise HubError(f"{text!r} is not a Hub repo id: expected USER/REPO (a branch goes in "
                       "--branch, or hub.branch in a config)")
    return text


# -- errors and retries ----------------------------------------------------------------------


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _status(error: BaseException) -> int | None:
    for e in _causes(error):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return e.response.status_code
    return None


def _retry_after(error: BaseException) -> float | None:
    for e in _causes(error):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            value = e.response.headers.get("Retry-After")
            try:
                seconds = float(value) if value is not None else None
            except ValueError:
                return None  # an HTTP-date: fall back to our own back-off
            if seconds is not None and math.isfinite(seconds) and seconds >= 0:
                return min(seconds, _MAX_RETRY_AFTER)
    return None


def _transient(error: BaseException) -> bool:
    """Worth another try: a 408 / 412 / 429 / 5xx answer, a timeout or a dropped connection."""
    status = _status(error)
    if status is not None:
        # 412: someone else committed since we read the branch head; re-plan and commit again.
        return status in _RETRY_STATUS or status == 412
    return any(isinstance(e, (TransportError, ConnectionError, TimeoutError))
               for e in _causes(error))


def _hub_error(error: BaseException, spec: HubSpec | str, endpoint: str) -> HubError:
    """The one-line :class:`HubError` for a client error, naming the repo and what to do."""
    where = str(spec)
    status = _status(error)
    for e in _causes(error):
        if isinstance(e, HubError):
            return e
        if isinstance(e, RevisionNotFoundError):
            return HubNotFoundError(
                f"Hub repo {where}: revision not found (expected a branch, tag or commit sha)"
            )
        if isinstance(e, RepositoryNotFoundError):
            hint = ("no token found: set HF_TOKEN or run `hf auth login`" if get_token() is None
                    else "check the name, and that your token can read it")
            return HubNotFoundError(f"Hub repo {where} not found, or private ({hint})")
    if status == 401:
        return HubAuthError(
            f"the Hub refused the token for {where} (401): set HF_TOKEN to a valid token or run "
            f"`hf auth login`"
        )
    if status == 403:
        return HubAuthError(
            f"your token has no write access to Hub repo {where} (403): use a write token, or "
            f"push to a repo of your own with --repo-id"
        )
    if status is not None:
        return HubError(f"Hub repo {where}: the Hub answered HTTP {status}")
    if any(isinstance(e, (TransportError, LocalEntryNotFoundError, OSError))
           for e in _causes(error)):
        return HubError(f"cannot reach the Hub at {endpoint} for {where}: {_first_line(error)}")
    return HubError(f"Hub repo {where}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# -- pushing ---------------------------------------------------------------------------------


class Pusher:
    """Push finished checkpoint folders to a Hub repo in the background, in order, with retries.

    ``submit`` (call it from one thread) returns at once; one worker thread uploads, and only
    while there is something to upload. Folders are compared as given: pass the paths that
    ``checkpoint.save`` returned, and check those against :meth:`pinned`. Each push is one
    commit that adds ``checkpoints/step-NNNNNNN/...`` exactly as on disk, points
    ``checkpoints/latest`` at it, refreshes the top-level adapters and the model card, and
    deletes the remote step folders beyond ``keep_remote`` (the one just pushed is always kept).
    A push that still fails after ``retries`` retries logs one warning naming the checkpoint,
    keeps it :meth:`pinned`, and is sent again with the next push (or by :meth:`wait`).

    Args:
        repo_id: ``USER/REPO``; created (``private``) on the first push if missing.
        branch: the branch pushed to; created from ``main`` if missing.
        push_every: push every N-th submitted checkpoint.
        keep_remote: step folders to keep on the Hub; ``None`` keeps all.
        push_final: ``submit(..., final=True)`` is pushed even when it is not an N-th one.
        endpoint: the Hub's url; ``None`` uses ``HF_ENDPOINT`` / huggingface.co.
        retries, backoff, max_backoff: retry policy on HTTP 408/412/429/5xx, timeouts and dropped
            connections: exponential back-off with full jitter, at least ``Retry-After``.
    """

    def __init__(
        self,
        repo_id: str,
        *,
        private: bool = True,
        branch: str = "main",
        push_every: int = 1,
        keep_remote: int | None = None,
        push_final: bool = True,
        endpoint: str | None = None,
        retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
    ):
        self.spec = HubSpec(check_repo_id(repo_id), None)
        for name, value in (("push_every", push_every), ("keep_remote", keep_remote)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        self.repo_id, self.private, self.branch = self.spec.repo_id, private, branch
        self.push_every, self.keep_remote, self.push_final = push_every, keep_remote, push_final
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._api = HfApi(endpoint=endpoint)
        self._prepared = False
        self._submitted = 0
        self._queue: collections.deque[Path | None] = collections.deque()
        self._carry: list[Path] = []
        self._inflight: list[Path] = []
        self._pushed: list[tuple[Path, str]] = []
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The repo's page on the Hub."""
        suffix = "" if self.branch == "main" else f"/tree/{self.branch}"
        return f"{self._api.endpoint}/{self.repo_id}{suffix}"

    @property
    def pushed(self) -> list[tuple[Path, str]]:
        """``(folder, commit sha)`` of every checkpoint pushed so far, in order."""
        with self._cond:
            return list(self._pushed)

    def prepare(self) -> str:
        """Check the token and write access, create the repo and branch if missing; return the url.

        Call it before training to fail early; the first push calls it otherwise.

        Raises:
            HubAuthError: no token, a refused token, or no write access to the repo.
            HubError: the Hub could not be reached or answered an error.
        """
        if get_token() is None:
            raise HubAuthError(
                f"no Hugging Face token to push to {self.repo_id}: set HF_TOKEN or run "
                f"`hf auth login` (tokens are never read from a config file)"
            )
        try:
            self._retrying(self._prepare_once)
        except Exception as e:
            raise _hub_error(e, self.repo_id, self._api.endpoint) from e
        return self.url

    def _prepare_once(self) -> None:
        self._api.create_repo(self.repo_id, private=self.private, exist_ok=True)
        # create_repo(exist_ok=True) succeeds on a repo we can only read; this does not.
        self._api.auth_check(self.repo_id, write=True)
        if self.private and self._api.repo_info(self.repo_id).private is False:
            log.warning("Hub repo %s exists and is public: the checkpoints pushed there (adapters, "
                        "optimizer state, config) are public too", self.repo_id)
        if self.branch != "main":
            self._api.create_branch(self.repo_id, branch=self.branch, exist_ok=True)
        self._prepared = True

    def submit(self, folder: str | Path, *, final: bool = False) -> bool:
        """Queue a finished checkpoint folder for upload; return whether it will be pushed.

        Every ``push_every``-th submission is pushed, and the final one when ``push_final``.
        A queued folder stays in :meth:`pinned` until its push succeeds.
        """
        self._submitted += 1
        if self._submitted % self.push_every and not (final and self.push_final):
            return False
        with self._cond:
            if self._closed.is_set():
                raise HubError(f"push of {folder} after close(): this Pusher has stopped")
            self._queue.append(Path(folder))
            self._kick()
        return True

    def _kick(self) -> None:
        """Start the worker if it is not running; call with ``self._cond`` held."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, daemon=True,
                                            name=f"adamw-lm-hub-push {self.repo_id}")
            self._thread.start()
        self._cond.notify_all()

    def pinned(self) -> set[Path]:
        """Local folders not yet on the Hub: queued, being pushed, or failed. Do not delete them."""
        with self._cond:
            return {p for p in (*self._carry, *self._inflight, *self._queue) if p is not None}

    def unpushed(self) -> list[Path]:
        """:meth:`pinned`, oldest first."""
        with self._cond:
            found = [*self._carry, *self._inflight, *(p for p in self._queue if p is not None)]
        return list(dict.fromkeys(found))

    def wait(self, progress: bool = True, timeout: float | None = None,
             retry_failed: bool = True) -> list[Path]:
        """Wait for every queued push; return what is not pushed (oldest first).

        With ``retry_failed`` (the end of a run), failed pushes get one more try first. Shows a
        tqdm bar when ``progress``. A ``KeyboardInterrupt`` reaches the caller, which can then
        :meth:`close` and report :meth:`unpushed`.
        """
        with self._cond:
            if retry_failed and self._carry and not self._queue and not self._closed.is_set():
                self._queue.append(None)  # one more try for the failed ones
                self._kick()
            total = len(self._queue) + bool(self._inflight)
        bar = tqdm(total=total, desc=f"pushing to {self.repo_id}", unit="checkpoint",
                   disable=not progress or total == 0)
        try:
            with self._cond:
                def idle() -> bool:
                    bar.update(max(0, total - len(self._queue) - bool(self._inflight) - bar.n))
                    return not self._queue and not self._inflight

                self._cond.wait_for(idle, timeout)
        finally:
            bar.close()
        return self.unpushed()

    def close(self) -> list[Path]:
        """Stop after the push in progress, leave the queued ones; return what is not pushed."""
        left = self.unpushed()
        with self._cond:
            self._closed.set()
            self._queue.clear()
            self._cond.notify_all()
        return left

    # -- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        # Runs while there is work; submit() starts a new worker when needed, so an idle
        # Pusher holds no thread.
        while True:
            with self._cond:
                if self._closed.is_set() or not self._queue:
                    self._thread = None
                    self._cond.notify_all()
                    return
                job = self._queue.popleft()
                batch = [f for f in dict.fromkeys([*self._carry, *([job] if job else [])])
                         if _pushable(f)]
                self._carry, self._inflight = [], batch
            ok, sha = self._push(batch)
            with self._cond:
                self._inflight = []
                if ok:
                    self._pushed.extend((folder, sha) for folder in batch)
                elif not self._closed.is_set():
                    self._carry = [f for f in batch if f.is_dir()]
                self._cond.notify_all()

    def _push(self, batch: list[Path]) -> tuple[bool, str]:
        if not batch:
            return True, ""
        try:
            with _quiet_client():
                return self._push_quietly(batch)
        except Exception as e:  # the worker must survive anything; the warning says what failed
            names = ", ".join(str(f) for f in batch)
            reason = _hub_error(e, self.repo_id, self._api.endpoint)
            log.warning(
                "checkpoint %s is not on the Hub (%s): %s; it is kept locally and will be sent "
                "with the next push", names, self.repo_id, reason,
            )
            return False, ""

    def _push_quietly(self, batch: list[Path]) -> tuple[bool, str]:
        if not self._prepared:
            self.prepare()
        return True, self._retrying(lambda: self._commit(batch))

    def _retrying(self, attempt: Callable[[], _T]) -> _T:
        n = 0
        while True:
            try:
                return attempt()
            except Exception as e:
                if n == self.retries or not _transient(e) or self._closed.is_set():
                    raise
                delay = random.uniform(0, min(self.max_backoff, self.backoff * 2**n))
                after = _retry_after(e)
                if after is not None:
                    delay = max(delay, after)
                n += 1
                log.info("push to %s failed (%s); retry %d/%d in %.1fs", self.repo_id,
                         _first_line(e), n, self.retries, delay)
                if self._closed.wait(delay):
                    raise

    def _remote_steps(self, revision: str) -> dict[int, str]:
        try:
            entries = self._api.list_repo_tree(self.repo_id, path_in_repo=CHECKPOINTS_DIR,
                                               revision=revision)
            names = [e.path.rsplit("/", 1)[-1] for e in entries]
        except RemoteEntryNotFoundError:
            return {}
        return {int(m.group(1)): n for n in names if (m := STEP_DIR.fullmatch(n))}

    def _commit(self, batch: list[Path]) -> str:
        """One commit for ``batch``, planned against the branch head as it is now (so a retry
        after a lost answer neither duplicates nor fails on files already there)."""
        head = self._api.repo_info(self.repo_id, revision=self.branch).sha
        remote = self._remote_steps(head)
        local = {int(STEP_DIR.fullmatch(f.name).group(1)): f for f in batch}
        newest = max(local)
        ranked = sorted(set(remote) | set(local), reverse=True)
        keep = {newest} | set(ranked[: self.keep_remote] if self.keep_remote else ranked)
        ops: list[CommitOperationAdd | CommitOperationDelete] = []
        for step in sorted(s for s in local if s in keep):
            ops += _folder_additions(local[step], f"{CHECKPOINTS_DIR}/{dir_name(step)}")
        newest_folder = local[newest]
        top = [_copy_of(ops, newest_folder / name, name) for name in (ADAPTERS, ADAPTER_CONFIG)]
        # Upload the folder first: the commit then finds the top-level copy of the adapters
        # already stored (same sha256) instead of sending its bytes a second time.
        self._api.preupload_lfs_files(self.repo_id, additions=list(ops), revision=self.branch)
        plot = loss_plot(newest_folder)
        if plot is not None:
            top.append(CommitOperationAdd(LOSS_PLOT, plot))
        card = model_card(newest_folder, self.repo_id, sorted(keep), self.branch,
                          plot=LOSS_PLOT if plot is not None else None)
        ops += [
            *top,
            CommitOperationAdd(f"{CHECKPOINTS_DIR}/{LATEST}", f"{dir_name(newest)}\n".encode()),
            CommitOperationAdd("README.md", str(card).encode()),
        ]
        ops += [CommitOperationDelete(f"{CHECKPOINTS_DIR}/{remote[s]}/", is_folder=True)
                for s in sorted(remote) if s not in keep]
        deleted = sorted(s for s in remote if s not in keep)
        info = self._api.create_commit(
            self.repo_id, ops, revision=self.branch, parent_commit=head,
            commit_message=f"adamw-lm: checkpoint {dir_name(newest)}",
            commit_description=(f"Adds {', '.join(dir_name(s) for s in sorted(local))}"
                                + (f"; removes {', '.join(dir_name(s) for s in deleted)}"
                                   if deleted else "")),
        )
        return info.oid


def _copy_of(ops: list, source: Path, path_in_repo: str) -> CommitOperationAdd:
    """An addition of ``source`` at ``path_in_repo`` that reuses the sha256 of ``source``'s own
    addition in ``ops`` (full fine-tunes: the adapters are all the weights, hashed once)."""
    op = CommitOperationAdd(path_in_repo, str(source))
    for other in ops:
        if (isinstance(other, CommitOperationAdd) and other.path_or_fileobj == str(source)
                and other.upload_info.is_hashed):
            op.upload_info.sha256 = other.upload_info.sha256
    return op


def _pushable(folder: Path) -> bool:
    """A finished checkpoint folder; anything else is dropped with a warning, never carried."""
    if STEP_DIR.fullmatch(folder.name) and (folder / MANIFEST).is_file():
        return True
    log.warning("not pushing %s: it is gone or not a finished checkpoint folder (step-NNNNNNN "
                "with %s)", folder, MANIFEST)
    return False


@contextlib.contextmanager
def _quiet_client():
    """Hide the client's per-file bars while a background push runs: they would interleave with
    the training log (``Pusher.wait`` shows one bar of its own)."""
    if are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _folder_additions(folder: Path, prefix: str) -> list[CommitOperationAdd]:
    """Every file of a checkpoint folder; sha256s come from its manifest, so nothing is hashed
    twice (the Hub checks them against the bytes it receives)."""
    manifest = read_json(folder / MANIFEST, MAX_JSON_BYTES, str(folder / MANIFEST))
    listed = manifest.get("files", {}) if isinstance(manifest, dict) else {}
    ops = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            raise HubError(f"{entry} is not a regular file: a checkpoint folder holds files only")
        op = CommitOperationAdd(f"{prefix}/{entry.name}", str(entry))
        record = listed.get(entry.name)
        if (isinstance(record, dict) and record.get("size") == op.upload_info.size
                and isinstance(record.get("sha256"), str) and len(record["sha256"]) == 64):
            op.upload_info.sha256 = bytes.fromhex(record["sha256"])
        ops.append(op)
    return ops


# -- pulling ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A checkpoint folder on the Hub, as :func:`list_remote` reports it."""

    step: int
    path: str
    latest: bool
    size: int
    val_loss: float | None = None
    train_loss: float | None = None


class _Remote:
    """One repo at one commit: every read below sees the same files."""

    def __init__(self, spec: HubSpec, endpoint: str | None, cache_dir: str | Path | None):
        self.spec, self.cache_dir = spec, cache_dir
        self.api = HfApi(endpoint=endpoint)
        self.endpoint = self.api.endpoint
        try:
            self.sha = self.api.repo_info(spec.repo_id, revision=spec.revision).sha
            tree = self.api.list_repo_tree(spec.repo_id, path_in_repo=CHECKPOINTS_DIR,
                                           recursive=True, revision=self.sha)
            self.files = {}
            for entry in tree:
                if hasattr(entry, "size"):
                    self.files[entry.path] = entry.size
                    if len(self.files) > MAX_REMOTE_FILES:
                        raise HubError(f"Hub repo {spec}: more than {MAX_REMOTE_FILES} files under "
                                       f"{CHECKPOINTS_DIR}/ (a checkpoint has a handful); not a run "
                                       "this package reads")
        except RemoteEntryNotFoundError:
            self.files = {}
        except HubError:
            raise
        except Exception as e:
            raise _hub_error(e, spec, self.endpoint) from e
        self.steps: dict[int, str] = {}
        #: Bytes of each step folder, summed once (not once per step: a repo may hold many).
        self.sizes: dict[int, int] = {}
        for path, size in self.files.items():
            parts = path.split("/")
            if len(parts) == 3 and (m := STEP_DIR.fullmatch(parts[1])):
                step = int(m.group(1))
                self.steps[step] = parts[1]
                self.sizes[step] = self.sizes.get(step, 0) + (size if isinstance(size, int) else 0)
        where = f"{spec}" + ("" if spec.revision else " (main)")
        if not self.steps:
            raise HubNotFoundError(f"Hub repo {where} has no checkpoints "
                                   f"({CHECKPOINTS_DIR}/step-NNNNNNN folders)")
        self.where = where

    def download(self, path: str, cap: int) -> Path | None:
        """One small file, or ``None`` when it is missing or larger than ``cap``."""
        size = self.files.get(path)
        if size is None or size > cap:
            return None
        try:
            return Path(hf_hub_download(self.spec.repo_id, path, revision=self.sha,
                                        cache_dir=self.cache_dir, endpoint=self.endpoint))
        except Exception as e:
            raise _hub_error(e, self.spec, self.endpoint) from e

    def latest(self) -> int:
        """The step ``checkpoints/latest`` names; the highest step if it is missing or wrong."""
        found = self.download(f"{CHECKPOINTS_DIR}/{LATEST}", MAX_LATEST_BYTES)
        text = ""
        if found is not None:
            with open(found, "rb") as f:
                text = f.read(MAX_LATEST_BYTES).decode("ascii", "replace")
        match = STEP_DIR.fullmatch(text.strip())
        if match and int(match.group(1)) in self.steps:
            return int(match.group(1))
        highest = max(self.steps)
        log.warning("Hub repo %s: %s/%s does not name one of its checkpoints; using the highest "
                    "step, %d", self.where, CHECKPOINTS_DIR, LATEST, highest)
        return highest


def pull(
    spec: str | HubSpec,
    step: int | None = None,
    *,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download one checkpoint folder of a Hub run and return it, ready for ``checkpoint.load``.

    ``spec`` is ``[hub:]USER/REPO[@REVISION]``; the default step is the one the remote
    ``checkpoints/latest`` names. Only the files that the step's manifest lists are downloaded
    (``snapshot_download`` into the Hugging Face cache, at the commit the revision resolves to),
    after checking their sizes against the manifest. The returned folder holds links into the
    cache's blobs; verify it with ``checkpoint.verify`` / ``load`` like any local folder.

    Raises:
        HubNotFoundError: the repo, revision or step does not exist.
        HubAuthError: no token for a private repo, or a refused token.
        HubError: the Hub could not be reached, or the step folder is not a checkpoint.
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    remote = _Remote(spec, endpoint, cache_dir)
    if step is None:
        step = remote.latest()
    elif step not in remote.steps:
        have = sorted(remote.steps, reverse=True)
        listed = ", ".join(str(s) for s in have[:MAX_DETAILED_STEPS])
        more = f" and {len(have) - MAX_DETAILED_STEPS} older" if len(have) > MAX_DETAILED_STEPS else ""
        raise HubNotFoundError(f"Hub repo {remote.where} has no checkpoint for step {step}; "
                               f"it has steps {listed}{more}")
    prefix = f"{CHECKPOINTS_DIR}/{remote.steps[step]}"
    manifest_file = remote.download(f"{prefix}/{MANIFEST}", MAX_JSON_BYTES)
    if manifest_file is None:
        raise HubError(f"Hub repo {remote.where}: {prefix} has no {MANIFEST} (of at most "
                       f"{MAX_JSON_BYTES} bytes): not a complete checkpoint")
    label = f"{prefix}/{MANIFEST} on {remote.where}"
    # Checked in full before anything it lists is downloaded: the names (plain ones: they become
    # download patterns, where * ? [ would match other files), how many, and the step.
    manifest = read_json(manifest_file, MAX_JSON_BYTES, label)
    try:
        listed = check_manifest(label, manifest, step)["files"]
    except CorruptCheckpointError as e:
        raise HubError(f"{e}: not an adamw_lm checkpoint") from None
    for name, record in listed.items():
        size = remote.files.get(f"{prefix}/{name}")
        expected = record["size"]  # check_manifest: a dict with an int size
        if size is None:
            raise HubError(f"Hub repo {remote.where}: {prefix}/{name} is missing (listed in its "
                           f"{MANIFEST})")
        if size != expected:
            raise HubError(f"Hub repo {remote.where}: {prefix}/{name} is {size} bytes, its "
                           f"{MANIFEST} says {expected!r}")
    try:
        snapshot = snapshot_download(
            spec.repo_id, revision=remote.sha, cache_dir=cache_dir, endpoint=remote.endpoint,
            allow_patterns=[f"{prefix}/{name}" for name in (MANIFEST, *listed)],
        )
    except Exception as e:
        raise _hub_error(e, spec, remote.endpoint) from e
    return Path(snapshot) / prefix


def list_remote(
    spec: str | HubSpec, *, cache_dir: str | Path | None = None, endpoint: str | None = None
) -> list[RemoteCheckpoint]:
    """The checkpoints of a Hub run, newest first, with their validation and last training loss.

    Only each step's manifest and trainer state are read (size-capped, untrusted: a value that
    is not a finite number is shown as missing), for the newest :data:`MAX_DETAILED_STEPS` steps
    and within :data:`MAX_DETAIL_BYTES` in all: a repo of many steps cannot fill the disk from a
    read-only command. Older steps show their size alone.
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    remote = _Remote(spec, endpoint, cache_dir)
    latest = remote.latest()
    found = []
    budget = MAX_DETAIL_BYTES
    for rank, step in enumerate(sorted(remote.steps, reverse=True)):
        prefix = f"{CHECKPOINTS_DIR}/{remote.steps[step]}"
        size = remote.sizes[step]
        val = train = None
        for name, cap in ((MANIFEST, MAX_JSON_BYTES), (TRAINER_STATE, MAX_TRAINER_STATE_BYTES)):
            listed = remote.files.get(f"{prefix}/{name}")
            if rank >= MAX_DETAILED_STEPS or listed is None or listed > min(cap, budget):
                continue
            budget -= listed
            path = remote.download(f"{prefix}/{name}", cap)
            if path is not None and name == MANIFEST:
                val = finite_number(_get(path, cap, "val_loss"))
            elif path is not None:
                losses = _get(path, cap, "losses")
                train = finite_number(losses[-1]) if isinstance(losses, list) and losses else None
        found.append(RemoteCheckpoint(step, prefix, step == latest, size, val, train))
    return found


#: Files under ``checkpoints/`` a Hub run may list: thousands of steps, but a bounded listing.
MAX_REMOTE_FILES = 100_000

#: :func:`list_remote` reads the losses of this many newest steps, and this many bytes in all.
MAX_DETAILED_STEPS = 20
MAX_DETAIL_BYTES = 128 * 2**20


def _get(path: Path, cap: int, key: str) -> Any:
    try:
        data = read_json(path, cap, str(path), nonfinite=True)
    except CheckpointError:
        return None
    return data.get(key) if isinstance(data, dict) else None




__all__ = [
    "HubAuthError",
    "HubError",
    "HubNotFoundError",
    "HubSpec",
    "Pusher",
    "RemoteCheckpoint",
    "check_repo_id",
    "list_remote",
    "parse_spec",
    "pull",
]
