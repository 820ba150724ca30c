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
import resource
import threading
from collections import deque
from dataclasses import dataclass

from . import uring
from .buffers import BufferPool
from .errors import NotRegularFileError, ShardIOError
from .safeopen import NotRegular, kind_of, open_checked

BACKENDS = ("io_uring", "pread", "buffered")
_RETRY = (errno.EINTR, errno.EAGAIN)


@dataclass(eq=False)
class Ticket:
    """One file being read into one slot. Its fields belong to the loader and change only under the loader's lock.

    fd ownership: the loader opened `fd` and closes it exactly once (`Loader._retire`, under its lock), as soon as
    the ticket is done and no chunk of it is still with the kernel or a worker; whoever gets there first (the
    completion, `wait`, or `close`) closes it and sets fd = -1, so nobody closes it twice and a read that nobody
    waits for still gives its fd back.
    """

    path: str
    size: int
    slot: int
    id: int
    fd: int = -1
    remaining: int = 0  # chunks neither complete nor dropped
    in_flight: int = 0  # chunks with the kernel or a worker now
    issued: int = 0  # chunks ever handed to the kernel or a worker
    error: BaseException | None = None
    done: bool = False  # remaining == 0: the slot's bytes will not change any more
    urgent: bool = False  # a foreground read (or a prefetch promoted since): never held back by `spec_window`


def _not_regular(path: str, mode: int) -> NotRegularFileError:
    # one argument, so that str() is the message alone (no "[Errno N]" in the CLI's one line)
    return NotRegularFileError(f"{path}: is {kind_of(mode)}, not a regular file; the folder was tampered with: "
                               "re-extract it")


def _open(path: str, direct: bool) -> int:
    """Open a shard for reading: only a regular file, and never blocking on the way (a FIFO, a device, a folder in
    an expert's place gets a NotRegularFileError naming it, not a hang; see safeopen.open_checked)."""
    try:
        return open_checked(path, os.O_DIRECT if direct else 0)[0]
    except NotRegular as nr:
        raise _not_regular(path, nr.mode) from None
    except OSError as exc:
        hint = ""
        if direct and exc.errno == errno.EINVAL:
            hint = "; the filesystem refuses O_DIRECT: use --io buffered (or auto, which falls back by itself)"
        raise ShardIOError(exc.errno, f"{path}: cannot open ({exc.strerror}){hint}") from None


def check_regular_file(path: str | os.PathLike[str]) -> None:
    """Raise NotRegularFileError (or ShardIOError) unless path opens as a regular file, without blocking."""
    os.close(_open(os.fspath(path), False))


def _short(path: str, offset: int, size: int) -> ShardIOError:
    return ShardIOError(errno.EIO, f"{path}: file ends at byte {offset} but {size} bytes were expected; the shard is "
                                   "truncated: run `mertools verify` and re-extract")


def _close_fd(t: Ticket) -> ShardIOError | None:
    """Close a ticket's fd once; never raises (that would escape from a worker or the reaper half-way through
    handing out a completion, and its waiters would never be woken). close(2) releases the descriptor even when it
    reports EIO or EINTR, and a read-only fd has nothing left to lose: those are dropped. EBADF is not: it means the
    fd had been closed already (a double close, which may have closed a descriptor another thread had just been
    given for the same number, and the ticket's reads may have gone to that file), a bug of ours: returned, for
    the caller to report (`Loader._close_ticket_fd`)."""
    fd, t.fd = t.fd, -1
    try:
        os.close(fd)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return ShardIOError(errno.EBADF, f"{t.path}: its file descriptor {fd} had already been closed (a bug in "
                                             "mer_runtime; the read may have gone to another file): retry, and use "
                                             "--io pread if it recurs")
    return None


def _others(paths: list[str], default: str) -> str:
    """'first file and N other file(s)': where an error about several files says it happened."""
    if not paths:
        return default
    return paths[0] + (f" and {len(paths) - 1} other file(s)" if len(paths) > 1 else "")


def _fresh(err: BaseException) -> BaseException:
    """A new exception for one waiter, raised `from` the shared one: raising one object in several threads at once
    would have them write its __traceback__ over each other's."""
    if not isinstance(err, ShardIOError):
        return err
    new = type(err)(*err.args)
    new.__cause__ = err
    return new


def _cause(why: BaseException) -> tuple[str, str]:
    """What ended a close (for the message) and the advice that fits it: an interrupt (KeyboardInterrupt, whose
    str() is empty) is named by its type and is no reason to change backend; an error of ours is."""
    text = str(why) or type(why).__name__
    if not isinstance(why, Exception):
        return f"interrupted ({text})", "retry"
    return f"on an internal error ({text})", "retry, and use --io pread if it recurs"


def _closed_error(path: str, why: BaseException | None = None, *, in_flight: bool = False,
                  landed: bool = False) -> ShardIOError:
    """`why`: the internal error or interrupt that ended the close. `in_flight`: part of the read is still with the
    kernel (its slot may still be written), else none of it reached the kernel (its buffer is free); `landed`: part
    of it was with the kernel and has landed since (`Loader._finish` rewrites an `in_flight` error so)."""
    if why is None:
        return ShardIOError(errno.ECANCELED, f"{path}: the loader was closed before this read finished")
    cause, advice = _cause(why)
    if in_flight:
        e = ShardIOError(errno.ECANCELED, f"{path}: the loader was closed before this read finished, {cause}, "
                                          "while part of it was still with the kernel, which finishes it on its "
                                          "own: its buffer may still be written for a moment: close the buffer "
                                          f"pool rather than reuse it, and {advice}")
        e.closed_why = why  # what _finish needs to say it again once that part has landed
        return e
    if landed:
        return ShardIOError(errno.ECANCELED, f"{path}: the loader was closed before this read finished, {cause}, "
                                             "while part of it was with the kernel; that part has landed since, "
                                             f"so its buffer is free (but holds only part of the read): {advice}")
    return ShardIOError(errno.ECANCELED, f"{path}: the loader was closed before this read finished, {cause}; "
                                         f"nothing of it reached the kernel and its buffer is free: {advice}")


