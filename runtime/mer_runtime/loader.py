"""Loader backends behind one interface: io_uring + O_DIRECT, O_DIRECT pread from a thread pool, buffered reads.

    loader = open_loader("auto", pool, probe_file=some_shard)   # says which it picked and why
    t = loader.start(path, size, slot)    # asynchronous: reads are in flight
    loader.wait(t)                        # bytes are in pool.view(slot), or ShardIOError naming the file

Every backend reads a file in chunks of `block_size` (>= 1 MiB by default) and keeps up to `queue_depth` chunks in
flight; short reads are continued, EINTR and EAGAIN retried, and a file shorter than asked is an error.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
from collections import deque
from dataclasses import dataclass

from . import uring
from .buffers import BufferPool
from .errors import ShardIOError
from .safeopen import clear_nonblock, kind_of

BACKENDS = ("io_uring", "pread", "buffered")
_RETRY = (errno.EINTR, errno.EAGAIN)


@dataclass
class Ticket:
    path: str
    size: int
    slot: int
    id: int
    fd: int = -1
    remaining: int = 0  # chunks not yet complete
    error: BaseException | None = None
    done: bool = False


def _open(path: str, direct: bool) -> int:
    # O_NONBLOCK + fstat: a shard replaced by a FIFO must not block the open forever, nor a device be read
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        try:
            mode = os.stat(path).st_mode  # O_DIRECT on a FIFO fails with EINVAL: say what the file is instead
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise ShardIOError(f"{path}: is {kind_of(mode)}, not a regular file; run `mertools verify` and "
                               "re-extract") from None
        hint = ""
        if direct and exc.errno == errno.EINVAL:
            hint = "; the filesystem refuses O_DIRECT: use --io buffered (or auto, which falls back by itself)"
        raise ShardIOError(exc.errno, f"{path}: cannot open ({exc.strerror}){hint}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ShardIOError(f"{path}: is {kind_of(mode)}, not a regular file; run `mertools verify` and re-extract")
    clear_nonblock(fd)
    return fd


def _short(path: str, offset: int, size: int) -> ShardIOError:
    return ShardIOError(errno.EIO, f"{path}: file ends at byte {offset} but {size} bytes were expected; the shard is "
                                   "truncated: run `mertools verify` and re-extract")


class Loader:
    name = "?"
    direct = True

    def __init__(self, pool: BufferPool, *, block_size: int = 1 << 20, queue_depth: int = 32, threads: int = 4):
        """threads: worker threads of the thread-based backends (io_uring needs none)."""
        if block_size % 4096:
            raise ValueError("block_size must be a multiple of 4096")
        self.pool, self.block_size, self.queue_depth, self.threads = pool, block_size, queue_depth, threads
        self._ids = itertools.count(1)
        self.reason = ""
        self.bytes_read = 0

    def read(self, path: str, size: int, slot: int) -> None:
        self.wait(self.start(path, size, slot))

    def start(self, path: str, size: int, slot: int, urgent: bool = False) -> Ticket:
        """Begin reading `size` bytes of `path` into `slot`; urgent (foreground) reads jump the queue."""
        raise NotImplementedError

    def promote(self, t: Ticket) -> None:
        """Move a ticket's reads that have not started yet to the front (a prefetch is now needed)."""

    def wait(self, t: Ticket) -> None:
        raise NotImplementedError

    def ready(self, t: Ticket) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _check(self, size: int, slot: int) -> None:
        if size > self.pool.slot_size or size % 4096 and self.direct:
            raise ValueError(f"read of {size} bytes does not fit slot size {self.pool.slot_size} with O_DIRECT")
        if not 0 <= slot < self.pool.n_slots:
            raise ValueError(f"no slot {slot}")

    def describe(self) -> str:
        return f"{self.name} (block {self.block_size >> 10} KiB, queue depth {self.queue_depth})"


