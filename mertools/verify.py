"""``verify``: every shard present, of the right size and alignment, every whole-file and projection checksum right,
dense.gguf, the reassembly record and the checkpoint's companion files (``hf/``) likewise, and the manifest itself
unchanged (its ``manifest_xxh3``).

One sequential pass per file (mer_runtime.checksum) feeds the whole-file hash and the hash of whichever projection
the bytes belong to, so verification reads each byte once; with ``--deep --against SRC`` the same pass also
compares each projection's bytes with the source's (mertools.deep.scan_shard). Files are opened with
``open_regular`` (``O_NONBLOCK``, fstat), so an expert replaced by a FIFO, a device, a directory or a link out of
the folder is one more problem in the list, never a hang. A damaged folder always gives a report with ``ok`` False (the CLI exits 1) listing every
problem found; only bad arguments (a source that cannot be read for ``--against``) raise.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mer_runtime.checksum import hash_fd, hash_file
from mer_runtime.errors import ManifestError, MerError
from mer_runtime.manifest import (COMPANION_DIR, HASH_FIELD, MANIFEST_NAME, ExpertEntry, Manifest, decode_manifest,
                                  manifest_integrity, parse_manifest, read_manifest_bytes)
from mer_runtime.safeopen import open_regular

from .report import Problem, VerifyReport

if TYPE_CHECKING:  # deep verify (numpy, gguf, the runtime) is imported only by a verify that goes deep
    from .deep import SourceReference

__all__ = ["Problem", "VerifyReport", "check_companions", "check_dense", "check_expert", "check_manifest", "verify"]


def _why(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or str(exc)


def check_manifest(folder: str | os.PathLike[str]) -> tuple[Manifest | None, list[Problem], list[Problem]]:
    """(the manifest or None if it cannot be used, problems, warnings) for folder/manifest.json.

    A manifest that parses but whose manifest_xxh3 does not match is returned with a problem, so that the shards
    are still checked and the report lists everything.
    """
    root = Path(folder)
    where = root / MANIFEST_NAME
    try:
        data = read_manifest_bytes(root)
        raw = decode_manifest(data, where)
        m = parse_manifest(raw, root)
    except ManifestError as exc:
        return None, [Problem(MANIFEST_NAME, str(exc))], []
    try:
        m.integrity = manifest_integrity(data, raw, where)
    except ManifestError as exc:
        return m, [Problem(MANIFEST_NAME, str(exc))], []
    if m.integrity == "absent":
        return m, [], [Problem(MANIFEST_NAME, f"has no {HASH_FIELD} (written by an older mertools), so an edit of "
                                              "the manifest itself cannot be detected; re-extract to add one")]
    return m, [], []


def _open_listed(m: Manifest, rel: str, what: str, size: int) -> tuple[int | None, list[Problem]]:
    """(fd, []) for a listed file of the expected size, else (None, [the problem])."""
    if not os.path.lexists(m.root / rel):
        return None, [Problem(rel, "missing")]
    try:
        fd, st = open_regular(m.resolve(rel, what))
    except MerError as exc:
        return None, [Problem(rel, _why(exc))]
    if st.st_size != size:
        os.close(fd)
        short = "truncated" if st.st_size < size else "too long"
        return None, [Problem(rel, f"{short}: {st.st_size} bytes, manifest says {size}")]
    return fd, []


def check_expert(m: Manifest, e: ExpertEntry, tick: Callable[[int], None], against: SourceReference | None = None,
                 mismatches: list[Problem] | None = None) -> tuple[list[Problem], int]:
    """(problems, bytes read) for one expert file: present, a regular file inside the folder, size, checksums.

    With `against` (verify --deep --against), the same pass also compares every projection's bytes with the source
    (mertools.deep.scan_shard) and appends what differs to `mismatches`, kept apart because such an expert is still
    run through the runtime.
    """
    rel = e.path
    fd, probs = _open_listed(m, rel, f"layer {e.layer} expert {e.expert}", e.size)
    if fd is None:
        return probs, 0
    try:
        if against is not None:
            from .deep import scan_shard, source_regions

            found: list[Problem] = []
            whole, parts, n, differ = scan_shard(fd, e, source_regions(against, e, found), tick)
            mismatches.extend(found + differ)  # list.extend is atomic under the GIL: the pool's threads share it
        else:
            ranges = [(t.offset, t.offset + t.nbytes, role) for role, t in e.tensors.items()]
            whole, parts, n = hash_fd(fd, e.size, ranges, tick)
    except (OSError, ValueError) as exc:
        return [Problem(rel, f"cannot read ({exc})")], 0
    finally:
        os.close(fd)
    for role, t in e.tensors.items():
        if parts[role] != t.xxh3_64:
            probs.append(Problem(rel, f"{role} checksum mismatch (xxh3 {parts[role]}, manifest {t.xxh3_64})"))
    if whole != e.xxh3_64:
        where = "in the padding" if not probs else "in the file"
        probs.append(Problem(rel, f"file checksum mismatch {where} (xxh3 {whole}, manifest {e.xxh3_64})"))
    return probs, n


def _check_reassembly_record(m: Manifest) -> list[Problem]:
    """The optional ``reassembly`` record (mertools.reassemble): present, of its size and xxh3 (like the manifest,
    metadata: its bytes are not counted in bytes_read)."""
    rec = m.raw.get("reassembly")
    if rec is None:
        return []
    from mer_runtime.manifest import plain_name

    rel = rec.get("path") if isinstance(rec, dict) else None
    if not plain_name(rel):
        return [Problem("manifest.json", "reassembly: bad or missing path")]
    try:
        whole, _, n = hash_file(m.resolve(rel, "reassembly record"))  # a regular file only (never a FIFO)
    except MerError as exc:
        return [Problem(rel, getattr(exc, "reason", str(exc)))]
    if n != rec.get("size") or whole != rec.get("xxh3_64"):
        return [Problem(rel, f"size {n} / xxh3 {whole} differ from the manifest's {rec.get('size')} / "
                             f"{rec.get('xxh3_64')}")]
    return []


def _check_whole(m: Manifest, rel: str, what: str, size: int, xxh3: str,
                 tick: Callable[[int], None]) -> tuple[list[Problem], int]:
    """(problems, bytes read) for a listed file checked whole: present, a regular file inside the folder, its size
    and xxh3."""
    fd, probs = _open_listed(m, rel, what, size)
    if fd is None:
        return probs, 0
    try:
        whole, _, n = hash_fd(fd, size, (), tick)
    except (OSError, ValueError) as exc:
        return [Problem(rel, f"cannot read ({exc})")], 0
    finally:
        os.close(fd)
    if whole != xxh3:
        return [Problem(rel, f"checksum mismatch (xxh3 {whole}, manifest {xxh3})")], n
    return [], n


def check_dense(m: Manifest, tick: Callable[[int], None]) -> tuple[list[Problem], int]:
    """(problems, bytes read) for dense.gguf, when the manifest lists one."""
    if not m.dense:
        return [], 0
    return _check_whole(m, m.dense["path"], "dense", m.dense["size"], m.dense["xxh3_64"], tick)


def check_companions(m: Manifest, tick: Callable[[int], None]) -> tuple[list[Problem], int]:
    """(problems, bytes read) for the checkpoint's companion files in hf/ (tokenizer, ...), when listed."""
    probs, total = [], 0
    for c in m.companions:
        p, n = _check_whole(m, c.path, "companion file", c.size, c.xxh3_64, tick)
        probs += p
        total += n
    return probs, total


