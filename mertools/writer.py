"""The aligned shard writer: one expert's projections into one file, hashed as they are written.

A projection is either copied as a byte range from the source's memory map (one copy, as ``cp`` does; hashed in
small pieces so the second hash finds them still in cache), or produced in row bands by its transform
(transpose, de-interleave, MXFP4 repack, quantize). Thread-safe: several threads may write different shards with
one writer (the source's views are opened under its lock; each call has its own file and hashers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

import xxhash

from .commit import start_writeback
from .errors import SourceError
from .layout import ALIGNMENT, ShardLayout

SEGMENT = 4 << 20  # bytes per write: large and sequential, and memory stays flat
PIECE = 256 << 10  # bytes per hash update: small enough to stay in cache for the second hash
_ZEROS = bytes(ALIGNMENT)


class ShardWriter:
    """Writes shards of `src` (any ``sources.Source``); `tick(n)` is called with the bytes written."""

    def __init__(self, src: Any, tick: Callable[[int], None], writeback: bool = False):
        """writeback: start each shard's writeback as soon as it is written (for an output flushed at the end)."""
        self.src = src
        self.tick = tick
        self.writeback = writeback

    def close(self) -> None:
        """Nothing of its own to release: the source owns its memory maps (``src.close()``)."""

    def write_shard(self, shard: ShardLayout, dst: Path) -> tuple[str, dict[str, str]]:
        """Write `shard` to `dst` (created, must not exist); returns (xxh3 of the file, {role: xxh3}).

        Not flushed: the output is made durable all at once (mertools.commit.flush_tree, or ``write_experts``'s
        ``fsync``), which lets the disk take every shard's writeback together instead of one file at a time.
        """
        whole = xxhash.xxh3_64()
        hashes: dict[str, str] = {}
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            pos = 0
            for pl in shard.placed:
                pos = self._pad(fd, pos, pl.offset, whole)
                h = xxhash.xxh3_64()
                p = pl.projection
                produce = getattr(p, "produce", None)
                if produce is None:
                    self._copy(p.file_index, p.offset, p.nbytes, fd, (h, whole))
                else:
                    self._produce(p, produce, fd, (h, whole))
                pos += p.nbytes
                hashes[p.role] = h.hexdigest()
            self._pad(fd, pos, shard.size, whole)
            if self.writeback:
                start_writeback(fd)
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
        view = self.src.view(fi)
        end = offset + n
        if end > len(view):
            raise SourceError(f"{self.src.files[fi]}: {len(view)} bytes, but a projection needs bytes up to {end}; "
                              "the file is truncated")
        check = getattr(self.src, "check", None)
        for seg_start in range(offset, end, SEGMENT):
            if check is not None:
                check(fi)  # before touching: without the C guard a shrunk file must be caught here
            with view[seg_start:min(seg_start + SEGMENT, end)] as seg:
                for p in range(0, len(seg), PIECE):
                    with seg[p:p + PIECE] as piece:
                        for h in hashers:
                            h.update(piece)
                self._write_read(dst, seg, fi)
                self.tick(len(seg))

    def _produce(self, p: Any, produce: Any, dst: int, hashers: Iterable[Any]) -> None:
        done = 0
        for band in produce(self.src.view):
            mv = memoryview(band).cast("B")
            for h in hashers:
                h.update(mv)
            self._write_read(dst, mv, None)
            done += len(mv)
            self.tick(len(mv))
        if done != p.nbytes:  # a transform that disagrees with its own plan must not pass silently
            raise SourceError(f"{p.tensor}: its {p.transform} transform gave {done} bytes, the plan says {p.nbytes}")

    def _write_read(self, dst: int, data: memoryview, fi: int | None) -> None:
        """Write bytes read from the source, then make sure they were really read: a source file that shrank
        meanwhile raises FileChangedError (mer_runtime.guard) naming it, also when write() itself found the
        mapped pages gone (EFAULT)."""
        check = getattr(self.src, "check", None)
        try:
            _write_all(dst, data)
        except OSError:
            if check is not None:
                check(fi)
            raise
        if check is not None:
            check(fi)


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]
