"""A clear error, not a dead process, when a file shrinks while this process reads it through a memory map.

Touching a mapped page past a file's new end (a download being rewritten, a ``truncate``, a full network file
system) raises SIGBUS, which ends the process with no message in the middle of xxhash, memcmp or NumPy. Every
read-only mapping of a file we do not own is registered here (`guard_mapping`, `map_file`); the small C handler
``_sigbus_guard.c`` (built at install, loaded with ctypes) maps zeros over a registered mapping from the faulting
page to its end, in one go (one signal and one kernel mapping per file, however many pages are touched), counts
the fault and lets the interrupted code finish on zeros. Readers call `Guard.check` after each piece and before the
bytes read are used (a counter read and one fstat of the mapped file) and `Guard.finish` at the end, which raise
`FileChangedError` naming the file; the zeros read are never used, and the caller's usual clean-up runs. The size is compared in both modes because a file cut in the
middle of a page raises no SIGBUS at all: the kernel zero-fills the rest of that page.

Without the compiled handler (no C compiler at install) `check` is the size comparison alone, so a file that shrank
between two pieces still gets the clear error; one that shrinks in the middle of a piece ends the process as
before. ``GUARDED`` says which. Not seen in either mode: a file cut and regrown to its old size in place between
two checks (its bytes are then whatever the writer put back).

Thread-safe: the C handler runs on the faulting thread and only reads the registration table; registration takes
a lock. Faults outside registered mappings go to the previous handler (faulthandler's, or the default action).

>>> import mmap, os
>>> fd = os.open(__file__, os.O_RDONLY)
>>> mm, g = map_file(fd, os.fstat(fd).st_size, __file__)
>>> g.check(); g.close(); mm.close(); os.close(fd)
"""

from __future__ import annotations

import ctypes
import mmap
import os
import warnings
import weakref
from typing import Any, Iterator

from .errors import MerError
from .native import load_library


class FileChangedError(MerError):
    """A file changed size (or was truncated) while it was being read; re-run once it is complete."""


def _load() -> tuple[ctypes.CDLL, Any] | None:
    if os.environ.get("MER_SIGBUS_GUARD") == "off":  # the fallback, for tests and for comparison
        return None
    lib = load_library("_sigbus_guard")
    if lib is None:
        return None
    lib.mer_guard_install.restype = ctypes.c_int
    lib.mer_guard_register.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mer_guard_register.restype = ctypes.c_int
    lib.mer_guard_unregister.argtypes = [ctypes.c_int]
    lib.mer_guard_unregister.restype = None
    faults = (ctypes.c_long * lib.mer_guard_slots()).in_dll(lib, "mer_guard_faults")
    return lib, faults


_LOADED = _load()
_LIB, _FAULTS = _LOADED if _LOADED else (None, None)
GUARDED = _LIB is not None  # False: the size-check fallback (see the module docstring)


def changed(path: str | os.PathLike[str], was: int, now: int | None) -> FileChangedError:
    """The error for a file of `was` bytes that now has `now` (None: gone)."""
    if now == was:  # a page failed to read, yet the size is back (rewritten meanwhile) or never changed (EIO)
        return FileChangedError(f"{path}: part of it could not be read while it was mapped ({was} bytes; an I/O error, "
                                "or the file was truncated and rewritten meanwhile); check it, and re-run when it is "
                                "complete")
    what = "is gone" if now is None else f"now {now}"
    return FileChangedError(f"{path} changed size while being read (was {was} bytes, {what}): it is still being "
                            "written (a download?) or was truncated or replaced; re-run when it is complete")


