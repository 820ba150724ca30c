"""Open files that came from a shard folder without trusting what is there.

A name in a folder can be anything: a FIFO (opening it for reading blocks until a writer appears, forever), a
directory, a device such as ``/dev/zero`` (endless bytes), a socket, a symlink to any of those. Every consumer opens
through ``open_regular``: ``O_NONBLOCK`` so that a FIFO cannot block the open, then ``fstat`` on the descriptor
(not on the name, which may change in between) and a refusal of anything but a regular file.
"""

from __future__ import annotations

import os
import stat

from .errors import MerError, ShardIOError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    """What a file of this st_mode is, in words (``"a FIFO"``)."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def clear_nonblock(fd: int) -> None:
    """Back to blocking mode once fstat has shown a regular file: io_uring answers EAGAIN instead of waiting on a
    descriptor that has O_NONBLOCK (it does not punt the read to its workers)."""
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


class NotRegular(Exception):
    """`open_checked` found something other than a regular file (its st_mode in `mode`)."""

    def __init__(self, mode: int):
        super().__init__(kind_of(mode))
        self.mode = mode


def open_checked(path: str | os.PathLike[str], flags: int = 0) -> tuple[int, os.stat_result]:
    """The one way untrusted files are opened: (fd in blocking mode, fstat) of a regular file; NotRegular if it is
    anything else (nothing left open); the open's own OSError otherwise. `flags` adds e.g. O_DIRECT."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | flags)
    except OSError:
        try:
            mode = os.stat(path).st_mode  # O_DIRECT on a FIFO or device fails (EINVAL) before fstat could say so
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise NotRegular(mode) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(st.st_mode)
        clear_nonblock(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_regular(path: str | os.PathLike[str], *, flags: int = 0, error: type[MerError] = ShardIOError,
                 hint: str = "re-extract the model") -> tuple[int, os.stat_result]:
    """(fd, fstat) of a regular file opened read-only; anything else raises `error` naming the file and what to do.

    Never blocks on a FIFO and never reads a device. The caller closes the fd.

    >>> fd, st = open_regular("out/experts/L000/E0000.bin")   # doctest: +SKIP
    >>> os.close(fd)                                          # doctest: +SKIP
    """
    def fail(what: str) -> MerError:
        exc = error(f"{path}: {what}; {hint}")  # one argument: str() is the message alone, no "[Errno N]"
        exc.reason = what  # type: ignore[attr-defined]  # the short form, for reports that already name the file
        return exc

    try:
        return open_checked(path, flags)
    except NotRegular as nr:
        raise fail(f"is {kind_of(nr.mode)}, not a regular file") from None
    except FileNotFoundError:
        raise fail("missing") from None
    except OSError as exc:
        raise fail(f"cannot open ({exc.strerror or exc})") from None


def read_regular(path: str | os.PathLike[str], limit: int, *, error: type[MerError] = ShardIOError,
                 hint: str = "re-extract the model") -> bytes:
    """The whole content of a regular file of at most `limit` bytes (see `open_regular`).

    The size is taken from fstat and exactly that many bytes are read, so a file that grows while it is read (or a
    file system that lies about sizes) cannot make this read without end.
    """
    def fail(what: str) -> MerError:
        exc = error(f"{path}: {what}; {hint}")
        exc.reason = what  # type: ignore[attr-defined]
        return exc

    fd, st = open_regular(path, error=error, hint=hint)
    try:
        if st.st_size > limit:
            raise fail(f"{st.st_size} bytes, more than the {limit}-byte limit")
        chunks, left = [], st.st_size
        while left:
            try:
                b = os.read(fd, min(left, 1 << 24))
            except OSError as exc:
                raise fail(f"cannot read ({exc.strerror or exc})") from None
            if not b:
                raise fail(f"ended after {st.st_size - left} of {st.st_size} bytes (changed while being read?)")
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)
