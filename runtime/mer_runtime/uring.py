"""A small ctypes binding of Linux io_uring: setup, enter, register, the mmap'd rings, READ_FIXED.

Written from the stable kernel ABI (io_uring(7), include/uapi/linux/io_uring.h) because the PyPI bindings do not
serve O_DIRECT: `liburing` reads only into bytearrays, which cannot be 4096-aligned. Only what the loader needs is
here: reads into registered (fixed) buffers, with plain READ as a fallback when the kernel refuses to register them.

Threads: a `Ring` is not thread-safe by itself. Its owner (`loader.UringLoader`) calls `prep_read`, `submit`,
`retract`, `drop_unsubmitted`, `reap` and `update_buffer` under one lock; only `wait_cqe` (a blocking io_uring_enter
that submits nothing and touches no user-side ring index) may run without that lock, from one thread at a time
(io_uring_register takes the kernel's ring lock, which a thread sleeping in io_uring_enter for completions does not
hold).

Memory ordering: the rings are shared with the kernel, which asks (io_uring(7); liburing's
io_uring_smp_load_acquire/io_uring_smp_store_release) for an acquire load of the CQ tail before reading CQEs, a
release store of the CQ head after reading them, and a release store of the SQ tail after writing an SQE (plus an
acquire load of the SQ head). ctypes has no atomics, so these go through `_uring_atomics.c` (C11 builtins, built
at install) when it is present. Without it, plain ctypes loads and stores are used on x86-64 only: x86-64's
memory model (TSO) never reorders a load with an older load nor a store with an older store, which makes every
plain aligned 32-bit load an acquire and every plain store a release at the CPU level; and no compiler reordering
can happen either, because each ctypes access is a separate call out of the interpreter's bytecode loop (an
opaque function with side effects that the C compiler cannot move other memory accesses across). That argument
fails on weakly ordered CPUs (arm64, POWER, RISC-V), so there io_uring is refused without the helper, with the
reason `probe()` (and so `--io auto`) reports.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform

from .native import load_library

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
IORING_REGISTER_BUFFERS2 = 15
IORING_REGISTER_BUFFERS_UPDATE = 16
IORING_RSRC_REGISTER_SPARSE = 1 << 0
IORING_OP_READ_FIXED = 4
IORING_OP_READ = 22

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


TSO_MACHINES = ("x86_64", "AMD64", "i386", "i686")


def _load_atomics() -> ctypes.CDLL | None:
    lib = load_library("_uring_atomics")
    if lib is not None:
        lib.mer_load_acquire_u32.argtypes = [ctypes.c_void_p]
        lib.mer_load_acquire_u32.restype = ctypes.c_uint32
        lib.mer_store_release_u32.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.mer_store_release_u32.restype = None
    return lib


_ATOMICS = None if os.environ.get("MER_URING_ATOMICS") == "plain" else _load_atomics()


def ordering_refusal(machine: str, helper: bool) -> str | None:
    """Why the rings cannot be accessed with the ordering the kernel asks for, or None if they can.

    >>> ordering_refusal("x86_64", helper=False) is None   # TSO: plain loads/stores are acquire/release
    True
    >>> ordering_refusal("aarch64", helper=False)[:30]
    'io_uring on aarch64 needs the '
    """
    if helper or machine in TSO_MACHINES:
        return None
    return (f"io_uring on {machine} needs the mer_runtime._uring_atomics helper (acquire/release access to the "
            "rings) and it was not built: reinstall with a C compiler present")


#: how the ring indices are accessed, for describe() and the docs
ORDERING = ("C11 acquire/release (mer_runtime._uring_atomics)" if _ATOMICS is not None
            else "plain loads/stores (x86-64 TSO)" if platform.machine() in TSO_MACHINES
            else "unavailable")


class _Index:
    """One u32 ring index in the shared mapping, read with acquire and written with release ordering."""

    __slots__ = ("_cell", "_addr")

    def __init__(self, buf: mmap.mmap, offset: int):
        self._cell = ctypes.c_uint32.from_buffer(buf, offset)
        self._addr = ctypes.addressof(self._cell)

    def load(self) -> int:
        if _ATOMICS is not None:
            return _ATOMICS.mer_load_acquire_u32(self._addr)
        return self._cell.value

    def store(self, v: int) -> None:
        if _ATOMICS is not None:
            _ATOMICS.mer_store_release_u32(self._addr, v)
        else:
            self._cell.value = v


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


class _RsrcRegister(ctypes.Structure):  # struct io_uring_rsrc_register
    _fields_ = [("nr", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("resv2", ctypes.c_uint64),
                ("data", ctypes.c_uint64), ("tags", ctypes.c_uint64)]


class _RsrcUpdate2(ctypes.Structure):  # struct io_uring_rsrc_update2
    _fields_ = [("offset", ctypes.c_uint32), ("resv", ctypes.c_uint32), ("data", ctypes.c_uint64),
                ("tags", ctypes.c_uint64), ("nr", ctypes.c_uint32), ("resv2", ctypes.c_uint32)]


assert ctypes.sizeof(SQE) == 64 and ctypes.sizeof(CQE) == 16 and ctypes.sizeof(_Params) == 120
assert ctypes.sizeof(_RsrcRegister) == 32 and ctypes.sizeof(_RsrcUpdate2) == 32


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
    if (why := ordering_refusal(platform.machine(), _ATOMICS is not None)) is not None:
        return why
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
    """One io_uring instance. Not thread-safe: its owner serialises every call but `wait_cqe` (module docstring).

    >>> with Ring(4) as r:                                   # doctest: +SKIP
    ...     r.prep_read(fd, addr, 4096, 0, user_data=7, buf_index=None)
    ...     r.wait(1)
    [(7, 4096)]
    """

    def __init__(self, entries: int = 64):
        if (why := ordering_refusal(platform.machine(), _ATOMICS is not None)) is not None:
            raise UringError(errno.ENOTSUP, why)
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
        except BaseException:
            self._unmap()
            os.close(self.fd)
            self.fd = -1
            raise
        u32 = ctypes.c_uint32
        self.sq_head = _Index(self._sq_map, p.sq_off.head)
        self.sq_tail = _Index(self._sq_map, p.sq_off.tail)
        self.sq_mask = u32.from_buffer(self._sq_map, p.sq_off.ring_mask).value
        self.sq_array = (u32 * p.sq_entries).from_buffer(self._sq_map, p.sq_off.array)
        self.sqes = (SQE * p.sq_entries).from_buffer(self._sqe_map)
        self.cq_head = _Index(self._cq_map, p.cq_off.head)
        self.cq_tail = _Index(self._cq_map, p.cq_off.tail)
        self.cq_mask = u32.from_buffer(self._cq_map, p.cq_off.ring_mask).value
        self.cqes = (CQE * p.cq_entries).from_buffer(self._cq_map, p.cq_off.cqes)
        self.entries = p.sq_entries
        self.pending = 0  # SQEs queued but not yet passed to io_uring_enter
        self.in_flight = 0  # submitted, completion not yet reaped
        self.registered = False
        self._tail = self.sq_tail.load()  # our copy of the SQ tail (we are its only writer)

    # -- buffers ------------------------------------------------------------------------------------------
    def register_buffers(self, buffers: list[tuple[int, int]]) -> None:
        """Register (address, length) regions for READ_FIXED; index i is buffers[i]."""
        iovs = (_IOVec * len(buffers))(*[_IOVec(a, n) for a, n in buffers])
        _check(_syscall(SYS_IO_URING_REGISTER, self.fd, IORING_REGISTER_BUFFERS, iovs, len(buffers)),
               "io_uring_register(BUFFERS)")
        self.registered = True

    def register_sparse(self, n: int) -> None:
        """A table of n empty fixed-buffer indices (Linux 5.19 and later), each filled by `update_buffer`: nothing is
        pinned until then. Older kernels refuse it (EINVAL): register the buffers whole instead."""
        reg = _RsrcRegister(nr=n, flags=IORING_RSRC_REGISTER_SPARSE)
        _check(_syscall(SYS_IO_URING_REGISTER, self.fd, IORING_REGISTER_BUFFERS2, ctypes.byref(reg),
                        ctypes.sizeof(reg)), "io_uring_register(BUFFERS2, sparse)")
        self.registered = True

    def update_buffer(self, index: int, addr: int, length: int) -> None:
        """Put (addr, length) at fixed-buffer index `index` of a sparse table: the kernel pins (and faults in) its
        pages now, counting them against RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK."""
        iov = _IOVec(addr, length)
        up = _RsrcUpdate2(offset=index, data=ctypes.addressof(iov), nr=1)
        _check(_syscall(SYS_IO_URING_REGISTER, self.fd, IORING_REGISTER_BUFFERS_UPDATE, ctypes.byref(up),
                        ctypes.sizeof(up)), "io_uring_register(BUFFERS_UPDATE)")

    # -- submission ---------------------------------------------------------------------------------------
    def space(self) -> int:
        # our own tail needs no ordering (only we write it); the head is the kernel's: acquire
        return self.entries - (self._tail - self.sq_head.load()) % (1 << 32)

    def prep_read(self, fd: int, addr: int, length: int, offset: int, user_data: int, buf_index: int | None) -> None:
        if self.space() <= 0:
            self.submit()
        tail = self._tail
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
        self._tail = (tail + 1) & 0xFFFFFFFF
        self.sq_tail.store(self._tail)  # release: the kernel sees the SQE written before the new tail
        self.pending += 1

    def drop_unsubmitted(self, user_data: int) -> None:
        """Take back the last SQE prepared if it is `user_data`'s and the kernel has not consumed it (a `prep_read`
        whose caller was interrupted before it recorded the read), and recount `pending` from the ring: an
        interrupt inside `prep_read` may have moved the tail without counting the SQE. No SQPOLL thread: the kernel
        reads the SQ only inside our io_uring_enter."""
        head = self.sq_head.load()
        if self._tail != head and self.sqes[self.sq_array[(self._tail - 1) & self.sq_mask]].user_data == user_data:
            self._tail = (self._tail - 1) & 0xFFFFFFFF
        self.sq_tail.store(self._tail)
        self.pending = (self._tail - head) & 0xFFFFFFFF

    def _enter(self, to_submit: int, min_complete: int) -> int:
        flags = IORING_ENTER_GETEVENTS if min_complete else 0
        while True:
            ret = _syscall(SYS_IO_URING_ENTER, self.fd, to_submit, min_complete, flags, None, 0)
            if ret >= 0:
                return ret
            err = ctypes.get_errno()
            if err != errno.EINTR:  # a signal arrived: simply retry
                raise UringError(err, f"io_uring_enter: {os.strerror(err)}")

    def submit(self, wait: int = 0) -> None:
        """Pass queued SQEs to the kernel; with wait > 0 also block until that many completions are ready.

        The loader keeps fewer reads in flight than the completion queue holds, so the kernel never answers
        EBUSY for a full CQ.
        """
        ret = self._enter(self.pending, wait)
        self.in_flight += ret
        self.pending -= ret

    def retract(self, into: list[int] | None = None) -> list[int]:
        """Take back the SQEs queued but not yet consumed by the kernel (after `submit` raised: the kernel consumed
        none of them); returns their user_data, oldest first. Safe because this ring has no SQPOLL thread: the
        kernel reads the SQ only inside an io_uring_enter with to_submit > 0, which only the owner makes. `into`:
        a list they are added to, in one step, before the SQ lets go of them, so that a caller interrupted by an
        asynchronous exception (KeyboardInterrupt) still knows every one (an interrupt between the two may add
        them twice: the next call finds them still queued).

        >>> r.prep_read(fd, addr, 4096, 0, user_data=7, buf_index=None)   # doctest: +SKIP
        >>> r.retract()                                                    # doctest: +SKIP
        [7]
        """
        head = self.sq_head.load()  # acquire: how far the kernel has consumed
        n = (self._tail - head) & 0xFFFFFFFF
        out = [self.sqes[self.sq_array[(head + i) & self.sq_mask]].user_data for i in range(n)]
        if into is not None:
            into.extend(out)  # one C call
        self._tail = head
        self.sq_tail.store(head)
        self.in_flight += max(0, self.pending - n)  # consumed without being counted (never, when submit raised)
        self.pending = 0
        return out

    def wait_cqe(self, n: int = 1) -> None:
        """Block until at least n completions are in the CQ; submits nothing and reads no user-side index, so it
        may run while another thread holds the owner's lock (and submits)."""
        self._enter(0, n)

    def reap(self) -> list[tuple[int, int]]:
        """Completions available now, as (user_data, res); res < 0 is -errno."""
        out: list[tuple[int, int]] = []
        head = self.cq_head.load()  # only we write it
        tail = self.cq_tail.load()  # acquire: the CQEs before it are visible
        while head != tail:
            c = self.cqes[head & self.cq_mask]
            out.append((c.user_data, c.res))
            head = (head + 1) & 0xFFFFFFFF
        self.cq_head.store(head)  # release: the kernel may reuse the CQEs only after we read them
        self.in_flight -= len(out)
        return out

    def wait(self, n: int = 1) -> list[tuple[int, int]]:
        """Submit what is queued and block until at least n completions (or all in flight) are reaped."""
        got = self.reap()
        if len(got) >= n:
            return got
        self.submit(wait=min(n - len(got), self.in_flight + self.pending))
        return got + self.reap()

    def _unmap(self) -> None:
        for name in ("sq_head", "sq_tail", "sq_array", "sqes", "cq_head", "cq_tail", "cqes"):
            if hasattr(self, name):
                delattr(self, name)
        for m in {id(x): x for x in (getattr(self, "_sqe_map", None), getattr(self, "_cq_map", None),
                                     getattr(self, "_sq_map", None)) if x is not None}.values():
            m.close()

    def close(self) -> None:
        """Unmap the rings and close the ring's fd (once; a second call does nothing)."""
        if self.fd < 0:
            return
        self._unmap()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
