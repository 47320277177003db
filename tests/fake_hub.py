"""A small fake Hugging Face Hub on 127.0.0.1, for testing the real huggingface_hub client offline.

It implements just what ``HfApi.create_repo / create_branch / upload_folder / model_info /
list_repo_tree`` and ``snapshot_download / hf_hub_download`` call, with the Hub's answers
(JSON shapes, ``X-Error-Code`` headers, ``X-Repo-Commit`` / ``ETag`` download headers):

* ``POST /api/repos/create``                          create a repo (409 + url if it exists)
* ``GET  /api/models/{ns}/{name}[/revision/{rev}]``   model info, with ``siblings`` and ``sha``
* ``GET  /api/models/{ns}/{name}/tree/{rev}``         the file listing (huggingface_hub 2.x downloads)
* ``GET  /api/models/{ns}/{name}/refs``               branches
* ``POST /api/models/{ns}/{name}/branch/{branch}``    create a branch (409 if it exists)
* ``POST /api/validate-yaml``                         README.md front matter check (PyYAML)
* ``POST /api/models/{ns}/{name}/preupload/{rev}``    upload modes: lfs for weights, regular otherwise
* ``POST /{ns}/{name}.git/info/lfs/objects/batch``    Git LFS batch API, "basic" transfer
* ``PUT  /lfs-upload/{oid}``, ``POST /lfs-verify/{oid}``   LFS object upload (sha256-checked) and verify
* ``POST /api/models/{ns}/{name}/commit/{rev}``       ndjson commit: file (base64), lfsFile, deletedFile
* ``HEAD/GET /{ns}/{name}/resolve/{rev}/{path}``      downloads (ETag, X-Repo-Commit, Content-Length)

Xet: huggingface_hub uploads through the Xet protocol whenever ``hf_xet`` is installed (2.x has no
fallback on the server's answer). This server does not speak Xet; tests set
``huggingface_hub.constants.HF_HUB_DISABLE_XET = True`` (what ``HF_HUB_DISABLE_XET=1`` sets at
import) so that the client uses the LFS protocol. Downloads use Xet only when the server sends
``X-Xet-Hash``, which this one never does.

Authentication: with ``token`` set, a request carrying another bearer token gets the Hub's 401
("Invalid credentials in Authorization header"); writes need the token. Failures can be forced
with ``fail`` (status and error code for paths matching a prefix), or ``read_only`` repos (403 on
writes). Every request is recorded in ``requests`` (method, path, query) for assertions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    lfs_paths: set[str] = field(default_factory=set)
    messages: list[str] = field(default_factory=list)
    pull_requests: int = 0

    def new_commit(self, files: dict[str, bytes], branch: str, message: str) -> str:
        sha = secrets.token_hex(20)
        self.commits[sha] = files
        self.branches[branch] = sha
        self.messages.append(message)
        return sha

    def resolve(self, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        return None


class _Error(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHub:
    """``with FakeHub() as hub:`` serves on ``hub.url`` in a thread until the block ends."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.create_payloads: list[dict] = []
        self.commit_payloads: list[list[dict]] = []
        self.fail: list[tuple[str, int, str | None, str]] = []  # (path prefix, status, X-Error-Code, message)
        self.read_only: set[str] = set()
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: list[socket.socket] = []
        self._url: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open keep-alive connections: the Hub is gone for the client too."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._url is not None, "start() first"
        return self._url

    # ------------------------------------------------------------------ helpers for tests
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, branch: str = "main") -> str:
        repo = self.repos.setdefault(repo_id, Repo(repo_id, private=private))
        repo.lfs_paths |= {p for p, data in files.items() if p.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE}
        base = dict(repo.commits[repo.branches[branch]]) if branch in repo.branches else {}
        base.update(files)
        return repo.new_commit(base, branch, "add files")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(revision)])

    def paths_requested(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.requests if method is None or m == method]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def setup(self) -> None:
        super().setup()
        with self.hub.lock:
            self.hub._connections.append(self.connection)

    def log_message(self, format, *args) -> None:  # silence the per-request stderr log
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json",
              length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _auth(self) -> str | None:
        value = self.headers.get("Authorization", "")
        return value[7:] if value.lower().startswith("bearer ") else None

    def _dispatch(self) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        body = self._body() if self.command in ("POST", "PUT") else b""
        with hub.lock:
            hub.requests.append((self.command, path, query))
        try:
            for prefix, status, code, message in hub.fail:
                if path.startswith(prefix):
                    raise _Error(status, message, code)
            sent = self._auth()
            if hub.token is not None and sent is not None and sent != hub.token:
                raise _Error(401, "Invalid credentials in Authorization header", None,
                             {"X-Error-Message": "Invalid credentials in Authorization header"})
            self._route(split.path, path, query, body)
        except _Error as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers.setdefault("X-Error-Message", e.message)
            self._json(e.status, {"error": e.message}, headers)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _dispatch

    # ------------------------------------------------------------------ routing
    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        hub = self.hub
        repo = hub.repos.get(repo_id)
        authed = hub.token is None or self._auth() == hub.token
        if repo is None or (repo.private and not authed):
            # The Hub hides private repos behind 401 (anonymous) or 404 (another user): both RepoNotFound.
            raise _Error(401 if self._auth() is None else 404, "Repository not found", "RepoNotFound")
        if write:
            if not authed or self._auth() is None:
                raise _Error(401, "Invalid credentials in Authorization header", None,
                             {"X-Error-Message": "Invalid credentials in Authorization header"})
            if repo_id in hub.read_only:
                raise _Error(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _route(self, raw_path: str, path: str, query: dict, body: bytes) -> None:
        hub = self.hub
        parts = [unquote(p) for p in raw_path.strip("/").split("/")]
        method = self.command
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        if method == "PUT" and parts[0] == "lfs-upload":
            data = body
            if hashlib.sha256(data).hexdigest() != parts[1]:
                raise _Error(400, "sha256 of the uploaded object does not match its oid")
            with hub.lock:
                hub.lfs[parts[1]] = data
            return self._send(200)
        if method == "POST" and parts[0] == "lfs-verify":
            if parts[1] not in hub.lfs:
                raise _Error(404, "object not found")
            return self._json(200, {"success": True})
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if not rest and method == "GET":
                return self._model_info(repo_id, None)
            if rest[:1] == ["revision"] and method == "GET":
                return self._model_info(repo_id, rest[1])
            if rest[:1] == ["tree"] and method == "GET":
                return self._tree(repo_id, rest[1])
            if rest[:1] == ["refs"] and method == "GET":
                repo = self._repo(repo_id)
                return self._json(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                                                     for b, s in repo.branches.items()], "converts": [], "tags": []})
            if rest[:1] == ["branch"] and method == "POST":
                return self._branch(repo_id, rest[1], json.loads(body or b"{}"))
            if rest[:1] == ["preupload"] and method == "POST":
                return self._preupload(repo_id, rest[1], json.loads(body))
            if rest[:1] == ["commit"] and method == "POST":
                return self._commit(repo_id, rest[1], body, query)
        if len(parts) >= 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body))
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise _Error(404, f"fake hub: no route for {method} {path}")

    # ------------------------------------------------------------------ endpoints
    def _create_repo(self, payload: dict) -> None:
        hub = self.hub
        with hub.lock:
            hub.create_payloads.append(payload)
        if self._auth() is None or (hub.token is not None and self._auth() != hub.token):
            raise _Error(401, "Invalid credentials in Authorization header", None,
                         {"X-Error-Message": "Invalid credentials in Authorization header"})
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in hub.repos:
            if repo_id in hub.read_only:
                raise _Error(403, "You don't have the rights to create a model under this namespace")
            return self._json(409, {"error": "You already created this model repo", "url": url},
                              {"X-Error-Message": "You already created this model repo"})
        private = payload.get("private") is True or payload.get("visibility") == "private"
        repo = Repo(repo_id, private=private)
        repo.new_commit({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "main", "initial commit")
        with hub.lock:
            hub.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id, "id": secrets.token_hex(12)})

    def _validate_yaml(self, payload: dict) -> None:
        import yaml

        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            try:
                front = content.split("---", 2)[1]
                if not isinstance(yaml.safe_load(front), dict):
                    errors.append({"message": "metadata is not a mapping"})
            except (yaml.YAMLError, IndexError) as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _model_info(self, repo_id: str, revision: str | None) -> None:
        repo = self._repo(repo_id)
        sha = repo.resolve(revision or "main")
        if sha is None:
            raise _Error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = repo.commits[sha]
        self._json(200, {
            "_id": secrets.token_hex(12), "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": sha, "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": [], "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": name} for name in sorted(files)],
        })

    def _tree_entry(self, repo: Repo, name: str, data: bytes) -> dict:
        entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha(data)}
        if name in repo.lfs_paths:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _tree(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        sha = repo.resolve(revision)
        if sha is None:
            raise _Error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = repo.commits[sha]
        entries, folders = [], set()
        for name in sorted(files):
            parts = name.split("/")
            for i in range(1, len(parts)):
                folders.add("/".join(parts[:i]))
            entries.append(self._tree_entry(repo, name, files[name]))
        entries += [{"type": "directory", "path": f, "size": 0, "oid": hashlib.sha1(f.encode()).hexdigest()}
                    for f in sorted(folders)]
        self._json(200, entries)

    def _branch(self, repo_id: str, branch: str, payload: dict) -> None:
        repo = self._repo(repo_id, write=True)
        if branch in repo.branches:
            raise _Error(409, "Reference already exists")
        start = repo.resolve(payload.get("startingPoint") or "main")
        if start is None:
            raise _Error(404, "Invalid starting point", "RevisionNotFound")
        repo.branches[branch] = start
        self._json(200, {})

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
        repo = self._repo(repo_id, write=True)
        sha = repo.resolve(revision)
        current = repo.commits.get(sha, {}) if sha else {}
        files = []
        for f in payload["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
            old = current.get(f["path"])
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_blob_sha(old))
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._json(200, {"files": files, "commitOid": sha})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        self._repo(repo_id, write=True)
        assert payload["operation"] == "upload"
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.url}/lfs-verify/{obj['oid']}"},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _commit(self, repo_id: str, revision: str, body: bytes, query: dict) -> None:
        hub = self.hub
        repo = self._repo(repo_id, write=True)
        revision = unquote(revision)
        sha = repo.resolve(revision)
        if sha is None or revision not in repo.branches:
            raise _Error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with hub.lock:
            hub.commit_payloads.append(lines)
        files = dict(repo.commits[sha])
        message = ""
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                repo.lfs_paths.discard(value["path"])
            elif key == "lfsFile":
                if value["oid"] not in hub.lfs:
                    raise _Error(422, f"LFS object {value['oid']} was never uploaded")
                data = hub.lfs[value["oid"]]
                if len(data) != value["size"]:
                    raise _Error(422, "LFS object size mismatch")
                files[value["path"]] = data
                repo.lfs_paths.add(value["path"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _Error(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise _Error(400, f"unknown commit operation {key}")
        pr_url = None
        if query.get("create_pr") == ["1"]:
            repo.pull_requests += 1
            branch = f"refs/pr/{repo.pull_requests}"
            pr_url = f"{hub.url}/{repo_id}/discussions/{repo.pull_requests}"
        else:
            branch = revision
        new = repo.new_commit(files, branch, message)
        self._json(200, {"success": True, "commitOid": new, "commitUrl": f"{hub.url}/{repo_id}/commit/{new}",
                         "pullRequestUrl": pr_url, "hookOutput": ""})

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo(repo_id)
        sha = repo.resolve(revision)
        if sha is None:
            raise _Error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = repo.commits[sha]
        if filename not in files:
            raise _Error(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        data = files[filename]
        lfs = filename in repo.lfs_paths
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha(data)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        status, body = 200, data
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and self.command == "GET":
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(data) - 1
            body = data[start:end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, body, headers, content_type="application/octet-stream", length=len(body))

