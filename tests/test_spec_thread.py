"""io_uring's background speculation thread (`UringLoader.spec_background`): it starts, streams guesses while the
caller makes no call, survives what the kernel refuses, never sleeps in the kernel with nothing there to complete,
and is gone after close(). Also what the kernel refuses on the caller's own thread (a submission, a wait): the
cache never hands out a slot that a read may still write.

Real files, the real ring. Where a failure must be provoked, the ring's own syscall wrapper is made to fail once
with the error the kernel gives (the stdlib's Thread.start likewise): nothing of the loader's logic is replaced.
The waits are liveness bounds that end as soon as the thread is seen dead or the condition holds; no timing is
asserted.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time

import numpy as np
import pytest

from mer_runtime import uring
from mer_runtime.buffers import BufferPool
from mer_runtime.cache import ExpertCache
from mer_runtime.errors import ShardIOError
from mer_runtime.loader import UringLoader, open_loader

SIZE = 4 << 20  # 1024 chunks of 4 KiB: a guess streams long enough to be caught part-way through
SMALL = 8192


@pytest.fixture
def files(tmp_path):
    if uring.probe():
        pytest.skip(uring.probe())
    data = np.random.default_rng(5).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(data)
    small.write_bytes(data[:SMALL])
    return big, small


@pytest.fixture
def streaming(files):
    """A 3-slot cache over an io_uring loader that reads guesses a token ahead with its background thread.
    Key (9, e) is the 4 MiB file, (1, e) the 8 KiB one."""
    big, small = files
    pool = BufferPool(SIZE, 3)
    loader = open_loader("io_uring", pool, block_size=4096, queue_depth=8)
    assert isinstance(loader, UringLoader)
    loader.spec_window, loader.spec_cap_each, loader.spec_background = 2, False, True
    cache = ExpertCache(pool, loader, lambda key: (str(big), SIZE) if key[0] == 9 else (str(small), SMALL))
    yield cache, loader, pool
    loader.close()
    pool.close()


def until(pred, what: str, bound: float = 30.0, alive=None) -> None:
    """Wait until pred() holds; a liveness bound, not a timing. `alive`: a thread whose death ends the wait at
    once (a broken thread then fails the test in milliseconds, not at the bound)."""
    deadline = time.monotonic() + bound
    while not pred() and time.monotonic() < deadline:
        if alive is not None and not alive.is_alive():
            break
        time.sleep(0.002)
    assert pred(), what


def fail_once(monkeypatch, obj, name: str, err: BaseException, when=lambda *a: True) -> list:
    """Make obj.name raise err the first time it is called while when(*args) holds; returns who it failed."""
    real = getattr(obj, name)
    fired: list = []

    def wrapper(*a, **kw):
        if not fired and when(*a):
            fired.append(threading.current_thread().name)
            raise err
        return real(*a, **kw)

    monkeypatch.setattr(obj, name, wrapper)
    return fired


def close_fails_once(monkeypatch, path, code: int) -> list:
    """Make os.close fail with errno `code` the first time it closes `path`'s fd, after the fd really is closed
    (close(2) releases the fd even when it reports an error); returns the threads it failed in."""
    real, fired = os.close, []

    def closing(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        real(fd)
        if not fired and target == str(path):
            fired.append(threading.current_thread().name)
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "close", closing)
    return fired


def in_spec_thread(*_) -> bool:
    return threading.current_thread().name == "mer-io_uring-spec"


def test_a_guess_streams_and_the_thread_ends_with_close(streaming, files):
    cache, loader, pool = streaming
    assert cache.prefetch((9, 0), due=3)
    t = cache.entries[(9, 0)].ticket
    th = loader._background
    assert th is not None
    until(lambda: t.done, "the thread streams the guess with no call from the caller", alive=th)
    slot = cache.acquire((9, 0))
    assert pool.view(slot, SIZE).tobytes() == files[0].read_bytes()
    cache.release((9, 0))
    loader.close()
    assert not th.is_alive()


def test_close_while_the_thread_is_reaping(streaming):
    cache, loader, pool = streaming
    assert cache.prefetch((9, 0), due=3)
    t = cache.entries[(9, 0)].ticket
    th = loader._background
    until(lambda: t.issued > 8, "the guess is streaming", alive=th)
    closer = threading.Thread(target=loader.close)
    closer.start()
    closer.join(60)  # a bound: close() waits only for the chunks with the kernel
    assert not closer.is_alive(), "close() hung while the background thread was reaping"
    assert not th.is_alive() and loader.ring.fd < 0
    assert t.done and t.fd < 0  # the queued chunks were cancelled, those with the kernel landed
    assert t.error is None or t.error.errno == errno.ECANCELED


def test_a_miss_and_cancel_stale_while_a_guess_streams(streaming, files):
    cache, loader, pool = streaming
    big, small = files
    assert cache.prefetch((9, 0), due=3)
    t = cache.entries[(9, 0)].ticket
    th = loader._background
    until(lambda: t.issued > 8, "the guess is streaming", alive=th)
    slot = cache.acquire((1, 0))  # a foreground miss goes ahead of the guess's queued chunks
    assert pool.view(slot, SMALL).tobytes() == small.read_bytes()
    cache.release((1, 0))
    assert cache.cancel_stale(keep=set(), now=2) == 0  # not its step yet
    n = cache.cancel_stale(keep=set(), now=3)  # its step, routed without it: withdrawn (or demoted, if complete)
    assert n + cache.stats.prefetch_stale == 1
    cache.drain()
    assert len(cache.entries) + len(cache.free) == 3  # every slot accounted for
    assert th.is_alive() and loader._background is th  # idle, not ended: the next guess needs no new thread
    assert cache.prefetch((9, 1), due=5)
    t2 = cache.entries[(9, 1)].ticket
    until(lambda: t2.done, "the same thread streams the next guess", alive=th)
    assert t2.error is None
    loader.close()
    assert not th.is_alive()


def test_a_thread_that_cannot_start_leaves_the_guess_read_from_calls(streaming, files, monkeypatch):
    """Thread.start() raising used to escape from prefetch() with the guess's chunks already with the kernel (the
    cache then gave their slot back) and to make close() raise joining a thread that never ran."""
    cache, loader, pool = streaming
    fail_once(monkeypatch, threading.Thread, "start", RuntimeError("can't start new thread"),
              when=lambda th: th.name == "mer-io_uring-spec")
    assert cache.prefetch((9, 0), due=3)
    assert loader._background is None and "could not start" in loader.spec_background_refused
    slot = cache.acquire((9, 0))  # read from the caller's calls instead
    assert pool.view(slot, SIZE).tobytes() == files[0].read_bytes()
    cache.release((9, 0))
    loader.close()  # nothing to join, nothing raised


def test_an_error_in_the_thread_is_reported_once_and_the_thread_restarts(streaming, files, monkeypatch):
    cache, loader, pool = streaming
    fired = fail_once(monkeypatch, loader.ring, "wait_cqe",
                      uring.UringError(errno.ENOMEM, "io_uring_enter: Cannot allocate memory"), when=in_spec_thread)
    assert cache.prefetch((9, 0), due=3)
    t = cache.entries[(9, 0)].ticket
    th = loader._background
    until(lambda: not th.is_alive(), "the thread ends on the kernel's error")
    assert fired == ["mer-io_uring-spec"]
    assert loader._background is None  # free to be started again once the error has been reported
    with pytest.raises(ShardIOError, match="background speculation thread failed.*Cannot allocate memory"):
        loader.wait(t)  # the guess is read from this call; the error is raised once it is done
    assert t.done and t.error is None and t.fd < 0
    assert pool.view(cache.entries[(9, 0)].slot, SIZE).tobytes() == files[0].read_bytes()
    loader.wait(t)  # reported once
    assert cache.prefetch((9, 1), due=5)
    t2 = cache.entries[(9, 1)].ticket
    th2 = loader._background
    assert th2 is not None and th2 is not th
    until(lambda: t2.done, "a new thread streams the next guess", alive=th2)
    loader.close()
    assert not th2.is_alive()


def test_an_error_nobody_waited_for_is_raised_by_close(streaming, monkeypatch):
    cache, loader, pool = streaming
    fail_once(monkeypatch, loader.ring, "wait_cqe",
              uring.UringError(errno.ENOMEM, "io_uring_enter: Cannot allocate memory"), when=in_spec_thread)
    assert cache.prefetch((9, 0), due=3)
    th = loader._background
    until(lambda: not th.is_alive(), "the thread ends on the kernel's error")
    with pytest.raises(ShardIOError, match="background speculation thread failed"):
        loader.close()
    assert loader.ring.fd < 0
    loader.close()  # idempotent, reported once


def test_a_refused_submission_leaves_nothing_queued_for_the_thread(streaming, files, monkeypatch):
    """A submission the kernel refused used to leave its SQEs queued, nothing in flight, and the error raised from
    start() (the cache then gave back a slot those SQEs would still write); the thread could also sleep in the
    kernel for a completion that could never come. Now the refused SQEs are taken back and their read fails."""
    cache, loader, pool = streaming
    big, small = files
    assert cache.prefetch((1, 0), due=1)  # starts the thread; it reads the small guess and goes idle
    first = cache.entries[(1, 0)].ticket
    th = loader._background
    until(lambda: first.done, "the first guess lands", alive=th)
    fail_once(monkeypatch, loader.ring, "submit",
              uring.UringError(errno.EAGAIN, "io_uring_enter: Resource temporarily unavailable"),
              when=lambda *_: not in_spec_thread())
    t = loader.start(str(small), SMALL, 2)  # a guess: its two chunks are prepared, their submission refused
    assert t.done and t.fd < 0 and t.issued == 0
    assert loader.ring.pending == 0 and loader.ring.in_flight == 0 and not loader._chunks
    with pytest.raises(ShardIOError, match=f"{small}: the kernel refused.*retry.*--io pread"):
        loader.wait(t)
    t2 = loader.start(str(small), SMALL, 2)  # the kernel takes it now: the thread reads it
    until(lambda: t2.done, "the thread reads the retried guess", alive=th)
    assert t2.error is None and pool.view(2, SMALL).tobytes() == small.read_bytes()


@pytest.fixture
def tight(files, tmp_path):
    """A 2-slot cache over an io_uring loader, no background thread: (9, e) is the 4 MiB file, (1, e) its first
    8 KiB, (2, e) 8 KiB of other bytes (what an overwrite by the big file's reads would show)."""
    big, small = files
    other = tmp_path / "other.bin"
    other.write_bytes(np.random.default_rng(6).integers(0, 256, SMALL, dtype=np.uint8).tobytes())
    paths = {9: (str(big), SIZE), 1: (str(small), SMALL), 2: (str(other), SMALL)}
    pool = BufferPool(SIZE, 2)
    loader = open_loader("io_uring", pool, block_size=4096, queue_depth=8)
    assert isinstance(loader, UringLoader)
    cache = ExpertCache(pool, loader, lambda key: paths[key[0]])
    yield cache, loader, pool, other
    loader.close()
    pool.close()


def chunks_by_slot(loader) -> dict[int, int]:
    """Slot -> chunks the loader has with the kernel or queued in the SQ for it (what may still write the slot)."""
    out: dict[int, int] = {}
    for t, _, _ in loader._chunks.values():
        out[t.slot] = out.get(t.slot, 0) + 1
    return out


def test_a_submission_refused_on_a_miss_frees_its_slot_only_with_nothing_queued(tight, files, monkeypatch):
    """The refusal used to escape from start() with the SQEs still queued: the cache freed the slot, and the next
    submission sent them, to land in whatever expert had the slot by then."""
    cache, loader, pool, other = tight
    big, _ = files
    seen: list = []
    fail_once(monkeypatch, loader.ring, "submit",
              uring.UringError(errno.EAGAIN, "io_uring_enter: Resource temporarily unavailable"),
              when=lambda *_: seen.append(chunks_by_slot(loader)) or True)
    with pytest.raises(OSError) as raised:
        cache.acquire((9, 0))
    (refused,) = seen[0]  # the slot the refused SQEs targeted
    assert chunks_by_slot(loader) == {} and loader.ring.pending == 0  # nothing can write it any more
    assert refused in cache.free and not cache.entries and not cache._draining
    assert isinstance(raised.value, ShardIOError)
    assert re.search(f"{big}: the kernel refused to start the read.*retry.*--io pread", str(raised.value))
    slot = cache.acquire((2, 0))
    assert slot == refused  # the recycled slot
    assert pool.view(slot, SMALL).tobytes() == other.read_bytes()
    cache.release((2, 0))
    assert loader.ring.in_flight == 0 and not loader._chunks


def test_a_submission_refused_part_way_through_a_read_fails_it_once_its_chunks_landed(tight, files, monkeypatch):
    """A guess has chunks with the kernel when its promotion's submission is refused: the read fails, but only
    once those chunks have landed, so its slot is free only then."""
    cache, loader, pool, other = tight
    big, _ = files
    loader.spec_window = 2  # nobody reaps (no background thread): exactly 2 chunks stay with the kernel
    assert cache.prefetch((9, 0), due=1)
    t = cache.entries[(9, 0)].ticket
    slot = t.slot
    assert t.in_flight == 2 and loader.ring.in_flight == 2
    seen: list = []
    fail_once(monkeypatch, loader.ring, "submit",
              uring.UringError(errno.ENOMEM, "io_uring_enter: Cannot allocate memory"),
              when=lambda *_: seen.append((t.in_flight, loader.ring.pending)) or True)
    with pytest.raises(OSError) as raised:
        cache.acquire((9, 0))  # promoted: 6 more chunks prepared, their submission refused
    assert seen == [(8, 6)]  # 2 submitted, 6 refused
    assert t.done and t.in_flight == 0 and t.issued == 2 and t.fd < 0  # raised only once the 2 landed
    assert loader.ring.in_flight == 0 and not loader._chunks
    assert slot in cache.free and (9, 0) not in cache.entries
    assert isinstance(raised.value, ShardIOError)
    assert re.search(f"{big}: the kernel refused to start the read.*Cannot allocate", str(raised.value))
    got = cache.acquire((2, 0))
    assert got == slot
    assert pool.view(got, SMALL).tobytes() == other.read_bytes()
    cache.release((2, 0))


def test_a_failed_wait_quarantines_the_slot_until_its_read_lands(tight, files, monkeypatch):
    """wait_cqe failing on the caller's thread used to make the cache free the slot with the whole read still
    with the kernel: the next expert loaded there could be overwritten after its checksum."""
    cache, loader, pool, other = tight
    big, _ = files
    cache.pin([(1, 0)])  # one slot pinned: the next miss can only get the failed read's slot
    slot = 1 - cache.entries[(1, 0)].slot
    # 1 MiB chunks: the read is usually still with the kernel when the cache looks (the case under test). On a
    # fast disk all of it may have landed by then, and the slot is then rightly free at once: both outcomes are
    # checked for what matters, that the slot is never free while a chunk of the failed read may still write it
    loader.block_size = 1 << 20
    fail_once(monkeypatch, loader.ring, "wait_cqe",
              uring.UringError(errno.ENOMEM, "io_uring_enter: Cannot allocate memory"))
    with pytest.raises(OSError) as raised:
        cache.acquire((9, 0))
    assert (9, 0) not in cache.entries
    assert not set(chunks_by_slot(loader)) & set(cache.free)  # never free while the kernel may write it
    if cache._draining:  # still with the kernel when the cache looked: quarantined
        ((t, got),) = cache._draining
        assert got == slot and t.path == str(big) and not t.done and slot not in cache.free
        assert set(chunks_by_slot(loader)) == {slot}  # nothing reaped since: the kernel may still write it
        assert not any(it[0] is t for it in loader._queue)  # nothing more is issued into a slot nobody will use
    else:  # every chunk had landed: nothing of it is with the kernel, the slot came back at once
        t = None
        assert slot in cache.free and not chunks_by_slot(loader) and loader.ring.in_flight == 0
    assert isinstance(raised.value, ShardIOError)
    assert re.search(f"{big}: waiting for the read failed.*Cannot allocate.*--io pread", str(raised.value))
    n = cache.in_flight()  # polls: the read may land now, and its slot then comes back
    assert len(cache._draining) == n and n == (0 if t is None or t.done else 1)
    got = cache.acquire((2, 0))  # waits for a quarantined read, then reuses its slot
    assert got == slot and slot not in chunks_by_slot(loader)
    assert t is None or t.done and t.error is raised.value
    assert pool.view(got, SMALL).tobytes() == other.read_bytes()  # not overwritten by the failed read's chunks
    cache.release((2, 0))
    assert not cache._draining and loader.ring.in_flight == 0


def test_a_promoted_guess_s_chunks_are_no_longer_speculative(files):
    """Once needed, a guess's chunks with the disk are not 'in the way' of a foreground read (spec_in_way), and
    the background thread no longer reaps for them."""
    big, small = files
    pool = BufferPool(SIZE, 3)
    loader = open_loader("io_uring", pool, block_size=4096, queue_depth=8)
    try:
        loader.spec_window = 2
        t = loader.start(str(big), SIZE, 0)
        assert t.in_flight == 2 and loader._spec_with_disk() == 2
        loader.promote(t)
        assert loader._spec_with_disk() == 0
        before = loader.spec_in_way
        f = loader.start(str(small), SMALL, 1, urgent=True)
        assert loader.spec_in_way == before
        loader.wait(f)
        loader.wait(t)
        assert pool.view(0, SIZE).tobytes() == big.read_bytes()
    finally:
        loader.close()
        pool.close()


def test_the_thread_s_error_is_not_swallowed_by_an_eviction(streaming, files, monkeypatch):
    """An eviction of a finished guess used to wait() for it and count any error as the guess's failure: the
    background thread's once-only error was taken there and never seen. Now it reaches the next call that waits
    for a read, exactly once, naming the file it was reading, and the read it came with is kept."""
    cache, loader, pool = streaming
    big, small = files
    for e in (0, 1):  # two of the three slots hold used experts
        cache.acquire((1, e))
        cache.release((1, e))
    fail_once(monkeypatch, loader.ring, "wait_cqe",
              uring.UringError(errno.ENOMEM, "io_uring_enter: Cannot allocate memory"), when=in_spec_thread)
    assert cache.prefetch((9, 0), due=3)
    t = cache.entries[(9, 0)].ticket
    th = loader._background
    assert th is not None, "the guess did not start the background thread"
    until(lambda: not th.is_alive(), "the thread ends on the kernel's error")
    until(lambda: loader.ready(t), "the guess is read from calls into the loader")
    assert cache.cancel_stale(keep=set(), now=3) == 0 and cache.stats.prefetch_stale == 1  # complete, demoted
    reported: list[str] = []

    def call(fn, *a):
        try:
            return fn(*a)
        except ShardIOError as exc:
            reported.append(str(exc))

    call(cache.acquire, (1, 2))  # no free slot: the stale guess is evicted, then (1, 2) is read
    assert (9, 0) not in cache.entries and cache.stats.prefetch_failed == 0  # the guess did not fail
    assert len(reported) == 1
    assert re.search(f"{big}: the background speculation thread failed.*Cannot allocate memory.*not at fault.*"
                     "retry.*--io pread", reported[0])
    slot = cache.acquire((1, 2))  # kept, checked now, a plain hit
    assert pool.view(slot, SMALL).tobytes() == small.read_bytes()
    cache.release((1, 2))
    for e in (0, 1, 2):
        call(cache.acquire, (1, e))
        cache.release((1, e))
    call(cache.close)
    call(loader.close)
    assert len(reported) == 1  # exactly once


def test_a_close_whose_wait_fails_raises_our_error_and_still_releases_everything(files, monkeypatch):
    """close() used to let the kernel's refusal of its wait escape as a raw UringError. Now: a ShardIOError
    naming the file and what to do, the ring and every fd closed all the same, the read still with the kernel
    never reported ready (its slot may still be written), its waiters told at once, and a second close() a
    no-op."""
    big, small = files
    fds = set(os.listdir("/proc/self/fd"))
    pool = BufferPool(SIZE, 2)
    loader = open_loader("io_uring", pool, block_size=4096, queue_depth=8)
    try:
        t = loader.start(str(big), SIZE, 0)
        assert t.in_flight == 8 and t.fd >= 0
        fail_once(monkeypatch, loader.ring, "wait_cqe",
                  uring.UringError(errno.ENOMEM, "io_uring_enter: Cannot allocate memory"))
        with pytest.raises(ShardIOError) as raised:
            loader.close()
        assert not isinstance(raised.value, uring.UringError)
        assert re.search(f"{big}: closing the io_uring loader failed while waiting for 1 read\\(s\\).*Cannot allocate "
                         "memory.*close the buffer pool.*--io pread", str(raised.value))  # 1 read: 8 chunks of it
        assert loader.ring.fd < 0 and t.fd < 0
        assert set(os.listdir("/proc/self/fd")) == fds  # the ring's fd and the file's: nothing leaked
        loader.close()  # a no-op: nothing raised twice, nothing closed twice
        assert not loader.ready(t)  # never reported ready: the kernel may still write its slot
        with pytest.raises(ShardIOError, match="closing the io_uring loader failed"):
            loader.wait(t)  # at once, not a wait on a closed ring
    finally:
        loader.close()
        pool.close()


@pytest.mark.parametrize("backend", ["io_uring", "pread"])
def test_a_close_that_reports_an_error_neither_hangs_nor_escapes(files, monkeypatch, backend):
    """close(2) releases the fd even when it reports EIO; a ticket's fd closed that way used to raise out of a
    pread worker half-way through finishing the ticket (the worker died and its waiters slept for ever) or out of
    io_uring's wait as a raw OSError."""
    big, small = files
    pool = BufferPool(SIZE, 2)
    # one worker: a worker killed by the error would leave none to make the follow-up read
    loader = open_loader(backend, pool, block_size=4096, queue_depth=8, threads=1)
    fired = close_fails_once(monkeypatch, small, errno.EIO)
    try:
        t = loader.start(str(small), SMALL, 1)
        got: list = []
        waiter = threading.Thread(target=lambda: got.append(loader.wait(t) or "ok"), daemon=True)
        waiter.start()
        waiter.join(30)  # a liveness bound
        assert fired and got == ["ok"], "the wait hung or raised"
        assert t.fd < 0 and pool.view(1, SMALL).tobytes() == small.read_bytes()
        loader.read(str(small), SMALL, 0)  # the loader still works (a pread worker did not die)
        assert pool.view(0, SMALL).tobytes() == small.read_bytes()
    finally:
        monkeypatch.undo()
        loader.close()
        pool.close()


def test_a_ring_the_kernel_refuses_is_our_error(monkeypatch):
    """UringLoader made directly used to let io_uring_setup's refusal escape as a raw UringError."""
    if uring.probe():
        pytest.skip(uring.probe())
    import ctypes

    real = uring._syscall

    def refusing(nr, *a):
        if nr == uring.SYS_IO_URING_SETUP:
            ctypes.set_errno(errno.ENOMEM)
            return -1
        return real(nr, *a)

    monkeypatch.setattr(uring, "_syscall", refusing)
    pool = BufferPool(SMALL, 2)
    try:
        with pytest.raises(ShardIOError, match="io_uring is not available here.*Cannot allocate memory.*--io auto") \
                as raised:
            UringLoader(pool)
        assert not isinstance(raised.value, uring.UringError)
    finally:
        pool.close()


def test_worker_threads_that_cannot_start_are_our_error_and_leave_none_behind(files, monkeypatch):
    """A pread loader whose second worker could not start used to raise the stdlib's raw RuntimeError."""
    from mer_runtime.loader import PreadLoader

    before = set(threading.enumerate())
    fired = fail_once(monkeypatch, threading.Thread, "start", RuntimeError("can't start new thread"),
                      when=lambda th: th.name == "mer-pread-1")
    pool = BufferPool(SMALL, 2)
    try:
        with pytest.raises(ShardIOError, match=r"pread: could not start reader thread 2 of 3.*fewer --threads"):
            PreadLoader(pool, threads=3)
        assert fired
        assert set(threading.enumerate()) <= before  # the first was joined (others' threads are not ours to judge)
    finally:
        pool.close()


def test_a_read_cut_short_while_closing_is_finished_not_left_queued(tmp_path):
    """A chunk that comes back short during close() used to have its rest re-queued after the queue had been
    cancelled; a guess that had read its window was then skipped by the pump, so close() returned with the ticket
    never done, its fd open and its chunk queued for ever; wait() said "closed" instead of the truncation, and
    promote() on the closed ring raised a raw AttributeError. The short read is certain here: an 8 KiB file read
    as 12 KiB in one chunk, and nothing reaps before close() (no background thread, no call into the loader)."""
    if uring.probe():
        pytest.skip(uring.probe())
    short = tmp_path / "short.bin"
    short.write_bytes(os.urandom(SMALL))
    fds = set(os.listdir("/proc/self/fd"))
    pool = BufferPool(16384, 2)
    loader = open_loader("io_uring", pool, block_size=16384, queue_depth=8)
    try:
        loader.spec_window, loader.spec_cap_each = 1, True
        t = loader.start(str(short), 12288, 0)  # a guess: its one chunk is its window
        assert t.issued == 1
        loader.close()
        assert t.done and t.fd < 0 and not loader._queue and not loader._chunks
        assert set(os.listdir("/proc/self/fd")) == fds  # the file's fd and the ring's: nothing left open
        with pytest.raises(ShardIOError, match=f"{short}: file ends at byte {SMALL} but 12288 bytes were expected.*"
                                               "truncated.*mertools verify"):
            loader.wait(t)
        loader.promote(t)  # nothing to do on a closed loader: no raw error
        loader.poll()
        assert loader.ready(t)
    finally:
        loader.close()
        pool.close()


@pytest.mark.parametrize("backend", ["io_uring", "pread"])
def test_a_double_close_of_a_ticket_s_fd_is_reported_not_dropped(files, monkeypatch, backend):
    """close(2) failing with EBADF means the fd had been closed already: a double close, which may have closed a
    descriptor another thread had just been given (the read may have gone to another file). It used to be dropped
    with EIO's and EINTR's; now the read that owned the fd fails with an error that says so. The fd really is
    closed before EBADF is reported, as after a double close."""
    big, small = files
    pool = BufferPool(SIZE, 2)
    loader = open_loader(backend, pool, block_size=4096, queue_depth=8, threads=1)
    fired = close_fails_once(monkeypatch, small, errno.EBADF)
    try:
        t = loader.start(str(small), SMALL, 1)
        with pytest.raises(ShardIOError, match=f"{small}: its file descriptor .* had already been closed.*a bug") \
                as raised:
            loader.wait(t)
        assert fired and raised.value.errno == errno.EBADF and t.fd < 0
        loader.read(str(small), SMALL, 0)  # the loader still works (a pread worker did not die)
        assert pool.view(0, SMALL).tobytes() == small.read_bytes()
    finally:
        monkeypatch.undo()
        loader.close()
        pool.close()

def _enter_taking_none():
    """A stand-in for the ring's syscall wrapper whose io_uring_enter takes none of the SQEs it is given (and reports
    no error): the kernel's side of a submission that never happens, without a mock of our own code."""
    import ctypes

    real = uring._syscall

    def taking_none(nr, *a):
        if nr == uring.SYS_IO_URING_ENTER and a[1] > 0:  # (fd, to_submit, min_complete, flags, sigset, size)
            ctypes.set_errno(0)
            return 0
        return real(nr, *a)

    return taking_none



def test_a_failed_close_keeps_a_read_s_own_error_and_gives_each_waiter_its_own_exception(files, monkeypatch):
    """close() failing used to overwrite a read's own error with its own, and to hand one exception object to
    every waiter (raised in several threads at once, each writing its traceback into it). The read's own error
    here: its promotion's submission refused, with 2 chunks already with the kernel that nobody reaps before the
    close (no background thread), so they are still there when close()'s wait fails."""
    big, small = files
    pool = BufferPool(SIZE, 2)
    loader = open_loader("io_uring", pool, block_size=4096, queue_depth=8)
    try:
        loader.spec_window = 2
        t = loader.start(str(big), SIZE, 0)
        assert t.in_flight == 2
        fail_once(monkeypatch, loader.ring, "submit",
                  uring.UringError(errno.ENOMEM, "io_uring_enter: Cannot allocate memory"))
        loader.promote(t)  # 6 more chunks prepared, their submission refused: t fails once its 2 have landed
        own = t.error
        assert own is not None and not t.done and t.in_flight == 2
        fail_once(monkeypatch, loader.ring, "wait_cqe",
                  uring.UringError(errno.EAGAIN, "io_uring_enter: Resource temporarily unavailable"))
        with pytest.raises(ShardIOError, match=f"{big}: closing the io_uring loader failed while waiting for "
                                               r"1 read\(s\)"):
            loader.close()
        assert t.error is own and not loader.ready(t)
        got = []
        for _ in range(2):
            with pytest.raises(ShardIOError, match=f"{big}: the kernel refused to start the read") as raised:
                loader.wait(t)
            got.append(raised.value)
        assert got[0] is not got[1] and got[0].__cause__ is own and got[1].__cause__ is own
        assert got[0].errno == own.errno
    finally:
        loader.close()
        pool.close()


def test_a_bug_found_while_closing_is_not_reported_as_the_kernel_refusing_the_wait(files, monkeypatch):
    """close() caught every OSError, so the loader's own "a bug" error (nothing in flight, yet reads outstanding)
    came out as "closing failed while waiting ... buffers may still be written". Provoked through the ring's
    syscall wrapper: io_uring_enter takes none of the SQEs it is given (and reports no error)."""
    big, small = files
    fds = set(os.listdir("/proc/self/fd"))
    pool = BufferPool(SIZE, 2)
    loader = open_loader("io_uring", pool, block_size=4096, queue_depth=8)
    try:
        monkeypatch.setattr(uring, "_syscall", _enter_taking_none())
        t = loader.start(str(small), SMALL, 0)
        assert loader.ring.pending == 2 and loader.ring.in_flight == 0
        with pytest.raises(ShardIOError) as raised:
            loader.close()
        assert "a bug" in str(raised.value) and "closing the io_uring loader failed" not in str(raised.value)
        monkeypatch.undo()
        assert loader.ring.fd < 0 and t.fd < 0
        assert set(os.listdir("/proc/self/fd")) == fds
    finally:
        monkeypatch.undo()
        loader.close()
        pool.close()


def test_an_interrupt_after_fetch_submitted_quarantines_the_slot(tight, files, monkeypatch):
    """fetch() gave the slots back on any exception; a KeyboardInterrupt arriving as the submission returned then
    freed a slot the kernel was writing. The interrupt is raised by the ring's submit once the kernel has the SQEs
    (as Python raises it when the syscall returns); nobody reaps before the cache is inspected."""
    cache, loader, pool, other = tight
    cache.pin([(1, 0)])  # one slot pinned: the fetch takes the other, the next miss can only get it back
    slot = 1 - cache.entries[(1, 0)].slot
    real, fired = loader.ring.submit, []

    def interrupted(*a, **kw):
        real(*a, **kw)
        if not fired:
            fired.append(True)
            raise KeyboardInterrupt

    monkeypatch.setattr(loader.ring, "submit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.fetch([(9, 0)])
    assert fired and (9, 0) not in cache.entries
    assert slot not in cache.free and [s for _, s in cache._draining] == [slot]  # quarantined, not free
    ((t, _),) = cache._draining
    assert not any(it[0] is t for it in loader._queue)  # nothing more is read for it
    got = cache.acquire((2, 0))  # waits for the interrupted read to land, then reuses its slot
    assert got == slot and t.done and slot not in chunks_by_slot(loader)
    assert pool.view(got, SMALL).tobytes() == other.read_bytes()
    cache.release((2, 0))
    assert not cache._draining and loader.ring.in_flight == 0


def test_advice_fits_the_backend(files, monkeypatch):
    """A buffered loader (chosen because O_DIRECT is refused) was told to use --io io_uring (O_DIRECT) when its
    threads could not start; `--io auto` recorded io_uring's refusal with the advice "use --io auto"."""
    import ctypes

    from mer_runtime.loader import BufferedLoader

    fail_once(monkeypatch, threading.Thread, "start", RuntimeError("can't start new thread"),
              when=lambda th: th.name == "mer-buffered-0")
    pool = BufferPool(SIZE, 2)
    try:
        with pytest.raises(ShardIOError, match="buffered: could not start reader thread 1 of 1.*fewer --threads") \
                as raised:
            BufferedLoader(pool, threads=1)
        assert "io_uring" not in str(raised.value)
        monkeypatch.undo()
        real = uring._syscall

        def refusing(nr, *a):  # probe()'s 2-entry ring works, the loader's larger one is refused
            if nr == uring.SYS_IO_URING_SETUP and a[0].value > 2:
                ctypes.set_errno(errno.ENOMEM)
                return -1
            return real(nr, *a)

        monkeypatch.setattr(uring, "_syscall", refusing)
        loader = open_loader("auto", pool, probe_file=str(files[1]))
        try:
            assert loader.name == "pread"
            assert "Cannot allocate memory" in loader.reason and "--io auto" not in loader.reason
        finally:
            loader.close()
    finally:
        monkeypatch.undo()
        pool.close()


@pytest.mark.parametrize("backend", ["io_uring", "pread"])
def test_a_double_close_after_the_read_failed_is_raised_by_the_next_wait(tmp_path, monkeypatch, backend):
    """A read that already failed (a truncated file) keeps its own error; the double close of its fd found after
    that is the loader's, raised once by the next wait whose read is fine."""
    if uring.probe():
        pytest.skip(uring.probe())
    short, good = tmp_path / "short.bin", tmp_path / "good.bin"
    short.write_bytes(os.urandom(SMALL))
    good.write_bytes(os.urandom(SMALL))
    pool = BufferPool(16384, 2)
    loader = open_loader(backend, pool, block_size=4096, queue_depth=8, threads=1)
    fired = close_fails_once(monkeypatch, short, errno.EBADF)
    try:
        t = loader.start(str(short), 12288, 0)
        with pytest.raises(ShardIOError, match="truncated"):
            loader.wait(t)
        assert fired
        t2 = loader.start(str(good), SMALL, 1)
        with pytest.raises(ShardIOError, match=f"{short}: its file descriptor .* had already been closed"):
            loader.wait(t2)
        assert t2.done and t2.error is None and pool.view(1, SMALL).tobytes() == good.read_bytes()
        loader.read(str(good), SMALL, 0)  # raised once
    finally:
        monkeypatch.undo()
        loader.close()
        pool.close()


@pytest.fixture(params=["io_uring", "pread"])
def two_slots(request, tmp_path):
    """A 2-slot cache over either backend (one pread worker): key (9, e) is a 4 MiB file, (1, e) and (2, e) 8 KiB
    files of other bytes (what an overwrite by the big file's reads would show)."""
    if request.param == "io_uring" and uring.probe():
        pytest.skip(uring.probe())
    rng = np.random.default_rng(7)
    paths = {}
    for k, size in ((9, SIZE), (1, SMALL), (2, SMALL)):
        p = tmp_path / f"{k}.bin"
        p.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        paths[k] = (str(p), size)
    pool = BufferPool(SIZE, 2)
    loader = open_loader(request.param, pool, block_size=4096, queue_depth=8, threads=1)
    cache = ExpertCache(pool, loader, lambda key: paths[key[0]])
    yield cache, loader, pool, paths
    loader.close()
    pool.close()


def interrupt_after(monkeypatch, obj, name: str, when=lambda *a: True) -> list:
    """Make obj.name raise KeyboardInterrupt once, after it has done its work (as Python raises a signal's
    exception at the next bytecode): returns whether it fired."""
    real, fired = getattr(obj, name), []

    def wrapper(*a, **kw):
        out = real(*a, **kw)
        if not fired and when(*a):
            fired.append(True)
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(obj, name, wrapper)
    return fired


@pytest.mark.parametrize("op", ["acquire", "prefetch"])
def test_an_interrupt_after_a_miss_or_a_guess_was_queued_quarantines_the_slot(two_slots, monkeypatch, op):
    """acquire() and prefetch() (through `_start`) gave the slot back on any exception, even a KeyboardInterrupt
    raised once the read was queued: the next miss got the slot while the interrupted read still wrote it. The
    interrupt is raised as the loader's `_kick` returns (the chunks queued, or with the kernel); the slot must be
    quarantined then, not free."""
    cache, loader, pool, paths = two_slots
    fired = interrupt_after(monkeypatch, loader, "_kick")
    with pytest.raises(KeyboardInterrupt):
        getattr(cache, op)((9, 0))
    monkeypatch.undo()
    assert fired and (9, 0) not in cache.entries and len(cache._draining) == 1
    ((t, slot),) = cache._draining
    assert t.slot == slot and slot not in cache.free  # quarantined, not free
    assert not any(it[0] is t for it in loader._queue)  # nothing more is read for it
    cache.pin([(1, 0)])  # the slots come back (the interrupted read's once it has landed), with the right bytes
    got = cache.acquire((2, 0))
    assert t.done and t.fd < 0 and not cache._draining
    for k, s in ((1, cache.entries[(1, 0)].slot), (2, got)):
        with open(paths[k][0], "rb") as f:
            assert pool.view(s, SMALL).tobytes() == f.read()
    cache.release((2, 0))


class _InterruptedOnAdd(list):
    """A `created` list whose filling is interrupted right after the tickets went in (as a signal would be)."""

    def append(self, t):
        super().append(t)
        raise KeyboardInterrupt

    def extend(self, ts):
        super().extend(ts)
        raise KeyboardInterrupt


def test_an_interrupt_as_start_many_publishes_its_tickets_closes_each_fd_once(two_slots):
    """start_many published a ticket in `created` before giving up its own claim on the fd: interrupted between
    the two, its finally closed the fd and the caller's withdraw closed it again, which closed whatever file had
    got that number meanwhile (or reported a double close)."""
    cache, loader, pool, paths = two_slots
    created, fds = _InterruptedOnAdd(), set(os.listdir("/proc/self/fd"))
    with pytest.raises(KeyboardInterrupt):
        loader.start_many([(paths[1][0], SMALL, 0)], urgent=True, created=created)
    (t,) = created
    assert t.fd >= 0 and os.readlink(f"/proc/self/fd/{t.fd}") == paths[1][0]  # the ticket's fd is still open
    with open(paths[2][0], "rb") as victim:  # another file opened meanwhile (its number is not the ticket's)
        loader.withdraw(t)
        loader.settle(t)
        assert t.done and t.fd < 0 and t.error is not None and t.error.errno == errno.ECANCELED
        assert os.fstat(victim.fileno()) and os.readlink(f"/proc/self/fd/{victim.fileno()}") == paths[2][0]
    assert set(os.listdir("/proc/self/fd")) == fds  # closed once, by the withdrawal: none leaked
    assert loader._internal_error is None  # no double close was found
    loader.read(paths[2][0], SMALL, 1)  # the loader still works
    with open(paths[2][0], "rb") as f:
        assert pool.view(1, SMALL).tobytes() == f.read()


def test_an_interrupt_inside_enqueue_leaves_no_ticket_waiting_for_chunks_that_do_not_exist(two_slots, monkeypatch):
    """An interrupt inside the loader's `_enqueue` (after a ticket's `remaining` was set, before its chunks were
    queued) left a ticket that withdraw never finished: the next miss settled it for ever, holding the cache's
    lock. The interrupt is raised by the loader's trace hook at the "queued" event, which sits in that window."""
    cache, loader, pool, paths = two_slots
    fired = fail_once(monkeypatch, loader, "_note", KeyboardInterrupt(), when=lambda *ev: ev[0] == "queued")
    with pytest.raises(KeyboardInterrupt):
        cache.fetch([(1, 0), (9, 0)])
    monkeypatch.undo()
    assert fired and not cache.entries
    assert len(cache._draining) == 2 and all(t.done for t, _ in cache._draining)  # nothing of theirs will land
    assert all(t.fd < 0 for t, _ in cache._draining)
    for k in (2, 1):  # both slots come back, with the right bytes
        slot = cache.acquire((k, 0))
        with open(paths[k][0], "rb") as f:
            assert pool.view(slot, SMALL).tobytes() == f.read()
        cache.release((k, 0))
    assert not cache._draining


def test_a_bug_found_while_closing_fails_and_frees_the_reads_the_kernel_never_saw(files, monkeypatch):
    """The loader's own "a bug" error raised inside close() (nothing in flight, yet reads outstanding) used to
    leave those reads' tickets not done for ever: their SQEs had never reached the kernel, so nothing would ever
    complete them, ready() stayed False and whoever owned their slots kept them quarantined for good. Now close()
    takes the SQEs back, fails and finishes every such ticket (its waiters get a ShardIOError at once, from any
    thread), and a second close() is a no-op. Provoked as above: io_uring_enter takes none of the SQEs it is
    given; a guess and a miss, the guess queued behind its window so that its fd is also closed by the cancel."""
    big, small = files
    fds = set(os.listdir("/proc/self/fd"))
    pool = BufferPool(SIZE, 3)
    loader = open_loader("io_uring", pool, block_size=4096, queue_depth=8)
    try:
        monkeypatch.setattr(uring, "_syscall", _enter_taking_none())
        miss = loader.start(str(small), SMALL, 0, urgent=True)
        guess = loader.start(str(big), SIZE, 1)
        assert loader.ring.pending == 8 and loader.ring.in_flight == 0 and loader._queue
        with pytest.raises(ShardIOError, match="a bug"):
            loader.close()
        monkeypatch.undo()
        for t in (miss, guess):
            assert t.done and loader.ready(t) and t.fd < 0  # its slot may be reused: the kernel never had it
            assert isinstance(t.error, ShardIOError)
        assert not loader._chunks and not loader._queue and loader.ring.pending == 0 and loader.ring.fd < 0
        assert set(os.listdir("/proc/self/fd")) == fds
        got: list = []

        def waiting():
            try:
                loader.wait(miss)
            except ShardIOError as exc:
                got.append(exc)

        th = threading.Thread(target=waiting, daemon=True)
        th.start()
        th.join(30)  # a liveness bound
        assert len(got) == 1 and re.search(f"{small}: .*closed", str(got[0])), "the wait hung or said nothing"
        loader.close()  # a no-op: nothing raised twice, nothing closed twice
        loader.settle(guess)  # returns at once: done
    finally:
        monkeypatch.undo()
        loader.close()
        pool.close()


def _part_and_none(tmp_path, seed: int):
    """The files of an 8-chunk read `part` and a 2-chunk read `none` (4 KiB chunks), the process's open fds, and a
    fresh io_uring loader on a 2-slot pool to start them on."""
    data = np.random.default_rng(seed).integers(0, 256, 8 * 4096, dtype=np.uint8).tobytes()
    a, b = tmp_path / "part.bin", tmp_path / "none.bin"
    a.write_bytes(data)
    b.write_bytes(data[:8192])
    fds = set(os.listdir("/proc/self/fd"))
    pool = BufferPool(8 * 4096, 2)
    return data, a, b, fds, pool, open_loader("io_uring", pool, block_size=4096, queue_depth=16)


def _start_both_and_close(monkeypatch, loader, a, b, syscall):
    """Start `part` and `none` through `syscall` (the ring's wrapped syscall), then close(), which it interrupts;
    every patch is undone after. Returns (part, none)."""
    monkeypatch.setattr(uring, "_syscall", syscall)
    part = loader.start(str(a), 8 * 4096, 0, urgent=True)
    none = loader.start(str(b), 8192, 1, urgent=True)
    with pytest.raises(KeyboardInterrupt):
        loader.close()
    monkeypatch.undo()
    return part, none


def test_an_interrupted_close_says_free_only_for_reads_with_nothing_left_with_the_kernel(tmp_path, monkeypatch):
    """A close() interrupted (KeyboardInterrupt) while the kernel had taken only part of a read's SQEs took back
    the rest and failed the read with "nothing of it reached the kernel and its buffer is free: retry", though its
    first chunks were still with the kernel (done False: the slot may still be written): whoever followed the
    advice reused a buffer the kernel wrote into. And the message read "on an internal error ()". Now a read with
    nothing left anywhere is done and says its buffer is free; one with chunks still with the kernel stays not
    done and says its buffer may still be written; both name the interrupt. Provoked through the ring's syscall
    wrapper: io_uring_enter takes one SQE of each submission, and the close's wait is interrupted.
    Expected: the 8-chunk read `part` has 3 chunks with the kernel (start, the second start's submit, the
    close's), the 2-chunk read `none` has none."""
    if uring.probe():
        pytest.skip(uring.probe())
    data, a, b, fds, pool, loader = _part_and_none(tmp_path, 8)
    real = uring._syscall

    def one_at_a_time(nr, *a):
        if nr == uring.SYS_IO_URING_ENTER and a[1] > 1:  # (fd, to_submit, min_complete, flags, sigset, size)
            return real(nr, a[0], 1, *a[2:])
        if nr == uring.SYS_IO_URING_ENTER and a[2] > 0 and loader._closed:
            raise KeyboardInterrupt  # Ctrl-C while close() waits for the reads with the kernel
        return real(nr, *a)

    try:
        part, none = _start_both_and_close(monkeypatch, loader, a, b, one_at_a_time)
        assert (part.in_flight, none.in_flight) == (3, 0)
        assert loader.ring.fd < 0 and part.fd < 0 and none.fd < 0
        assert set(os.listdir("/proc/self/fd")) == fds
        assert none.done and loader.ready(none)
        with pytest.raises(ShardIOError) as raised:
            loader.wait(none)
        assert "buffer is free" in str(raised.value) and "KeyboardInterrupt" in str(raised.value)
        assert not part.done and not loader.ready(part)  # its slot may still be written
        with pytest.raises(ShardIOError) as raised:
            loader.wait(part)  # at once: the ring is closed
        msg = str(raised.value)
        assert "free" not in msg and "may still be written" in msg and "KeyboardInterrupt" in msg, msg
        assert "()" not in msg
        loader.close()  # a no-op
    finally:
        monkeypatch.undo()
        loader.close()
        pool.close()


def test_a_close_interrupted_twice_is_finished_by_the_next_close(files, monkeypatch):
    """A second Ctrl-C while close() waited (in its clean-up) for another thread sleeping in the kernel as the
    reaper escaped before the ring and the fds were given back, with the loader marked closed: every later close()
    then waited for ever for a ring nobody would close. Now the next close() finishes the job (once the reaper is
    back), and nothing leaks. The interrupts are raised by the closing thread's waits on the loader's condition
    (where a signal reaches a waiting thread); the reaper sleeps in the kernel until the test lets it go."""
    big, small = files
    fds = set(os.listdir("/proc/self/fd"))
    pool = BufferPool(SIZE, 2)
    loader = open_loader("io_uring", pool, block_size=4096, queue_depth=8)
    real, gate = uring._syscall, threading.Event()

    def slow(nr, *a):
        if nr == uring.SYS_IO_URING_ENTER and a[2] > 0 and threading.current_thread().name == "reaper":
            gate.wait(30)  # a slow disk (a liveness bound)
        return real(nr, *a)

    closer = threading.current_thread()
    real_wait, interrupts = loader._cv.wait, []

    def interrupted_wait(*a, **kw):
        if threading.current_thread() is closer and loader._closed and len(interrupts) < 2:
            interrupts.append(True)
            raise KeyboardInterrupt
        return real_wait(*a, **kw)

    try:
        monkeypatch.setattr(uring, "_syscall", slow)
        t = loader.start(str(small), SMALL, 0, urgent=True)
        reaper = threading.Thread(target=loader.wait, args=(t,), name="reaper", daemon=True)
        reaper.start()
        until(lambda: loader._reaping, "the reader never became the reaper", alive=reaper)
        monkeypatch.setattr(loader._cv, "wait", interrupted_wait)
        with pytest.raises(KeyboardInterrupt):
            loader.close()
        assert len(interrupts) == 2 and loader.ring.fd >= 0  # the clean-up itself was interrupted
        later = threading.Thread(target=loader.close, daemon=True)  # while the reaper still sleeps in the kernel
        later.start()
        gate.set()
        later.join(30)  # a liveness bound
        assert not later.is_alive(), "a close() after an interrupted one hung"
        reaper.join(30)
        assert not reaper.is_alive()
        assert loader.ring.fd < 0 and t.done and t.error is None and t.fd < 0
        assert pool.view(0, SMALL).tobytes() == small.read_bytes()
        assert set(os.listdir("/proc/self/fd")) == fds
        loader.close()  # a no-op
    finally:
        gate.set()
        monkeypatch.undo()
        close_within(loader, pool)


def test_an_interrupt_as_the_reaper_lets_go_of_the_lock_leaves_the_loader_usable(files, monkeypatch):
    """The reaper released the loader's lock outside the try that takes it back: an interrupt raised as release()
    returned (where Python delivers a signal) skipped the re-acquire, and the clean-up then notified and left a
    lock it did not hold (RuntimeError instead of the KeyboardInterrupt, and the lock state broken). Now the
    KeyboardInterrupt comes out, nobody is left marked as the reaper, and the read completes on the next wait."""
    big, small = files
    pool = BufferPool(SIZE, 2)
    loader = open_loader("io_uring", pool, block_size=4096, queue_depth=8)
    real_release, fired = loader._cv.release, []

    def interrupted_release():
        real_release()
        if not fired:
            fired.append(True)
            raise KeyboardInterrupt

    try:
        t = loader.start(str(small), SMALL, 0, urgent=True)
        monkeypatch.setattr(loader._cv, "release", interrupted_release)
        with pytest.raises(KeyboardInterrupt):
            loader.wait(t)
        assert fired and not loader._reaping
        loader.wait(t)
        assert pool.view(0, SMALL).tobytes() == small.read_bytes()
    finally:
        monkeypatch.undo()
        loader.close()
        pool.close()


def close_within(loader, pool, bound: float = 30.0) -> None:
    """Close the loader in a thread and wait at most `bound` seconds (a hang fails the test, not the session); the
    pool is closed only if the loader's close returned (a slot the kernel may still write is never unmapped)."""
    last = threading.Thread(target=loader.close, daemon=True)
    last.start()
    last.join(bound)
    if not last.is_alive():
        pool.close()


def second_interrupt(monkeypatch, loader, where: str, nth: int, thread: threading.Thread | None = None) -> list:
    """Arrange a second Ctrl-C (KeyboardInterrupt) in a closing loader: as the message for the `nth` read judged
    is made (`where` "judge"), or once the `nth` chunk taken back has been recorded as returned ("take back");
    only in `thread` if given. Returns the list that records it once it has fired."""
    import mer_runtime.loader as loader_mod

    fired: list = []
    seen: list = []

    def due(what) -> bool:
        if not loader._closed or fired or thread is not None and threading.current_thread() is not thread:
            return False
        seen.append(what)
        if len(seen) == nth:
            fired.append(what)
            return True
        return False

    if where == "judge":
        real_closed = loader_mod._closed_error

        def closed_error(path, why=None, **kw):
            if why is not None and due(path):
                raise KeyboardInterrupt  # the second Ctrl-C: before that read is failed
            return real_closed(path, why, **kw)

        monkeypatch.setattr(loader_mod, "_closed_error", closed_error)
    else:
        real_note = loader._note

        def note(*event):
            real_note(*event)
            if event[0] == "returned" and due(event):
                raise KeyboardInterrupt  # the second Ctrl-C: part-way through taking back the chunks

        monkeypatch.setattr(loader, "_note", note)
    return fired


@pytest.mark.parametrize("where, nth", [("judge", 1), ("judge", 2), ("take back", 1), ("take back", 3),
                                        ("take back", 7)])
def test_a_close_interrupted_while_taking_reads_back_is_finished_by_the_next_close(tmp_path, monkeypatch, where,
                                                                                   nth):
    """close() takes back the SQEs the kernel never consumed, then fails each read they belonged to, one after the
    other. A second interrupt between two of those steps (a double Ctrl-C: the first ended the close's wait) used to
    leave the reads not yet handled for ever: their chunks were out of the ring (the next close() found nothing to
    take back) and out of the loader's table, so no later close(), and no completion, ever finished them: not done,
    their slots reserved for good and their fds open. Now the reads taken back are recorded before any is changed,
    and the next close() finishes each one from what is really left with the kernel: a read with nothing there is
    done and says its buffer is free, one whose chunks the kernel still had is done once they are reaped, and every
    fd is closed. Set-up as in the test above (one SQE of each submission taken: `part` has 3 of its 8 chunks with
    the kernel, `none` none of its 2, so 7 chunks are taken back); the second interrupt is raised where the loader
    makes its next step: as the message for the `nth` read judged is made, or once the `nth` chunk taken back has
    been recorded as returned."""
    if uring.probe():
        pytest.skip(uring.probe())

    data, a, b, fds, pool, loader = _part_and_none(tmp_path, 9)
    real, waits = uring._syscall, []

    def one_at_a_time(nr, *a):
        if nr == uring.SYS_IO_URING_ENTER and a[1] > 1:  # (fd, to_submit, min_complete, flags, sigset, size)
            return real(nr, a[0], 1, *a[2:])
        if nr == uring.SYS_IO_URING_ENTER and a[2] > 0 and loader._closed and not waits:
            waits.append(True)
            raise KeyboardInterrupt  # the first Ctrl-C: while close() waits for the reads with the kernel
        return real(nr, *a)

    fired = second_interrupt(monkeypatch, loader, where, nth)
    try:
        part, none = _start_both_and_close(monkeypatch, loader, a, b, one_at_a_time)
        assert waits and fired and loader.ring.fd >= 0  # both interrupts came, the second before the ring was closed
        assert not none.done
        r = loader.ring
        # a chunk that landed early may already have been reaped (by the second start or the close): what is left
        # with the kernel is what the ring counts in flight
        assert 1 <= r.in_flight <= 3
        until(lambda: (r.cq_tail.load() - r.cq_head.load()) & 0xFFFFFFFF == r.in_flight,
              "part's chunks with the kernel never landed")
        loader.close()  # finishes what the interrupted one left
        assert loader.ring.fd < 0 and part.fd < 0 and none.fd < 0
        assert set(os.listdir("/proc/self/fd")) == fds
        assert none.done and loader.ready(none) and none.in_flight == 0
        with pytest.raises(ShardIOError) as raised:
            loader.wait(none)
        assert "buffer is free" in str(raised.value) and "KeyboardInterrupt" in str(raised.value), raised.value
        assert part.done and loader.ready(part) and part.in_flight == 0  # its chunks landed and were reaped
        with pytest.raises(ShardIOError) as raised:
            loader.wait(part)
        assert "KeyboardInterrupt" in str(raised.value)
        assert pool.view(0, 3 * 4096).tobytes() == data[:3 * 4096]  # what the kernel had, it read
        loader.close()  # a no-op
    finally:
        monkeypatch.undo()
        loader.close()
        pool.close()
