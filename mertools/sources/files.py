"""Read-only memory maps of a source's files, opened on first use and released one by one (thread-safe)."""

from __future__ import annotations

import mmap
import threading
from pathlib import Path

from ..errors import SourceError


class MappedFiles:
    """Mixin: ``view(i)`` maps ``self.files[i]`` once; ``release(i)`` unmaps it (before deleting the file, so its
    space is freed at once); ``close()`` unmaps all. Subclasses may check a fresh map in ``_check_map``."""

    files: list[Path]

    def _init_maps(self) -> None:
        self._maps: dict[int, tuple[mmap.mmap, memoryview]] = {}
        self._lock = threading.Lock()

    def _check_map(self, i: int, m: mmap.mmap) -> None:
        """Raise if the mapped file is not the one planned (default: accept)."""

    def view(self, i: int) -> memoryview:
        """Read-only bytes of source file `i`."""
        with self._lock:
            if i not in self._maps:
                p = self.files[i]
                try:
                    with open(p, "rb") as fh:
                        m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
                except FileNotFoundError:
                    raise SourceError(f"{p}: missing; it holds tensors the conversion needs") from None
                except (OSError, ValueError) as exc:
                    raise SourceError(f"{p}: cannot be mapped for reading ({exc})") from None
                try:
                    self._check_map(i, m)
                except BaseException:
                    m.close()
                    raise
                m.madvise(mmap.MADV_SEQUENTIAL)
                self._maps[i] = (m, memoryview(m))
            return self._maps[i][1]

    def release(self, i: int) -> None:
        """Unmap source file `i`; a later ``view(i)`` maps it again."""
        with self._lock:
            if i in self._maps:
                m, v = self._maps.pop(i)
                v.release()
                m.close()

    def close(self) -> None:
        with self._lock:
            for m, v in self._maps.values():
                try:
                    v.release()
                    m.close()
                except BufferError:
                    pass  # a view is still alive (e.g. in a traceback being raised): the map goes with its last view
            self._maps.clear()
