"""A local Hugging Face Hub for the tests: real commits, LFS uploads, tokens and fault injection.

It answers, on 127.0.0.1 only, the routes that the real ``huggingface_hub`` client (2.x) calls for
``create_repo``, ``repo_info``, ``auth_check``, ``create_commit`` (preupload, LFS batch + PUT,
NDJSON commit), ``list_repo_tree``, ``list_repo_refs``, ``list_repo_commits``, ``create_branch``,
``create_tag`` and ``hf_hub_download`` / ``snapshot_download`` (HEAD + GET ``resolve``). Each commit
is stored with its parent and its whole file table, so branches, tags, commit shas and tree
listings behave as on the Hub. File contents live on disk under ``root`` by sha256.

Files above ``lfs_threshold`` bytes, or with a suffix the Hub's default ``.gitattributes`` sends to
LFS (``*.safetensors``, ...), must go through the LFS batch API and a PUT, as on the real Hub; the
PUT is checked against the announced sha256 and size.

Faults are injected per route with :meth:`LocalHub.fail`; each fault fires a bounded number of
times. Every request is logged (:meth:`LocalHub.requests`) so tests can see retries and waits.

    python tests/hub_server.py [ROOT]  # serves until killed; prints {"url", "token", "user"}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024
#: What the Hub's default ``.gitattributes`` stores with LFS whatever the size.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".npy", ".gguf", ".h5")
PAGE_SIZE = 50
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


class HubHTTPError(Exception):
    """An error answer: status, message and the Hub's ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body or {}


@dataclass(frozen=True)
class Entry:
    """One file of a commit; its bytes are ``objects/<sha256>``."""

    size: int
    sha256: str
    git_oid: str  # git blob sha1 of the content, or of the LFS pointer for LFS files
    lfs: bool


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, Entry]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)  # LFS objects uploaded to this repo, as on the Hub


@dataclass
class Fault:
    """``times`` requests to ``route`` (``method`` if given) get ``kind``:

    - ``"status"``: answer ``status`` (with ``Retry-After: retry_after`` when given);
    - ``"drop"``: close the connection without an answer (after applying the request when
      ``apply``, which for a commit is a commit whose answer is lost);
    - ``"slow"``: sleep ``delay`` seconds, then answer normally.
    """

    route: str
    kind: str
    times: int
    status: int = 500
    retry_after: float | None = None
    delay: float = 0.0
    apply: bool = False
    method: str | None = None


@dataclass(frozen=True)
class Request:
    method: str
    route: str
    path: str
    status: int | None  # None: dropped
    authorized: bool
    time: float


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    spec = "version https://git-lfs.github.com/spec/v1"
    return f"{spec}\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_API = r"/api/models/" + _REPO
