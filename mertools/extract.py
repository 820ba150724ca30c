"""``extract``: copy every expert of a GGUF model into its own aligned shard, plus dense.gguf and manifest.json.

Everything is written into a hidden staging folder beside OUT and renamed into place only once the manifest,
the last file, is on disk; an interrupted or failed run never leaves an OUT that looks complete.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import xxhash

from mer_runtime.manifest import MANIFEST_NAME, parse_manifest

from . import __version__
from .dense import write_dense
from .errors import MertoolsError, OutputError
from .gguf_source import ExpertPlan, GGUFSource, open_source
from .layout import ALIGNMENT, DENSE_NAME, ShardLayout, format_version_for, place
from .units import human_bytes

SEGMENT = 4 << 20  # bytes per write: large and sequential, and memory stays flat
PIECE = 256 << 10  # bytes per hash update: small enough to stay in cache for the second hash
_ZEROS = bytes(ALIGNMENT)
WRITERS = 2
STAGING_MARK = ".mertools-staging-"


@dataclass
class ExtractResult:
    out: Path
    experts: int
    layers: int
    bytes_written: int
    expert_bytes: int
    dense_bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "experts": self.experts,
            "layers": self.layers,
            "bytes_written": self.bytes_written,
            "expert_bytes": self.expert_bytes,
            "dense_bytes": self.dense_bytes,
            "seconds": round(self.seconds, 4),
            "gb_per_s": round(self.gb_per_s, 4),
        }


def parse_ranges(spec: str | None, what: str) -> set[int] | None:
    """'0-3,7' -> {0,1,2,3,7}; None stays None (everything)."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise MertoolsError(f"--{what} {spec!r}: expected numbers and ranges such as 0-3,7") from None
    return out


def select(src: GGUFSource, layers: set[int] | None, experts: set[int] | None) -> list[ExpertPlan]:
    chosen = [p for p in src.experts if (layers is None or p.layer in layers) and (experts is None or p.expert in experts)]
    for name, want, have in (
        ("layers", layers, {p.layer for p in src.experts}),
        ("experts", experts, {p.expert for p in src.experts}),
    ):
        if want is not None and want - have:
            raise MertoolsError(
                f"--{name}: {sorted(want - have)} not in the model (it has {name} {min(have)}-{max(have)})"
            )
    return chosen


class _Writer:
    """Copies byte ranges from the source into shard files, hashing what it writes as it goes.

    The source is memory-mapped: bytes are hashed straight from the page cache and written from there, one copy
    in all (as `cp` does). Hashing works on small pieces so the second hash finds them still in cache.
    """

    def __init__(self, src: GGUFSource, tick: Callable[[int], None]):
        self.maps = []
        for p in src.files:
            with open(p, "rb") as fh:
                m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
            m.madvise(mmap.MADV_SEQUENTIAL)
            self.maps.append(m)
        self.views = [memoryview(m) for m in self.maps]
        self.tick = tick

    def close(self) -> None:
        for v in self.views:
            v.release()
        for m in self.maps:
            m.close()

    def write_shard(self, shard: ShardLayout, dst: Path, fsync: bool) -> tuple[str, dict[str, str]]:
        whole = xxhash.xxh3_64()
        hashes: dict[str, str] = {}
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            pos = 0
            for pl in shard.placed:
                pos = self._pad(fd, pos, pl.offset, whole)
                h = xxhash.xxh3_64()
                p = pl.projection
                self._copy(p.file_index, p.offset, p.nbytes, fd, (h, whole))
                pos += p.nbytes
                hashes[p.role] = h.hexdigest()
            self._pad(fd, pos, shard.size, whole)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return whole.hexdigest(), hashes

    def _pad(self, fd: int, pos: int, to: int, whole: Any) -> int:
        while pos < to:
            n = min(to - pos, len(_ZEROS))
            _write_all(fd, memoryview(_ZEROS)[:n])
            whole.update(_ZEROS[:n])
            pos += n
        return pos

    def _copy(self, fi: int, offset: int, n: int, dst: int, hashers: Iterable[Any]) -> None:
        view = self.views[fi]
        end = offset + n
        for seg_start in range(offset, end, SEGMENT):
            with view[seg_start:min(seg_start + SEGMENT, end)] as seg:
                for p in range(0, len(seg), PIECE):
                    with seg[p:p + PIECE] as piece:
                        for h in hashers:
                            h.update(piece)
                _write_all(dst, seg)
                self.tick(len(seg))