class Loader:
    """The interface. Every method may be called from any thread (each backend has one lock, `_cv`, over all of
    its state); `close()` cancels queued reads, waits for those already issued, and makes later `start`s fail."""

    name = "?"
    direct = True

    def __init__(self, pool: BufferPool, *, block_size: int = 1 << 20, queue_depth: int = 32, threads: int = 4):
        """threads: worker threads of the thread-based backends (io_uring needs none)."""
        if block_size <= 0 or block_size % 4096:
            raise ValueError(f"block_size must be a positive multiple of 4096, got {block_size}")
        if queue_depth < 1:  # io_uring's pump would spin for ever issuing nothing, the workers never be fed
            raise ValueError(f"queue_depth must be at least 1, got {queue_depth}")
        self.pool, self.block_size, self.queue_depth, self.threads = pool, block_size, queue_depth, threads
        self._ids = itertools.count(1)
        self.reason = ""
        self.bytes_read = 0
        # not reentrant: no path takes it twice. Blocks enter the lock itself, not the Condition, whose Python
        # __exit__ a signal's handler can interrupt before it releases (see mer_runtime.cache)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._closed = False
        self._trace: deque | None = None
        # an internal error (a double close: `_close_ticket_fd`) found after its ticket had already failed: raised
        # once by the next wait() whose own read did not fail, or by close()
        self._internal_error: ShardIOError | None = None
        self._queue: deque[tuple[Ticket, int, int]] = deque()  # (ticket, offset, length) not yet issued
        # every backend: at most this many chunks of speculative (not urgent) reads with the disk (io_uring) or the
        # workers (pread, buffered), none while an urgent chunk is queued or in flight, and at most this many of
        # each speculative read until it is promoted (needed); None: no limit. A wrong guess then reads at most
        # spec_window chunks, in the disk's idle time, and a foreground read queues behind at most spec_window.
        self._spec_window: int | None = None  # `spec_window`: setting it issues what a wider window lets go
        # False: a speculative read is not stopped at spec_window chunks of its own (a guess made a token ahead has
        # the time to land whole); the window still bounds the speculative chunks with the disk at once
        self.spec_cap_each = True
        # speculative chunks that were with the disk when a foreground read was queued, summed: what foreground
        # reads queued behind (at most spec_window each time)
        self.spec_in_way = 0

    # -- the interface ------------------------------------------------------------------------------------
    @property
    def spec_window(self) -> int | None:
        return self._spec_window

    @spec_window.setter
    def spec_window(self, value: int | None) -> None:
        """Widening the window lets held-back guesses go now (io_uring submits them, pread/buffered wake a worker):
        otherwise they would stay queued until some other call into the loader. Takes the loader's lock.

        >>> loader.spec_window = 4     # doctest: +SKIP
        """
        with self._lock:
            self._spec_window = value
            self._kick()

    def read(self, path: str, size: int, slot: int) -> None:
        self.wait(self.start(path, size, slot))

    def start(self, path: str, size: int, slot: int, urgent: bool = False) -> Ticket:
        """Begin reading `size` bytes of `path` into `slot`; urgent (foreground) reads jump the queue."""
        return self.start_many([(path, size, slot)], urgent=urgent)[0]

    def start_many(self, reads: list[tuple[str, int, int]], urgent: bool = False,
                   created: list[Ticket] | None = None) -> list[Ticket]:
        """Begin several reads at once (e.g. the k experts of one step), queued together in this order.
        `created`: a list the tickets are added to (all at once, before anything is queued), for a caller
        interrupted by an asynchronous exception (KeyboardInterrupt) raised after they were issued: it still knows
        which slots the kernel may be writing, and `withdraw` on each makes it safe. A ticket in `created` owns its
        fd (its withdrawal closes it); the fds of tickets never published there are closed here.

        >>> ts = loader.start_many([(p1, n1, 0), (p2, n2, 1)], urgent=True)   # doctest: +SKIP
        >>> for t in ts: loader.wait(t)                                        # doctest: +SKIP
        """
        for _, size, slot in reads:
            self._check(size, slot)
        fds: list[int] = []
        tickets: list[Ticket] = []
        try:
            for path, _, _ in reads:
                fds.append(_open(path, self.direct))
            with self._lock:
                if self._closed:
                    raise ShardIOError(errno.EBADF, f"{reads[0][0] if reads else '?'}: the loader is closed")
                for (path, size, slot), fd in zip(reads, fds):
                    tickets.append(Ticket(path, size, slot, next(self._ids), fd=fd))
                if created is not None:
                    # one C call: an interrupt comes before it (nobody knows the tickets: the finally closes their
                    # fds) or after it (the caller's withdraw closes them), never half-way
                    created.extend(tickets)
                fds = []  # the tickets own them now
                self._enqueue(tickets, urgent)
                return tickets
        finally:
            # an interrupt between publishing the tickets (all at once) and `fds = []`: published tickets' fds are
            # closed by their withdrawal; closing them here too would close whatever file got the number meanwhile
            if fds and not (created is not None and tickets and any(c is tickets[0] for c in created)):
                for fd in fds:
                    os.close(fd)

    def promote(self, t: Ticket) -> None:
        """Move a ticket's reads that have not started yet to the front (a prefetch is now needed)."""
        with self._lock:
            if self._closed:  # close() failed every queued read; nothing is issued any more
                return
            mine = [it for it in self._queue if it[0] is t]
            t.urgent = True
            self._promoted(t)
            if mine:
                self._queue = deque(it for it in self._queue if it[0] is not t)
                self._queue.extendleft(reversed(mine))
                self._note("promoted", t.id, len(mine))
                self._kick()

    def cancel(self, t: Ticket) -> bool:
        """Withdraw a read none of whose chunks has been issued yet (a stale prefetch): True if it was withdrawn
        (the ticket is then done, with an error, and its fd closed), False if it is already under way or done."""
        with self._lock:
            self._mend_issue()  # a chunk of t recorded as issued by a step an interrupt cut short counts
            if t.done or t.issued:
                return False
            self._note("cancelled", t.id)
            self._drop(t, ShardIOError(errno.ECANCELED, f"{t.path}: read cancelled (a stale prefetch)"))
            return True

    def withdraw(self, t: Ticket) -> int | None:
        """Drop the chunks of a read that have not been issued yet, even if others have (a stale prefetch part-way
        through): nothing more is read for it, and the ticket fails with ECANCELED once the chunks already with the
        kernel or a worker complete (`ready`/`wait` say when the slot is no longer written). Returns the bytes still
        in flight (the disk time the withdrawn read still takes), or None if the read was already done.

        >>> loader.withdraw(t)        # doctest: +SKIP
        4194304
        """
        with self._lock:
            self._collect()  # chunks that landed are not "in flight"; nothing new is issued before the withdrawal
            if t.done:
                return None
            self._note("withdrawn", t.id, t.in_flight)
            inflight = t.in_flight * self.block_size
            self._drop(t, ShardIOError(errno.ECANCELED, f"{t.path}: read withdrawn (a stale prefetch)"))
            return inflight

    def _drop(self, t: Ticket, err: BaseException) -> None:
        """Under the lock, from a caller (never from inside `_pump`, where chunks are briefly out of the queue):
        fail t and drop its queued chunks; it is done once the chunks really with the kernel or a worker land.
        `remaining` is recounted from them rather than decremented: an interrupt inside `_enqueue` (after it was
        set, before the chunks were queued) would otherwise leave a ticket waiting for chunks that do not exist,
        and whoever settles it (a cache taking its slot back) blocks for ever."""
        self._mend_issue()  # t's counts include a chunk whose issuing an interrupt cut short
        self._fail(t, err)
        if not t.done:
            t.remaining = t.in_flight
            if t.remaining == 0:
                self._finish(t)

    def ready(self, t: Ticket) -> bool:
        with self._lock:
            return t.done

    def wait(self, t: Ticket) -> None:
        """Block until the ticket is done; raise its error (ShardIOError naming the file) if it failed. Several
        threads may wait for the same ticket. It also raises, once, an error of the loader's own that no wait has
        reported yet (io_uring: what ended its background thread), after t is done and only if t's read did not
        fail: `t.done and t.error is None` then tells the caller that t's bytes are fine all the same."""
        self.settle(t)
        if t.error is not None:
            raise t.error
        if self._internal_error is not None:  # read without the lock first: the common path takes it once only
            with self._lock:
                self._raise_internal_error()

    def settle(self, t: Ticket) -> None:
        """Block until the ticket is done without raising its read's error (it stays in `t.error`) or the loader's
        own (the next `wait` reports it): for a caller that only needs the slot quiet, e.g. a cache evicting a
        finished guess, which would otherwise swallow an error meant for the user. Raises only if the waiting
        itself failed (io_uring: the kernel refused the wait), t then not done: its slot may still be written.

        >>> loader.settle(t); t.done, t.error     # doctest: +SKIP
        (True, None)
        """
        raise NotImplementedError

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _raise_internal_error(self) -> None:
        """Under the lock: report (once) an internal error no ticket could carry."""
        exc, self._internal_error = self._internal_error, None
        if exc is not None:
            raise exc

    def _close_ticket_fd(self, t: Ticket) -> None:
        """Under the lock: close t's fd; a double close (EBADF) becomes t's error, or, if t already failed, the
        loader's own, raised by the next wait (never raised from here: see `_close_fd`)."""
        err = _close_fd(t)
        if err is not None:
            if t.error is None:
                t.error = err
            elif self._internal_error is None:
                self._internal_error = err

    def record_issues(self, limit: int = 1 << 16) -> deque:
        """Start recording, in order, when reads are queued, promoted and issued (for tests and diagnostics):
        ("queued", ticket id, urgent, chunks), ("promoted", ticket id, chunks), ("issue", ticket id, offset),
        ("returned", ticket id, offset): an issued chunk is back from the kernel or a worker (read, failed, short,
        or never taken by the kernel), so it no longer occupies the disk."""
        with self._lock:
            self._trace = deque(maxlen=limit)
            return self._trace

    def describe(self) -> str:
        return f"{self.name} (block {self.block_size >> 10} KiB, queue depth {self.queue_depth})"

    def warm_up(self) -> None:
        """Fault the pool's slots in now rather than at their first reads (`ShardSet.warm_up`); io_uring also
        registers them."""
        self.pool.prefault()

    def _mend_issue(self) -> None:
        """Under the lock: io_uring finishes an issuing step an interrupt cut short (`UringLoader._mend_issue`);
        the other backends' workers take a chunk from the queue in one step."""

    # -- shared machinery (all under self._cv) --------------------------------------------------------------
    _queue: deque

    def _check(self, size: int, slot: int) -> None:
        if size < 0 or size > self.pool.slot_size or size % 4096 and self.direct:
            raise ValueError(f"read of {size} bytes does not fit slot size {self.pool.slot_size} with O_DIRECT")
        if not 0 <= slot < self.pool.n_slots:
            raise ValueError(f"no slot {slot}")

    def _note(self, *event: object) -> None:
        if self._trace is not None:
            self._trace.append(event)

    def _promoted(self, t: Ticket) -> None:
        """Under the lock: t is needed now; its chunks with the disk are no longer speculative."""

    def poll(self) -> None:
        """Hand out what completed and issue what may go now, without blocking (io_uring: speculative chunks are
        issued only from calls into the loader unless its `spec_background` thread runs, so a caller that computes
        between them calls this first)."""

    def _spec_with_disk(self) -> int:
        return 0

    def landed_bytes(self) -> int:
        """Bytes of reads that have completed, including those nobody has collected yet (io_uring: completions
        still in the ring), read without collecting anything: for measuring what reads landing meanwhile cost a
        computation without changing when the next chunks go. Approximate (a collected short chunk counts whole)."""
        return self.bytes_read

    def _enqueue(self, tickets: list[Ticket], urgent: bool) -> None:
        if urgent:
            self._collect()  # chunks that have landed are in nobody's way
            self.spec_in_way += self._spec_with_disk()
        items = []
        for t in tickets:
            t.urgent = urgent
            mine = [(t, off, min(self.block_size, t.size - off)) for off in range(0, t.size, self.block_size)]
            t.remaining = len(mine)
            self._note("queued", t.id, urgent, len(mine))
            if not mine:
                self._finish(t)
            items += mine
        if urgent:
            self._queue.extendleft(reversed(items))
        else:
            self._queue.extend(items)
        self._kick()

    def _kick(self) -> None:
        """Queued work may be issued now."""

    def _collect(self) -> None:
        """Account for chunks that have completed, without issuing any (thread backends: already done)."""

    def _fail(self, t: Ticket, err: BaseException) -> None:
        """Record the first error and drop the ticket's queued chunks: nothing more is read for it."""
        if t.error is None:
            t.error = err
        n = len(self._queue)
        self._queue = deque(it for it in self._queue if it[0] is not t)
        t.remaining -= n - len(self._queue)
        if t.remaining == 0:
            self._finish(t)

    def _chunk_done(self, t: Ticket, n: int, err: BaseException | None) -> None:
        t.in_flight -= 1
        t.remaining -= 1
        if err is None:
            self.bytes_read += n
        if err is not None:
            self._fail(t, err)
        elif t.remaining == 0:
            self._finish(t)

    def _finish(self, t: Ticket) -> None:
        t.done = True
        why = getattr(t.error, "closed_why", None)
        if why is not None and t.in_flight == 0:  # "may still be written" no longer holds: every chunk has landed
            t.error = _closed_error(t.path, why, landed=True)
        self._retire(t)
        self._cv.notify_all()

    def _retire(self, t: Ticket) -> None:
        """The one place a ticket's fd is closed: once done and no chunk of it is with the kernel or a worker."""
        if t.fd >= 0 and t.done and t.in_flight == 0:
            self._close_ticket_fd(t)

    def _cancel_queued(self) -> None:
        for t in {id(it[0]): it[0] for it in self._queue}.values():
            self._fail(t, _closed_error(t.path))


