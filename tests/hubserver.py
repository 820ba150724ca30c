"""A Hugging Face Hub-compatible HTTP server on loopback, for tests and benchmarks (standard library only).

It serves real files from disk per repo and revision, with the endpoints ``huggingface_hub`` 2.x calls for what
mertools does (read from the library's own source, ``hf_api.py``, ``file_download.py``, ``_commit_api.py``, ``lfs.py``):

- ``GET /api/models/{repo}[/revision/{rev}]``            repo info (``sha``, ``siblings``)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``         tree listing (``recursive``), LFS ``oid`` = sha256
- ``POST /api/models/{repo}/paths-info/{rev}``           form field ``paths`` (repeated)
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``              ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``,
                                                          ``X-Linked-Size``, single ``Range: bytes=a-b``
- ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{branch}``
- ``POST /api/models/{repo}/preupload/{rev}``            ``uploadMode`` lfs for binary or large files
- ``POST /{repo}.git/info/lfs/objects/batch``            basic transfer; no ``actions`` when the object is stored
- ``PUT /lfs-upload/{oid}``                              the object's bytes (sha256 checked)
- ``POST /api/models/{repo}/commit/{rev}``               NDJSON header/file/lfsFile lines; 412 when the header's
  ``parentCommit`` is not the branch's head
- ``POST /api/validate-yaml``

Fault injection (:meth:`HubServer.fault`): cut the connection after N body bytes, corrupt a byte, answer 5xx N
times, or send slowly; and a hub that lies or attacks (each kind documented on :class:`Fault`): answers that never
come (``hang``), redirects (``redirect``), raw or edited JSON (``body``, ``json``), a Range ignored (``norange``),
a Content-Length that lies (``declare``), bytes past the body (``extra``, ``nolength``), a wrong ETag (``etag``), an
LFS pointer for the file (``pointer``), the branch's bytes for a pinned commit (``ignore_rev``), a callback on a
request (``hook``), JSON gzip-compressed when the client accepts it, as a CDN does (``gzip``), an answer that
trickles one byte at a time for ever (``trickle``), and a download that stops after N bytes until the client has
gone (``stall``). Counters: body bytes served per (repo, path), requests, request headers, LFS uploads per oid.

>>> with HubServer() as hub:                                      # doctest: +SKIP
...     sha = hub.add_revision("org/model", {"model.gguf": Path("fixtures/real/mixtral-q4_0.gguf")})
...     os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import base64
import fnmatch
import gzip
import hashlib
import json
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 64 << 10
LFS_THRESHOLD = 1 << 20  # the real hub stores binary or large files in LFS; small text files in git


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    """One file version: on disk (served by streaming) or in memory."""

    size: int
    sha256: str
    git_oid: str
    lfs: bool
    path: Path | None = None
    data: bytes | None = None

    @classmethod
    def of(cls, src: Path | bytes, lfs: bool | None = None) -> "Blob":
        if isinstance(src, (bytes, bytearray)):
            data = bytes(src)
            return cls._make(len(data), hashlib.sha256(data).hexdigest(), data[:8192], None, data, lfs)
        p = Path(src)
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            head = fh.read(8192)
            h.update(head)
            while b := fh.read(8 << 20):
                h.update(b)
        return cls._make(p.stat().st_size, h.hexdigest(), head, p, None, lfs)

    @classmethod
    def _make(cls, size: int, sha256: str, head: bytes, path: Path | None, data: bytes | None,
              lfs: bool | None = None) -> "Blob":
        if lfs is None:
            lfs = size >= LFS_THRESHOLD or b"\0" in head
        if lfs:
            # the git object of an LFS file is its pointer; its sha1 is what the tree's "oid" holds
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
            git_oid = git_blob_sha1(pointer)
        else:
            git_oid = git_blob_sha1(data if data is not None else path.read_bytes())  # type: ignore[union-attr]
        return cls(size, sha256, git_oid, lfs, path, data)

    def open(self):  # noqa: ANN201
        import io

        return io.BytesIO(self.data) if self.data is not None else open(self.path, "rb")  # type: ignore[arg-type]

    def read(self) -> bytes:
        with self.open() as fh:
            return fh.read()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Fault:
    """An injected failure on matching requests. ``times`` None: every time."""

    kind: str
    pattern: str  # fnmatch over the request path, e.g. "*/resolve/*/model-00002*"
    times: int | None = 1
    # cut: body bytes sent before the connection is closed; corrupt: offset of the flipped byte;
    # declare: added to the true Content-Length (negative: less; the body sent is the shorter of the two, then the
    # connection closes); extra / nolength: junk bytes written after the body (nolength: no Content-Length, the body
    # ends when the connection closes)
    after: int = 0
    status: int = 503  # error: the status; redirect: 301/302/307/308
    delay: float = 0.0  # slow: seconds per chunk; hang: longest wait before the connection is closed unanswered
    headers: dict[str, str] = field(default_factory=dict)  # error, redirect: extra response headers
    body: bytes = b""  # body: the raw bytes answered (200, application/json) instead of the real answer
    location: str = ""  # redirect: Location ("{url}" is the server's base URL, "{path}" the request's path)
    edit: Any = None  # json: edit(value) -> value, applied to a JSON answer; hook: call(handler) before handling
    value: str = ""  # etag: the ETag sent
    # gzip: every matching JSON answer, no budget used; trickle: one byte every ``delay`` s until the client goes
    # (a 200 with no Content-Length); cap: a 206 holds at most ``after`` bytes, its Content-Range and Content-Length
    # saying so (a server or CDN that caps range answers);
    # stall: after ``after`` body bytes of a download, wait (at most ``delay`` s, default 30) until the client has
    # closed the connection, then send the rest if it has not
    fired: int = 0


@dataclass
class Repo:
    revisions: dict[str, dict[str, Blob]] = field(default_factory=dict)  # commit sha -> path -> blob
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    private: bool = False


class HubServer:
    """Start with ``with HubServer() as hub`` (or :meth:`start`); ``hub.url`` is what HF_ENDPOINT must be."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, Blob] = {}  # uploaded LFS objects by sha256
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.bytes_served: dict[tuple[str, str], int] = {}
        self.range_starts: dict[tuple[str, str], list[int]] = {}
        self.transfers: list[tuple[tuple[str, str], int, int]] = []  # ((repo, path), first byte, bytes sent)
        self.lfs_uploads: dict[str, int] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.commits: list[dict[str, Any]] = []
        self.chunk = CHUNK  # bytes per write of a download; small values give kill tests something to interrupt
        # called as on_chunk((repo, path), first byte of the chunk) before each chunk of a download is sent, from the
        # server's thread: lets a test watch the client's disk at every step of a transfer, without timing
        self.on_chunk: Any = None
        self.seen_headers: list[tuple[str, dict[str, str]]] = []  # (path, request headers) of every request
        self.gzipped = 0  # JSON answers sent gzip-compressed (gzip fault)
        self._stopping = threading.Event()  # releases "hang" faults when the server stops
        self._server: ThreadingHTTPServer | None = None

    # -- content ---------------------------------------------------------------------------------------
    def add_revision(self, repo_id: str, files: dict[str, Path | bytes], branch: str | None = "main",
                     base: str | None = None) -> str:
        """Add a commit holding ``files`` (plus the files of commit ``base``); move ``branch`` to it; return its sha."""
        blobs = dict(self.repos[repo_id].revisions[base]) if base else {}
        blobs.update({p: Blob.of(s) for p, s in files.items()})
        return self._commit(repo_id, blobs, branch)

    def _commit(self, repo_id: str, blobs: dict[str, Blob], branch: str | None) -> str:
        with self.lock:
            return self._commit_locked(repo_id, blobs, branch)

    def _commit_locked(self, repo_id: str, blobs: dict[str, Blob], branch: str | None) -> str:
        repo = self.repos.setdefault(repo_id, Repo())
        h = hashlib.sha1(repo_id.encode() + str(len(repo.revisions)).encode())
        for p in sorted(blobs):
            h.update(p.encode() + blobs[p].etag.encode())
        sha = h.hexdigest()
        repo.revisions[sha] = blobs
        if branch:
            repo.refs[branch] = sha
        return sha

    def fault(self, kind: str, pattern: str, **kw: Any) -> Fault:
        f = Fault(kind, pattern, **kw)
        with self.lock:
            self.faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def env(self, home: Path) -> dict[str, str]:
        """Environment for a mertools or huggingface_hub process that talks to this server only."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(Path(home) / "hub"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",  # this server speaks the LFS protocol, not Xet
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_TOKEN": "hf_loopback_test_token",
            "MERTOOLS_HUB_RETRY_WAIT": "0.01",
            "HF_HUB_OFFLINE": "0",
        }

    def served(self, repo_id: str, path: str) -> int:
        return self.bytes_served.get((repo_id, path), 0)

    def files_at(self, repo_id: str, rev: str = "main") -> dict[str, Blob]:
        repo = self.repos[repo_id]
        return repo.revisions[repo.refs.get(rev, rev)]

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> "HubServer":
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        serve = self._server.serve_forever
        threading.Thread(target=serve, kwargs={"poll_interval": 0.05}, daemon=True).start()  # quick to stop
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- used by the handler ---------------------------------------------------------------------------
    def active(self, path: str, kind: str) -> list[Fault]:
        """Faults of ``kind`` matching ``path`` that apply to every request (no ``times`` budget used)."""
        with self.lock:
            return [f for f in self.faults if f.kind == kind and fnmatch.fnmatch(path, f.pattern)]

    def take_fault(self, path: str, kinds: tuple[str, ...]) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.kind in kinds and fnmatch.fnmatch(path, f.pattern) and (f.times is None or f.fired < f.times):
                    f.fired += 1
                    return f
        return None

    def resolve(self, repo_id: str, rev: str) -> tuple[str, dict[str, Blob]] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        sha = repo.refs.get(rev, rev)
        if sha not in repo.revisions:
            return None
        return sha, repo.revisions[sha]


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<op>revision|tree|paths-info|preupload|commit|branch)"
                  r"/(?P<rev>[^/]+)(?:/(?P<path>.*))?)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_UPLOAD = re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")


class _Cut(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # -- plumbing --------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              ctype: str = "application/json") -> None:
        # recorded before the answer leaves: a client that has its answer finds the request counted
        self.server_hub.requests.append((self.command, self.path, status))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        hub = self.server_hub
        path = unquote(urlsplit(self.path).path)
        if status == 200 and (f := hub.take_fault(path, ("json",))):
            obj = f.edit(obj) if f.edit is not None else obj
            headers = {**(headers or {}), **f.headers}
        body = json.dumps(obj).encode()
        accept = [e.split(";")[0].strip().lower() for e in self.headers.get("Accept-Encoding", "").split(",")]
        if hub.active(path, "gzip") and "gzip" in accept:
            body = gzip.compress(body)
            headers = {**(headers or {}), "Content-Encoding": "gzip"}
            with hub.lock:
                hub.gzipped += 1
        self._send(status, body, headers)

    def _error(self, status: int, code: str, msg: str) -> None:
        self._json({"error": msg}, status, {"X-Error-Code": code, "X-Error-Message": msg})

    def _dispatch(self) -> None:
        hub = self.server_hub
        url = urlsplit(self.path)
        path = unquote(url.path)
        with hub.lock:
            hub.seen_headers.append((path, dict(self.headers.items())))
        if (f := hub.take_fault(path, ("hook",))) is not None:
            f.edit(self)
        f = hub.take_fault(path, ("error", "hang", "redirect", "body", "trickle"))
        if f is not None:
            self._body()
            if f.kind == "hang":  # accept the request, never answer: only a client timeout gets out
                hub._stopping.wait(f.delay or 60)
                self.close_connection = True
                return
            if f.kind == "redirect":
                loc = f.location.replace("{url}", hub.url).replace("{path}", self.path)
                self._send(f.status if 300 <= f.status < 400 else 302, b"", {"Location": loc, **f.headers})
                return
            if f.kind == "body":
                self._send(200, f.body, f.headers)
                return
            if f.kind == "trickle":  # every byte well within a read timeout, the answer never complete
                hub.requests.append((self.command, self.path, 200))
                self.send_response(200)
                # no Content-Length (the body ends when the connection does): a declared length that is not the
                # file's would be a hub contradicting its listing, refused at once before any deadline matters
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    while not hub._stopping.wait(f.delay or 0.1):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                except OSError:  # the client has gone
                    pass
                return
            self._send(f.status, b'{"error": "injected"}', f.headers)
            return
        try:
            if m := _RESOLVE.match(path):
                return self._resolve(m["repo"], m["rev"], m["path"])
            if m := _API.match(path):
                return self._api(m["repo"], m["op"], m["rev"], m["path"], parse_qs(url.query))
            if path == "/api/repos/create" and self.command == "POST":
                return self._create_repo()
            if m := _BATCH.match(path):
                return self._batch(m["repo"])
            if (m := _UPLOAD.match(path)) and self.command == "PUT":
                return self._upload(m["oid"])
            if path == "/api/validate-yaml":
                self._body()
                return self._json({"errors": [], "warnings": []})
            self._error(404, "EntryNotFound", f"no route for {self.command} {path}")
        except _Cut:
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = lambda self: self._dispatch()  # noqa: E731

    # -- read side -------------------------------------------------------------------------------------
    def _entry(self, p: str, b: Blob) -> dict[str, Any]:
        e: dict[str, Any] = {"type": "file", "path": p, "size": b.size, "oid": b.git_oid}
        if b.lfs:
            e["lfs"] = {"oid": b.sha256, "size": b.size, "pointerSize": 134}
        return e

    def _api(self, repo_id: str, op: str | None, rev: str | None, sub: str | None, query: dict) -> None:
        hub = self.server_hub
        if op in (None, "revision") and self.command == "GET":
            r = hub.resolve(repo_id, rev or "main")
            if r is None:
                return self._not_found(repo_id, rev)
            sha, blobs = r
            return self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": hub.repos[repo_id].private,
                               "siblings": [{"rfilename": p} for p in sorted(blobs)]})
        if op == "tree":
            r = hub.resolve(repo_id, rev)  # type: ignore[arg-type]
            if r is None:
                return self._not_found(repo_id, rev)
            blobs = r[1]
            recursive = query.get("recursive", ["False"])[0].lower() == "true"
            prefix = (sub.strip("/") + "/") if sub else ""
            out, dirs = [], set()
            for p in sorted(blobs):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix):]
                parts = rest.split("/")
                for i in range(1, len(parts)):
                    if recursive or i == 1:
                        dirs.add(prefix + "/".join(parts[:i]))
                if recursive or len(parts) == 1:
                    out.append(self._entry(p, blobs[p]))
            out += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(dirs)]
            return self._json(out)
        if op == "paths-info" and self.command == "POST":
            r = hub.resolve(repo_id, rev)  # type: ignore[arg-type]
            form = parse_qs(self._body().decode())
            if r is None:
                return self._not_found(repo_id, rev)
            blobs = r[1]
            return self._json([self._entry(p, blobs[p]) for p in form.get("paths", []) if p in blobs])
        if op == "branch" and self.command == "POST":
            self._body()
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._not_found(repo_id, None)
            if rev in repo.refs:
                return self._error(409, "BranchExists", f"branch {rev} exists")
            repo.refs[rev] = repo.refs.get("main") or hub._commit(repo_id, {}, None)  # type: ignore[index]
            return self._json({})
        if op == "preupload" and self.command == "POST":
            return self._preupload(repo_id, rev)  # type: ignore[arg-type]
        if op == "commit" and self.command == "POST":
            return self._commit(repo_id, rev)  # type: ignore[arg-type]
        self._error(404, "EntryNotFound", f"no route for {self.command} {self.path}")

    def _not_found(self, repo_id: str, rev: str | None) -> None:
        if repo_id not in self.server_hub.repos:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        else:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        hub = self.server_hub
        r = hub.resolve(repo_id, rev)
        if r is None:
            return self._not_found(repo_id, rev)
        sha, blobs = r
        upath = unquote(urlsplit(self.path).path)
        if hub.active(upath, "ignore_rev"):  # a hub that serves the branch's head whatever commit was asked for
            sha, blobs = hub.resolve(repo_id, "main")  # type: ignore[misc]
        b = blobs.get(path)
        if b is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {rev}")
        if hub.active(upath, "pointer"):  # the LFS pointer where the file's bytes belong
            ptr = f"version https://git-lfs.github.com/spec/v1\noid sha256:{b.sha256}\nsize {b.size}\n".encode()
            b = Blob(len(ptr), hashlib.sha256(ptr).hexdigest(), git_blob_sha1(ptr), False, None, ptr)
        start, end = 0, b.size - 1
        status = 200
        rng = None if hub.active(upath, "norange") else self.headers.get("Range")
        if rng and (m := re.match(r"bytes=(\d*)-(\d*)$", rng.strip())):
            if m[1] == "":
                start = max(0, b.size - int(m[2]))
            else:
                start = int(m[1])
                if m[2]:
                    end = min(end, int(m[2]))
            if start >= b.size:
                return self._send(416, b"", {"Content-Range": f"bytes */{b.size}"})
            status = 206
            if (cap := hub.take_fault(upath, ("cap",))) is not None:  # a server that caps its answers, consistently
                end = min(end, start + cap.after - 1)
        n = end - start + 1
        declare = hub.take_fault(upath, ("declare",))
        extra = hub.take_fault(upath, ("extra", "nolength"))
        etag = hub.take_fault(upath, ("etag",))
        self.send_response(status)
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(n + (declare.after if declare else 0)),
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": sha,
            "ETag": f'"{etag.value if etag else b.etag}"',
        }
        if declare is not None:
            n = min(n, n + declare.after)
            self.close_connection = True
        if extra is not None and extra.kind == "nolength":
            del headers["Content-Length"]
            headers["Connection"] = "close"
            self.close_connection = True
        if b.lfs:
            headers.update({"X-Linked-Etag": f'"{b.sha256}"', "X-Linked-Size": str(b.size)})
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{b.size}"
        hub.requests.append((self.command, self.path, status))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        key = (repo_id, path)
        with hub.lock:
            hub.range_starts.setdefault(key, []).append(start)
        full = self.path
        cut = hub.take_fault(full, ("cut",)) or hub.take_fault(unquote(urlsplit(full).path), ("cut",))
        corrupt = [f for f in hub.faults if f.kind == "corrupt" and fnmatch.fnmatch(unquote(urlsplit(full).path), f.pattern)]
        slow = [f for f in hub.faults if f.kind == "slow" and fnmatch.fnmatch(unquote(urlsplit(full).path), f.pattern)]
        stall = hub.take_fault(unquote(urlsplit(full).path), ("stall",))
        self._sent = 0
        try:
            self._stream(b, key, start, n, cut, corrupt, slow, stall)
            if extra is not None:
                self.wfile.write(b"\xee" * extra.after)
                self.wfile.flush()
        finally:
            with hub.lock:
                hub.transfers.append((key, start, self._sent))

    def _stream(self, b: Blob, key: tuple[str, str], start: int, n: int, cut: Fault | None, corrupt: list[Fault],
                slow: list[Fault], stall: Fault | None = None) -> None:
        hub = self.server_hub
        sent = self._sent = 0
        with b.open() as fh:
            fh.seek(start)
            pos = start
            while sent < n:
                chunk = bytearray(fh.read(min(hub.chunk, n - sent)))
                for f in corrupt:
                    if pos <= f.after < pos + len(chunk):
                        chunk[f.after - pos] ^= 0xFF
                if cut is not None and sent + len(chunk) > cut.after:
                    chunk = chunk[: cut.after - sent]
                    self.wfile.write(chunk)
                    self._count(key, len(chunk))
                    self._sent = sent + len(chunk)
                    self.wfile.flush()
                    raise _Cut
                if stall is not None and sent >= stall.after and self._client_gone(stall.delay or 30):
                    raise _Cut
                stall = None if stall is not None and sent >= stall.after else stall
                for f in slow:
                    time.sleep(f.delay)
                if hub.on_chunk is not None:
                    hub.on_chunk(key, pos)
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    raise _Cut from None
                self._count(key, len(chunk))
                sent += len(chunk)
                self._sent = sent
                pos += len(chunk)

    def _client_gone(self, wait: float) -> bool:
        """Wait up to ``wait`` s for the client to close its end (readable with nothing to read, or reset)."""
        end = time.monotonic() + wait
        while (left := end - time.monotonic()) > 0 and not self.server_hub._stopping.is_set():
            if select.select([self.connection], [], [], min(left, 0.5))[0]:
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True
        return False

    def _count(self, key: tuple[str, str], n: int) -> None:
        hub = self.server_hub
        with hub.lock:
            hub.bytes_served[key] = hub.bytes_served.get(key, 0) + n

    # -- write side ------------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        hub = self.server_hub
        req = json.loads(self._body() or b"{}")
        repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
        if "/" not in repo_id:
            repo_id = f"user/{repo_id}"
        if repo_id in hub.repos:  # the hub's 409 carries the url too; huggingface_hub reads it with exist_ok
            return self._json({"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}, 409,
                              {"X-Error-Code": "RepoExists"})
        hub._commit(repo_id, {}, "main")
        hub.repos[repo_id].private = bool(req.get("private")) or req.get("visibility") == "private"
        self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id})

    def _preupload(self, repo_id: str, rev: str) -> None:
        hub = self.server_hub
        req = json.loads(self._body())
        r = hub.resolve(repo_id, rev)
        if r is None:
            return self._not_found(repo_id, rev)
        blobs = r[1]
        files = []
        for f in req["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["size"] >= LFS_THRESHOLD or b"\0" in sample
            cur = blobs.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": cur.git_oid if cur is not None and not cur.lfs else None})
        self._json({"files": files, "commitOid": r[0]})

    def _batch(self, repo_id: str) -> None:
        hub = self.server_hub
        req = json.loads(self._body())
        objects = []
        for o in req["objects"]:
            entry: dict[str, Any] = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in hub.lfs:
                entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _upload(self, oid: str) -> None:
        hub = self.server_hub
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "BadRequest", "sha256 mismatch")
        with hub.lock:
            hub.lfs[oid] = Blob.of(data, lfs=True)
            hub.lfs_uploads[oid] = hub.lfs_uploads.get(oid, 0) + 1
        self._send(200)

    def _apply_commit(self, repo_id: str, rev: str, lines: list[dict[str, Any]]) -> str | Callable[[], None]:
        """Apply a commit's NDJSON lines to branch `rev` (the hub's lock held): its sha, or a refusal, the answer to
        send once the lock is released."""
        hub = self.server_hub
        r = hub.resolve(repo_id, rev)
        if r is None:
            return lambda: self._not_found(repo_id, rev)
        parent = next((x["value"].get("parentCommit") for x in lines if x["key"] == "header"), None)
        if parent and not r[0].startswith(parent):  # the hub's status and words
            return lambda: self._error(412, "PreconditionFailed", "A commit has happened since. Please refresh and "
                                                                  "try again.")
        blobs = dict(r[1])
        for line in lines:
            v = line["value"]
            if line["key"] == "file":
                blobs[v["path"]] = Blob.of(base64.b64decode(v["content"]))
            elif line["key"] == "lfsFile":
                if v["oid"] not in hub.lfs:
                    return lambda: self._error(400, "BadRequest", f"LFS object {v['oid']} was never uploaded")
                blobs[v["path"]] = hub.lfs[v["oid"]]
            elif line["key"] == "deletedFile":
                blobs.pop(v["path"], None)
        sha = hub._commit_locked(repo_id, blobs, rev)
        hub.commits.append({"repo": repo_id, "sha": sha, "lines": len(lines)})
        return sha

    def _commit(self, repo_id: str, rev: str) -> None:
        hub = self.server_hub
        lines = [json.loads(x) for x in self._body().splitlines() if x.strip()]
        with hub.lock:  # read the head and move it in one step, as the hub does: two commits never both apply to one
            sha = self._apply_commit(repo_id, rev, lines)  # answered outside the lock: _json takes it
        if callable(sha):
            return sha()
        self._json({"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})


def main() -> None:
    """Serve folders as repos until killed: ``python tests/hubserver.py org/name=DIR [...]``; prints the URL."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("repos", nargs="+", help="org/name=DIR: every file under DIR, at one commit on main")
    args = ap.parse_args()
    hub = HubServer()
    for spec in args.repos:
        repo_id, _, folder = spec.partition("=")
        root = Path(folder)
        hub.add_revision(repo_id, {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()})
    hub.start()
    print(hub.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
        sys.exit(0)


if __name__ == "__main__":
    main()
