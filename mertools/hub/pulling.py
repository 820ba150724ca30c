"""``pull``: a hub repo at one commit -> expert shards, verified, resumable, with little disk beyond the output.

Steps: resolve the revision to a commit sha; list the files with sizes and sha256; choose what the conversion
needs; download each into ``.OUT.mertools-pull/files/`` beside OUT (resuming partial files by HTTP range), verify
its sha256, journal it; hand verified files to the converter (:mod:`mertools.hub.convert`) while the next one
downloads; delete each source file once the converter no longer needs it. OUT appears only complete (extract's
staging + rename). A killed pull, run again, reuses every verified file (hashed again first: it sat on disk in
between) and skips finished conversion.

With ``HF_HUB_OFFLINE=1`` the files come from the local Hugging Face cache (``snapshots/<sha>/``), each checked
against the hash its blob is named by; an incomplete snapshot is refused before anything is written.

Thread safety: pulls into different folders may run at once (from threads or processes); a second pull into the same
OUT is refused by an advisory lock on its staging folder. One pull uses two threads of its own (download, convert).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import queue
import re
import shutil
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mer_runtime.safeopen import read_regular

from ..commit import test_point
from ..errors import OutputError
from .convert import StreamingConverter, converter_for
from .download import check_file, fetch
from .inspect import read_range
from .journal import Journal
from .remote import (
    ST_INDEX, Choice, HubError, IntegrityError, RemoteFile, RepoSpec, add_index_shards, check_needed, choose, endpoint,
    list_files, offline, resolve_commit,
)

PULL_MARK = ".mertools-pull"
KEPT_MARK = ".mertools-kept-source"  # in OUT.source: what --overwrite may replace
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass
class PullResult:
    out: Path
    repo: str
    commit: str
    kind: str
    files: list[dict[str, Any]]
    downloaded_bytes: int
    reused_bytes: int
    offline: bool
    seconds: float
    extract: dict[str, Any] = field(default_factory=dict)
    source_kept: str | None = None
    already: bool = False
    companions: list[str] = field(default_factory=list)  # repo files kept in OUT/hf/ (mertools.companions)
    companions_skipped: list[dict[str, str]] = field(default_factory=list)  # [{name, why}]

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "repo": self.repo, "commit": self.commit, "kind": self.kind, "files": self.files,
            "downloaded_bytes": self.downloaded_bytes, "reused_bytes": self.reused_bytes, "offline": self.offline,
            "seconds": round(self.seconds, 3), "extract": self.extract, "source_kept": self.source_kept,
            "already_complete": self.already, "companions": self.companions,
            "companions_skipped": self.companions_skipped,
        }


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{PULL_MARK}"


def pull(
    repo: str,
    out: str | os.PathLike[str],
    *,
    revision: str | None = None,
    gguf: str | None = None,
    include: list[str] | None = None,
    dtype: str | None = None,
    keep_source: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    converter: Callable[..., StreamingConverter] | None = None,
) -> PullResult:
    """Pull ``repo`` (``org/name[@rev]``) and convert it into the shard folder ``out``.

    >>> pull("TheBloke/Mixtral-8x7B-v0.1-GGUF", "out/", gguf="*Q4_0.gguf")   # doctest: +SKIP
    >>> pull("mistralai/Mixtral-8x7B-v0.1", "out/", revision="main")          # doctest: +SKIP

    ``converter`` (a factory called like :func:`mertools.hub.convert.converter_for`) replaces the built-in choice.
    """
    t0 = time.perf_counter()
    spec = RepoSpec.parse(repo, revision)
    out = Path(out).absolute()
    bar = progress or (lambda desc, total: (lambda n: None))
    if offline():
        return _pull_offline(spec, out, gguf=gguf, include=include, dtype=dtype, overwrite=overwrite, bar=bar, t0=t0,
                             factory=converter or converter_for)
    commit = resolve_commit(spec)
    done = None if overwrite else _already(out, spec, commit)
    if done is not None:
        # a run killed between its commit and its clean-up left its folder (work/ shares OUT's files by hard links);
        # removed only under its lock, never while another pull (e.g. with --overwrite) is using it
        _remove_stage_if_free(staging_dir(out), out)
        return PullResult(out, spec.repo_id, commit, done.get("format", "?"), done["hub"]["files"], 0, 0, False,
                          time.perf_counter() - t0, already=True)
    _check_out(out, overwrite)
    kept_dir = out.parent / f"{out.name}.source"
    if keep_source:
        _check_kept(kept_dir, overwrite)
    listing = list_files(spec, commit)
    where = f"{spec.repo_id}@{commit[:12]}"
    choice = choose(listing, gguf=gguf, include=include, where=where, unusable=listing.unusable)
    check_needed(choice.files, listing.unusable, where)

    stage = staging_dir(out)
    stage.mkdir(parents=True, exist_ok=True)
    lock = _lock(stage, out)
    try:
        journal = Journal.open(stage, repo=spec.repo_id, commit=commit)
        if journal.fresh:  # files (and partial output) of another commit must not be mixed in
            shutil.rmtree(stage / "files", ignore_errors=True)
            shutil.rmtree(stage / "work", ignore_errors=True)
        files_dir = stage / "files"
        counters = {"downloaded": 0, "reused": 0}

        def get(f: RemoteFile, stop: threading.Event | None = None) -> Path:
            dest = files_dir / f.path
            if journal.state(f.path) == "verified" and dest.is_file():
                try:  # checked again: the file sat on disk between runs, and only checked bytes get converted
                    check_file(dest, f, f"{where}: {f.path}")
                    counters["reused"] += f.size
                    return dest
                except IntegrityError:
                    dest.unlink()
            tick = bar(f"get {f.path.rpartition('/')[2]}", f.size)
            before = (dest.with_name(dest.name + ".part").stat().st_size
                      if dest.with_name(dest.name + ".part").exists() else 0)
            fetch(spec, commit, f, dest, tick=tick, stop=stop)
            counters["downloaded"] += f.size - before
            counters["reused"] += before
            journal.mark(f.path, "verified", size=f.size, sha256=f.sha256, git_oid=f.git_oid)
            return dest

        if choice.index_needed:
            idx = next(f for f in choice.files if f.path == ST_INDEX)
            choice = add_index_shards(choice, listing, get(idx).read_bytes(), where)
            check_needed(choice.files, listing.unusable, where)
        extra = _source_record(spec, commit, choice)
        by_path = {f.path: f for f in choice.files}
        conv = (converter or converter_for)(choice, out, overwrite=overwrite, source_extra=extra, dtype=dtype,
                                            progress=(lambda total, items: bar("convert", total)),
                                            fetch=lambda path: get(by_path[path]),
                                            read_range=lambda path, a, b: read_range(spec, commit, path, a, b,
                                                                                 by_path[path].size))
        try:
            result = run_pipeline(choice, conv, get, journal, stage / "work", keep_source=keep_source)
        except OSError as exc:  # the conversion's own files (a download reports its own): what is done stays
            full = exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            todo = ("free space (or raise the file-size limit) and run the pull again" if full else
                    "run the pull again once that is fixed")
            raise OutputError(f"{exc.filename or stage / 'work'}: the conversion failed ({exc.strerror or exc}); "
                              f"{todo}: what was downloaded and converted so far is kept") from None
        journal.set(done=True)
        kept = None
        if keep_source:
            _check_kept(kept_dir, overwrite)  # again: what is there now is what goes
            (files_dir / KEPT_MARK).write_text("kept by mertools pull --keep-source: a later --overwrite replaces "
                                               "this folder\n", encoding="utf-8")
            if kept_dir.exists():
                shutil.rmtree(kept_dir)
            os.replace(files_dir, kept_dir)
            kept = str(kept_dir)
        shutil.rmtree(stage, ignore_errors=True)  # still under the lock: no other pull can be using it now
    finally:
        _unlock(lock)
    return PullResult(out, spec.repo_id, commit, choice.kind, extra["hub"]["files"], counters["downloaded"],
                      counters["reused"], False, time.perf_counter() - t0,
                      result.as_dict() if hasattr(result, "as_dict") else {}, kept,
                      companions=choice.companions, companions_skipped=choice.companions_skipped)


def run_pipeline(choice: Choice, conv: StreamingConverter, get: Callable[..., Path], journal: Journal,
                 work_dir: Path, *, keep_source: bool) -> Any:
    """Download (thread) and convert (this thread) at once; release each file once the converter is done with it."""
    converted = {f.path for f in choice.files if journal.state(f.path) == "converted"}
    conv.begin(work_dir, converted)
    todo = [f for f in choice.files if conv.needs(f.path) and f.path not in converted]
    q: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    slots = threading.Semaphore(conv.window) if conv.window and not keep_source else None
    # small files kept to the end need no window slot: the converter's own, and the checkpoint's companion files
    # (never released by a converter: they are copied into OUT/hf/ when it finishes)
    resident = set(getattr(conv, "resident", ())) | set(choice.companions)

    def produce() -> None:
        try:
            for f in todo:
                while slots is not None and f.path not in resident and not slots.acquire(timeout=0.2):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                q.put((f, get(f, stop)))
            q.put(None)
        except BaseException as exc:  # handed to the converting thread, which raises it
            q.put(exc)

    t = threading.Thread(target=produce, name="mertools-pull-download", daemon=True)
    t.start()
    present: dict[str, Path] = {}
    try:
        while True:
            item = q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            f, path = item
            present[f.path] = path
            for p in conv.convert_available(dict(present)):
                journal.mark(p, "converted")
                if p in present and not keep_source:
                    present.pop(p).unlink(missing_ok=True)
                if slots is not None and p not in resident:
                    slots.release()
                test_point(f"pull-converted:{p}")
        return conv.finish()
    finally:
        stop.set()
        t.join(timeout=10)  # it stops at its next chunk; a stalled connection must not hold up an interrupt


def _source_record(spec: RepoSpec, commit: str, choice: Choice) -> dict[str, Any]:
    return {"hub": {
        "repo": spec.repo_id,
        "revision": spec.revision or "main",
        "commit": commit,
        "endpoint": endpoint(),
        "files": [f.as_dict() for f in choice.files],
    }}


def _already(out: Path, spec: RepoSpec, commit: str) -> dict[str, Any] | None:
    """The manifest's source if OUT already holds this very pull (a run killed after the final rename)."""
    try:
        src = json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("source", {})
        hub = src.get("hub", {})
        if hub.get("repo") == spec.repo_id and hub.get("commit") == commit:
            return src
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: folder is not empty; pass --overwrite to replace it, or choose an empty folder")