def _entry(shard: ShardLayout, whole: str, hashes: dict[str, str]) -> dict[str, Any]:
    return {
        "layer": shard.layer,
        "expert": shard.expert,
        "path": shard.path,
        "size": shard.size,
        "xxh3_64": whole,
        "tensors": {
            pl.projection.role: {
                "dtype": pl.projection.dtype,
                "shape": list(pl.projection.shape),
                "offset": pl.offset,
                "nbytes": pl.projection.nbytes,
                "xxh3_64": hashes[pl.projection.role],
                "source": pl.projection.tensor,
            }
            for pl in shard.placed
        },
    }


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_stale_staging(out: Path) -> None:
    """Remove staging folders that runs killed before they could clean up left beside OUT."""
    prefix = f".{out.name}{STAGING_MARK}"
    for p in out.parent.glob(prefix + "*"):
        try:
            pid = int(p.name[len(prefix):].split("-")[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            continue  # that run is still going
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: folder is not empty; pass --overwrite to replace it, or choose an empty folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out.parent}: cannot create the parent folder ({exc.strerror})") from None


def _check_space(where: Path, need: int) -> None:
    free = shutil.disk_usage(where).free
    if free < need:
        raise OutputError(
            f"{where}: needs {human_bytes(need)} free but only {human_bytes(free)} is; free some space or choose "
            "another OUT (use --layers/--experts to extract part of the model)"
        )


def extract(
    src_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layers: set[int] | None = None,
    experts: set[int] | None = None,
    overwrite: bool = False,
    fsync: bool = True,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> ExtractResult:
    """Extract experts from a GGUF model into OUT. Returns a summary; raises MertoolsError on bad input.

    >>> extract("mixtral-q4_0.gguf", "out/")                        # doctest: +SKIP
    >>> extract("model-00001-of-00003.gguf", "out/", layers={0, 1})  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    src = open_source(src_path)
    out = Path(out).absolute()
    _check_out(out, overwrite)
    plans = select(src, layers, experts)
    shards = [place(p) for p in plans]
    dense_tensors = src.dense_tensors()
    expert_bytes = sum(s.size for s in shards)
    # dense.gguf: its tensors plus roughly the source's metadata (file sizes minus all tensor bytes)
    dense_estimate = sum(src.sizes) - sum(t.nbytes for t in src.tensors.values()) + sum(t.nbytes for t in dense_tensors)
    _clean_stale_staging(out)
    _check_space(out.parent, expert_bytes + dense_estimate)

    staging = out.parent / f".{out.name}{STAGING_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    total = sum(p.nbytes for p in plans) + sum(t.nbytes for t in dense_tensors)
    tick = progress(total, len(shards)) if progress else (lambda n: None)
    writer = _Writer(src, tick)
    try:
        for shard in shards:
            (staging / shard.path).parent.mkdir(parents=True, exist_ok=True)
        # Shards are independent; two writers keep both cores busy hashing while the other copies.
        with ThreadPoolExecutor(max_workers=min(WRITERS, os.cpu_count() or 1)) as pool:
            written = list(pool.map(lambda sh: writer.write_shard(sh, staging / sh.path, fsync), shards))
        entries = [_entry(shard, whole, hashes) for shard, (whole, hashes) in zip(shards, written)]
        dense = write_dense(src, staging / DENSE_NAME, fsync=fsync, tick=tick)
        manifest = {
            "format_version": format_version_for(plans),
            "alignment": ALIGNMENT,
            "created_by": f"mertools {__version__}",
            "model": src.model,
            "source": src.source_info(),
            "selection": {
                "complete": len(plans) == len(src.experts),
                "layers": sorted({p.layer for p in plans}),
                "experts": sorted({p.expert for p in plans}),
            },
            "dense": dense,
            "experts": entries,
        }
        parse_manifest(manifest, staging)  # the writer must satisfy the reader every consumer uses
        mpath = staging / MANIFEST_NAME
        with open(mpath, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.write("\n")
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        if fsync:
            for d in {(staging / s.path).parent for s in shards} | {staging / "experts", staging}:
                _fsync_dir(d)
        _commit(staging, out)
        if fsync:
            _fsync_dir(out.parent)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"{out}: the disk filled up while writing ({exc.strerror}); nothing was left behind. Free space or "
                "choose another OUT"
            ) from None
        if isinstance(exc, OSError) and not isinstance(exc, MertoolsError):
            raise OutputError(f"{exc.filename or out}: {exc.strerror or exc}; nothing was left behind") from None
        raise
    finally:
        writer.close()
    return ExtractResult(
        out, len(shards), len({s.layer for s in shards}), expert_bytes + dense["size"], expert_bytes, dense["size"],
        time.perf_counter() - t0,
    )


def _commit(staging: Path, out: Path) -> None:
    """Put the finished staging folder at OUT; an old OUT (only with --overwrite) goes only after that."""
    trash = None
    if out.exists():
        if any(out.iterdir()):
            trash = out.parent / f".{out.name}.mertools-old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
        else:
            out.rmdir()
    try:
        staging.rename(out)
    except BaseException:
        if trash is not None:
            trash.rename(out)  # put the old output back: a failed replace must not lose it
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