_ROUTES = [
    ("POST", "create", r"/api/repos/create"),
    ("POST", "validate_yaml", r"/api/validate-yaml"),
    ("GET", "whoami", r"/api/whoami-v2"),
    ("GET", "auth_check", _API + r"/auth-check(?P<write>/write)?"),
    ("POST", "preupload", _API + r"/preupload/(?P<rev>[^/]+)"),
    ("POST", "commit", _API + r"/commit/(?P<rev>[^/]+)"),
    ("GET", "tree", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"),
    ("GET", "refs", _API + r"/refs"),
    ("GET", "commits", _API + r"/commits/(?P<rev>[^/]+)"),
    ("POST", "branch", _API + r"/branch/(?P<name>[^/]+)"),
    ("POST", "tag", _API + r"/tag/(?P<rev>[^/]+)"),
    ("GET", "info", _API + r"(?:/revision/(?P<rev>[^/]+))?"),
    ("POST", "lfs_batch", r"/" + _REPO + r"\.git/info/lfs/objects/batch"),
    ("PUT", "lfs_upload", r"/lfs-upload/(?P<nonce>[0-9a-f]+)"),
    ("HEAD", "resolve", r"/" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
    ("GET", "resolve", r"/" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
]
_COMPILED = [(m, name, re.compile(pattern)) for m, name, pattern in _ROUTES]


class LocalHub:
    """The Hub's state and the HTTP server that serves it (start with :meth:`start`)."""

    def __init__(self, root: Path, lfs_threshold: int = LFS_THRESHOLD):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, tuple[str, bool]] = {}  # token -> (user, may write)
        self._uploads: dict[str, tuple[str, str, int]] = {}  # nonce -> (repo, sha256, size)
        self._faults: list[Fault] = []
        self._log: list[Request] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # -- test controls -------------------------------------------------------------------------

    def start(self) -> LocalHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def add_token(self, user: str, write: bool = True) -> str:
        token = "hf_" + secrets.token_hex(16)
        with self._lock:
            self.tokens[token] = (user, write)
        return token

    def fail(self, route: str, kind: str = "status", times: int = 1, **options: Any) -> Fault:
        """Inject a fault into the next ``times`` requests of ``route`` (see :class:`Fault`)."""
        if route not in {name for _, name, _ in _ROUTES}:
            raise ValueError(f"unknown route {route!r}")
        if kind not in ("status", "drop", "slow"):
            raise ValueError(f"unknown fault kind {kind!r}")
        fault = Fault(route, kind, times, **options)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def requests(self, route: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._log if route is None or r.route == route]

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self.repos[repo_id].branches[branch]

    def history(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """Commits of ``branch``, newest first."""
        with self._lock:
            repo = self.repos[repo_id]
            return list(self._ancestry(repo, repo.branches[branch]))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of every file at ``revision``."""
        with self._lock:
            repo = self.repos[repo_id]
            commit = repo.commits[self._resolve(repo, revision)]
            return {p: (self.objects / e.sha256).read_bytes() for p, e in commit.files.items()}

    def commit_files(self, repo_id: str, files: dict[str, bytes], branch: str = "main",
                     message: str = "edit on the server") -> str:
        """Commit ``files`` as someone else with write access would; returns the commit sha."""
        with self._lock:
            repo = self.repos[repo_id]
            table = dict(repo.commits[repo.branches[branch]].files)
            for path, data in files.items():
                table[path] = self._store(data, lfs=self._is_lfs(path, len(data)))
                if table[path].lfs:
                    repo.lfs.add(table[path].sha256)
            return self._new_commit(repo, branch, table, message, "", repo.owner)

    def stored_bytes(self) -> bytes:
        """Everything the server keeps (file contents and commit metadata), for leak checks."""
        with self._lock:
            meta = json.dumps([[c.title, c.message, c.author] for r in self.repos.values()
                               for c in r.commits.values()]).encode()
        return meta + b"".join(p.read_bytes() for p in sorted(self.objects.iterdir()))

    # -- state -------------------------------------------------------------------------------

    def _is_lfs(self, path: str, size: int) -> bool:
        return size >= self.lfs_threshold or path.lower().endswith(LFS_SUFFIXES)

    def _store(self, data: bytes, lfs: bool) -> Entry:
        sha = hashlib.sha256(data).hexdigest()
        self._write_object(sha, data)
        oid = _git_oid(_lfs_pointer(sha, len(data))) if lfs else _git_oid(data)
        return Entry(len(data), sha, oid, lfs)

    def _write_object(self, sha: str, data: bytes) -> None:
        target = self.objects / sha
        if not target.exists():
            tmp = self.objects / f".{sha}.{threading.get_ident()}.tmp"
            tmp.write_bytes(data)
            tmp.replace(target)

    def _ancestry(self, repo: Repo, oid: str | None):
        while oid is not None:
            commit = repo.commits[oid]
            yield commit
            oid = commit.parent

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if _COMMIT_SHA.fullmatch(revision) and revision in repo.commits:
            return revision
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _new_commit(self, repo: Repo, branch: str, files: dict[str, Entry], title: str,
                    message: str, author: str) -> str:
        parent = repo.branches.get(branch)
        seed = json.dumps([parent, sorted((p, e.git_oid) for p, e in files.items()), title,
                           time.time_ns(), secrets.token_hex(4)])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, files, title, message, author, _now())
        repo.branches[branch] = oid
        return oid

    def _take_fault(self, method: str, route: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.route == route and fault.method in (None, method) and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LocalHub

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        """Quiet: the tests read :meth:`LocalHub.requests` instead."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- plumbing ------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        route, args = "unknown", {}
        for m, name, pattern in _COMPILED:
            match = pattern.fullmatch(split.path)
            if m == method and match:
                route = name
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                break
        authorized = self.headers.get("authorization") is not None
        fault = self.hub._take_fault(method, route)
        status: int | None = None
        try:
            body = self._read_body()
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.delay)
            if fault is not None and fault.kind == "status":
                headers = ({} if fault.retry_after is None
                           else {"Retry-After": f"{fault.retry_after:g}"})
                raise HubHTTPError(fault.status, f"injected {fault.status}", None, headers)
            if fault is not None and fault.kind == "drop" and not fault.apply:
                raise ConnectionAbortedError
            if route == "unknown":
                raise HubHTTPError(404, f"no route for {method} {split.path}")
            status, headers, payload = getattr(self, "_" + route)(method, body, **args)
            if fault is not None and fault.kind == "drop":
                raise ConnectionAbortedError  # applied, but the answer is lost
            self._send(status, headers, payload, head=method == "HEAD")
        except HubHTTPError as e:
            status = e.status
            headers = {**e.headers, "X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, headers, json.dumps({"error": e.message, **e.body}).encode(),
                       head=method == "HEAD")
        except (ConnectionAbortedError, BrokenPipeError, ConnectionResetError):
            status = None  # dropped on purpose, or the client went away
        finally:
            if status is None:
                self.close_connection = True
            with self.hub._lock:
                self.hub._log.append(
                    Request(method, route, split.path, status, authorized, time.monotonic()))

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, headers: dict[str, str], payload: bytes, head: bool) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **headers}
        headers.setdefault("Content-Length", str(len(payload)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(payload)

    def _json(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except ValueError as e:
            raise HubHTTPError(400, f"body is not JSON: {e}") from e

    @staticmethod
    def _ok(data: Any, status: int = 200, headers: dict[str, str] | None = None):
        return status, headers or {}, json.dumps(data).encode()

    # -- auth ----------------------------------------------------------------------------------

    def _user(self) -> tuple[str, bool] | None:
        header = self.headers.get("authorization")
        if header is None:
            return None
        token = header.removeprefix("Bearer ").strip()
        found = self.hub.tokens.get(token)
        if found is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return found

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user()
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or user[0] != repo.owner)):
            if user is None:
                raise HubHTTPError(401, "Repository not found", "RepoNotFound")
            raise HubHTTPError(404, "Repository not found", "RepoNotFound")
        if write:
            if user is None:
                raise HubHTTPError(401, "You must be authenticated to write to this repo")
            if user[0] != repo.owner or not user[1]:
                raise HubHTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # -- routes --------------------------------------------------------------------------------

    def _create(self, method: str, body: bytes):
        data = self._json(body)
        user = self._user()
        if user is None:
            raise HubHTTPError(401, "You must be authenticated to create a repo")
        namespace = data.get("organization") or user[0]
        if namespace != user[0] or not user[1]:
            raise HubHTTPError(403, f"You don't have the rights to create a repo under {namespace}")
        repo_id = f"{namespace}/{data['name']}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                # The Hub names the existing repo: create_repo(exist_ok=True) reads its url.
                raise HubHTTPError(409, "You already created this model repo", None, None,
                                   {"url": f"{self.hub.url}/{repo_id}"})
            repo = Repo(repo_id, namespace, data.get("visibility", "public") != "public")
            attributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n"
                                 for s in LFS_SUFFIXES)
            gitattributes = self.hub._store(attributes.encode(), lfs=False)
            self.hub._new_commit(repo, "main", {".gitattributes": gitattributes},
                                 "initial commit", "", namespace)
            self.hub.repos[repo_id] = repo
        return self._ok({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, method: str, body: bytes):
        self._json(body)
        return self._ok({"errors": [], "warnings": []})

    def _whoami(self, method: str, body: bytes):
        user = self._user()
        if user is None:
            raise HubHTTPError(401, "Invalid username or password.")
        role = "write" if user[1] else "read"
        return self._ok({"type": "user", "name": user[0],
                         "auth": {"type": "access_token", "accessToken": {"role": role}}})

    def _auth_check(self, method: str, body: bytes, repo: str, write: str | None = None):
        self._repo(repo, write=write is not None)
        return self._ok({})

    def _info(self, method: str, body: bytes, repo: str, rev: str = "main"):
        found = self._repo(repo)
        with self.hub._lock:
            commit = found.commits[self.hub._resolve(found, rev)]
            return self._ok({
                "id": repo, "modelId": repo, "author": found.owner, "sha": commit.oid,
                "private": found.private, "lastModified": commit.date,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            })

    def _preupload(self, method: str, body: bytes, repo: str, rev: str):
        found = self._repo(repo, write=True)
        data = self._json(body)
        with self.hub._lock:
            files = found.commits[self.hub._resolve(found, rev)].files
        answer = []
        for item in data.get("files", []):
            path, size = item["path"], int(item["size"])
            lfs = self.hub._is_lfs(path, size)
            existing = files.get(path)
            oid = None
            if existing is not None and existing.lfs == lfs:
                oid = existing.sha256 if lfs else existing.git_oid
            answer.append({"path": path, "uploadMode": "lfs" if lfs else "regular",
                           "shouldIgnore": False, "oid": oid})
        return self._ok({"files": answer})

    def _lfs_batch(self, method: str, body: bytes, repo: str):
        found = self._repo(repo, write=True)
        data = self._json(body)
        objects = []
        for item in data.get("objects", []):
            oid, size = item["oid"], int(item["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in found.lfs:
                nonce = secrets.token_hex(16)
                with self.hub._lock:
                    self.hub._uploads[nonce] = (found.repo_id, oid, size)
                answer["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{nonce}",
                                                "header": {}}}
            objects.append(answer)
        return self._ok({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, method: str, body: bytes, nonce: str):
        with self.hub._lock:
            upload = self.hub._uploads.get(nonce)
        if upload is None:
            raise HubHTTPError(403, "upload url expired or unknown")
        repo_id, oid, size = upload
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise HubHTTPError(400, f"uploaded content does not match oid {oid} / size {size}")
        self.hub._write_object(oid, body)
        with self.hub._lock:
            self.hub._uploads.pop(nonce, None)
            self.hub.repos[repo_id].lfs.add(oid)
        return 200, {"ETag": f'"{oid}"'}, b""

    def _commit(self, method: str, body: bytes, repo: str, rev: str):
        found = self._repo(repo, write=True)
        if self.query.get("create_pr"):
            raise HubHTTPError(400, "pull requests are not supported by the local Hub")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "the first NDJSON line must be the commit header")
        header = lines[0]["value"]
        user = self._user()
        with self.hub._lock:
            if rev not in found.branches:
                raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = found.branches[rev]
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                raise HubHTTPError(412, "A commit has happened since. Please refresh and retry.")
            table = dict(found.commits[head].files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    table[path] = self.hub._store(data, lfs=False)
                elif key == "lfsFile":
                    sha = value["oid"]
                    if sha not in found.lfs:
                        raise HubHTTPError(422, f"LFS object {sha} of {path} was never uploaded")
                    size = (self.hub.objects / sha).stat().st_size
                    table[path] = Entry(size, sha, _git_oid(_lfs_pointer(sha, size)), True)
                elif key == "deletedFile":
                    if table.pop(path, None) is None:
                        raise HubHTTPError(404, f"A file with this name doesn't exist: {path}",
                                           "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    gone = [p for p in table if p.startswith(prefix)]
                    if not gone:
                        raise HubHTTPError(404, f"A folder with this name doesn't exist: {path}",
                                           "EntryNotFound")
                    for p in gone:
                        del table[p]
                else:
                    raise HubHTTPError(400, f"unknown commit operation {key!r}")
            oid = self.hub._new_commit(found, rev, table, header.get("summary", ""),
                                       header.get("description", ""), user[0] if user else "")
        return self._ok({"success": True, "commitOid": oid, "pullRequestUrl": None,
                         "commitUrl": f"{self.hub.url}/{repo}/commit/{oid}"})

    def _tree(self, method: str, body: bytes, repo: str, rev: str, path: str = ""):
        found = self._repo(repo)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        with self.hub._lock:
            files = found.commits[self.hub._resolve(found, rev)].files
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubHTTPError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for name, entry in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                if not recursive and depth > 1:
                    break
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                item: dict[str, Any] = {"type": "file", "path": name, "size": entry.size,
                                        "oid": entry.git_oid}
                if entry.lfs:
                    pointer = _lfs_pointer(entry.sha256, entry.size)
                    item["lfs"] = {"oid": entry.sha256, "size": entry.size,
                                   "pointerSize": len(pointer)}
                entries[name] = item
        return self._page(list(entries.values()))

    def _page(self, items: list[Any]):
        start = int(self.query.get("cursor", 0))
        headers = {}
        if start + PAGE_SIZE < len(items):
            query = {**self.query, "cursor": str(start + PAGE_SIZE)}
            link = urlsplit(self.path).path + "?" + "&".join(
                f"{quote(k)}={quote(v)}" for k, v in query.items())
            headers["Link"] = f'<{self.hub.url}{link}>; rel="next"'
        return self._ok(items[start:start + PAGE_SIZE], headers=headers)

    def _refs(self, method: str, body: bytes, repo: str):
        found = self._repo(repo)

        def refs(names: dict[str, str], kind: str) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c}
                    for n, c in sorted(names.items())]

        with self.hub._lock:
            return self._ok({"branches": refs(found.branches, "heads"),
                             "tags": refs(found.tags, "tags"), "converts": [],
                             "pullRequests": []})

    def _commits(self, method: str, body: bytes, repo: str, rev: str):
        found = self._repo(repo)
        with self.hub._lock:
            history = [
                {"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                 "authors": [{"user": c.author}]}
                for c in self.hub._ancestry(found, self.hub._resolve(found, rev))
            ]
        return self._page(history)

    def _branch(self, method: str, body: bytes, repo: str, name: str):
        found = self._repo(repo, write=True)
        start = self._json(body).get("startingPoint") or "main"
        with self.hub._lock:
            if name in found.branches:
                raise HubHTTPError(409, f"Reference already exists: refs/heads/{name}")
            found.branches[name] = self.hub._resolve(found, start)
        return self._ok({})

    def _tag(self, method: str, body: bytes, repo: str, rev: str):
        found = self._repo(repo, write=True)
        tag = self._json(body)["tag"]
        with self.hub._lock:
            if tag in found.tags:
                raise HubHTTPError(409, f"Tag already exists: {tag}")
            found.tags[tag] = self.hub._resolve(found, rev)
        return self._ok({})

    def _resolve(self, method: str, body: bytes, repo: str, rev: str, path: str):
        found = self._repo(repo)
        with self.hub._lock:
            oid = self.hub._resolve(found, rev)
            entry = found.commits[oid].files.get(path)
        if entry is None:
            raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound",
                               {"X-Repo-Commit": oid})
        headers = {"X-Repo-Commit": oid, "ETag": f'"{entry.git_oid}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        if method == "HEAD":
            return 200, {**headers, "Content-Length": str(entry.size)}, b""
        data = (self.hub.objects / entry.sha256).read_bytes()
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("range", ""))
        if ranged and int(ranged.group(1)) < len(data):
            start = int(ranged.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return 206, headers, data[start:]
        return 200, headers, data


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        hub = LocalHub(Path(sys.argv[1] if len(sys.argv) > 1 else folder)).start()
        # One JSON line on stdout, for scripts that start the server as a subprocess.
        print(json.dumps({"url": hub.url, "token": hub.add_token("user"), "user": "user"}),
              flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            hub.stop()