def _check_kept(kept: Path, overwrite: bool) -> None:
    """OUT.source may be replaced only where an earlier --keep-source pull made it (it holds KEPT_MARK): --overwrite
    replaces an earlier output, never a folder of the user's."""
    if kept.is_symlink():
        raise OutputError(f"{kept}: is a link; --keep-source keeps the source files in a folder of that name: move "
                          "the link away or choose another OUT")
    if kept.is_dir() and any(kept.iterdir()) and not (kept / KEPT_MARK).is_file():
        raise OutputError(f"{kept}: not empty, and not a folder an earlier --keep-source pull kept (--overwrite "
                          "replaces only such a folder): move it away or choose another OUT")
    _check_out(kept, overwrite)


def _lock(stage: Path, out: Path) -> int:
    fd = os.open(stage / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"{out}: another pull into this folder is running; wait for it or choose another OUT") from None
    return fd


def _unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _remove_stage_if_free(stage: Path, out: Path) -> None:
    """Remove a pull's leftover folder unless another pull holds its lock."""
    if not stage.is_dir():
        return
    try:
        lock = _lock(stage, out)
    except OutputError:
        return  # another pull is using it
    try:
        shutil.rmtree(stage, ignore_errors=True)
    finally:
        _unlock(lock)


# -- offline: the local Hugging Face cache ----------------------------------------------------------------
def cache_snapshot(spec: RepoSpec) -> tuple[str, Path]:
    """(commit sha, snapshot folder) of ``spec`` in the HF cache, or a clear HubError."""
    from huggingface_hub import constants

    cache = Path(os.environ.get("HF_HUB_CACHE") or (Path(os.environ["HF_HOME"]) / "hub" if os.environ.get("HF_HOME")
                                                   else constants.HF_HUB_CACHE))
    repo_dir = cache / f"models--{spec.repo_id.replace('/', '--')}"
    rev = spec.revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        commit = rev
    else:
        try:
            commit = (repo_dir / "refs" / rev).read_text().strip()
        except OSError:
            raise HubError(f"{spec}: HF_HUB_OFFLINE=1 and the local cache ({cache}) has no {rev!r} of this repo; "
                           "pull once online, or unset HF_HUB_OFFLINE") from None
    snap = repo_dir / "snapshots" / commit
    if not snap.is_dir():
        raise HubError(f"{spec}: HF_HUB_OFFLINE=1 and the cache has no snapshot {commit[:12]} ({snap}); pull once "
                       "online, or unset HF_HUB_OFFLINE")
    return commit, snap


