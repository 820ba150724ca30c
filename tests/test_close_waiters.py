"""Threads waiting for a read while a close() interrupted part-way (a double Ctrl-C) has not been finished yet.

The first interrupt ends the close's wait for the reads with the kernel; the second comes while it takes back the
SQEs the kernel never consumed and fails their reads one after the other, so the close escapes with the ring open
and the rest of that work left for the next close(). A thread that was waiting for one of those reads (or that
starts waiting before the next close) used to run into "io_uring: nothing in flight but reads are outstanding (a
bug)", and a read judged only part-way could even be reported whole. Now whoever waits finishes the take-back the
close left (under the loader's lock, as the next close() would) before it reaps anything: its read is either
finished by the kernel or fails with the loader's "closed before this read finished ... interrupted" error.

Real io_uring ring, real files; the interrupts are raised where the existing interrupted-close tests raise them
(tests/test_spec_thread.py): the ring's syscall wrapper, and the loader's own `_note`/`_closed_error` steps. The
waits are liveness bounds, never timings.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from mer_runtime import uring
from mer_runtime.buffers import BufferPool
from mer_runtime.errors import ShardIOError
from mer_runtime.loader import open_loader
from test_spec_thread import close_within, second_interrupt

BLOCK = 4096


def until(pred, what: str, bound: float = 30.0) -> None:
    deadline = time.monotonic() + bound
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert pred(), what


def _files(tmp_path, seed: int):
    """An 8-chunk file `part` and a 2-chunk file `none` (4 KiB chunks)."""
    data = np.random.default_rng(seed).integers(0, 256, 8 * BLOCK, dtype=np.uint8).tobytes()
    a, b = tmp_path / "part.bin", tmp_path / "none.bin"
    a.write_bytes(data)
    b.write_bytes(data[:2 * BLOCK])
    return data, a, b


class Waiter(threading.Thread):
    """wait() for one ticket; keeps what came out (None: the read was finished)."""

    def __init__(self, loader, t, name):
        super().__init__(name=name, daemon=True)
        self.loader, self.t, self.out = loader, t, "never returned"

    def run(self):
        try:
            self.loader.wait(self.t)
            self.out = None
        except BaseException as exc:  # noqa: BLE001 - whatever it is, the test looks at it
            self.out = exc


@pytest.mark.parametrize("where, nth", [("take back", 1), ("take back", 3), ("judge", 1), ("judge", 2)])
def test_a_waiter_in_an_interrupted_close_gets_its_read_or_a_closed_error(tmp_path, monkeypatch, where, nth):
    """`part` (8 chunks) has 3 chunks with the kernel, `none` (2 chunks) none: io_uring_enter takes one SQE of
    each submission (as in test_a_close_interrupted_while_taking_reads_back_is_finished_by_the_next_close). A thread
    is waiting for `part` while close() reaps (it sleeps on the loader's condition); close() is interrupted in its
    wait, then again while taking back (`nth` chunk recorded) or judging (`nth` read). A second thread then starts
    waiting for `none`. Both must come back, before any further close(), with the closed-while-pending error that
    names the interrupt (never "a bug", never a hang), the fds stay accounted for, and the next close() finishes."""
    if uring.probe():
        pytest.skip(uring.probe())

    data, a, b = _files(tmp_path, 21)
    fds = set(os.listdir("/proc/self/fd"))
    pool = BufferPool(8 * BLOCK, 2)
    loader = open_loader("io_uring", pool, block_size=BLOCK, queue_depth=16)
    real, closer = uring._syscall, threading.current_thread()
    first: list = []
    early: list = []  # the thread already waiting when close() is interrupted
    asleep = threading.Event()
    real_wait = loader._cv.wait

    def noting_wait(*args, **kw):
        if threading.current_thread().name == "waits-for-part":
            asleep.set()
        return real_wait(*args, **kw)

    def syscall(nr, *args):
        if nr == uring.SYS_IO_URING_ENTER and args[1] > 1:  # (fd, to_submit, min_complete, flags, sigset, size)
            return real(nr, args[0], 1, *args[2:])
        if (nr == uring.SYS_IO_URING_ENTER and args[2] > 0 and loader._closed and not first
                and threading.current_thread() is closer):
            first.append(True)
            # close() is the reaper (the lock released): a reader of `part` comes and sleeps on the condition
            w = Waiter(loader, part_box[0], "waits-for-part")
            early.append(w)
            w.start()
            assert asleep.wait(30), "the reader never went to sleep behind the closing reaper"
            raise KeyboardInterrupt  # the first Ctrl-C: while close() waits for the reads with the kernel
        return real(nr, *args)

    fired = second_interrupt(monkeypatch, loader, where, nth, thread=closer)
    part_box: list = []
    try:
        monkeypatch.setattr(uring, "_syscall", syscall)
        monkeypatch.setattr(loader._cv, "wait", noting_wait)
        part = loader.start(str(a), 8 * BLOCK, 0, urgent=True)
        part_box.append(part)
        none = loader.start(str(b), 2 * BLOCK, 1, urgent=True)
        with pytest.raises(KeyboardInterrupt):
            loader.close()
        assert first and fired and loader.ring.fd >= 0  # both interrupts came, the second before the ring closed
        monkeypatch.undo()
        (early_waiter,) = early
        late_waiter = Waiter(loader, none, "waits-for-none")
        late_waiter.start()
        for w in (early_waiter, late_waiter):
            w.join(30)  # a liveness bound
            assert not w.is_alive(), f"{w.name} hung on a loader whose close() was interrupted"
        for w, path in ((early_waiter, a), (late_waiter, b)):
            assert isinstance(w.out, ShardIOError), f"{w.name}: {w.out!r}"
            msg = str(w.out)
            assert "a bug" not in msg and f"{path}: the loader was closed before this read finished" in msg, msg
            assert "KeyboardInterrupt" in msg, msg
            # done, nothing of it left with the kernel: "may still be written" would have the pool closed for nothing
            assert "may still be written" not in msg and "buffer is free" in msg, msg
        assert part.done and none.done and part.in_flight == 0 and none.in_flight == 0
        assert part.error is not None  # 5 of its 8 chunks were never read: never reported whole
        assert pool.view(0, 3 * BLOCK).tobytes() == data[:3 * BLOCK]  # what the kernel had, it read
        loader.close()  # finishes the interrupted close: ring and fds given back
        assert loader.ring.fd < 0 and part.fd < 0 and none.fd < 0
        assert set(os.listdir("/proc/self/fd")) == fds
        loader.close()  # a no-op
    finally:
        monkeypatch.undo()
        close_within(loader, pool)


def test_a_ready_poll_after_an_interrupted_close_never_reports_a_part_read_whole(tmp_path, monkeypatch):
    """The second interrupt comes before `part` (3 of 8 chunks with the kernel) is judged: its counts are already
    recounted to the 3 chunks with the kernel. A poll()/ready() then collected those 3 completions and finished
    `part` with no error: ready() True and wait() returning as if all 8 chunks had been read. Now the take-back the
    close left is finished first, so `part` fails with the closed error."""
    if uring.probe():
        pytest.skip(uring.probe())
    import mer_runtime.loader as loader_mod

    data, a, b = _files(tmp_path, 22)
    pool = BufferPool(8 * BLOCK, 2)
    loader = open_loader("io_uring", pool, block_size=BLOCK, queue_depth=16)
    real, first, fired = uring._syscall, [], []

    def syscall(nr, *args):
        if nr == uring.SYS_IO_URING_ENTER and args[1] > 1:
            return real(nr, args[0], 1, *args[2:])
        if nr == uring.SYS_IO_URING_ENTER and args[2] > 0 and loader._closed and not first:
            first.append(True)
            raise KeyboardInterrupt
        return real(nr, *args)

    real_closed = loader_mod._closed_error

    def closed_error(path, why=None, **kw):
        if why is not None and loader._closed and not fired:
            fired.append(path)
            raise KeyboardInterrupt
        return real_closed(path, why, **kw)

    try:
        monkeypatch.setattr(uring, "_syscall", syscall)
        monkeypatch.setattr(loader_mod, "_closed_error", closed_error)
        part = loader.start(str(a), 8 * BLOCK, 0, urgent=True)
        none = loader.start(str(b), 2 * BLOCK, 1, urgent=True)
        with pytest.raises(KeyboardInterrupt):
            loader.close()
        monkeypatch.undo()
        assert first and fired == [str(a)] and loader.ring.fd >= 0
        r = loader.ring
        # (a chunk that landed early may already have been reaped: what is left with the kernel is the ring's count)
        until(lambda: (r.cq_tail.load() - r.cq_head.load()) & 0xFFFFFFFF == r.in_flight,
              "part's chunks with the kernel never landed")
        assert loader.ready(part)
        with pytest.raises(ShardIOError, match="closed before this read finished.*KeyboardInterrupt.*landed since, "
                                               "so its buffer is free"):
            loader.wait(part)
        with pytest.raises(ShardIOError, match="buffer is free"):
            loader.wait(none)
    finally:
        monkeypatch.undo()
        loader.close()
        pool.close()


@pytest.mark.parametrize("io", ["pread", "buffered"])
def test_a_pread_waiter_in_an_interrupted_close_gets_its_read(tmp_path, monkeypatch, io):
    """The thread backends' window: close() interrupted while it fails the queued reads one after the other (its
    second read not yet failed), before the workers are joined. A thread waiting for that read then gets it
    finished by the workers (they take what is still queued; only an empty queue lets them go), and the next
    close() joins them. Two guesses, each held back by a window of one chunk, are queued when close() starts."""
    data = np.random.default_rng(23).integers(0, 256, 8 * BLOCK, dtype=np.uint8).tobytes()
    paths = []
    for i in range(2):
        p = tmp_path / f"g{i}.bin"
        p.write_bytes(data)
        paths.append(str(p))
    pool = BufferPool(8 * BLOCK, 2)
    loader = open_loader(io, pool, block_size=BLOCK, queue_depth=8, threads=1)
    try:
        loader.spec_window = 1
        g0 = loader.start(paths[0], 8 * BLOCK, 0)
        g1 = loader.start(paths[1], 8 * BLOCK, 1)
        real_fail, failed = loader._fail, []

        def fail(t, err):
            real_fail(t, err)
            if loader._closed and not failed:
                failed.append(t)
                raise KeyboardInterrupt  # Ctrl-C once the first queued read is failed

        monkeypatch.setattr(loader, "_fail", fail)
        with pytest.raises(KeyboardInterrupt):
            loader.close()
        monkeypatch.undo()
        (gone,) = failed
        other = g1 if gone is g0 else g0
        w = Waiter(loader, other, "waits-for-guess")
        w.start()
        w.join(30)
        assert not w.is_alive(), "a wait after an interrupted close hung"
        if w.out is None:
            assert pool.view(other.slot, 8 * BLOCK).tobytes() == data
        else:
            assert isinstance(w.out, ShardIOError) and "closed" in str(w.out)
        loader.close()
        assert all(not th.is_alive() for th in loader._workers)
        with pytest.raises(ShardIOError, match="closed"):
            loader.wait(gone)
    finally:
        monkeypatch.undo()
        last = threading.Thread(target=loader.close, daemon=True)
        last.start()
        last.join(30)
        if not last.is_alive():
            pool.close()