class PreadLoader(Loader):
    """O_DIRECT preadv on a few worker threads: for kernels or containers where io_uring is disabled.

    Chunks wait in one queue; urgent (foreground) loads go to its front, so a miss never queues behind prefetches.
    `spec_window` holds speculation to the workers' idle time as io_uring's does to the disk's: a worker takes a
    speculative chunk only while no urgent chunk is with a worker (urgent ones are queued first) and fewer than
    spec_window speculative chunks are, so a miss finds at most the window ahead of it whatever the thread count.
    The workers are joined by close(); a worker finishing a ticket's last chunk closes its fd.
    """

    name = "pread"
    direct = True

    def __init__(self, pool: BufferPool, **kw):
        super().__init__(pool, **kw)
        self._queue: deque[tuple[Ticket, int, int]] = deque()
        self._view = memoryview(pool.array)
        self._busy = 0  # chunks with a worker now
        self._spec_n = 0  # of them, speculative: taken from a ticket not urgent and not promoted since
        self._spec_by: dict[int, int] = {}  # ticket id -> its speculative chunks with a worker (until promoted)
        # ticket id -> threads in settle() for it: with no chunk at a worker, a chunk of a guess held back by its
        # window is taken anyway (the waiter needs it; io_uring's forced pump), else a wait for a guess never
        # promoted would last for ever
        self._waited: dict[int, int] = {}
        self._held = False  # a worker found only chunks the window holds back: wake it when a chunk returns
        self._workers: list[threading.Thread] = []
        try:
            for i in range(max(1, self.threads)):
                w = threading.Thread(target=self._work, name=f"mer-{self.name}-{i}", daemon=True)
                w.start()
                self._workers.append(w)
        except BaseException as exc:
            self.close()  # the workers already started are joined
            if isinstance(exc, RuntimeError):  # "can't start new thread": the process is out of threads
                # io_uring needs no threads, but it reads with O_DIRECT: no way out for buffered reads, which were
                # chosen because the filesystem refuses O_DIRECT
                alt = ", or --io io_uring, which needs none" if self.direct else ""
                raise ShardIOError(errno.EAGAIN, f"{self.name}: could not start reader thread {i + 1} of "
                                                 f"{max(1, self.threads)} ({exc}); use fewer --threads{alt}") from exc
            raise

    def _kick(self) -> None:
        self._cv.notify_all()

    def poll(self) -> None:
        """The workers issue on their own; a worker that found only guesses held back by the window sleeps until a
        chunk returns, so this wakes it in case the window (or a promotion) lets one go now."""
        with self._lock:
            if self._held:
                self._held = False
                self._cv.notify_all()

    def _take(self) -> tuple[Ticket, int, int] | None:
        """Under the lock: the next chunk a worker may read now, or None (only speculative chunks are queued, and
        the window says they must wait). As `UringLoader._pump`: a guess that has read its window is passed over,
        so it does not hold back the guesses queued behind it."""
        window = self._spec_window
        if window is None:
            return self._queue.popleft()
        passed: list[tuple[Ticket, int, int]] = []
        try:
            while self._queue:
                t = self._queue[0][0]
                if not t.urgent:
                    if self._spec_n >= window or self._busy > self._spec_n:
                        break  # speculation only in the idle time (urgent chunks are queued ahead of it)
                    if self.spec_cap_each and t.issued >= window:
                        passed.append(self._queue.popleft())
                        continue
                return self._queue.popleft()
        finally:
            self._queue.extendleft(reversed(passed))
        if self._busy == 0 and self._waited:  # held back, but somebody waits for it and the workers are idle
            for i, item in enumerate(self._queue):
                if item[0].id in self._waited:
                    del self._queue[i]
                    return item
        return None

    def _work(self) -> None:
        while True:
            with self._lock:
                while (item := self._take() if self._queue else None) is None:
                    if self._closed and not self._queue:
                        return
                    self._held = bool(self._queue)
                    self._cv.wait()
                t, off, n = item
                spec = not t.urgent
                if spec:
                    self._spec_n += 1
                    self._spec_by[t.id] = self._spec_by.get(t.id, 0) + 1
                self._busy += 1
                t.in_flight += 1
                t.issued += 1
                self._note("issue", t.id, off)
            err: BaseException | None = None
            try:
                start = t.slot * self.pool.slot_size + off
                self._read(t, self._view[start:start + n], off)
            except BaseException as exc:  # handed to the waiters
                err = exc
            with self._lock:
                self._busy -= 1
                if spec and t.id in self._spec_by:  # not promoted since (that moved its count out already)
                    self._spec_n -= 1
                    self._spec_by[t.id] -= 1
                    if not self._spec_by[t.id]:
                        del self._spec_by[t.id]
                self._note("returned", t.id, off)
                self._chunk_done(t, n, err)
                if self._held:  # a chunk held back by the window may go now (only then: waiters sleep meanwhile)
                    self._held = False
                    self._cv.notify_all()

    def _spec_with_disk(self) -> int:
        return self._spec_n

    def _promoted(self, t: Ticket) -> None:
        # needed now: its chunks with the workers are no longer speculative (a foreground read waits for them as
        # for its own)
        self._spec_n -= self._spec_by.pop(t.id, 0)

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

    def settle(self, t: Ticket) -> None:
        with self._lock:
            if t.done:
                return
            self._waited[t.id] = self._waited.get(t.id, 0) + 1
            try:
                self._cv.notify_all()  # a guess held back by its window is needed now
                while not t.done:
                    self._cv.wait()
            finally:
                self._waited[t.id] -= 1
                if not self._waited[t.id]:
                    del self._waited[t.id]

    def close(self) -> None:
        """Cancel queued reads (their waiters get an error), let the workers finish the chunk in hand, join them."""
        with self._lock:
            self._closed = True
            self._cancel_queued()
            self._cv.notify_all()
        for w in self._workers:
            if w is not threading.current_thread():
                w.join()
        try:
            self._view.release()
        except BufferError:
            pass  # a slice still referenced somewhere: it goes with the last reference
        with self._lock:
            self._raise_internal_error()


