"""A local stand-in for the Hugging Face Hub, speaking the HTTP huggingface-hub 2.4 uses.

Two servers on 127.0.0.1 (ports picked by the OS): the hub, and a "CDN" on another port,
so a resolve URL redirects to another origin the way huggingface.co's do. huggingface-hub
then reads the file metadata from the redirect response itself and drops the
Authorization header before following it, as it does against the real hub.

Hub endpoints (what ``HfApi.model_info``, ``list_repo_tree``, ``get_paths_info``,
``get_hf_file_metadata`` and ``http_get`` call):

    GET  /api/models/{org}/{name}[/revision/{rev}]  repo info; ?blobs=True adds size and lfs
    GET  /api/models/{org}/{name}/tree/{rev}        file listing
    POST /api/models/{org}/{name}/paths-info/{rev}  listing of some paths
    HEAD /{org}/{name}/resolve/{rev}/{path}         302 + X-Repo-Commit, X-Linked-Etag,
    GET  /{org}/{name}/resolve/{rev}/{path}         X-Linked-Size, ETag, Location
    HEAD /cdn/{sha256}, GET with or without Range   the bytes (CDN server)

Errors carry the hub's X-Error-Code header (RepoNotFound, EntryNotFound, GatedRepo),
which is how huggingface-hub tells them apart. Faults for tests: drop the connection
after N bytes (once), stall after N bytes until released, corrupt one byte. Every
request is recorded with its Range and Authorization headers, and the bytes served
per file are counted.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

GOOD_TOKEN = "hf_test_token_with_access"
_CHUNK = 1 << 20
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(8 << 20):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


@dataclass
class HubEntry:
    """One file of a fake repo: its bytes on disk and what the hub says about it."""

    path: str
    source: Path
    sha256: str
    size: int  # what the hub reports (may differ from the source, to fake a huge file)


@dataclass
class FakeRepo:
    repo_id: str
    commit: str
    files: dict[str, HubEntry]
    gated: bool = False


@dataclass(frozen=True)
class Recorded:
    server: str  # hub | cdn
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeHub:
    """The servers, their repos, the faults to inject and what they saw."""

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    bytes_served: Counter[str] = field(default_factory=Counter)  # by sha256
    drop_after: int | None = None  # next CDN GET: close the connection after N body bytes
    stall_after: int | None = None  # next CDN GET: stop after N body bytes until released
    corrupt_offset: int | None = None  # flip this byte in every body that covers it
    release: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _servers: list[ThreadingHTTPServer] = field(default_factory=list)

    # -- setup
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, Path],
        *,
        gated: bool = False,
        reported_sizes: dict[str, int] | None = None,
    ) -> FakeRepo:
        entries = {}
        for name, source in files.items():
            size = (reported_sizes or {}).get(name, source.stat().st_size)
            entries[name] = HubEntry(name, source, file_sha256(source), size)
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        repo = FakeRepo(repo_id, commit, entries, gated)
        self.repos[repo_id.lower()] = repo
        return repo

    def start(self) -> FakeHub:
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.fake_hub = self  # type: ignore[attr-defined]
            server.role = role  # type: ignore[attr-defined]
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        self.release.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # -- what tests look at
    def cdn_gets(self) -> list[Recorded]:
        return [r for r in self.requests if r.server == "cdn" and r.method == "GET"]

    def find(self, sha256: str) -> HubEntry | None:
        for repo in self.repos.values():
            for entry in repo.files.values():
                if entry.sha256 == sha256:
                    return entry
        return None


_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_API = re.compile(r"^/api/models/([^/]+/[^/]+?)(?:/(revision|tree|paths-info)/([^/]+))?/?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.fake_hub

    def _record(self) -> None:
        with self.hub.lock:
            self.hub.requests.append(
                Recorded(
                    self.server.role,
                    self.command,
                    self.path,
                    self.headers.get("Range"),
                    self.headers.get("Authorization"),
                )
            )

    # -- plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self._send(200, body, {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None):
        headers = {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})}
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"Content-Type": "application/json", **headers})

    def _repo(self, repo_id: str) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id.lower())
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _authorized(self, repo: FakeRepo) -> bool:
        if not repo.gated:
            return True
        auth = self.headers.get("Authorization")
        if auth == f"Bearer {GOOD_TOKEN}":
            return True
        if auth is None:
            self._error(
                401,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted. You must have access to it "
                "and be authenticated to access it. Please log in.",
            )
        else:
            self._error(
                403,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted and you are not in the "
                "authorized list. Visit the repo page to ask for access.",
            )
        return False

    # -- verbs
    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._record()
        url = urlsplit(self.path)
        path = unquote(url.path)
        if self.server.role == "cdn":
            return self._cdn(path)
        if match := _API.match(path):
            return self._api(match.group(1), match.group(2), parse_qs(url.query))
        if match := _RESOLVE.match(path):
            return self._resolve(match.group(1), match.group(2), match.group(3))
        self._error(404, "NotFound", f"no route for {path}")

    # -- hub
    def _file_json(self, entry: HubEntry, *, tree: bool) -> dict[str, Any]:
        blob = hashlib.sha1(entry.sha256.encode()).hexdigest()
        lfs_key = "oid" if tree else "sha256"
        data = {
            "size": entry.size,
            "lfs": {lfs_key: entry.sha256, "size": entry.size, "pointerSize": 135},
        }
        if tree:
            return {"type": "file", "oid": blob, "path": entry.path, **data}
        return {"rfilename": entry.path, "blobId": blob, **data}

    def _api(self, repo_id: str, kind: str | None, query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if kind == "tree":
            return self._json([self._file_json(e, tree=True) for e in repo.files.values()])
        if kind == "paths-info":
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            wanted = set(form.get("paths", []))
            return self._json(
                [self._file_json(e, tree=True) for e in repo.files.values() if e.path in wanted]
            )
        with_blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [
            self._file_json(e, tree=False) if with_blobs else {"rfilename": e.path}
            for e in repo.files.values()
        ]
        siblings.append({"rfilename": "README.md", **({"size": 120} if with_blobs else {})})
        self._json(
            {
                "_id": repo.commit[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": repo.commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": ["gguf"],
                "siblings": siblings,
            }
        )

    def _resolve(self, repo_id: str, revision: str, file_path: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if not self._authorized(repo):
            return
        entry = repo.files.get(file_path)
        if entry is None:
            return self._error(
                404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.commit}
            )
        self._send(
            302,
            b"",
            {
                "Location": f"{self.hub.cdn}/cdn/{entry.sha256}",
                "X-Repo-Commit": repo.commit,
                "X-Linked-Etag": f'"{entry.sha256}"',
                "X-Linked-Size": str(entry.size),
                "ETag": f'"{hashlib.sha1(entry.sha256.encode()).hexdigest()}"',
            },
        )

    # -- cdn
    def _cdn(self, path: str) -> None:
        sha = path.removeprefix("/cdn/")
        entry = self.hub.find(sha)
        if entry is None:
            return self._send(404, b"not found")
        size = entry.source.stat().st_size
        start, end = 0, size - 1
        status = 200
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": f'"{entry.sha256}"',
            "Content-Type": "application/octet-stream",
        }
        if requested := self.headers.get("Range"):
            match = _RANGE.match(requested)
            if match is None or int(match.group(1)) >= size:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        with self.hub.lock:
            drop, self.hub.drop_after = self.hub.drop_after, None
            stall, self.hub.stall_after = self.hub.stall_after, None
        limit = drop if drop is not None else stall
        sent = 0
        try:
            with entry.source.open("rb") as fh:
                fh.seek(start)
                while sent < length:
                    if limit is not None and sent >= limit:
                        break
                    want = min(_CHUNK, length - sent)
                    if limit is not None:
                        want = min(want, limit - sent)
                    chunk = bytearray(fh.read(want))
                    offset = self.hub.corrupt_offset
                    if offset is not None and start + sent <= offset < start + sent + len(chunk):
                        chunk[offset - start - sent] ^= 0xFF
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    with self.hub.lock:
                        self.hub.bytes_served[entry.sha256] += len(chunk)
            if sent < length:
                self.wfile.flush()
                if stall is not None:
                    self.hub.stalled.set()
                    self.hub.release.wait(timeout=120)
                # Cut the connection mid-body, as a dropped network would.
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
