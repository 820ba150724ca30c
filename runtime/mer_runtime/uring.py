"""A small ctypes binding of Linux io_uring: setup, enter, register, the mmap'd rings, READ_FIXED.

Written from the stable kernel ABI (io_uring(7), include/uapi/linux/io_uring.h) because the PyPI bindings do not
serve O_DIRECT: `liburing` reads only into bytearrays, which cannot be 4096-aligned. Only what the loader needs is
here: one ring used from one thread, reads into registered (fixed) buffers, with plain READ as a fallback when the
kernel refuses to register them.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform

# Syscall numbers are the same on every architecture that has io_uring (they were added after the unification).
SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427

IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_ENTER_GETEVENTS = 1 << 0
IORING_REGISTER_BUFFERS = 0
IORING_UNREGISTER_BUFFERS = 1
IORING_OP_READ_FIXED = 4
IORING_OP_READ = 22

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _SQOff(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32), ("ring_mask", ctypes.c_uint32),
                ("ring_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("dropped", ctypes.c_uint32),
                ("array", ctypes.c_uint32), ("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class _CQOff(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32), ("ring_mask", ctypes.c_uint32),
                ("ring_entries", ctypes.c_uint32), ("overflow", ctypes.c_uint32), ("cqes", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("sq_thread_cpu", ctypes.c_uint32), ("sq_thread_idle", ctypes.c_uint32),
                ("features", ctypes.c_uint32), ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", _SQOff), ("cq_off", _CQOff)]


class SQE(ctypes.Structure):
    _fields_ = [("opcode", ctypes.c_uint8), ("flags", ctypes.c_uint8), ("ioprio", ctypes.c_uint16),
                ("fd", ctypes.c_int32), ("off", ctypes.c_uint64), ("addr", ctypes.c_uint64),
                ("len", ctypes.c_uint32), ("rw_flags", ctypes.c_uint32), ("user_data", ctypes.c_uint64),
                ("buf_index", ctypes.c_uint16), ("personality", ctypes.c_uint16), ("splice_fd_in", ctypes.c_int32),
                ("addr3", ctypes.c_uint64), ("pad", ctypes.c_uint64)]


class CQE(ctypes.Structure):
    _fields_ = [("user_data", ctypes.c_uint64), ("res", ctypes.c_int32), ("flags", ctypes.c_uint32)]


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


assert ctypes.sizeof(SQE) == 64 and ctypes.sizeof(CQE) == 16 and ctypes.sizeof(_Params) == 120


class UringError(OSError):
    pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise UringError(err, f"{what}: {os.strerror(err)}")
    return ret


def probe() -> str | None:
    """None if io_uring can be set up here, else the reason (seccomp, sysctl, old kernel, other OS)."""
    if platform.system() != "Linux":
        return f"io_uring is Linux-only (this is {platform.system()})"
    try:
        Ring(2).close()
    except OSError as exc:
        hint = {
            errno.ENOSYS: "the kernel has no io_uring (before 5.1), or a seccomp filter hides it",
            errno.EPERM: "refused: kernel.io_uring_disabled is set, or a container's seccomp profile blocks it",
            errno.EACCES: "refused by a security policy",
        }.get(exc.errno, "")
        return f"io_uring_setup failed ({os.strerror(exc.errno or 0)}){': ' + hint if hint else ''}"
    return None


class Ring:
    """One io_uring instance. Not thread-safe: the loader drives it from one thread."""

    def __init__(self, entries: int = 64):
        self.params = _Params()
        fd = _syscall(SYS_IO_URING_SETUP, ctypes.c_uint32(entries), ctypes.byref(self.params))
        self.fd = _check(fd, "io_uring_setup")
        p = self.params
        try:
            sq_size = p.sq_off.array + p.sq_entries * 4
            cq_size = p.cq_off.cqes + p.cq_entries * ctypes.sizeof(CQE)
            if p.features & IORING_FEAT_SINGLE_MMAP:
                sq_size = cq_size = max(sq_size, cq_size)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self._sq_map = mmap.mmap(self.fd, sq_size, flags=flags, offset=IORING_OFF_SQ_RING)
            self._cq_map = (self._sq_map if p.features & IORING_FEAT_SINGLE_MMAP
                            else mmap.mmap(self.fd, cq_size, flags=flags, offset=IORING_OFF_CQ_RING))
            self._sqe_map = mmap.mmap(self.fd, p.sq_entries * ctypes.sizeof(SQE), flags=flags, offset=IORING_OFF_SQES)
        except OSError:
            os.close(self.fd)
            raise
        u32 = ctypes.c_uint32
        self.sq_head = u32.from_buffer(self._sq_map, p.sq_off.head)
        self.sq_tail = u32.from_buffer(self._sq_map, p.sq_off.tail)
        self.sq_mask = u32.from_buffer(self._sq_map, p.sq_off.ring_mask).value
        self.sq_array = (u32 * p.sq_entries).from_buffer(self._sq_map, p.sq_off.array)
        self.sqes = (SQE * p.sq_entries).from_buffer(self._sqe_map)
        self.cq_head = u32.from_buffer(self._cq_map, p.cq_off.head)
        self.cq_tail = u32.from_buffer(self._cq_map, p.cq_off.tail)
        self.cq_mask = u32.from_buffer(self._cq_map, p.cq_off.ring_mask).value
        self.cqes = (CQE * p.cq_entries).from_buffer(self._cq_map, p.cq_off.cqes)
        self.entries = p.sq_entries
        self.pending = 0  # SQEs queued but not yet passed to io_uring_enter
        self.in_flight = 0  # submitted, completion not yet reaped
        self.registered = False

    # -- buffers ------------------------------------------------------------------------------------------
    def register_buffers(self, buffers: list[tuple[int, int]]) -> None:
        """Register (address, length) regions for READ_FIXED; index i is buffers[i]."""
        iovs = (_IOVec * len(buffers))(*[_IOVec(a, n) for a, n in buffers])
        _check(_syscall(SYS_IO_URING_REGISTER, self.fd, IORING_REGISTER_BUFFERS, iovs, len(buffers)),
               "io_uring_register(BUFFERS)")
        self.registered = True

    # -- submission ---------------------------------------------------------------------------------------
    def space(self) -> int:
        return self.entries - (self.sq_tail.value - self.sq_head.value) % (1 << 32)

    def prep_read(self, fd: int, addr: int, length: int, offset: int, user_data: int, buf_index: int | None) -> None:
        if self.space() <= 0:
            self.submit()
        tail = self.sq_tail.value
        idx = tail & self.sq_mask
        sqe = self.sqes[idx]
        ctypes.memset(ctypes.addressof(sqe), 0, ctypes.sizeof(SQE))
        sqe.opcode = IORING_OP_READ_FIXED if buf_index is not None else IORING_OP_READ
        sqe.fd = fd
        sqe.off = offset
        sqe.addr = addr
        sqe.len = length
        sqe.user_data = user_data
        sqe.buf_index = buf_index or 0
        self.sq_array[idx] = idx
        # x86 and arm64 CPython: each ctypes store is a separate C call, so the SQE is written before the tail.
        self.sq_tail.value = (tail + 1) & 0xFFFFFFFF
        self.pending += 1

    def submit(self, wait: int = 0) -> None:
        """Pass queued SQEs to the kernel; with wait > 0 also block until that many completions are ready.

        The loader keeps fewer reads in flight than the completion queue holds, so the kernel never answers
        EBUSY for a full CQ; EINTR (a signal arrived) is simply retried.
        """
        while True:
            flags = IORING_ENTER_GETEVENTS if wait else 0
            ret = _syscall(SYS_IO_URING_ENTER, self.fd, self.pending, wait, flags, None, 0)
            if ret < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                raise UringError(err, f"io_uring_enter: {os.strerror(err)}")
            self.in_flight += ret
            self.pending -= ret
            return

    def reap(self) -> list[tuple[int, int]]:
        """Completions available now, as (user_data, res); res < 0 is -errno."""
        out: list[tuple[int, int]] = []
        head = self.cq_head.value
        tail = self.cq_tail.value
        while head != tail:
            c = self.cqes[head & self.cq_mask]
            out.append((c.user_data, c.res))
            head = (head + 1) & 0xFFFFFFFF
        self.cq_head.value = head
        self.in_flight -= len(out)
        return out

    def wait(self, n: int = 1) -> list[tuple[int, int]]:
        """Submit what is queued and block until at least n completions (or all in flight) are reaped."""
        got = self.reap()
        if len(got) >= n:
            return got
        self.submit(wait=min(n - len(got), self.in_flight + self.pending))
        return got + self.reap()

    def close(self) -> None:
        if self.fd < 0:
            return
        for name in ("sq_head", "sq_tail", "sq_array", "sqes", "cq_head", "cq_tail", "cqes"):
            if hasattr(self, name):
                delattr(self, name)
        for m in {id(x): x for x in (getattr(self, "_sqe_map", None), getattr(self, "_cq_map", None),
                                     getattr(self, "_sq_map", None)) if x is not None}.values():
            m.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
