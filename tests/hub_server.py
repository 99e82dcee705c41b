"""A Hugging Face Hub-compatible HTTP server for the tests (standard library only).

The real, unpatched ``huggingface_hub`` client (and PEFT / transformers through it) talks to this
server exactly as it talks to huggingface.co, for model repositories. It keeps everything in
memory: repos with branches, pull-request refs and git-like commits holding a full file tree.

Ids are real git object ids: a file's ``oid`` is its git blob sha1, a directory's is its git
tree sha1 and a commit id is the sha1 of a git commit object (tree, parent, author, date, message).

Usage::

    with running_hub() as hub:
        api = HfApi(endpoint=hub.url, token="t")
        ...
        assert hub.files("org/name")["README.md"] == b"..."

Protocol notes are in /work/shared/HUB_PROTOCOL.md. Anything the server does not implement
answers 404 ``{"error": "not implemented in test server: METHOD PATH"}`` so that surprises show.
Set ``PEM_HUB_DEBUG=1`` to log every request (and handler tracebacks) to stderr.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import sys
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = ["Commit", "HubServer", "running_hub", "git_blob_oid"]

GITATTRIBUTES = b"""*.7z filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*tfevents* filter=lfs diff=lfs merge=lfs -text
"""

HEX40 = re.compile(r"^[0-9a-f]{40}$")
PR_REF = re.compile(r"^refs/pr/(\d+)$")
TREE_PAGE_SIZE = 1000
TREE_PAGE_SIZE_EXPANDED = 50
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"  # the client special-cases this text


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of ``data`` (what the Hub calls a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _git_tree_oid(entries: dict[str, Any]) -> str:
    """Git tree sha1 of a nested dict {name: bytes | dict}."""
    items = []
    for name, value in entries.items():
        if isinstance(value, dict):
            items.append((name + "/", b"40000 " + name.encode() + b"\0" + bytes.fromhex(_git_tree_oid(value))))
        else:
            items.append((name, b"100644 " + name.encode() + b"\0" + bytes.fromhex(git_blob_oid(value))))
    body = b"".join(entry for _, entry in sorted(items, key=lambda item: item[0].encode()))
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


def _nest(files: dict[str, bytes], prefix: str = "") -> dict[str, Any]:
    """{"a/b.txt": data} -> {"a": {"b.txt": data}}, restricted to the folder ``prefix`` if given."""
    root: dict[str, Any] = {}
    for path, data in files.items():
        if prefix:
            if not path.startswith(prefix + "/"):
                continue
            path = path[len(prefix) + 1:]
        node = root
        *folders, name = path.split("/")
        for folder in folders:
            node = node.setdefault(folder, {})
        node[name] = data
    return root


def _iso(date: datetime) -> str:
    return date.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Commit:
    id: str
    parent: str | None
    title: str
    message: str
    date: datetime
    author: str
    files: dict[str, bytes] = field(repr=False)

    @property
    def tree_oid(self) -> str:
        return _git_tree_oid(_nest(self.files))


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created: datetime
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit id
    pull_requests: dict[int, str] = field(default_factory=dict)  # number -> commit id
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """Commit id of a branch, refs/heads/..., refs/pr/N or a full commit id; None if unknown."""
        if revision in self.branches:
            return self.branches[revision]
        if revision.startswith("refs/heads/") and revision[len("refs/heads/"):] in self.branches:
            return self.branches[revision[len("refs/heads/"):]]
        match = PR_REF.match(revision)
        if match and int(match.group(1)) in self.pull_requests:
            return self.pull_requests[int(match.group(1))]
        if HEX40.match(revision) and revision in self.commits:
            return revision
        return None

    def history(self, commit_id: str) -> list[Commit]:
        out = []
        current: str | None = commit_id
        while current is not None:
            commit = self.commits[current]
            out.append(commit)
            current = commit.parent
        return out


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code
        self.headers = headers or {}
        self.extra = extra or {}  # more keys for the JSON body


def _repo_not_found() -> HubError:
    return HubError(404, "Repository not found", "RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class HubServer:
    """An in-memory Hub for model repos, served on 127.0.0.1 from a daemon thread.

    ``start()`` binds a free port (the same port again after a ``stop()``, so a test can take
    the Hub down and bring it back with its content intact); ``url`` is the endpoint to give
    the client.
    """

    def __init__(self, user: str = "test-user", port: int = 0) -> None:
        self.user = user
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.RLock()
        self._valid_tokens: set[str] | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = port
        self.requests: list[tuple[str, str]] = []  # (method, raw path), in arrival order

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "HubServer":
        if self._httpd is not None:
            return self
        server = self

        class Handler(_Handler):
            hub = server

        httpd = _QuietServer(("127.0.0.1", self._port), Handler)
        self._port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def url(self) -> str:
        if not self._port:
            raise RuntimeError("HubServer is not started")
        return f"http://127.0.0.1:{self._port}"

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ test helpers
    def set_token(self, valid_tokens: set[str] | None) -> None:
        """Only accept ``Authorization: Bearer X`` for X in ``valid_tokens``; None accepts anything."""
        with self._lock:
            self._valid_tokens = set(valid_tokens) if valid_tokens is not None else None

    def repo_exists(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    def _repo(self, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise KeyError(f"no repo {repo_id!r} on the test Hub")
        return repo

    def _resolve(self, repo_id: str, revision: str) -> str:
        commit_id = self._repo(repo_id).resolve(revision)
        if commit_id is None:
            raise KeyError(f"no revision {revision!r} in {repo_id!r}")
        return commit_id

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The full file tree at ``revision`` (a branch, refs/pr/N or a commit id)."""
        with self._lock:
            return dict(self._repo(repo_id).commits[self._resolve(repo_id, revision)].files)

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self._resolve(repo_id, branch)

    def branches(self, repo_id: str) -> dict[str, str]:
        with self._lock:
            return dict(self._repo(repo_id).branches)

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """History reachable from ``revision``, newest first (the initial commit last)."""
        with self._lock:
            repo = self._repo(repo_id)
            return repo.history(self._resolve(repo_id, revision))

    def create_repo(self, repo_id: str, private: bool = False) -> None:
        """Create a repo directly (like POST /api/repos/create); an existing one is kept."""
        with self._lock:
            if repo_id not in self._repos:
                self._create_repo(repo_id, private)

    def add_commit(
        self, repo_id: str, files: dict[str, bytes] | None = None, *, deletes: tuple[str, ...] = (),
        branch: str = "main", message: str = "Seed files", author: str | None = None,
    ) -> str:
        """Commit directly on the server (creating the repo and the branch from main if needed)."""
        with self._lock:
            if repo_id not in self._repos:
                self._create_repo(repo_id, False)
            repo = self._repos[repo_id]
            if branch not in repo.branches:
                repo.branches[branch] = repo.branches["main"]
            parent = repo.branches[branch]
            tree = dict(repo.commits[parent].files)
            for path in deletes:
                tree.pop(path, None)
            tree.update(files or {})
            commit = self._commit(repo, parent, tree, message, "", author or self.user)
            repo.branches[branch] = commit.id
            return commit.id

    # ------------------------------------------------------------- the store
    def _create_repo(self, repo_id: str, private: bool) -> _Repo:
        now = datetime.now(timezone.utc)
        repo = _Repo(repo_id=repo_id, private=private, created=now)
        commit = self._commit(repo, None, {".gitattributes": GITATTRIBUTES}, "initial commit", "", self.user)
        repo.branches["main"] = commit.id
        self._repos[repo_id] = repo
        return repo

    def _commit(
        self, repo: _Repo, parent: str | None, files: dict[str, bytes], title: str, message: str, author: str
    ) -> Commit:
        date = datetime.now(timezone.utc)
        tree = _git_tree_oid(_nest(files))
        stamp = f"{author} <{author}@users.noreply.test> {int(date.timestamp())} +0000"
        body = f"tree {tree}\n" + (f"parent {parent}\n" if parent else "") + f"author {stamp}\ncommitter {stamp}\n\n"
        body += title + ("\n\n" + message if message else "") + "\n"
        raw = body.encode()
        commit_id = hashlib.sha1(b"commit %d\0" % len(raw) + raw).hexdigest()
        commit = Commit(commit_id, parent, title, message, date, author, dict(files))
        repo.commits.setdefault(commit_id, commit)
        return repo.commits[commit_id]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:  # e.g. a client hanging up mid-answer
        if os.environ.get("PEM_HUB_DEBUG"):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.0"  # one request per connection: a stopped server is really gone
    server_version = "pem-test-hub/1.0"

    # ---------------------------------------------------------------- plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if os.environ.get("PEM_HUB_DEBUG"):
            sys.stderr.write("[test hub] " + (format % args) + "\n")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _body(self) -> bytes:
        if getattr(self, "_cached_body", None) is None:
            self._cached_body = self._read_body()
        return self._cached_body

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json; charset=utf-8", length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, err: HubError) -> None:
        headers = dict(err.headers)
        headers["X-Error-Message"] = err.message
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        self._json(err.status, {"error": err.message, **err.extra}, headers)

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(split.query, keep_blank_values=True).items()}
        segments = split.path.split("/")[1:]  # raw (still quoted) segments
        with hub._lock:
            hub.requests.append((method, self.path))
        try:
            if method not in ("GET", "HEAD"):
                self._body()  # always drain the request body, even when answering an error
            self._check_token()
            self._route(method, segments, query, split)
        except HubError as err:
            self._error(err)
        except Exception as exc:  # a bug in the test server: make it loud but keep serving
            if os.environ.get("PEM_HUB_DEBUG"):
                traceback.print_exc()
            # 501, not 500: the client retries 5xx answers with backoff for ~30 s, but not 501
            self._json(501, {"error": f"test server error: {exc.__class__.__name__}: {exc}"})

    def _check_token(self) -> None:
        valid = self.hub._valid_tokens
        if valid is None:
            return
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else None
        if token not in valid:
            raise HubError(401, INVALID_CREDENTIALS)

    # ----------------------------------------------------------------- routing
    def _route(self, method: str, seg: list[str], query: dict[str, str], split: Any) -> None:
        n = len(seg)
        if seg[:1] == ["api"]:
            if method == "GET" and seg == ["api", "whoami-v2"]:
                return self._whoami()
            if method == "POST" and seg == ["api", "repos", "create"]:
                return self._create_repo()
            if method == "POST" and seg == ["api", "validate-yaml"]:
                return self._json(200, {"errors": [], "warnings": []})
            if n >= 4 and seg[1] == "models":
                repo_id = unquote(seg[2]) + "/" + unquote(seg[3])
                rest = seg[4:]
                if method == "GET" and not rest:
                    return self._model_info(repo_id, None, query)
                if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                    return self._model_info(repo_id, unquote(rest[1]), query)
                if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                    path = unquote("/".join(rest[2:])).strip("/")
                    return self._tree(repo_id, unquote(rest[1]), path, query, split)
                if method == "GET" and rest == ["refs"]:
                    return self._refs(repo_id, query)
                if method == "GET" and len(rest) == 2 and rest[0] == "commits":
                    return self._commits(repo_id, unquote(rest[1]))
                if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                    return self._preupload(repo_id, unquote(rest[1]))
                if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
                    return self._paths_info(repo_id, unquote(rest[1]))
                if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                    return self._commit(repo_id, unquote(rest[1]), query)
                if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                    return self._create_branch(repo_id, unquote(rest[1]))
                if method == "DELETE" and len(rest) == 2 and rest[0] == "branch":
                    return self._delete_branch(repo_id, unquote(rest[1]))
        elif method in ("GET", "HEAD") and n >= 5 and seg[2] == "resolve" and seg[0] not in ("datasets", "spaces"):
            repo_id = unquote(seg[0]) + "/" + unquote(seg[1])
            return self._resolve_file(repo_id, unquote(seg[3]), unquote("/".join(seg[4:])))
        raise HubError(404, f"not implemented in test server: {method} {split.path}")

    def _get_repo(self, repo_id: str) -> _Repo:
        repo = self.hub._repos.get(repo_id)
        if repo is None:
            raise _repo_not_found()
        return repo

    def _get_commit(self, repo: _Repo, revision: str) -> Commit:
        commit_id = repo.resolve(revision)
        if commit_id is None:
            raise _revision_not_found(revision)
        return repo.commits[commit_id]

    # --------------------------------------------------------------- endpoints
    def _whoami(self) -> None:
        hub = self.hub
        self._json(200, {
            "type": "user", "id": "0" * 24, "name": hub.user, "fullname": hub.user,
            "email": f"{hub.user}@users.noreply.test", "emailVerified": True, "isPro": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
        })

    def _create_repo(self) -> None:
        hub = self.hub
        payload = json.loads(self._body() or b"{}")
        repo_type = payload.get("type") or "model"
        if repo_type != "model":
            raise HubError(400, f"not implemented in test server: repo type {repo_type!r}")
        name = payload.get("name")
        if not name:
            raise HubError(400, "name is required")
        repo_id = f"{payload.get('organization') or hub.user}/{name}"
        url = f"{hub.url}/{repo_id}"
        with hub._lock:
            if repo_id in hub._repos:
                # the client reads "url" from this body even with exist_ok=True
                raise HubError(409, "You already created this model repo", extra={"url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            hub._create_repo(repo_id, private)
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _model_info(self, repo_id: str, revision: str | None, query: dict[str, str]) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_id)
            commit = self._get_commit(repo, revision or "main")
            blobs = query.get("blobs", "").lower() in ("1", "true")
            siblings = []
            for path in sorted(commit.files):
                sibling: dict[str, Any] = {"rfilename": path}
                if blobs:
                    sibling.update(size=len(commit.files[path]), blobId=git_blob_oid(commit.files[path]))
                siblings.append(sibling)
            info = {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "author": repo_id.split("/")[0], "sha": commit.id, "lastModified": _iso(commit.date),
                "createdAt": _iso(repo.created), "private": repo.private, "gated": False, "disabled": False,
                "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            }
        self._json(200, info)

    @staticmethod
    def _tree_entries(commit: Commit, path: str, recursive: bool) -> list[dict[str, Any]] | None:
        files = commit.files
        if path and path in files:
            return None  # a file, not a folder
        nested = _nest(files, path)
        if path and not nested:
            return None
        out: list[dict[str, Any]] = []

        def walk(node: dict[str, Any], prefix: str) -> None:
            for name in sorted(node):
                value, full = node[name], prefix + name
                if isinstance(value, dict):
                    out.append({"type": "directory", "oid": _git_tree_oid(value), "size": 0, "path": full})
                    if recursive:
                        walk(value, full + "/")
                else:
                    out.append({"type": "file", "oid": git_blob_oid(value), "size": len(value), "path": full})

        walk(nested, path + "/" if path else "")
        return out

    def _tree(self, repo_id: str, revision: str, path: str, query: dict[str, str], split: Any) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_id)
            commit = self._get_commit(repo, revision)
            recursive = query.get("recursive", "").lower() in ("1", "true")
            entries = self._tree_entries(commit, path, recursive)
        if entries is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        expanded = query.get("expand", "").lower() in ("1", "true")
        size = TREE_PAGE_SIZE_EXPANDED if expanded else TREE_PAGE_SIZE
        start = int(query.get("cursor") or 0)
        page, headers = entries[start:start + size], {}
        if start + size < len(entries):
            next_query = urlencode({**query, "cursor": str(start + size)})
            headers["Link"] = f'<{self.hub.url}{split.path}?{next_query}>; rel="next"'
        self._json(200, page, headers)

    def _paths_info(self, repo_id: str, revision: str) -> None:
        body = self._body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body or "{}").get("paths", [])
        else:
            paths = parse_qs(body).get("paths", [])
        with self.hub._lock:
            commit = self._get_commit(self._get_repo(repo_id), revision)
            out = []
            for path in paths:
                path = path.strip("/")
                if path in commit.files:
                    data = commit.files[path]
                    out.append({"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path})
                elif (nested := _nest(commit.files, path)):
                    out.append({"type": "directory", "oid": _git_tree_oid(nested), "size": 0, "path": path})
        self._json(200, out)

    def _refs(self, repo_id: str, query: dict[str, str]) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_id)
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": target}
                for name, target in sorted(repo.branches.items())
            ]
            prs = [
                {"name": f"refs/pr/{num}", "ref": f"refs/pr/{num}", "targetCommit": target}
                for num, target in sorted(repo.pull_requests.items())
            ]
        self._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def _commits(self, repo_id: str, revision: str) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_id)
            commit = self._get_commit(repo, revision)
            history = repo.history(commit.id)
        self._json(200, [
            {"id": c.id, "title": c.title, "message": c.message, "date": _iso(c.date), "authors": [{"user": c.author}]}
            for c in history
        ])

    def _preupload(self, repo_id: str, revision: str) -> None:
        payload = json.loads(self._body() or b"{}")
        with self.hub._lock:
            repo = self._get_repo(repo_id)
            commit_id = repo.resolve(revision)
            if commit_id is None:
                raise _revision_not_found(revision)
            remote = repo.commits[commit_id].files
            files = [
                {
                    "path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                    "oid": git_blob_oid(remote[item["path"]]) if item["path"] in remote else None,
                }
                for item in payload.get("files", [])
            ]
        self._json(200, {"files": files, "commitOid": commit_id})

    def _commit(self, repo_id: str, revision: str, query: dict[str, str]) -> None:
        hub = self.hub
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise HubError(400, "The commit has no header with a summary")
        create_pr = query.get("create_pr", "") in ("1", "true", "True")
        with hub._lock:
            repo = self._get_repo(repo_id)
            pr_match = PR_REF.match(revision)
            branch = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
            if pr_match and int(pr_match.group(1)) in repo.pull_requests:
                head = repo.pull_requests[int(pr_match.group(1))]
            elif branch in repo.branches:
                head = repo.branches[branch]
            else:
                raise _revision_not_found(revision)
            parent_commit = header.get("parentCommit")
            if parent_commit:
                matches = [cid for cid in repo.commits if cid.startswith(parent_commit)]
                if len(matches) != 1:
                    raise _revision_not_found(parent_commit)
                if create_pr:
                    head = matches[0]
                elif matches[0] != head:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[head].files)
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "header":
                    continue
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                    tree[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in tree:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del tree[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    doomed = [p for p in tree if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    for p in doomed:
                        del tree[p]
                else:
                    raise HubError(400, f"not implemented in test server: commit operation {key!r} (LFS/Xet)")
            commit = hub._commit(repo, head, tree, header["summary"], header.get("description") or "", hub.user)
            pr_url = None
            if create_pr:
                number = max([0, *repo.pull_requests]) + 1
                repo.pull_requests[number] = commit.id
                pr_url = f"{hub.url}/{repo_id}/discussions/{number}"
            elif pr_match:
                repo.pull_requests[int(pr_match.group(1))] = commit.id
            else:
                repo.branches[branch] = commit.id
        self._json(200, {
            "success": True, "commitOid": commit.id, "commitUrl": f"{hub.url}/{repo_id}/commit/{commit.id}",
            "commitMessage": commit.title, "pullRequestUrl": pr_url, "hookOutput": "",
        })

    def _create_branch(self, repo_id: str, branch: str) -> None:
        payload = json.loads(self._body() or b"{}")
        with self.hub._lock:
            repo = self._get_repo(repo_id)
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = payload.get("startingPoint") or "main"
            commit_id = repo.resolve(start)
            if commit_id is None:
                raise _revision_not_found(start)
            repo.branches[branch] = commit_id
        self._json(200, {})

    def _delete_branch(self, repo_id: str, branch: str) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_id)
            if branch not in repo.branches:
                raise _revision_not_found(branch)
            if branch == "main":
                raise HubError(403, "You cannot delete the default branch")
            del repo.branches[branch]
        self._json(200, {})

    def _resolve_file(self, repo_id: str, revision: str, path: str) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_id)
            commit = self._get_commit(repo, revision)
            data = commit.files.get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.id})
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{git_blob_oid(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        status, body = 200, data
        range_header = self.headers.get("Range")
        if range_header and self.command == "GET":
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    first = int(match.group(1))
                    last = min(int(match.group(2)), len(data) - 1) if match.group(2) else len(data) - 1
                else:
                    first, last = max(len(data) - int(match.group(2)), 0), len(data) - 1
                if first >= len(data) or first > last:
                    raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
                status, body = 206, data[first:last + 1]
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        self._send(status, body, headers, content_type="application/octet-stream")


@contextlib.contextmanager
def running_hub(user: str = "test-user") -> Iterator[HubServer]:
    """A started :class:`HubServer`, stopped on exit: ``with running_hub() as hub: ...``."""
    hub = HubServer(user=user).start()
    try:
        yield hub
    finally:
        hub.stop()
