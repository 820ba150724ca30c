"""io_uring's background speculation thread (`UringLoader.spec_background`): it starts, streams guesses while the
caller makes no call, survives what the kernel refuses, never sleeps in the kernel with nothing there to complete,
and is gone after close().

Real files, the real ring. Where a failure must be provoked, the ring's own syscall wrapper is made to fail once
with the error the kernel gives (the stdlib's Thread.start likewise): nothing of the loader's logic is replaced.
The waits are liveness bounds that end as soon as the thread is seen dead or the condition holds; no timing is
asserted.
"""

from __future__ import annotations

import errno
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


def test_the_thread_never_sleeps_in_the_kernel_with_nothing_submitted(streaming, files, monkeypatch):
    """A submission the kernel refused leaves its SQEs queued and nothing in flight: the thread used to wait in
    io_uring_enter for a completion that could never come, as the reaper, so every wait() and close() hung."""
    cache, loader, pool = streaming
    big, small = files
    assert cache.prefetch((1, 0), due=1)  # starts the thread; it reads the small guess and goes idle
    first = cache.entries[(1, 0)].ticket
    th = loader._background
    until(lambda: first.done, "the first guess lands", alive=th)
    fail_once(monkeypatch, loader.ring, "submit",
              uring.UringError(errno.EAGAIN, "io_uring_enter: Resource temporarily unavailable"),
              when=lambda *_: not in_spec_thread())
    with pytest.raises(uring.UringError):
        loader.start(str(small), SMALL, 2)  # a guess: its two chunks are prepared, their submission refused
    t = next(t for t, _, _ in loader._chunks.values())
    assert loader.ring.pending == 2 and loader.ring.in_flight == 0
    try:
        with loader._cv:  # any wake-up (another ticket finishing, say) that issues nothing itself
            loader._cv.notify_all()
        # the thread stays alive when it hangs: this bound is what ends the wait then (a fix makes it milliseconds)
        until(lambda: t.done, "the thread submits what is queued instead of sleeping on nothing", bound=10, alive=th)
    finally:
        if not t.done:  # the old code's hang: free the sleeping reaper so that teardown can close
            loader.ring.submit()
    assert t.error is None and pool.view(2, SMALL).tobytes() == small.read_bytes()


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
