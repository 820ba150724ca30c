"""Read-only memory maps of a source's files, opened on first use and released one by one (thread-safe).

Each map is guarded (mer_runtime.guard): a source file that shrinks while it is read (a download still being
written, a ``truncate``) raises FileChangedError naming it from ``view``/``check`` instead of killing the process
with SIGBUS; readers call ``check(i)`` after each piece they used.
"""

from __future__ import annotations

import mmap
import threading
from pathlib import Path

from mer_runtime.guard import Guard, guard_mapping

from ..errors import SourceError


class MappedFiles:
    """Mixin: ``view(i)`` maps ``self.files[i]`` once; ``release(i)`` unmaps it (before deleting the file, so its
    space is freed at once); ``close()`` unmaps all. Subclasses may check a fresh map in ``_check_map``."""

    files: list[Path]

    def _init_maps(self) -> None:
        self._maps: dict[int, tuple[mmap.mmap, memoryview]] = {}
        self._guards: dict[int, Guard] = {}
        self._lock = threading.Lock()

    def _check_map(self, i: int, m: mmap.mmap) -> None:
        """Raise if the mapped file is not the one planned (default: accept)."""

    def view(self, i: int) -> memoryview:
        """Read-only bytes of source file `i` (raises FileChangedError if the file shrank since it was mapped)."""
        with self._lock:
            if i in self._guards:
                self._guards[i].check()
            if i not in self._maps:
                p = self.files[i]
                try:
                    with open(p, "rb") as fh:
                        m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
                        guard = guard_mapping(m, len(m), p)
                except FileNotFoundError:
                    raise SourceError(f"{p}: missing; it holds tensors the conversion needs") from None
                except (OSError, ValueError) as exc:
                    raise SourceError(f"{p}: cannot be mapped for reading ({exc})") from None
                try:
                    self._check_map(i, m)
                    guard.check()
                except BaseException:
                    guard.close()
                    m.close()
                    raise
                m.madvise(mmap.MADV_SEQUENTIAL)
                self._maps[i] = (m, memoryview(m))
                self._guards[i] = guard
            return self._maps[i][1]

    def drop(self, i: int, start: int, stop: int) -> None:
        """Drop this process's mapped pages of bytes start..stop of file `i` (whole pages inside the range only):
        they stay in the page cache, a later read faults them back. Bounds the resident memory of a long pass
        (deep verify) to what it is using. A no-op when the file is not mapped."""
        with self._lock:
            if i not in self._maps:
                return
            m = self._maps[i][0]
            lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
            hi = min(stop // mmap.PAGESIZE * mmap.PAGESIZE, len(m))
            if hi > lo:
                m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def check(self, i: int | None = None) -> None:
        """Raise FileChangedError if source file `i` (None: any mapped one) shrank while mapped: what was read from
        it since the last check may be zeros (see mer_runtime.guard). Cheap: one counter read and one fstat per file."""
        with self._lock:
            guards = [self._guards.get(i)] if i is not None else list(self._guards.values())
        for g in guards:
            if g is not None:
                g.check()

    def guarded(self, i: int) -> bool:
        """Whether source file `i` is mapped and its mapping is covered by the SIGBUS handler (``Guard.guarded``);
        when not, a reader must ``check(i)`` before it touches the file's pages."""
        with self._lock:
            g = self._guards.get(i)
            return g is not None and g.guarded

    def release(self, i: int) -> None:
        """Unmap source file `i`; a later ``view(i)`` maps it again."""
        with self._lock:
            if i in self._maps:
                m, v = self._maps.pop(i)
                self._guards.pop(i).close()
                v.release()
                m.close()

    def close(self) -> None:
        with self._lock:
            for g in self._guards.values():
                g.close()
            self._guards.clear()
            for m, v in self._maps.values():
                try:
                    v.release()
                    m.close()
                except BufferError:
                    pass  # a view is still alive (e.g. in a traceback being raised): the map goes with its last view
            self._maps.clear()
