"""A local stand-in for the Hugging Face hub, for the tests of `kimi-desk pull` (the real hub cannot be
reached from the test machines, and must not be relied on by tests anyway).

It serves, on 127.0.0.1 only, what huggingface-hub 2.x asks for (read from its source: hf_api.py
`model_info`, file_download.py `get_hf_file_metadata` / `http_get`, utils/_http.py `hf_raise_for_status`):

    GET  /api/models/{owner}/{name}[/revision/{rev}]     model info: sha, siblings with size/blobId/lfs
    HEAD /{owner}/{name}/resolve/{rev}/{file}             X-Repo-Commit, ETag, Content-Length
    GET  /{owner}/{name}/resolve/{rev}/{file}             the bytes (Range supported)
    HEAD/GET /cdn/{sha256}                                LFS files, as the hub's CDN serves them

As on the real hub, an LFS file's resolve URL answers 302 to the CDN with X-Linked-Etag (its sha256),
X-Linked-Size and X-Repo-Commit; the CDN is addressed as `localhost` instead of `127.0.0.1`, a different
host name for the same server, so huggingface-hub treats it as the off-hub host it is in reality (it
stops at the 302 and strips the token). Errors carry the hub's X-Error-Code (RepoNotFound, GatedRepo,
RevisionNotFound, EntryNotFound).

Faults for the tests: `drop_once(file, after_bytes, then_down)` closes the connection mid-file on the
next GET of that file (and optionally answers 503 to everything until `up()`); `stall(file, after_bytes)`
answers every GET of that file (resumed ones too) with the headers and its bytes up to `after_bytes`,
then nothing more, the connection left open; `silence(file)` never answers a request for that file;
`corrupt(file)` serves other bytes than the listing's checksum. Every request is logged in `requests`.
The server shuts itself down after `lifetime` seconds even if a test forgets to.

`SilentHub` is a server that accepts connections, reads the request and never answers.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model")


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    token: str | None  # the bearer token sent, if any


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    gated: bool = False
    revisions: dict[str, str] = field(default_factory=dict)

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HubStandIn:
    def __init__(self, lifetime: float = 120.0):
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.down = False
        self._drops: dict[str, tuple[int, bool]] = {}
        self._stalls: dict[str, int] = {}
        self._silenced: set[str] = set()
        self._closing = threading.Event()
        self._corrupt: set[str] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.standin = self
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn_url = f"http://localhost:{self.port}/cdn"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(lifetime, self.close)
        self._timer.daemon = True
        self._timer.start()

    # -- content --------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes] | Path,
        *,
        gated: bool = False,
        extra: dict[str, bytes] | None = None,
    ) -> str:
        """Serve `files` (a dict, or every file of a folder) plus `extra` as repo_id@main; returns the commit."""
        if isinstance(files, Path):
            files = {p.name: p.read_bytes() for p in sorted(files.iterdir()) if p.is_file()}
        files = {**files, **(extra or {})}
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name])
        commit = digest.hexdigest()
        self.repos[repo_id] = Repo(files, commit, gated, {"main": commit, commit: commit})
        return commit

    def drop_once(self, filename: str, after_bytes: int, then_down: bool = False) -> None:
        self._drops[filename] = (after_bytes, then_down)

    def stall(self, filename: str, after_bytes: int) -> None:
        self._stalls[filename] = after_bytes

    def silence(self, filename: str) -> None:
        self._silenced.add(filename)

    def corrupt(self, filename: str) -> None:
        self._corrupt.add(filename)

    def up(self) -> None:
        self.down = False

    def requests_for(self, filename: str, method: str | None = None) -> list[Request]:
        """Requests that touched `filename` (its resolve URL, or its bytes on the CDN)."""
        digest = self._sha_of(filename)
        return [
            r
            for r in self.requests
            if (method is None or r.method == method)
            and (("/resolve/" in r.path and r.path.endswith("/" + filename)) or r.path == f"/cdn/{digest}")
        ]

    def _sha_of(self, filename: str) -> str | None:
        for repo in self.repos.values():
            if filename in repo.files:
                return sha256(repo.files[filename])
        return None

    def close(self) -> None:
        self._timer.cancel()
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    @property
    def hub(self) -> HubStandIn:
        return self.server.standin

    def do_HEAD(self):
        self._handle(body=False)

    def do_GET(self):
        self._handle(body=True)

    # -- replies --------------------------------------------------------------------------------

    def _send_headers(self, status: int, headers: dict[str, str], length: int):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send(self, status: int, headers: dict[str, str] | None = None, payload: bytes = b"", body: bool = True):
        self._send_headers(status, headers or {}, len(payload))
        if body and payload:
            self.wfile.write(payload)

    def _error(self, status: int, code: str, message: str, body: bool, commit: str | None = None):
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, headers, json.dumps({"error": message}).encode(), body)

    def _handle(self, body: bool):
        path = unquote(urlsplit(self.path).path)
        authorization = self.headers.get("Authorization") or ""
        token = authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else None
        self.hub.requests.append(Request(self.command, path, self.headers.get("Range"), token))
        if self.hub.down:
            return self._send(503, {"Content-Type": "text/plain"}, b"down for maintenance", body)
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve" and "/".join(parts[4:]) in self.hub._silenced:
            self.hub._closing.wait()  # a request that is never answered
            self.close_connection = True
            return
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._model_info(
                "/".join(parts[2:4]), parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main", body
            )
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        if len(parts) == 2 and parts[0] == "cdn":
            return self._cdn(parts[1], body)
        return self._send(404, {"Content-Type": "text/plain"}, b"not found", body)

    def _lookup(self, repo_id: str, revision: str, body: bool) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", body)
            return None
        if repo.gated and not self.headers.get("Authorization", "").startswith("Bearer "):
            self._error(401, "GatedRepo", "Access to this model is restricted; you must be authenticated.", body)
            return None
        if revision not in repo.revisions:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, body)
            return None
        return repo

    def _model_info(self, repo_id: str, revision: str, body: bool):
        repo = self._lookup(repo_id, revision, body)
        if repo is None:
            return
        siblings = []
        for name, data in sorted(repo.files.items()):
            sibling = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
            if repo.is_lfs(name):
                sibling["lfs"] = {"size": len(data), "sha256": sha256(data), "pointerSize": 134}
            siblings.append(sibling)
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.revisions[revision],
            "private": False,
            "gated": repo.gated,
            "siblings": siblings,
        }
        self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)

    def _resolve(self, repo_id: str, revision: str, filename: str, body: bool):
        repo = self._lookup(repo_id, revision, body)
        if repo is None:
            return
        commit = repo.revisions[revision]
        if filename not in repo.files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist", body, commit)
        data = repo.files[filename]
        if repo.is_lfs(filename):
            digest = sha256(data)
            return self._send(
                302,
                {
                    "Location": f"{self.hub.cdn_url}/{digest}",
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{digest}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_blob_id(data)}"',
                },
                b"",
                body,
            )
        self._bytes(filename, data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"'}, body)

    def _cdn(self, digest: str, body: bool):
        for repo in self.hub.repos.values():
            for name, data in repo.files.items():
                if repo.is_lfs(name) and sha256(data) == digest:
                    return self._bytes(name, data, {"ETag": f'"{digest}"'}, body)
        return self._send(404, {"Content-Type": "text/plain"}, b"no such object", body)

    def _bytes(self, filename: str, data: bytes, headers: dict[str, str], body: bool):
        if filename in self.hub._corrupt:
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start, status = 0, 200
        wanted = self.headers.get("Range")
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if wanted and wanted.startswith("bytes=") and body:
            first, _, last = wanted[len("bytes=") :].partition("-")
            start = int(first)
            end = int(last) + 1 if last else len(data)
            if start >= len(data):
                return self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            data, status = data[start:end], 206
        stall = self.hub._stalls.get(filename) if body else None
        if stall is not None:
            self._send_headers(status, headers, len(data))
            self.wfile.write(data[: max(stall - start, 0)])  # up to the same place in the file, every time
            self.wfile.flush()
            self.hub._closing.wait()  # a server that has stopped sending, the connection still open
            self.close_connection = True
            return
        drop = self.hub._drops.pop(filename, None) if body else None
        if drop is None:
            return self._send(status, headers, data, body)
        after_bytes, then_down = drop
        self._send_headers(status, headers, len(data))
        self.wfile.write(data[:after_bytes])
        self.wfile.flush()
        if then_down:
            self.hub.down = True
        # A dropped connection, as when the network goes away mid-file.
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


class SilentHub:
    """Accepts connections on 127.0.0.1 and never answers them: a hub behind a proxy
    that has hung. `url` is its address; `connections` counts the connections it accepted."""

    def __init__(self, lifetime: float = 60.0):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        self._open: list[socket.socket] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(lifetime, self.close)
        self._timer.daemon = True
        self._timer.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            self._open.append(connection)  # kept open, never answered

    def close(self) -> None:
        self._timer.cancel()
        self._closing.set()
        self._thread.join()
        for connection in self._open:
            connection.close()
        self._listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