class Guard:
    """One registered read-only mapping of `size` bytes of a file (by `path`, or an open `fd`). `poll()` before
    each piece (or walk them with `pieces`), `check()` before the bytes read are used, `finish()` at the end; `close()` BEFORE the mapping is unmapped
    (a slot left registered over memory that is gone could swallow the SIGBUS of an unrelated mapping that the
    kernel puts at the same address; collecting the mapped object also unregisters, but CPython unmaps first).

    `check` takes the size with one fstat of the descriptor the mapping object itself keeps (``mmap.size()``; no
    descriptor of our own, so a split set of hundreds of files costs none extra): the very file mapped, whatever
    was renamed over its path since. Without an mmap object (or once it is closed) it stats `path`, or `fd`."""

    __slots__ = ("path", "fd", "size", "slot", "_mm", "_fin", "__weakref__")

    def __init__(self, owner: Any, addr: int, length: int, size: int, path: str | os.PathLike[str] | None = None,
                 fd: int | None = None):
        self.path, self.fd, self.size, self.slot = path, fd, size, -1
        self._mm = weakref.ref(owner) if isinstance(owner, mmap.mmap) else None
        if _LIB is not None and length > 0:
            _LIB.mer_guard_install()  # again each time: faulthandler.enable() may have put its handler on top
            self.slot = _LIB.mer_guard_register(addr, length)
            if self.slot < 0:
                _slots_full()
        # the mapping may outlive this object's user (a view kept by NumPy): unregister with it (late: see above)
        self._fin = weakref.finalize(owner, _release, self.slot)

    def name(self) -> str:
        return _name_of(self.path, self.fd)

    def _now(self) -> int | None:
        mm = self._mm() if self._mm is not None else None
        if mm is not None:
            try:
                return mm.size()
            except (ValueError, OSError):  # closed (ValueError); or the descriptor failed: ask by name below
                pass
        try:
            return (os.fstat(self.fd) if self.path is None else os.stat(self.path)).st_size
        except OSError:
            return None

    @property
    def guarded(self) -> bool:
        """Whether the C handler covers this mapping now: False without the compiled handler, when its slot table
        was full at registration (more than its slots of live mappings; see the RuntimeWarning), or once closed.
        An unguarded mapping must be `check`ed before each touch (a page past a shrunk file's end is SIGBUS).

        >>> import os
        >>> fd = os.open(__file__, os.O_RDONLY)
        >>> mm, g = map_file(fd, os.fstat(fd).st_size, __file__)
        >>> g.guarded == GUARDED
        True
        >>> g.close(); g.guarded
        False
        >>> mm.close(); os.close(fd)
        """
        return self.slot >= 0 and self._fin.alive

    def faulted(self) -> bool:
        """Whether a page of the mapping could not be read (the file shrank under it)."""
        return self.guarded and _FAULTS[self.slot] != 0

    def check(self) -> None:
        """Raise FileChangedError if the mapping faulted or the file is now shorter than when mapped (one fstat).

        Both, in both modes: a file cut in the middle of a page raises no SIGBUS (the kernel zero-fills the rest of
        that page), so only the size tells. Not seen: a file cut and regrown to its size between two checks."""
        if self.faulted():
            raise changed(self.name(), self.size, self._now())
        if (now := self._now()) is None or now < self.size:
            raise changed(self.name(), self.size, now)

    def poll(self) -> None:
        """The cheap per-piece test of a pass that ends with `finish()` (or `check()`) before its results are used:
        with the C handler one counter read (a fault), without it the size (one fstat: the fallback must not touch
        a page past the end). Not complete on its own: a cut in the middle of a page is only seen by the size.

        >>> import os
        >>> fd = os.open(__file__, os.O_RDONLY)
        >>> mm, g = map_file(fd, os.fstat(fd).st_size, __file__)
        >>> g.poll(); g.finish(); g.close(); mm.close(); os.close(fd)
        """
        if not self.guarded:
            self.check()
        elif self.faulted():
            raise changed(self.name(), self.size, self._now())

    def pieces(self, mv: memoryview, size: int, step: int) -> Iterator[tuple[int, int, memoryview]]:
        """(pos, end, mv[pos:end]) over the first `size` bytes, `step` at a time, each `poll`ed before it is touched
        (the fallback must not touch a page of a shrunk file) and released when the caller moves on. The caller
        still `finish()`es before using what it computed.

        >>> import os
        >>> fd = os.open(__file__, os.O_RDONLY)
        >>> mm, g = map_file(fd, os.fstat(fd).st_size, __file__)
        >>> with memoryview(mm) as mv:
        ...     sum(end - pos for pos, end, piece in g.pieces(mv, len(mm), 4096)) == len(mm)
        True
        >>> g.finish(); g.close(); mm.close(); os.close(fd)
        """
        for pos in range(0, size, step):
            self.poll()
            end = min(pos + step, size)
            with mv[pos:end] as piece:
                yield pos, end, piece

    def finish(self) -> None:
        """`check`, and the file still has the size it had when mapped (one fstat for both)."""
        if self.faulted():
            raise changed(self.name(), self.size, self._now())
        if (now := self._now()) != self.size:
            raise changed(self.name(), self.size, now)

    def close(self) -> None:
        """Unregister; call it before the mapping is unmapped. Idempotent."""
        self._fin()


def _release(slot: int) -> None:
    if slot >= 0 and _LIB is not None:
        _LIB.mer_guard_unregister(slot)


_warned_full = False


def _slots_full() -> None:
    global _warned_full
    if not _warned_full:
        _warned_full = True
        warnings.warn(f"mer_runtime.guard: all {_LIB.mer_guard_slots()} SIGBUS guard slots are taken; further "
                      "mappings are checked by size only (a file cut in the middle of a piece may end the process "
                      "with SIGBUS)", RuntimeWarning, stacklevel=4)


def _name_of(path: str | os.PathLike[str] | None, fd: int | None) -> str:
    if path is not None:
        return os.fspath(path)
    try:
        return os.readlink(f"/proc/self/fd/{fd}")  # only when an error is raised: never on the fast path
    except OSError:
        return f"file descriptor {fd}"


def _address(buf: Any) -> int:
    import numpy as np

    a = np.frombuffer(buf, np.uint8)
    try:
        return int(a.ctypes.data)
    finally:
        del a


def guard_mapping(mm: mmap.mmap, size: int, path: str | os.PathLike[str] | None = None,
                  fd: int | None = None) -> Guard:
    """Register an existing read-only mapping of a whole file of `size` bytes."""
    return Guard(mm, _address(mm) if len(mm) else 0, len(mm), size, path, fd)


def guard_array(arr: Any, size: int, path: str | os.PathLike[str]) -> Guard:
    """Register the mapping behind a NumPy memmap (e.g. the gguf package's reader's ``data``) of a whole file."""
    owner = getattr(arr, "_mmap", None) or arr
    return Guard(owner, int(arr.ctypes.data), int(arr.nbytes), size, path)


def map_file(fd: int, size: int, path: str | os.PathLike[str] | None = None) -> tuple[mmap.mmap, Guard]:
    """A read-only mapping of the first `size` bytes of open file `fd`, and its guard (named by `path`, or
    resolved from `fd`, which must then stay open while the guard is used)."""
    try:
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except ValueError:  # "mmap length is greater than file size": it shrank since the caller looked
        now = os.fstat(fd).st_size
        if now >= size:
            raise
        raise changed(_name_of(path, fd), size, now) from None
    # the file's own size, not the mapping's: `finish` then also holds for a caller reading only a prefix
    return mm, guard_mapping(mm, os.fstat(fd).st_size, path, None if path is not None else fd)