def cache_listing(snap: Path) -> list[RemoteFile]:
    """The snapshot's files; each one's expected hash is the name of the blob its link points to."""
    out = []
    for p in sorted(snap.rglob("*")):
        if p.is_dir():
            continue
        rel = p.relative_to(snap).as_posix()
        target = Path(os.path.realpath(p))
        name = target.name
        try:  # a link to nothing, or to a FIFO or a device (nothing a download leaves): as if not in the cache
            st = target.stat()
            size = st.st_size if stat.S_ISREG(st.st_mode) else -1
        except OSError:
            size = -1
        if re.fullmatch(r"[0-9a-f]{64}", name):
            out.append(RemoteFile(rel, size, name, None))
        elif re.fullmatch(r"[0-9a-f]{40}", name):
            out.append(RemoteFile(rel, size, None, name))
        else:
            out.append(RemoteFile(rel, size, None, None))
    return out


def _pull_offline(spec: RepoSpec, out: Path, *, gguf: str | None, include: list[str] | None, dtype: str | None,
                  overwrite: bool, bar: Progress, t0: float,
                  factory: Callable[..., StreamingConverter]) -> PullResult:
    commit, snap = cache_snapshot(spec)
    done = None if overwrite else _already(out, spec, commit)
    if done is not None:
        return PullResult(out, spec.repo_id, commit, done.get("format", "?"), done["hub"]["files"], 0, 0, True,
                          time.perf_counter() - t0, already=True)
    _check_out(out, overwrite)
    where = f"{spec.repo_id}@{commit[:12]} in the local cache (HF_HUB_OFFLINE=1)"
    listing = cache_listing(snap)
    broken = [f.path for f in listing if f.size < 0]
    # a companion whose cache entry is broken is left out with a note, as extract leaves it out; a needed file is
    # refused below
    why = "its cache entry is not a regular file (a link to nothing: the blob is gone or never finished)"
    choice = choose(listing, gguf=gguf, include=include, where=where, unusable={p: why for p in broken})
    if choice.index_needed:
        # not read_bytes(): a FIFO or a device put in the cache would hang the pull or read without end
        raw = read_regular(snap / ST_INDEX, 64 << 20, error=HubError,
                           hint=f"{where}: pull once online to download it again, or unset HF_HUB_OFFLINE")
        choice = add_index_shards(choice, listing, raw, where)
    missing = [f.path for f in choice.files if f.path in broken]
    if missing:  # a link whose blob is gone or never finished
        raise HubError(f"{where}: incomplete: {', '.join(missing[:4])} not in the cache (a download was "
                       "interrupted); nothing was converted. Pull once online, or unset HF_HUB_OFFLINE")
    present = {}
    for f in choice.files:
        try:
            check_file(snap / f.path, f, f"{where}: {f.path}")
        except IntegrityError as exc:
            raise HubError(f"{exc}; the cached file is damaged, nothing was converted: delete it from the cache "
                           "and pull online") from None
        present[f.path] = snap / f.path
    extra = _source_record(spec, commit, choice)
    extra["hub"]["offline"] = True
    conv = factory(choice, out, overwrite=overwrite, source_extra=extra, dtype=dtype,
                   progress=(lambda total, items: bar("convert", total)))
    conv.begin(staging_dir(out) / "work", set())
    conv.convert_available(present)
    result = conv.finish()
    return PullResult(out, spec.repo_id, commit, choice.kind, extra["hub"]["files"], 0,
                      sum(f.size for f in choice.files), True, time.perf_counter() - t0,
                      result.as_dict() if hasattr(result, "as_dict") else {}, str(snap),
                      companions=choice.companions, companions_skipped=choice.companions_skipped)
