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
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from ..commit import fsync_dir
from ..errors import OutputError
from .http import RETRIES, Retry, _encoding, progress_step, retry_status, timeout, with_retries
from .remote import HubError, IntegrityError, RemoteFile, RepoSpec, endpoint

CHUNK = 1 << 20
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


def resolve_url(spec: RepoSpec, commit: str, path: str) -> str:
    return f"{endpoint()}/{spec.repo_id}/resolve/{commit}/{quote(path)}"


def git_blob_sha1_file(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while b := fh.read(CHUNK):
            h.update(b)
    return h.hexdigest()


def check_file(path: Path, f: RemoteFile, what: str) -> None:
    """Raise IntegrityError unless ``path`` holds exactly the bytes the hub lists for ``f`` (sha256 or git oid).
    Opened non-blocking and checked by fstat: a FIFO or a device (a hostile cache) is refused, never waited on."""
    from mer_runtime.safeopen import open_regular

    fd, st = open_regular(path, error=IntegrityError, hint=f"{what}: not the file the hub lists")
    with os.fdopen(fd, "rb") as fh:
        if st.st_size != f.size:
            raise IntegrityError(f"{what}: {st.st_size} bytes where the hub lists {f.size}")
        if f.sha256:
            h = hashlib.sha256()
        elif f.git_oid:
            h = hashlib.sha1(b"blob %d\0" % st.st_size)
        else:
            return
        while b := fh.read(CHUNK):
            h.update(b)
    got, want = h.hexdigest(), f.sha256 or f.git_oid
    if got != want:
        raise IntegrityError(f"{what}: content hash {got} does not match the hub's {want}")


def fetch(spec: RepoSpec, commit: str, f: RemoteFile, dest: Path, *, tick: Callable[[int], None] = lambda n: None,
          stop: threading.Event | None = None) -> Path:
    """Download ``f`` at ``commit`` to ``dest`` (resuming ``dest.part``), verify it, and return ``dest``.

    Whatever the hub answers, ``dest`` appears only holding the bytes the listing's hash names; every other outcome
    is one :class:`HubError` (:class:`IntegrityError` when the hub's bytes or sizes contradict its listing).

    >>> fetch(RepoSpec("org/model"), sha, remote_file, Path("staging/model.gguf"))   # doctest: +SKIP
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = resolve_url(spec, commit, f.path)
    what = f"{spec.repo_id}@{commit[:12]}: {f.path}"
    want = f.sha256 or f.git_oid
    if not want:
        raise HubError(f"{what}: the hub lists no hash for it, so its bytes could not be checked; refusing")
    for attempt in (1, 2):
        sha = _hasher(f)
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
        _check_space(part, f.size - have, what)
        try:
            digest = _transfer(url, what, f, part, sha, have, tick, stop)
        except IntegrityError:
            part.unlink(missing_ok=True)  # bytes the hub did not list must not be resumed from
            raise
        if digest == want:
            break
        part.unlink()
        if attempt == 1 and have:
            continue  # the kept prefix (from an earlier run, or an earlier hub) may be what is wrong: once afresh
        raise IntegrityError(
            f"{what}: downloaded bytes hash to {digest}, the hub lists {want}; the file was deleted and nothing "
            "was converted from it. Run the pull again; if it repeats, the hub or a proxy serves corrupt data"
        )
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def _hasher(f: RemoteFile) -> Any:
    """The hash the listing names for ``f``: sha256 for LFS files, git's blob sha1 for the others."""
    return hashlib.sha256() if f.sha256 else hashlib.sha1(b"blob %d\0" % f.size)


def _kib(n: int) -> str:
    return f"{n >> 10} KiB" if n >= 1 << 10 else f"{n} bytes"


def _check_space(part: Path, need: int, what: str) -> None:
    """A listed size the disk cannot hold is refused before a byte is written (nothing is preallocated either)."""
    free = shutil.disk_usage(part.parent).free
    if need > free:
        raise OutputError(f"{what}: the hub lists {need} bytes still to download and only {free} are free on "
                          f"{part.parent}; free some space or choose another OUT")


def _expected_length(r: Any, have: int, f: RemoteFile, what: str) -> None:
    """The answer's headers must describe the listed file: Content-Range's total and Content-Length agree with the
    listing, before a body byte is written. A mismatch is the hub contradicting itself: IntegrityError, no retry."""
    enc = _encoding(r)
    if enc not in ("", "identity"):
        raise IntegrityError(f"{what}: the hub sent it {enc}-encoded although asked for identity; the listed sizes "
                             "and hashes are of the plain bytes: check HF_ENDPOINT or the proxy")
    start = have if r.status_code == 206 else 0
    length = r.headers.get("Content-Length")
    if r.status_code == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", r.headers.get("Content-Range", "").strip())
        if not m or int(m[1]) != have or (m[3] != "*" and int(m[3]) != f.size) or int(m[2]) != f.size - 1:
            raise IntegrityError(f"{what}: asked for bytes {have}-{f.size - 1} of {f.size}, the hub answered "
                                 f"{r.headers.get('Content-Range')!r}")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise IntegrityError(f"{what}: the hub's Content-Length {length[:40]!r} is not a number") from None
        if n != f.size - start:
            pointer = n < 1024 and f.sha256 and r.read().startswith(LFS_POINTER)
            if pointer:
                raise IntegrityError(f"{what}: the hub served a Git LFS pointer file instead of its {f.size} bytes "
                                     "(the LFS object is missing on the hub, or a mirror does not resolve LFS); "
                                     "nothing was converted: check HF_ENDPOINT or report it to the repo's owner")
            raise IntegrityError(f"{what}: the hub's answer holds {n} bytes where its listing says "
                                 f"{f.size - start} (of {f.size}); the hub contradicts itself, nothing was converted: "
                                 "run the pull again later, or check HF_ENDPOINT")


def _transfer(url: str, what: str, f: RemoteFile, part: Path, sha: Any, have: int, tick: Callable[[int], None],
              stop: threading.Event | None) -> str:
    """Append the rest of ``f`` to ``part`` (from byte ``have``), retrying; return the hex digest of the whole.

    Failed attempts in a row are counted until the file has grown by :func:`http.progress_step` bytes (1 MiB, or a
    RETRIES-th of a smaller file; or to its end) since the last time the count was reset: a hub that ignores Range
    and cuts every answer at the same byte, or one that sends one new byte per answer, is given up on after RETRIES attempts instead of being retried for ever.
    """
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    # identity: the listed size and hash are of the plain bytes, and ranges must count them
    headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
    session = get_session()
    again = "run the pull again after that: what was downloaded is kept"
    st = {"have": have, "sha": sha, "mark": have}  # mark: the size at the last reset of the failure count

    def once(out: Any) -> None:
        if st["have"] >= f.size:  # a transport error after the last byte: nothing left to ask for
            return
        h = dict(headers)
        if st["have"]:
            h["Range"] = f"bytes={st['have']}-"
        with session.stream("GET", url, headers=h, follow_redirects=True, timeout=timeout()) as r:
            retry_status(what, r, again)
            if r.status_code == 404:
                raise HubError(f"{what}: not found on the hub (HTTP 404); check the repo and --revision")
            if r.status_code in (401, 403):
                raise HubError(f"{what}: access denied (HTTP {r.status_code}); a gated or private repo "
                               "needs HF_TOKEN or `hf auth login`")
            if r.status_code not in (200, 206):
                raise HubError(f"{what}: the hub answered HTTP {r.status_code}; run the pull again later, "
                               "or check HF_ENDPOINT")
            _expected_length(r, st["have"], f, what)
            if st["have"] and r.status_code == 200:  # the range was ignored: start over
                out.truncate(0)
                out.seek(0)
                st["sha"] = _hasher(f)
                st["have"] = 0  # mark stays: a hub that ignores Range and cuts at the same byte makes no progress
            for b in r.iter_raw():  # as the network delivers: a cut keeps what arrived
                if stop is not None and stop.is_set():
                    raise HubError(f"{what}: stopped")
                if st["have"] + len(b) > f.size:
                    raise IntegrityError(f"{what}: the hub sent more than the {f.size} bytes it lists; "
                                         "nothing was converted: check HF_ENDPOINT or the proxy")
                _write_all(out, b, part)
                st["sha"].update(b)
                st["have"] += len(b)
                tick(len(b))
        if st["have"] < f.size:
            raise Retry("connection closed early")

    def progress() -> bool:
        if st["have"] - st["mark"] >= min(progress_step(f.size), f.size - st["mark"]):
            st["mark"] = st["have"]
            return True
        return False

    def give_up(problem: str, _transport: bool) -> str:
        return (f"{what}: gave up after {RETRIES} attempts in a row that brought less than "
                f"{_kib(progress_step(f.size))} ({problem}); run the pull again later: the bytes downloaded so far "
                "are kept (if it repeats, check HF_ENDPOINT or the proxy)")

    with open(part, "ab", buffering=0) as out:  # unbuffered: what arrived survives a kill, for the next run
        if st["have"] < f.size:
            with_retries(what, lambda: once(out), give_up, progress=progress, stop=stop)
        os.fsync(out.fileno())
    return st["sha"].hexdigest()


def _write_all(out: Any, b: bytes, part: Path) -> None:
    """Write every byte (a raw file may take fewer); a disk error is ours to report, never a network retry."""
    view = memoryview(b)
    try:
        while len(view):
            view = view[out.write(view):]
    except OSError as exc:
        raise OutputError(f"{part}: cannot write the download ({exc.strerror}); free space or choose another OUT. "
                          "What was written so far is kept for the next run") from None
