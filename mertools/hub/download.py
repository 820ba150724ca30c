"""Download one hub file into a staging folder: resumable across runs, retried with backoff, sha256-checked.

Why not ``hf_hub_download``: it checks sizes only (never the sha256 the hub lists), writes into the shared cache
(a second copy of the model on disk next to the output), and its resume of a ``.incomplete`` blob depends on the
transfer backend. Here the bytes go to ``NAME.part`` beside their final name; a later run sends
``Range: bytes=<size on disk>-`` and hashes what is already there first, so nothing finished is fetched twice.
A file becomes ``NAME`` only after its hash matched; a mismatch deletes it and raises :class:`IntegrityError`.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from ..commit import fsync_dir
from ..errors import OutputError
from .remote import HubError, IntegrityError, RemoteFile, RepoSpec, endpoint

CHUNK = 1 << 20
RETRIES = 6  # attempts in a row that bring no new byte before giving up
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def retry_wait() -> float:
    """Base backoff in seconds (doubles per failed attempt, capped at 16x): MERTOOLS_HUB_RETRY_WAIT, default 1."""
    try:
        return max(0.0, float(os.environ.get("MERTOOLS_HUB_RETRY_WAIT", "1")))
    except ValueError:
        raise HubError(f"MERTOOLS_HUB_RETRY_WAIT={os.environ['MERTOOLS_HUB_RETRY_WAIT']!r}: expected seconds") from None


def resolve_url(spec: RepoSpec, commit: str, path: str) -> str:
    return f"{endpoint()}/{spec.repo_id}/resolve/{commit}/{quote(path)}"


def git_blob_sha1_file(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while b := fh.read(CHUNK):
            h.update(b)
    return h.hexdigest()


def check_file(path: Path, f: RemoteFile, what: str) -> None:
    """Raise IntegrityError unless ``path`` holds exactly the bytes the hub lists for ``f`` (sha256 or git oid)."""
    size = path.stat().st_size
    if size != f.size:
        raise IntegrityError(f"{what}: {size} bytes where the hub lists {f.size}")
    if f.sha256:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while b := fh.read(CHUNK):
                h.update(b)
        got, want = h.hexdigest(), f.sha256
    elif f.git_oid:
        got, want = git_blob_sha1_file(path), f.git_oid
    else:
        return
    if got != want:
        raise IntegrityError(f"{what}: content hash {got} does not match the hub's {want}")


def fetch(spec: RepoSpec, commit: str, f: RemoteFile, dest: Path, *, tick: Callable[[int], None] = lambda n: None,
          stop: threading.Event | None = None) -> Path:
    """Download ``f`` at ``commit`` to ``dest`` (resuming ``dest.part``), verify it, and return ``dest``.

    >>> fetch(RepoSpec("org/model"), sha, remote_file, Path("staging/model.gguf"))   # doctest: +SKIP
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = resolve_url(spec, commit, f.path)
    what = f"{spec.repo_id}@{commit[:12]}: {f.path}"
    sha = hashlib.sha256() if f.sha256 else hashlib.sha1(b"blob %d\0" % f.size)
    have = 0
    if part.exists():
        have = part.stat().st_size
        if have > f.size:
            part.unlink()
            have = 0
        else:
            with open(part, "rb") as fh:  # the hash must cover the bytes a previous run wrote
                while b := fh.read(CHUNK):
                    sha.update(b)
            tick(have)
    try:
        digest = _transfer(url, what, f, part, sha, have, tick, stop)
    except IntegrityError:
        part.unlink(missing_ok=True)  # bytes the hub did not list must not be resumed from
        raise
    want = f.sha256 or f.git_oid
    if want and digest != want:
        part.unlink()
        raise IntegrityError(
            f"{what}: downloaded bytes hash to {digest}, the hub lists {want}; the file was deleted and nothing "
            "was converted from it. Run the pull again; if it repeats, the hub or a proxy serves corrupt data"
        )
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def _transfer(url: str, what: str, f: RemoteFile, part: Path, sha: Any, have: int, tick: Callable[[int], None],
              stop: threading.Event | None) -> str:
    """Append the rest of ``f`` to ``part`` (from byte ``have``), retrying; return the hex digest of the whole."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers()
    fails = 0
    session = get_session()
    with open(part, "ab", buffering=0) as out:  # unbuffered: what arrived survives a kill, for the next run
        while have < f.size:
            if stop is not None and stop.is_set():
                raise HubError(f"{what}: stopped")
            got_any = False
            try:
                h = dict(headers)
                if have:
                    h["Range"] = f"bytes={have}-"
                with session.stream("GET", url, headers=h, follow_redirects=True, timeout=30) as r:
                    if r.status_code in RETRY_STATUS:
                        raise _Retry(f"HTTP {r.status_code}")
                    if r.status_code == 404:
                        raise HubError(f"{what}: not found on the hub (HTTP 404)")
                    if r.status_code in (401, 403):
                        raise HubError(f"{what}: access denied (HTTP {r.status_code}); a gated or private repo "
                                       "needs HF_TOKEN or `hf auth login`")
                    if r.status_code not in (200, 206):
                        raise HubError(f"{what}: the hub answered HTTP {r.status_code}")
                    if r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                        raise IntegrityError(f"{what}: asked for bytes from {have}, the hub answered "
                                             f"{r.headers.get('Content-Range')!r}")
                    if have and r.status_code == 200:  # the range was ignored: start over
                        out.truncate(0)
                        out.seek(0)
                        sha = hashlib.sha256() if f.sha256 else hashlib.sha1(b"blob %d\0" % f.size)
                        have = 0
                    for b in r.iter_bytes():  # as the network delivers: a cut keeps what arrived
                        if stop is not None and stop.is_set():
                            raise HubError(f"{what}: stopped")
                        if have + len(b) > f.size:
                            raise IntegrityError(f"{what}: the hub sent more than the {f.size} bytes it lists")
                        _write_all(out, b, part)
                        sha.update(b)
                        have += len(b)
                        got_any = True
                        tick(len(b))
                if have < f.size:
                    raise _Retry("connection closed early")
            except _Retry as exc:
                _backoff(what, exc, fails := 0 if got_any else fails + 1)
            except Exception as exc:
                if type(exc).__module__.startswith(("httpx", "httpcore", "h11")):
                    _backoff(what, exc, fails := 0 if got_any else fails + 1)
                else:
                    raise
        os.fsync(out.fileno())
    return sha.hexdigest()


class _Retry(Exception):
    pass


def _write_all(out: Any, b: bytes, part: Path) -> None:
    """Write every byte (a raw file may take fewer); a disk error is ours to report, never a network retry."""
    view = memoryview(b)
    try:
        while len(view):
            view = view[out.write(view):]
    except OSError as exc:
        raise OutputError(f"{part}: cannot write the download ({exc.strerror}); free space or choose another OUT. "
                          "What was written so far is kept for the next run") from None


def _backoff(what: str, exc: BaseException, fails: int) -> None:
    if fails >= RETRIES:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HubError(f"{what}: gave up after {RETRIES} attempts without progress ({detail}); run the pull again "
                       "later: the bytes downloaded so far are kept") from None
    time.sleep(min(retry_wait() * 2 ** max(0, fails - 1), retry_wait() * 16))


