"""``verify``: every shard present, of the right size and alignment, every whole-file and projection checksum right.

One sequential pass per file (mer_runtime.checksum) feeds the whole-file hash and the hash of whichever projection
the bytes belong to, so verification reads each byte once.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mer_runtime.checksum import hash_file
from mer_runtime.errors import ManifestError
from mer_runtime.manifest import ExpertEntry, Manifest, load_manifest



@dataclass
class Problem:
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


@dataclass
class VerifyReport:
    folder: Path
    experts_checked: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    checksum_seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    deep: dict[str, Any] | None = None

    @property
    def gb_per_s(self) -> float:
        """Checksum throughput: bytes read over the time of the checksum pass alone."""
        return self.bytes_read / self.checksum_seconds / 1e9 if self.checksum_seconds else 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        d = {
            "folder": str(self.folder),
            "ok": self.ok,
            "experts_checked": self.experts_checked,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 4),
            "gb_per_s": round(self.gb_per_s, 4),
            "problems": [{"path": p.path, "problem": p.what} for p in self.problems],
            "warnings": [{"path": p.path, "problem": p.what} for p in self.warnings],
        }
        if self.deep is not None:
            d["deep"] = self.deep
        return d


def check_expert(m: Manifest, e: ExpertEntry, tick: Callable[[int], None]) -> tuple[list[Problem], int]:
    rel = e.path
    path = m.path_of(e)
    if not path.exists():
        return [Problem(rel, "missing")], 0
    if not path.is_file():
        return [Problem(rel, "is not a regular file")], 0
    size = path.stat().st_size
    if size != e.size:
        what = "truncated" if size < e.size else "too long"
        return [Problem(rel, f"{what}: {size} bytes, manifest says {e.size}")], 0
    ranges = [(t.offset, t.offset + t.nbytes, role) for role, t in e.tensors.items()]
    whole, parts, n = hash_file(path, ranges, tick)
    probs = []
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
    rel = rec.get("path") if isinstance(rec, dict) else None
    if not isinstance(rel, str) or "/" in rel or rel.startswith(".") or not rel:
        return [Problem("manifest.json", "reassembly: bad or missing path")]
    path = m.root / rel
    if not path.is_file():
        return [Problem(rel, "missing")]
    whole, _, n = hash_file(path)
    if n != rec.get("size") or whole != rec.get("xxh3_64"):
        return [Problem(rel, f"size {n} / xxh3 {whole} differ from the manifest's {rec.get('size')} / "
                             f"{rec.get('xxh3_64')}")]
    return []


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
    from `against` (the source model) or, without it, from the shard bytes (see mertools.deep).

    >>> report = verify("out/")                                        # doctest: +SKIP
    >>> report = verify("out/", deep=True, against="model.gguf")       # doctest: +SKIP
    >>> report.ok, report.problems                                     # doctest: +SKIP
    """
    t0 = time.perf_counter()
    report = VerifyReport(Path(folder))
    try:
        m = load_manifest(folder)
    except ManifestError as exc:
        report.problems.append(Problem("manifest.json", str(exc)))
        report.seconds = time.perf_counter() - t0
        return report
    total = sum(e.size for e in m.experts) + (m.dense["size"] if m.dense else 0)
    tick = progress(total, len(m.experts)) if progress else (lambda n: None)
    # xxhash releases the GIL: two or more files hashed at once beat one sequential reader (see bench_extract.py)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for probs, n in pool.map(lambda e: check_expert(m, e, tick), m.experts):
            report.problems.extend(probs)
            report.bytes_read += n
            report.experts_checked += 1
    if m.dense:
        d = m.dense
        path = m.root / d["path"]
        if not path.is_file():
            report.problems.append(Problem(d["path"], "missing"))
        elif path.stat().st_size != d["size"]:
            report.problems.append(Problem(d["path"], f"{path.stat().st_size} bytes, manifest says {d['size']}"))
        else:
            whole, _, n = hash_file(path, (), tick)
            report.bytes_read += n
            if whole != d["xxh3_64"]:
                report.problems.append(Problem(d["path"], f"checksum mismatch (xxh3 {whole}, manifest {d['xxh3_64']})"))
    report.problems.extend(_check_reassembly_record(m))
    listed = {e.path for e in m.experts}
    experts_dir = m.root / "experts"
    if experts_dir.is_dir():
        for p in sorted(experts_dir.rglob("*")):
            rel = p.relative_to(m.root).as_posix()
            if p.is_file() and rel not in listed:
                report.warnings.append(Problem(rel, "not listed in the manifest"))
    report.checksum_seconds = time.perf_counter() - t0
    if deep:
        from .deep import deep_verify

        names = {f["name"] for f in m.source.get("files", [])}
        folder_ok = against is not None and Path(against).is_dir() and names and all(
            (Path(against) / n).is_file() for n in names)
        if against is not None and Path(against).name not in names and not folder_ok:
            report.warnings.append(Problem(str(against), "is not the file this folder was extracted from "
                                                         f"({', '.join(f['name'] for f in m.source['files'])})"))

        deep_verify(report, m, against=against, io=io, progress=deep_progress)
    report.seconds = time.perf_counter() - t0
    return report