def _unlisted(m: Manifest, folder: str, listed: set[str]) -> list[Problem]:
    """A warning for each file under ``folder`` (experts/, hf/) that the manifest does not list."""
    d = m.root / folder
    if not d.is_dir() or d.is_symlink():
        return []
    return [Problem(rel, "not listed in the manifest") for p in sorted(d.rglob("*"))
            if (rel := p.relative_to(m.root).as_posix()) not in listed and not p.is_dir()]


def verify(
    folder: str | os.PathLike[str],
    *,
    deep: bool = False,
    against: str | os.PathLike[str] | None = None,
    io: str = "auto",
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    deep_progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> VerifyReport:
    """Check an extracted folder; the report lists every problem found (empty when all is well).

    With deep=True every expert is also run through the runtime and compared with a float64 reference computed
    from `against` (the source model) or, without it, from the shard bytes (see mertools.deep). Experts with a
    problem are not run.

    >>> report = verify("out/")                                        # doctest: +SKIP
    >>> report = verify("out/", deep=True, against="model.gguf")       # doctest: +SKIP
    >>> report.ok, report.problems                                     # doctest: +SKIP
    """
    t0 = time.perf_counter()
    report = VerifyReport(Path(folder))
    m, probs, warns = check_manifest(folder)
    report.problems += probs
    report.warnings += warns
    if m is None:
        report.seconds = time.perf_counter() - t0
        return report
    total = sum(e.size for e in m.experts) + (m.dense["size"] if m.dense else 0) + sum(c.size for c in m.companions)
    tick = progress(total, len(m.experts)) if progress else (lambda n: None)
    if deep:
        from .deep import RUNTIME_EXPERTS, SourceReference, deep_verify, open_runtime
    # with --against, the checksum pass also compares the bytes with the source: each shard byte is read once
    src = SourceReference(against, m) if deep and against is not None else None
    # the runtime's ring and first expert load in the background, overlapping the checksum pass
    ahead = ThreadPoolExecutor(max_workers=1) if deep and m.experts else None
    runtime = ahead.submit(open_runtime, m, io, m.experts[:RUNTIME_EXPERTS]) if ahead else None
    mismatches: list[Problem] = []

    try:
        # xxhash and memcmp release the GIL: two or more files at once beat one sequential reader (bench_extract.py)
        pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        try:
            for probs, n in pool.map(lambda e: check_expert(m, e, tick, src, mismatches), m.experts):
                report.problems.extend(probs)
                report.bytes_read += n
                report.experts_checked += 1
        finally:
            # an error (a shard that shrank, Ctrl-C) stops the pass now, not after every queued expert is hashed
            pool.shutdown(cancel_futures=True)
        compared = {e.path for e in m.experts} - {p.path for p in report.problems}
        probs, n = check_dense(m, tick)
        report.problems += probs
        report.bytes_read += n
        report.problems.extend(_check_reassembly_record(m))
        probs, n = check_companions(m, tick)
        report.problems += probs
        report.bytes_read += n
        report.warnings += _unlisted(m, "experts", {e.path for e in m.experts})
        report.warnings += _unlisted(m, COMPANION_DIR, {c.path for c in m.companions})
        report.checksum_seconds = time.perf_counter() - t0
        if deep:
            names = [f["name"] for f in m.source.get("files", [])]
            folder_ok = against is not None and Path(against).is_dir() and names and all(
                (Path(against) / n).is_file() for n in names)
            if against is not None and Path(against).name not in names and not folder_ok:
                report.warnings.append(Problem(str(against), "is not the file this folder was extracted from "
                                                             f"({', '.join(names) or 'the manifest names none'})"))
            order = {e.path: i for i, e in enumerate(m.experts)}  # the pool's threads appended in any order
            mismatches.sort(key=lambda p: order.get(p.path, -1))
            shards, runtime = runtime.result() if runtime else None, None
            deep_verify(report, m, against=src, io=io, progress=deep_progress,
                        compared=compared if src is not None else (), known=mismatches, shards=shards)
    finally:
        if runtime is not None and not isinstance(shards := runtime.result(), MerError) and shards is not None:
            shards.close()  # deep_verify was not reached (it closes what it is given)
        if ahead is not None:
            ahead.shutdown()
        if src is not None:
            src.close()
    report.seconds = time.perf_counter() - t0
    return report
