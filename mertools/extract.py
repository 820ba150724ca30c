"""``extract``: copy every expert of a GGUF model into its own aligned shard, plus dense.gguf and manifest.json.

Everything is written into a hidden staging folder beside OUT and renamed into place only once the manifest,
the last file, is on disk (mertools.commit); an interrupted or failed run never leaves an OUT that looks complete.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import xxhash

from mer_runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, parse_manifest

from . import __version__
from .commit import MARKER, STAGING_MARK, staged_output, test_point  # noqa: F401  (STAGING_MARK: old import path)
from .dense import write_dense
from .errors import MertoolsError
from .gguf_source import ExpertPlan, GGUFSource, open_source
from .layout import ALIGNMENT, DENSE_NAME, ShardLayout, place
from .ranges import Ranges, as_ranges, parse_ranges  # noqa: F401  (parse_ranges: old import path)
from .reassemble import record_for_reassembly

SEGMENT = 4 << 20  # bytes per write: large and sequential, and memory stays flat
PIECE = 256 << 10  # bytes per hash update: small enough to stay in cache for the second hash
_ZEROS = bytes(ALIGNMENT)
WRITERS = 2


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


def select(src: GGUFSource, layers: Iterable[int] | Ranges | None, experts: Iterable[int] | Ranges | None
           ) -> list[ExpertPlan]:
    """The experts of ``src`` in the chosen layers and expert numbers (None: all); refuses numbers the model lacks."""
    layers, experts = as_ranges(layers), as_ranges(experts)
    chosen = [p for p in src.experts if (layers is None or p.layer in layers) and (experts is None or p.expert in experts)]
    for name, want, have in (
        ("layers", layers, {p.layer for p in src.experts}),
        ("experts", experts, {p.expert for p in src.experts}),
    ):
        if want is not None and (gone := want.missing(have)):
            raise MertoolsError(
                f"--{name}: [{gone}] not in the model (it has {name} {min(have)}-{max(have)})"
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


def extract(
    src_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layers: Iterable[int] | Ranges | None = None,
    experts: Iterable[int] | Ranges | None = None,
    overwrite: bool = False,
    fsync: bool = True,
    wait: bool = False,
    marker: str | None = MARKER,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> ExtractResult:
    """Extract experts from a GGUF model into OUT. Returns a summary; raises MertoolsError on bad input.

    OUT appears complete or not at all; see :func:`mertools.commit.staged_output` for the rules (lock, overwrite,
    signals, crash recovery), ``wait`` and ``marker`` (the file a folder must hold for ``overwrite`` to replace it).

    >>> extract("mixtral-q4_0.gguf", "out/")                        # doctest: +SKIP
    >>> extract("model-00001-of-00003.gguf", "out/", layers={0, 1})  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    src = open_source(src_path)
    plans = select(src, layers, experts)
    shards = [place(p) for p in plans]
    dense_tensors = src.dense_tensors()
    expert_bytes = sum(s.size for s in shards)
    # dense.gguf: its tensors plus roughly the source's metadata (file sizes minus all tensor bytes)
    dense_estimate = sum(src.sizes) - sum(t.nbytes for t in src.tensors.values()) + sum(t.nbytes for t in dense_tensors)
    total = sum(p.nbytes for p in plans) + sum(t.nbytes for t in dense_tensors)
    out = Path(os.path.abspath(out))
    with staged_output(out, overwrite=overwrite, sources=src.files, fsync=fsync, wait=wait, marker=marker,
                       need_bytes=expert_bytes + dense_estimate) as staging:
        tick = progress(total, len(shards)) if progress else (lambda n: None)
        writer = _Writer(src, tick)
        try:
            for shard in shards:
                (staging / shard.path).parent.mkdir(parents=True, exist_ok=True)

            def write(sh: ShardLayout) -> tuple[str, dict[str, str]]:
                r = writer.write_shard(sh, staging / sh.path, fsync)
                test_point("writing")
                return r

            # Shards are independent; two writers keep both cores busy hashing while the other copies.
            pool = ThreadPoolExecutor(max_workers=min(WRITERS, os.cpu_count() or 1))
            try:
                written = list(pool.map(write, shards))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # on an error or a signal, stop at once
            entries = [_entry(shard, whole, hashes) for shard, (whole, hashes) in zip(shards, written)]
            dense = write_dense(src, staging / DENSE_NAME, fsync=fsync, tick=tick)
            # what `reassemble` needs beyond shards and dense.gguf (source headers, tensor places, xxh3s); whole
            # models only
            record = record_for_reassembly(src, staging, fsync=fsync) if len(plans) == len(src.experts) else None
            manifest = {
                "format_version": FORMAT_VERSION,
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
            if record is not None:
                manifest["reassembly"] = record
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
        finally:
            writer.close()
    return ExtractResult(
        out, len(shards), len({s.layer for s in shards}), expert_bytes + dense["size"], expert_bytes, dense["size"],
        time.perf_counter() - t0,
    )