class BufferedLoader(PreadLoader):
    """Plain (page-cache) reads, for filesystems that refuse O_DIRECT."""

    name = "buffered"
    direct = False

    def _enqueue(self, tickets: list[Ticket], urgent: bool) -> None:
        for t in tickets:
            try:
                os.posix_fadvise(t.fd, 0, t.size, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
        super()._enqueue(tickets, urgent)


CAP_IPC_LOCK = 14  # include/uapi/linux/capability.h


def _mem_size(n: int) -> str:
    """Whole MiB, or KiB below 10 MiB when not a whole MiB: a 64 KiB or 900 KiB limit must not read as 0 or 1 MiB."""
    return f"{n >> 10} KiB" if n < 10 << 20 and n % (1 << 20) else f"{n / 2**20:.0f} MiB"


def _locks_freely() -> bool:
    """Whether this process has CAP_IPC_LOCK (CapEff in /proc/self/status): then the kernel counts no pinned page
    against RLIMIT_MEMLOCK, and an ENOMEM is memory really short."""
    try:
        with open("/proc/self/status") as fh:
            caps = next((int(line.split()[1], 16) for line in fh if line.startswith("CapEff:")), 0)
    except (OSError, ValueError):
        return False
    return bool(caps >> CAP_IPC_LOCK & 1)


def _memlock_hint(exc: OSError, pool: BufferPool) -> str:
    """Why io_uring refused to pin the cache, when it is the locked-memory limit: without CAP_IPC_LOCK (root has it)
    registered buffers count against RLIMIT_MEMLOCK, 8 MiB by default, below one Mixtral expert. The kernel counts
    per user, with the rings' own pages on newer kernels (6.18 here): a cache within the limit can be refused too."""
    if exc.errno != errno.ENOMEM:
        return ""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or _locks_freely():
        return ""
    need = pool.slot_size * pool.n_slots
    raise_it = "raise it (`ulimit -l unlimited`, or LimitMEMLOCK= for a service) for reads into registered buffers"
    if soft < need:
        return f": the cache's {_mem_size(need)} exceed the locked-memory limit of {_mem_size(soft)}; {raise_it}"
    return (f": the locked-memory limit of {_mem_size(soft)} counts this user's other registered buffers and io_uring "
            f"rings besides the cache's {_mem_size(need)}; {raise_it}")


class UringLoader(Loader):
    """io_uring, O_DIRECT, reads into registered (fixed) buffers: one per pool slot.

    Threads: the ring's submission side and its completion side are touched only under `_cv`. One waiting thread
    at a time (the "reaper", `_reaping`) blocks in io_uring_enter without the lock; the others wait on `_cv` and
    are woken when the reaper has handed out what completed. Only the reaper reaps while it is reaping, so the
    completion it sleeps for cannot be taken from under it. The reaper may be the loader's own `mer-io_uring-spec`
    thread (`spec_background`), which waits for up to a window of completions a wake-up: a caller's `wait()` then
    sleeps on `_cv` until it has handed them out.
    """

    name = "io_uring"
    direct = True

    def __init__(self, pool: BufferPool, **kw):
        super().__init__(pool, **kw)
        entries = 1 << max(1, (self.queue_depth - 1).bit_length())
        try:
            self.ring = uring.Ring(entries)
        except OSError as exc:  # our error, with the reason probe() gives (seccomp, sysctl, old kernel, memlock)
            why = uring.probe() or f"io_uring_setup failed ({exc.strerror or exc})"
            err = ShardIOError(exc.errno or errno.EIO, f"--io io_uring is not available here: {why}; use --io auto "
                                                       "(it falls back by itself) or --io pread")
            err.reason = why  # what `--io auto` records: the advice to use --io auto is not for it
            raise err from exc
        # slots registered with the ring (their reads are READ_FIXED). Each is registered at its first read
        # (`_buf_index`): registering pins and faults in the slot's pages, which took 0.55-2.7 s for a 16-slot cache
        # of Mixtral experts when done whole at open; a slot never read is never pinned. Before Linux 5.19 (no
        # sparse table) the pool is registered whole here. Plain READ where registering is refused (about 10% slower:
        # docs/runtime.md, "Registered buffers").
        self._fixed: set[int] = set()
        self._lazy = False  # slots not yet registered may still be
        try:
            try:
                self.ring.register_sparse(pool.n_slots)
                self._lazy = True
            except OSError:
                self.ring.register_buffers(pool.regions())
                self._fixed = set(range(pool.n_slots))
        except OSError as exc:
            self._refuse(exc)
        except BaseException:
            self.ring.close()
            raise
        self._queue: deque[tuple[Ticket, int, int]] = deque()  # (ticket, offset, length) not yet submitted
        self._chunks: dict[int, tuple[Ticket, int, int]] = {}  # user_data -> chunk with the kernel
        self._chunk_ids = itertools.count(1)
        self._spec: set[int] = set()  # user_data of the speculative chunks with the kernel (for spec_window)
        # taking SQEs back (`_retract`) survives an interrupt (KeyboardInterrupt) at any step: the user_data the SQ
        # gave back and not yet handled, and the reads they belonged to that are not yet judged (failed, finished
        # if nothing of them is left with the kernel); whoever retracts next (the next close()) handles both first
        self._returned: list[int] = []
        self._issuing: tuple[int, tuple[Ticket, int, int]] | None = None  # (user_data, chunk): `_mend_issue`
        self._taken: dict[int, Ticket] = {}
        self._reaping = False
        # a close() is between `_closed = True` and having given the ring back (`_closer`: its thread); a close()
        # interrupted there (a second Ctrl-C) leaves it False with the ring open: the next close() finishes the job
        self._close_busy = False
        self._closer: threading.Thread | None = None
        self._close_cause: BaseException | None = None  # the interrupt that ended that close(), for the messages
        self._background: threading.Thread | None = None
        # what ended the background thread, reported once by the next wait() (once its ticket is done) or close();
        # no new thread is started until then, so a failure that repeats does not start one thread per call
        self._background_error: BaseException | None = None
        self._background_files: list[str] = []  # the files whose guesses it was reading when it failed
        # why the background thread could not be started (speculative chunks then go from calls into the loader)
        self.spec_background_refused: str | None = None
        # True: a thread of the loader's own reaps speculative chunks and issues the next ones while the caller
        # computes (without it they go only from calls into the loader: `poll`, `ready`, `wait`)
        self.spec_background = False

    @property
    def fixed(self) -> bool:
        """Whether reads go into registered buffers (every slot's, or every slot read so far and the rest may)."""
        return bool(self._fixed) or self._lazy

    def _refuse(self, exc: OSError) -> None:
        """Registering was refused: the slots not registered read with plain READ from now on."""
        self._lazy = False
        why = f"registered buffers refused ({exc.strerror}{_memlock_hint(exc, self.pool)})"
        n = len(self._fixed)
        self.reason = "; ".join(r for r in (self.reason, why + (
            f"; {n} of {self.pool.n_slots} slots registered, plain READ for the others" if n else
            "; using plain READ")) if r)

    def _buf_index(self, slot: int) -> int | None:
        """Under the lock: the fixed-buffer index of a read into `slot` (registering the slot now if it is the first
        read into it), or None for plain READ."""
        if slot in self._fixed:
            return slot
        if not self._lazy:
            return None
        try:
            self.ring.update_buffer(slot, self.pool.address(slot), self.pool.slot_size)
        except OSError as exc:  # RLIMIT_MEMLOCK: the next slots would be refused as well
            self._refuse(exc)
            return None
        self._fixed.add(slot)
        return slot

    def warm_up(self) -> None:
        """Fault in, then register every slot not yet registered now, rather than at its first read."""
        super().warm_up()  # registering pages already present pins them without faulting each under the lock
        with self._lock:
            for slot in range(self.pool.n_slots):
                if self._closed or self.ring.fd < 0 or self._buf_index(slot) is None:
                    break

    def describe(self) -> str:
        n = len(self._fixed)
        how = ("fixed buffers" if self._lazy or n == self.pool.n_slots else
               f"fixed buffers for {n} of {self.pool.n_slots} slots, plain READ for the others" if n else "plain READ")
        return super().describe() + f", {how}; ring indices: {uring.ORDERING}"

    def _kick(self) -> None:
        if self.ring.fd < 0:  # closed: nothing is issued any more (and the ring's memory is unmapped)
            return
        self._pump()
        if (self._spec and self.spec_background and self._background is None and not self._closed
                and self._background_error is None and self.spec_background_refused is None):
            th = threading.Thread(target=self._feed_speculation, name="mer-io_uring-spec", daemon=True)
            self._background = th
            try:
                th.start()
            except BaseException as exc:
                # the guess's chunks are already with the kernel: failing here would make the caller give their
                # slot back while they land in it. Speculation goes on from calls into the loader instead.
                self._background = None
                self.spec_background_refused = f"the background speculation thread could not start ({exc})"
        if self._spec:
            self._cv.notify_all()

    def _feed_speculation(self) -> None:
        """The background thread: while speculative chunks are with the disk, be the reaper until a window's
        worth of them has completed (one wake-up per window, not per chunk), then issue the next ones (`_pump`,
        which issues nothing speculative while a foreground chunk is with the disk). Sleeps otherwise.

        An error (the kernel refusing a submission or a wait) ends the thread: it is kept for the next wait() or
        close() to raise, and speculation goes on from calls into the loader until it has been reported."""
        with self._lock:
            try:
                while not (self._closed and (not self._chunks or self.ring.fd < 0)):
                    if self._reaping or not self._spec or self.ring.fd < 0:
                        self._cv.wait()
                        continue
                    self._resume_close()
                    r = self.ring
                    if r.in_flight == 0 and r.pending:  # a submit the kernel took only part of, with no error
                        self._submit()
                    if r.in_flight == 0:  # nothing the kernel could complete: sleeping in it would be for ever
                        self._cv.wait()
                        continue
                    self._reap_once(min(len(self._spec), r.in_flight))
            except BaseException as exc:
                self._background_error = exc
                # the files it was reading for, named in the report (they are not at fault)
                self._background_files = list(dict.fromkeys(self._chunks[c][0].path for c in self._spec))
            finally:
                if self._background is threading.current_thread():
                    self._background = None
                self._cv.notify_all()

    def _raise_background_error(self) -> None:
        """Under the lock: report (once) what ended the background thread."""
        self._raise_internal_error()
        exc, self._background_error = self._background_error, None
        if exc is not None:
            where = _others(self._background_files, "io_uring")
            raise ShardIOError(getattr(exc, "errno", None) or errno.EIO,
                               f"{where}: the background speculation thread failed while reading ahead ({exc}); the "
                               "file is not at fault and no read was lost (guesses were read from calls into the "
                               "loader since): retry, and use --io pread if it recurs") from exc

    def _mend_issue(self) -> None:
        """Under the lock: finish or undo an issuing step of `_pump` an interrupt cut short (`_issuing`). Its chunk
        not yet recorded: its SQE, if prepared, is taken back (the chunk is still queued). Recorded: it leaves the
        queue if still there, and its read's counts are redone. Every step may be interrupted and redone."""
        if self._issuing is None:
            return
        cid, item = self._issuing
        t = item[0]
        if cid not in self._chunks:
            if self.ring.fd >= 0:  # a closed ring took its SQEs with it
                self.ring.drop_unsubmitted(cid)
        else:
            # still queued (at the front, unless a promotion or an urgent read went ahead of it since)
            at = next((i for i, it in enumerate(self._queue) if it is item), None)
            if at is not None:
                del self._queue[at]
                t.issued += 1
            self._recount(t)
            if not t.urgent:
                self._spec.add(cid)
        self._issuing = None

    def _pump(self, force: bool = False) -> None:
        r = self.ring
        self._mend_issue()
        passed: list[tuple[Ticket, int, int]] = []  # chunks of guesses that have read their window, kept in order
        try:
            while self._queue and r.in_flight + r.pending < self.queue_depth:
                t = self._queue[0][0]
                window = self._spec_window
                if not (t.urgent or force or window is None):
                    if len(self._spec) >= window or len(self._chunks) > len(self._spec):
                        break  # speculation only in the disk's idle time (urgent chunks are queued ahead of guesses)
                    if self.spec_cap_each and t.issued >= window:
                        # this guess has read its window until it is needed; the guess (or anything) behind it may
                        # still go: stopping here would hold back every read queued after it
                        passed.append(self._queue.popleft())
                        continue
                buf = self._buf_index(t.slot)  # before the chunk leaves the queue: registering takes time
                item = self._queue[0]
                t, off, n = item
                cid = next(self._chunk_ids)
                addr = self.pool.address(t.slot) + off
                # an interrupt (a KeyboardInterrupt, at any call) leaves the chunk queued with no SQE for it, or
                # recorded in `_chunks` with its SQE: the SQE is prepared first (the kernel takes it only at our next
                # io_uring_enter), then the chunk is recorded, then it leaves the queue. `_mend_issue` finishes or
                # undoes a step cut short, before anything is submitted. (Popped first, as before, a Ctrl-C there
                # lost the chunk, or left an SQE whose completion raised KeyError: its read never finished.)
                self._issuing = (cid, item)
                # never submits by itself (so never raises the kernel's refusal): the SQ holds only the `pending`
                # SQEs, fewer than queue_depth by the loop's condition, and it has at least queue_depth entries (a
                # power of two >= queue_depth; test_a_pump_never_submits_behind_its_own_back); what is prepared goes
                # to the kernel in `_submit` below, whose refusal `_refused` handles
                r.prep_read(t.fd, addr, n, off, cid, buf)
                self._chunks[cid] = item
                self._queue.popleft()
                t.in_flight += 1
                t.issued += 1
                if not t.urgent:
                    self._spec.add(cid)
                self._issuing = None
                self._note("issue", t.id, off)
        finally:
            self._queue.extendleft(reversed(passed))
        if r.pending:
            self._submit()

    def _submit(self) -> None:
        """Under the lock: pass the queued SQEs to the kernel; if it refuses, their reads fail (`_refused`)."""
        self._mend_issue()
        try:
            self.ring.submit()
        except OSError as exc:
            self._refused(exc)

    def _retract(self) -> list[Ticket]:
        """Take back the SQEs the kernel has not consumed (under the lock): their chunks were never with the kernel.
        Returns the tickets still to judge (`_taken`: these ones', and any an interrupted call left), each's counts
        recounted from the chunks really with the kernel and those still queued (`_recount`); the caller removes
        each from `_taken` once it has failed it.

        Every step can be interrupted (a KeyboardInterrupt) and redone by the next call: the user_data are recorded
        (`_returned`) before the SQ lets go of them, a ticket is recorded (`_taken`) before any of its counts
        change, and a chunk leaves `_returned` only once handled. (A ticket lost between two steps used to stay
        not done for ever, its slot reserved and its fd open: its chunks were neither in the ring nor in
        `_chunks`.)"""
        self.ring.retract(into=self._returned)
        returned = self._returned
        while returned:
            cid = returned[0]
            chunk = self._chunks.get(cid)  # None: handled already (interrupted before it left `_returned`)
            if chunk is not None:
                t, off, _ = chunk
                self._taken[id(t)] = t  # first: whatever happens next, t is judged
                del self._chunks[cid]
                self._spec.discard(cid)
                self._note("returned", t.id, off)
                t.issued -= 1  # never with the kernel
            del returned[0]
        for t in self._taken.values():
            self._recount(t)
        return list(self._taken.values())

    def _recount(self, t: Ticket) -> None:
        """Under the lock: t's chunks with the kernel and not yet completed, counted from `_chunks` and the queue
        (a decrement an interrupt skipped cannot leave t waiting for a chunk that does not exist)."""
        t.in_flight = sum(1 for c in self._chunks.values() if c[0] is t)
        t.remaining = t.in_flight + sum(1 for it in self._queue if it[0] is t)

    def _refused(self, exc: OSError) -> None:
        """Under the lock: the kernel refused a submission (e.g. EAGAIN/ENOMEM: short of memory). Raising from here
        would reach a caller (start, promote, wait) that may give the slots back while the chunks these tickets
        submitted earlier still land in them, and the refused SQEs would go with the next submission. So the
        refused SQEs are taken back, and their tickets fail: each is done (and its error raised by wait) only once
        the chunks it had already submitted have landed, so its slot is never reused while the kernel writes it."""
        failed = self._retract()
        why = exc.strerror or os.strerror(exc.errno or errno.EIO)
        for t in failed:
            self._note("refused", t.id)
            self._fail(t, ShardIOError(exc.errno or errno.EIO,
                                       f"{t.path}: the kernel refused to start the read ({why}); the file is not "
                                       "at fault: retry, and use --io pread if it recurs"))
            self._taken.pop(id(t), None)

    def _complete(self, cid: int, res: int) -> None:
        t, off, n = self._chunks.pop(cid)
        self._spec.discard(cid)
        self._note("returned", t.id, off)
        if res < 0 and -res in _RETRY or 0 < res < n:  # retry, or continue a short read where it stopped
            if t.error is not None:  # the ticket failed meanwhile: drop the rest of this chunk
                self._chunk_done(t, 0, None)
            elif self._closed:  # nothing is issued any more: the rest of the chunk would stay queued for ever
                done = max(res, 0)
                self.bytes_read += done
                self._chunk_done(t, 0, self._cut_short(t, off + done))
            else:
                t.in_flight -= 1
                done = max(res, 0)
                self.bytes_read += done
                self._queue.appendleft((t, off + done, n - done))
        elif res < 0:
            self._chunk_done(t, 0, ShardIOError(-res, f"{t.path}: read failed at byte {off} ({os.strerror(-res)})"))
        elif res == 0:
            self._chunk_done(t, 0, _short(t.path, off, t.size))
        else:
            self._chunk_done(t, n, None)
        self._retire(t)

    def _cut_short(self, t: Ticket, offset: int) -> ShardIOError:
        """Under the lock, closed: why t's read stops at `offset`. A truncated file is what its reader must hear
        about (re-extract), not that the loader was closed: the rest is not read, but the file's size says."""
        try:
            end = os.fstat(t.fd).st_size
        except OSError:
            end = t.size
        return _short(t.path, end, t.size) if end < t.size else _closed_error(t.path)

    def _reap_once(self, n: int = 1) -> None:
        """Under the lock: become the reaper, sleep in the kernel for n completions (n <= those in flight: only the
        reaper reaps), hand out what came."""
        try:
            # set inside the try: an interrupt between setting it and the try would leave it True for ever, and
            # every waiter (close() too) would wait for a reaper that does not exist
            self._reaping = True
            try:
                # released inside the try: an interrupt is raised as release() returns, the lock then released,
                # and the finally must take it back before the outer finally notifies under it
                self._cv.release()
                self.ring.wait_cqe(max(1, n))
            finally:
                self._cv.acquire()
            self._resume_close()  # a close() interrupted meanwhile: its reads are judged before any completion
            for cid, res in self.ring.reap():
                self._complete(cid, res)
            self._kick()
        finally:
            self._reaping = False
            self._cv.notify_all()

    def _progress(self, t: Ticket | None = None) -> None:
        """Under the lock: make progress towards some completion (reap, or wait for whoever is reaping); returns
        early once `t` is done (a refused submission can finish it with nothing in flight)."""
        if self._reaping:
            self._cv.wait()
            return
        self._resume_close()
        self._pump()
        # only held-back speculative chunks are left, and this thread needs one; a refused submission fails the
        # tickets it was for and drops their queued chunks, so each round either submits or shortens the queue
        while self.ring.in_flight == 0 and self._queue and not (t is not None and t.done):
            self._pump(force=True)
        if t is not None and t.done:
            return
        if self.ring.in_flight == 0:
            raise ShardIOError(errno.EIO, "io_uring: nothing in flight but reads are outstanding (a bug): "
                                          "use --io pread")
        self._reap_once()

    def _spec_with_disk(self) -> int:
        return len(self._spec)

    def _promoted(self, t: Ticket) -> None:
        # a foreground read queued now waits for them as for its own, and the background thread stops reaping
        # for them
        if t.in_flight:
            self._spec.difference_update([cid for cid in self._spec if self._chunks[cid][0] is t])

    def landed_bytes(self) -> int:
        with self._lock:  # the reaper moves completions into bytes_read under it (and never closes the ring)
            r = self.ring
            if r.fd < 0:
                return self.bytes_read
            return self.bytes_read + ((r.cq_tail.load() - r.cq_head.load()) & 0xFFFFFFFF) * self.block_size

    def _collect(self) -> None:
        if not self._reaping and not self.ring.fd < 0:
            self._resume_close()
            for cid, res in self.ring.reap():
                self._complete(cid, res)

    def poll(self) -> None:
        with self._lock:
            if not self._reaping and not self.ring.fd < 0:
                self._collect()
                self._kick()

    def ready(self, t: Ticket) -> bool:
        self.poll()
        with self._lock:
            return t.done

    def wait(self, t: Ticket) -> None:
        with self._lock:
            self._settle(t)
            if t.error is None:  # only once t is done: a caller that gets an error may reuse t's slot at once
                self._raise_background_error()
        if t.error is not None:
            raise t.error

    def settle(self, t: Ticket) -> None:
        with self._lock:
            self._settle(t)

    def _settle(self, t: Ticket) -> None:
        """Under the lock: make progress until t is done; raises only if the wait itself failed."""
        while not t.done:
            if self.ring.fd < 0:  # closed with t's chunks still with the kernel (close's own wait failed)
                raise _fresh(t.error or _closed_error(t.path))
            try:
                self._progress(t)
            except uring.UringError as exc:
                # the wait itself failed (io_uring_enter refused): t's chunks are still with the kernel, and t
                # stays not done (ready() False) until a later wait, poll or close has seen them land: whoever
                # owns the slot must keep it until then (ExpertCache quarantines it). Its chunks not issued yet
                # are dropped, so the slot comes back once those already with the kernel land
                err = ShardIOError(exc.errno or errno.EIO,
                                   f"{t.path}: waiting for the read failed ({exc.strerror}); the read is still "
                                   "with the kernel and its buffer stays reserved until it lands: retry, and "
                                   "use --io pread if it recurs")
                self._fail(t, err)
                raise err from exc

    def close(self) -> None:
        """Cancel queued reads, wait for those with the kernel (their slots must not be written after this),
        close every fd and the ring. Idempotent."""
        err: ShardIOError | None = None
        other: BaseException | None = None  # a bug of ours ("nothing in flight") or an interrupt: raised as it is
        taken_over = False  # this call gave the ring back (a later close() finishing an interrupted one counts)
        with self._lock:
            if self._closed:
                # an earlier close() was interrupted before it gave the ring and the fds back (a second Ctrl-C while
                # it waited for the reaper): this one finishes its work, or waits while another close() still does
                while self.ring.fd >= 0:
                    if self._close_busy and self._closer is not threading.current_thread():
                        self._cv.wait()
                        continue
                    self._close_busy, self._closer = True, threading.current_thread()
                    taken_over = True
                    try:
                        if not self._reaping:
                            self._collect()  # what landed meanwhile is done, its slot free
                        self._abandon(None, self._close_cause)
                    finally:
                        self._close_busy = False
                        self._cv.notify_all()
            else:
                taken_over = True
                self._closed = True
                self._close_busy, self._closer = True, threading.current_thread()
                try:
                    self._cancel_queued()
                    try:
                        while self._chunks:
                            self._progress()
                    except uring.UringError as exc:  # the kernel refused the wait: what is with it cannot be waited for
                        err = self._close_failed(exc)
                    except BaseException as exc:
                        other = self._close_cause = exc
                    finally:
                        # the ring, every fd and every ticket the kernel never had are released in any case; raising
                        # from inside the lock would also skip joining the background thread
                        self._abandon(err, other)
                finally:
                    self._close_busy = False
                    self._cv.notify_all()
        if not taken_over:
            return
        bg = self._background
        if bg is not None and bg is not threading.current_thread():
            bg.join()  # it ends once it sees the ring closed (it never sleeps in the kernel without being the reaper)
        if other is not None:
            raise other
        with self._lock:
            if err is None:
                self._raise_background_error()
        if err is not None:
            raise err

    def _close_failed(self, exc: OSError) -> ShardIOError:
        """Under the lock: close() could not wait for the reads still with the kernel; the error it raises (once,
        with the background thread's unreported error folded in: a second close() is a no-op)."""
        tickets = list({id(t): t for t, _, _ in self._chunks.values()}.values())
        paths = list(dict.fromkeys(t.path for t in tickets))
        bg, self._background_error = self._background_error, None
        also = f"; earlier, the background speculation thread had failed too ({bg})" if bg is not None else ""
        return ShardIOError(exc.errno or errno.EIO,
                            f"{_others(paths, 'io_uring')}: closing the io_uring loader failed while waiting for "
                            f"{len(tickets)} read(s) still with the kernel ({exc.strerror or exc}); the ring and "
                            "every file were closed regardless and the kernel finishes those reads on its own, so "
                            "their buffers may still be written for a moment: close the buffer pool rather than "
                            f"reuse it, and use --io pread if it recurs{also}")

    def _abandon(self, err: ShardIOError | None, other: BaseException | None = None) -> None:
        """Under the lock, closing: give back every fd and the ring, even after an error. A ticket whose chunks are
        still with the kernel (only after `err` or `other`) keeps done=False: its slot may still be written, so
        whoever owns it keeps it reserved (`ready` stays False), and its waiters get its own error if its read had
        already failed (EIO, a truncation: what the user must act on), else `err`, at once instead of a wait on a
        closed ring. Chunks still queued (left by an exception out of the close's own wait) are failed, their
        tickets finished and their fds closed: nothing stays queued on a closed ring. So are the chunks whose SQEs
        the kernel never consumed (a bug of ours found by the close's wait, `other`: nothing in flight, yet reads
        outstanding; or a submission the kernel took only part of): they are taken back from the SQ, so nothing
        can write their slots, and a ticket left with no chunk anywhere is done (its slot reusable) rather than
        waiting for ever for a completion that cannot come; one the kernel took only part of keeps done=False.
        An interrupt in its wait for the reaper escapes with the ring open; `close()` called again then runs this
        again (`_close_busy` says nobody else is)."""
        while self._reaping:  # another thread sleeps in the kernel on this ring (an interrupt reached us meanwhile)
            self._cv.wait()
        self._take_back(err, other)
        for t, _, _ in self._chunks.values():
            # a cancellation (this close's, a withdrawn guess's) tells the user less than err: the slot may still
            # be written
            if t.error is None or err is not None and getattr(t.error, "errno", None) == errno.ECANCELED:
                t.error = err or _closed_error(t.path, other, in_flight=True)
            if t.fd >= 0:
                self._close_ticket_fd(t)
        self._spec.clear()
        self.ring.close()
        self._cv.notify_all()

    def _resume_close(self) -> None:
        """Under the lock, with nobody else sleeping in the kernel: if a close() was interrupted (a double Ctrl-C)
        before it had taken back the SQEs the kernel never consumed and judged their reads, and no close() is at
        work now, do that part of its work here, as the next close() would (the ring and the fds are left to it).
        Called by whoever is about to submit, reap or collect: a waiter in that window used to find its read's
        chunks neither in the ring nor with the kernel ("nothing in flight but reads are outstanding (a bug)"),
        and a read recounted but not yet judged was finished by its first chunks' completions as if read whole."""
        if self._closed and not self._close_busy and self.ring.fd >= 0:
            self._take_back(None, self._close_cause)

    def _take_back(self, err: ShardIOError | None, other: BaseException | None) -> None:
        """Under the lock, closing: fail what is still queued, take back the SQEs the kernel never consumed and
        judge each read they belonged to (`_abandon`'s first half, which `_resume_close` also runs). Every step
        may be interrupted and is redone by the next call."""
        self._mend_issue()
        self._cancel_queued()
        for t in self._retract():
            # judged once all its SQEs are back: a submission the kernel took only part of leaves other chunks
            # of the same read with the kernel, and "its buffer is free" would then have its owner reuse a slot
            # the kernel still writes (err, if any, says so too)
            why = err if err is not None and t.in_flight else _closed_error(t.path, other, in_flight=t.in_flight > 0)
            self._fail(t, why)  # finishes t once nothing of it is anywhere
            self._retire(t)
            del self._taken[id(t)]  # last: interrupted before it, the next close() judges t again (the same way)


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
    # a tampered file (a FIFO or a folder in a shard's place) is not a reason to try another backend
    if reason is None:
        try:
            loader = _probe_read(UringLoader, pool, probe_file, **kw)
            loader.reason = "io_uring with O_DIRECT works here" + (f"; {loader.reason}" if loader.reason else "")
            return loader
        except NotRegularFileError:
            raise
        except OSError as exc:
            why.append(getattr(exc, "reason", None) or f"io_uring read failed ({exc})")
    else:
        why.append(reason)
    try:
        loader = _probe_read(PreadLoader, pool, probe_file, **kw)
        loader.reason = "; ".join(why) + "; O_DIRECT pread works"
        return loader
    except NotRegularFileError:
        raise
    except OSError as exc:
        why.append(f"O_DIRECT refused ({exc})")
    loader = BufferedLoader(pool, **kw)
    loader.reason = "; ".join(why) + "; using buffered reads"
    return loader