class PreadLoader(Loader):
    """O_DIRECT preadv on a few worker threads: for kernels or containers where io_uring is disabled.

    Chunks wait in one queue; urgent (foreground) loads go to its front, so a miss never queues behind prefetches.
    """

    name = "pread"
    direct = True

    def __init__(self, pool: BufferPool, **kw):
        super().__init__(pool, **kw)
        self._cv = threading.Condition()
        self._queue: deque[tuple[Ticket, memoryview, int]] = deque()
        self._closing = False
        self._workers = [threading.Thread(target=self._work, name=f"mer-{self.name}-{i}", daemon=True)
                         for i in range(max(1, self.threads))]
        for w in self._workers:
            w.start()

    def start(self, path: str, size: int, slot: int, urgent: bool = False) -> Ticket:
        self._check(size, slot)
        t = Ticket(path, size, slot, next(self._ids))
        t.fd = _open(path, self.direct)
        if not self.direct:
            try:
                os.posix_fadvise(t.fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
        view = memoryview(self.pool.view(slot, size))
        items = [(t, view[off:off + self.block_size], off) for off in range(0, size, self.block_size)]
        t.remaining = len(items)
        with self._cv:
            if urgent:
                self._queue.extendleft(reversed(items))
            else:
                self._queue.extend(items)
            self._cv.notify_all()
        return t

    def promote(self, t: Ticket) -> None:
        with self._cv:
            mine = [it for it in self._queue if it[0] is t]
            if mine:
                self._queue = deque(it for it in self._queue if it[0] is not t)
                self._queue.extendleft(reversed(mine))

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                t, dest, offset = self._queue.popleft()
            err = None
            if t.error is None:
                try:
                    self._read(t, dest, offset)
                except BaseException as exc:  # handed to the waiter
                    err = exc
            with self._cv:
                if err is not None and t.error is None:
                    t.error = err
                t.remaining -= 1
                if t.remaining == 0:
                    self._cv.notify_all()

    def _read(self, t: Ticket, dest: memoryview, offset: int) -> None:
        done = 0
        while done < len(dest):
            try:
                n = os.preadv(t.fd, [dest[done:]], offset + done)
            except OSError as exc:
                if exc.errno in _RETRY:
                    continue
                raise ShardIOError(exc.errno, f"{t.path}: read failed at byte {offset + done} ({exc.strerror})") \
                    from None
            if n == 0:
                raise _short(t.path, offset + done, t.size)
            done += n

    def ready(self, t: Ticket) -> bool:
        return t.remaining == 0

    def wait(self, t: Ticket) -> None:
        with self._cv:
            while t.remaining > 0:
                self._cv.wait()
        if not t.done:
            t.done = True
            os.close(t.fd)
            if t.error is None:
                self.bytes_read += t.size
        if t.error is not None:
            raise t.error

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        for w in self._workers:
            w.join()


class BufferedLoader(PreadLoader):
    """Plain (page-cache) reads, for filesystems that refuse O_DIRECT."""

    name = "buffered"
    direct = False


class UringLoader(Loader):
    """io_uring, O_DIRECT, reads into registered (fixed) buffers: one per pool slot."""

    name = "io_uring"
    direct = True

    def __init__(self, pool: BufferPool, **kw):
        super().__init__(pool, **kw)
        entries = 1 << max(1, (self.queue_depth - 1).bit_length())
        self.ring = uring.Ring(entries)
        self.fixed = True
        try:
            self.ring.register_buffers(pool.regions())
        except OSError as exc:  # e.g. RLIMIT_MEMLOCK on older kernels: plain READ still works
            self.fixed = False
            self.reason = f"registered buffers refused ({exc.strerror}); using plain READ"
        self._tickets: dict[int, Ticket] = {}
        self._queue: list[tuple[Ticket, int, int]] = []  # (ticket, offset, length) not yet submitted
        self._chunks: dict[int, tuple[Ticket, int, int]] = {}
        self._chunk_ids = itertools.count(1)

    def describe(self) -> str:
        return super().describe() + (", fixed buffers" if self.fixed else ", plain READ")

    def start(self, path: str, size: int, slot: int, urgent: bool = False) -> Ticket:
        self._check(size, slot)
        t = Ticket(path, size, slot, next(self._ids))
        t.fd = _open(path, True)
        self._tickets[t.id] = t
        items = [(t, off, min(self.block_size, size - off)) for off in range(0, size, self.block_size)]
        t.remaining = len(items)
        self._queue = items + self._queue if urgent else self._queue + items
        if not t.remaining:
            self._finish(t)
        self._pump()
        return t

    def promote(self, t: Ticket) -> None:
        mine = [it for it in self._queue if it[0] is t]
        if mine:
            self._queue = mine + [it for it in self._queue if it[0] is not t]

    def _pump(self) -> None:
        r = self.ring
        while self._queue and r.in_flight + r.pending < self.queue_depth:
            t, off, n = self._queue.pop(0)
            if t.done:
                continue
            cid = next(self._chunk_ids)
            self._chunks[cid] = (t, off, n)
            r.prep_read(t.fd, self.pool.address(t.slot) + off, n, off, cid, t.slot if self.fixed else None)
        if r.pending:
            r.submit()

    def _complete(self, cid: int, res: int) -> None:
        t, off, n = self._chunks.pop(cid)
        if t.done:
            return
        if res < 0:
            if -res in _RETRY:
                self._queue.insert(0, (t, off, n))
                return
            t.error = ShardIOError(-res, f"{t.path}: read failed at byte {off} ({os.strerror(-res)})")
            self._finish(t)
        elif res == 0:
            t.error = _short(t.path, off, t.size)
            self._finish(t)
        elif res < n:  # short read: continue where it stopped
            self._queue.insert(0, (t, off + res, n - res))
        else:
            t.remaining -= 1
            self.bytes_read += n
            if t.remaining == 0:
                self._finish(t)

    def _finish(self, t: Ticket) -> None:
        t.done = True
        if not any(c[0] is t for c in self._chunks.values()):
            self._close_fd(t)

    def _close_fd(self, t: Ticket) -> None:
        if t.fd >= 0:
            os.close(t.fd)
            t.fd = -1
        self._tickets.pop(t.id, None)

    def poll(self) -> None:
        for cid, res in self.ring.reap():
            self._complete(cid, res)
        self._pump()
        for t in [t for t in self._tickets.values() if t.done]:
            if not any(c[0] is t for c in self._chunks.values()):
                self._close_fd(t)

    def ready(self, t: Ticket) -> bool:
        self.poll()
        return t.done

    def wait(self, t: Ticket) -> None:
        while not t.done:
            if self.ring.in_flight + self.ring.pending == 0:
                self._pump()
            for cid, res in self.ring.wait(1):
                self._complete(cid, res)
            self._pump()
        # a failed ticket may still have chunks in flight into its slot; drain them before the slot is reused
        while any(c[0] is t for c in self._chunks.values()):
            for cid, res in self.ring.wait(1):
                self._complete(cid, res)
        self._close_fd(t)
        if t.error:
            raise t.error

    def close(self) -> None:
        while self._chunks:
            for cid, res in self.ring.wait(1):
                self._complete(cid, res)
        for t in list(self._tickets.values()):
            self._close_fd(t)
        self.ring.close()


def _probe_read(cls: type[Loader], pool: BufferPool, probe_file: str | None, **kw) -> Loader:
    loader = cls(pool, **kw)
    if probe_file:
        try:
            loader.read(probe_file, 4096, 0)
        except BaseException:
            loader.close()
            raise
    return loader


def open_loader(io: str, pool: BufferPool, *, probe_file: str | None = None, **kw) -> Loader:
    """Make a loader. `auto` tries io_uring, then O_DIRECT pread, then buffered, and records why in .reason."""
    if io not in ("auto", *BACKENDS):
        raise ValueError(f"--io {io!r}: expected auto, {', '.join(BACKENDS)}")
    classes = {"io_uring": UringLoader, "pread": PreadLoader, "buffered": BufferedLoader}
    if io != "auto":
        try:
            loader = _probe_read(classes[io], pool, probe_file, **kw)
        except ShardIOError:
            raise
        except OSError as exc:
            why = uring.probe() or str(exc)
            raise ShardIOError(exc.errno or 0, f"--io {io} is not available here: {why}; use --io auto") from None
        loader.reason = loader.reason or f"--io {io} asked for"
        return loader
    why = []
    reason = uring.probe()
    if reason is None:
        try:
            loader = _probe_read(UringLoader, pool, probe_file, **kw)
            loader.reason = "io_uring with O_DIRECT works here" + (f"; {loader.reason}" if loader.reason else "")
            return loader
        except OSError as exc:
            why.append(f"io_uring read failed ({exc})")
    else:
        why.append(reason)
    try:
        loader = _probe_read(PreadLoader, pool, probe_file, **kw)
        loader.reason = "; ".join(why) + "; O_DIRECT pread works"
        return loader
    except OSError as exc:
        why.append(f"O_DIRECT refused ({exc})")
    loader = BufferedLoader(pool, **kw)
    loader.reason = "; ".join(why) + "; using buffered reads"
    return loader
