"""The expert cache over real shard files and a real loader: LRU, pinning, in-use protection, the reserved slot."""

from __future__ import annotations

import pytest

from mer_runtime import ShardIOError, load_manifest, open_shards
from mer_runtime.errors import CacheError
from mer_runtime.buffers import BufferPool
from mer_runtime.cache import ExpertCache
from mer_runtime.loader import open_loader

from conftest import REAL


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from mertools import extract

    out = tmp_path_factory.mktemp("cache") / "q4"
    extract(REAL / "mixtral-q4_0.gguf", out, fsync=False)
    return load_manifest(out)


def make_cache(m, slots):
    pool = BufferPool(m.max_expert_size, slots)
    loader = open_loader("auto", pool)

    def locate(key):
        e = m.expert(*key)
        return str(m.path_of(e)), e.size

    return ExpertCache(pool, loader, locate), pool


def access(cache, key):
    slot = cache.acquire(key)
    cache.release(key)
    return slot


def test_lru_hits_misses_evictions(folder):
    cache, pool = make_cache(folder, 3)
    for key in [(0, 0), (0, 1), (0, 2), (0, 0), (0, 3), (0, 1)]:
        access(cache, key)
    # (0,0),(0,1),(0,2) miss; (0,0) hit; (0,3) evicts LRU (0,1); (0,1) misses and evicts (0,2)
    s = cache.stats
    assert (s.hits, s.misses, s.evictions) == (1, 5, 2)
    assert list(cache.entries) == [(0, 0), (0, 3), (0, 1)]
    e = folder.expert(0, 1)
    assert pool.view(cache.entries[(0, 1)].slot, e.size).tobytes() == folder.path_of(e).read_bytes()


def test_pinned_experts_are_never_evicted(folder):
    cache, _ = make_cache(folder, 3)
    cache.pin([(1, 0), (1, 1)])
    for key in [(0, e) for e in range(4)] * 3:
        access(cache, key)
    assert (1, 0) in cache.entries and (1, 1) in cache.entries
    before = cache.stats.hits
    access(cache, (1, 0))
    assert cache.stats.hits == before + 1
    with pytest.raises(ValueError, match="one stays for loads"):
        cache.pin([(0, 0), (0, 1), (0, 2)])


def test_pin_top_from_a_routing_profile(folder):
    cache, _ = make_cache(folder, 4)
    profile = {(0, 0): 5, (1, 2): 50, (0, 3): 20, (1, 1): 20, (1, 0): 1}
    assert cache.pin_top(profile, 3) == [(1, 2), (0, 3), (1, 1)]
    assert all(cache.entries[k].pinned for k in [(1, 2), (0, 3), (1, 1)])
    for key in [(0, 0), (1, 0), (0, 1), (0, 2)] * 2:
        access(cache, key)
    assert all(k in cache.entries for k in [(1, 2), (0, 3), (1, 1)])


def test_in_use_expert_is_not_evicted(folder):
    cache, pool = make_cache(folder, 2)
    held = cache.acquire((1, 3))
    for key in [(0, e) for e in range(4)]:
        access(cache, key)
    assert cache.entries[(1, 3)].slot == held
    e = folder.expert(1, 3)
    assert pool.view(held, e.size).tobytes() == folder.path_of(e).read_bytes()
    cache.release((1, 3))
    with pytest.raises(CacheError, match="pinned or in use"):
        cache.acquire((0, 0)), cache.acquire((0, 1)), cache.acquire((0, 2))


@pytest.mark.parametrize("drain_first", [False, True])
def test_prefetch_never_takes_the_last_slot(folder, drain_first):
    """The reserve counts free slots and used, idle experts only: whether a guess's read has finished (here: not
    yet, or drained) never changes a decision (it did before: a finished guess counted as room, so a 4th started)."""
    cache, _ = make_cache(folder, 4)
    started = [cache.prefetch((0, e)) for e in range(3)]
    if drain_first:
        cache.drain()
    started.append(cache.prefetch((0, 3)))
    # 3 prefetches fit (one slot always stays for the foreground); unused guesses are no reserve
    assert started == [True, True, True, False] and len(cache.free) == 1
    cache.drain()
    assert [cache.prefetch((1, e)) for e in range(3)] == [False, False, False]
    assert cache.stats.prefetch_skipped == 4 and cache.stats.evictions == 0 and len(cache.free) == 1
    slot = cache.acquire((0, 3))  # a miss takes the free slot
    cache.release((0, 3))
    assert cache.stats.misses == 1 and not cache.free and cache.stats.evictions == 0
    # now (0, 3) is used and idle: it is room for the foreground, so no guess may take it ...
    assert cache.prefetch((1, 0)) is False
    access(cache, (0, 0))  # ... until a second used expert exists: then the LRU used one may go to a guess
    assert cache.prefetch((1, 0)) is True and (0, 3) not in cache.entries and (0, 0) in cache.entries
    assert cache.stats.prefetch_wasted == 0  # only used experts were evicted so far
    cache.drain()
    access(cache, (1, 3))  # the foreground evicts the least recently used idle entry: the unused guess (0, 1)
    assert (0, 1) not in cache.entries and cache.stats.prefetch_wasted == 1
    assert sorted(e.slot for e in cache.entries.values()) == [0, 1, 2, 3] and slot not in cache.free


def test_prefetch_used_and_wasted_counters(folder):
    cache, _ = make_cache(folder, 3)
    assert cache.prefetch((0, 0)) and cache.prefetch((0, 1))
    access(cache, (0, 0))  # a prefetch hit
    assert cache.stats.prefetch_used == 1 and cache.stats.hits == 1
    for key in [(1, 0), (1, 1), (1, 2)]:  # (0,1) is evicted without ever being used
        access(cache, key)
    assert cache.stats.prefetch_wasted == 1 and cache.stats.prefetch_issued == 2


def test_corrupt_shard_is_caught_on_load(folder, tmp_path):
    import shutil

    dst = tmp_path / "c"
    shutil.copytree(folder.root, dst)
    e = folder.expert(1, 2)
    data = bytearray((dst / e.path).read_bytes())
    data[100] ^= 0xFF
    (dst / e.path).write_bytes(bytes(data))
    import numpy as np

    with open_shards(dst, cache_slots=2) as s:
        x = np.ones(256, np.float32)
        s.ffn(1, 1, x)
        with pytest.raises(ShardIOError, match="E0002.bin: checksum mismatch after loading"):
            s.ffn(1, 2, x)
        s.ffn(1, 1, x)  # the cache is still usable
    with open_shards(dst, cache_slots=2, checksums="never") as s:
        s.ffn(1, 2, x)  # unchecked on purpose


def test_prefetch_errors_are_counted_then_raised_to_the_user(folder, tmp_path):
    """A speculative load that fails (short file, checksum) is not lost: the acquire that needs it raises it."""
    import shutil

    import numpy as np

    dst = tmp_path / "c"
    shutil.copytree(folder.root, dst)
    short, corrupt = folder.expert(0, 2), folder.expert(1, 1)
    (dst / short.path).write_bytes((dst / short.path).read_bytes()[:short.size - 4096])
    data = bytearray((dst / corrupt.path).read_bytes())
    data[5000] ^= 1
    (dst / corrupt.path).write_bytes(bytes(data))
    x = np.ones(256, np.float32)
    with open_shards(dst, cache_slots=4, checksums="always") as s:
        assert s.prefetch(0, 2) and s.prefetch(1, 1)
        s.cache.drain()  # both reads are over; nothing has been raised or lost
        assert s.cache.stats.prefetch_failed == 0 and s.loader.bytes_read < 2 * short.size + 4096
        reads = s.loader.bytes_read
        with pytest.raises(ShardIOError, match="E0002.bin: file ends at byte"):
            s.ffn(0, 2, x)
        with pytest.raises(ShardIOError, match="E0001.bin: checksum mismatch"):
            s.ffn(1, 1, x)
        assert s.cache.stats.prefetch_failed == 2 and s.loader.bytes_read == reads  # raised from the guesses
        s.ffn(0, 1, x)  # still usable
        assert not s.cache.in_flight() and len(s.cache.entries) + len(s.cache.free) == 4
    with open_shards(dst, cache_slots=4) as s:  # a failed guess evicted unused is counted, never raised
        assert s.prefetch(0, 2)
        s.cache.drain()
        for key in [(1, 0), (1, 2), (1, 3), (0, 0)]:  # the 4th miss evicts the LRU idle entry: the failed guess
            s.ffn(*key, x)
        assert (0, 2) not in s.cache.entries
        assert (s.cache.stats.prefetch_failed, s.cache.stats.prefetch_wasted) == (1, 1)


def big_file(tmp_path):
    import numpy as np

    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(1).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes())
    return big


@pytest.mark.parametrize("backend", ["io_uring", "pread"])
def test_stale_prefetches_are_withdrawn_before_they_take_disk_time(folder, backend, tmp_path):
    from mer_runtime import uring

    if backend == "io_uring" and uring.probe():
        pytest.skip(uring.probe())
    big = big_file(tmp_path)
    pool = BufferPool(4 << 20, 4)
    loader = open_loader(backend, pool, block_size=4096, queue_depth=1, threads=1)
    trace = loader.record_issues()

    def locate(key):
        e = folder.expert(*key)
        return str(folder.path_of(e)), e.size

    cache = ExpertCache(pool, loader, locate)
    try:
        long = loader.start(str(big), 4 << 20, 3)  # 1024 chunks ahead of the guesses
        assert cache.prefetch((0, 1)) and cache.prefetch((0, 2))
        ids = {k: e.ticket.id for k, e in cache.entries.items()}
        n = cache.cancel_stale(keep={(0, 2)})
        loader.wait(long)
        cache.drain()
        issued = {ev[1] for ev in trace if ev[0] == "issue"}
        cancelled = {ev[1] for ev in trace if ev[0] == "cancelled"}
        withdrawn = [i for i, ev in enumerate(trace) if ev[:2] == ("withdrawn", ids[(0, 1)])]
        # whatever the disk did: a withdrawn guess has no chunk issued after its withdrawal, and its slot is free
        # again once what was in flight has landed
        if n:
            assert cancelled == {ids[(0, 1)]} and ids[(0, 1)] not in issued or withdrawn and not any(
                ev[:2] == ("issue", ids[(0, 1)]) for ev in list(trace)[withdrawn[0]:])
            assert (0, 1) not in cache.entries and cache.stats.prefetch_cancelled == 1 and len(cache.free) == 3
        else:  # its read completed before it was found stale: kept
            assert ids[(0, 1)] in issued and (0, 1) in cache.entries
        assert (0, 2) in cache.entries and ids[(0, 2)] in issued  # the one still predicted is kept
        slot = cache.acquire((0, 2))
        e = folder.expert(0, 2)
        assert pool.view(slot, e.size).tobytes() == folder.path_of(e).read_bytes()
        cache.release((0, 2))
    finally:
        loader.close()
        pool.close()


def test_fetch_starts_a_steps_experts_together_ahead_of_guesses(folder, tmp_path):
    cache, pool = make_cache(folder, 4)
    trace = cache.loader.record_issues()
    access(cache, (1, 0))
    assert cache.prefetch((0, 3))
    # the step needs (1, 0) (present: never evicted for its own step) and two absent experts
    assert cache.fetch([(1, 0), (0, 1), (0, 2)]) == 2
    queued = [ev for ev in trace if ev[0] == "queued"]
    assert [ev[2] for ev in queued[-2:]] == [True, True]  # urgent, queued together after the guess
    for key in [(1, 0), (0, 1), (0, 2)]:
        slot = access(cache, key)
        e = folder.expert(*key)
        assert pool.view(slot, e.size).tobytes() == folder.path_of(e).read_bytes()
    assert (cache.stats.misses, cache.stats.hits) == (3, 1)  # fetched loads count once, as misses
    assert cache.fetch([(0, 1), (0, 2)]) == 0


def test_a_fetch_that_fails_for_a_reason_of_its_own_gives_its_slots_back(folder):
    """fetch() gave back the slots it had taken only for a MerError: anything else (here a size the slots cannot
    hold, a ValueError from the loader) lost them for good."""
    m = folder
    pool = BufferPool(m.max_expert_size, 3)
    loader = open_loader("auto", pool)

    def locate(key):
        e = m.expert(*key)
        return str(m.path_of(e)), (e.size if key[1] != 2 else pool.slot_size + 4096)

    cache = ExpertCache(pool, loader, locate)
    try:
        with pytest.raises(ValueError, match="does not fit slot size"):
            cache.fetch([(0, 1), (0, 2)])
        assert len(cache.free) == 3 and not cache.entries
        for e in (0, 1, 3):
            cache.acquire((0, e))
            cache.release((0, e))
    finally:
        loader.close()
        pool.close()


def test_a_refused_pin_pins_nothing_and_the_set_keeps_computing(folder):
    """pin() checked only its own keys against the slots: a second pin() took the last slot with its first key and
    then failed, leaving every slot pinned, so every later load of the ShardSet failed ("every cache slot is
    pinned"). Now the pins already held count, and a refused pin leaves the pins as they were."""
    import numpy as np

    with open_shards(folder.root, cache_slots=4) as s:
        s.pin([(0, 0), (0, 1)])
        with pytest.raises(CacheError, match="one stays for loads"):
            s.pin([(0, 1), (1, 0), (1, 1)])  # 2 held + 2 new: all 4 slots
        assert sorted(k for k, e in s.cache.entries.items() if e.pinned) == [(0, 0), (0, 1)]
        s.pin([(0, 1), (1, 0)])  # 3 distinct pins in 4 slots: allowed
        for e in range(4):
            assert s.ffn(1, e, np.ones(folder.model["d_model"], np.float32)).shape == (folder.model["d_model"],)
        s.unpin([(0, 0), (0, 1), (1, 0)])
        s.unpin([(0, 1)])  # pinned by two calls: pins are counted (test_pins_are_counted_per_expert)
        s.pin([(1, 1), (1, 2), (1, 3)])
        assert sorted(k for k, e in s.cache.entries.items() if e.pinned) == [(1, 1), (1, 2), (1, 3)]


def test_pins_from_two_threads_never_take_the_last_slot(folder):
    """Two threads pinning at once: each call's check saw only its own keys (and the pins not yet made by the
    other), so together they pinned every slot. Now each call counts the pins the other is making: one is refused
    whole."""
    import threading

    with open_shards(folder.root, cache_slots=4) as s:
        go, errors = threading.Barrier(2), []

        def pin(keys):
            go.wait()
            try:
                s.pin(keys)
            except CacheError as exc:
                errors.append(exc)

        ts = [threading.Thread(target=pin, args=(keys,)) for keys in ([(0, 0), (0, 1)], [(1, 0), (1, 1)])]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        pinned = [k for k, e in s.cache.entries.items() if e.pinned]
        assert len(errors) == 1 and len(pinned) == 2, (errors, pinned)
        with s.load(1, 2):
            pass


def test_threads_pinning_the_same_experts_at_once_are_not_refused(folder):
    """Each pin() counted the keys the other calls were pinning as more pins, though a pin is a mark and two calls
    pinning (0, 0) make one pin: two threads pinning the same 3 experts in 4 slots (each starting up with the same
    hot set) had one refused with "cannot pin 6 experts", though 3 pins were all there ever were."""
    import threading

    keys = [(0, 0), (0, 1), (1, 0)]
    for _ in range(10):
        with open_shards(folder.root, cache_slots=4, checksums="always") as s:
            go, errors = threading.Barrier(3), []

            def pin():
                go.wait()
                try:
                    s.pin(keys)
                except CacheError as exc:
                    errors.append(str(exc))

            ts = [threading.Thread(target=pin) for _ in range(3)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert errors == [] and sorted(k for k, e in s.cache.entries.items() if e.pinned) == keys, errors
            assert not s.cache._pin_calls  # nothing counted as coming once every pin() has returned


def test_a_failed_pin_does_not_take_back_the_pin_another_thread_made(tmp_path):
    """pin() rolled back every mark it had made, also on an expert another thread's pin() had pinned meanwhile and
    reported pinned: thread A pinned (0, 0), thread B's pin of (0, 0) and a corrupt expert failed, and B's rollback
    unpinned A's (0, 0) (in 56 of 60 rounds here). Pins are counted per key: B undoes only its own."""
    import threading

    from mertools import extract

    out = tmp_path / "q4"
    extract(REAL / "mixtral-q4_0.gguf", out, fsync=False)
    bad = next(e for e in load_manifest(out).experts if (e.layer, e.expert) == (1, 1))
    with open(out / bad.path, "r+b") as fh:  # one flipped byte: its checksum fails when (1, 1) is loaded
        fh.seek(bad.tensors["gate"].offset)
        b = fh.read(1)
        fh.seek(bad.tensors["gate"].offset)
        fh.write(bytes([b[0] ^ 0xFF]))
    lost = 0
    for _ in range(60):
        with open_shards(out, cache_slots=6, checksums="always") as s:
            go, ok = threading.Barrier(2), []

            def a():
                go.wait()
                s.pin([(0, 0)])
                ok.append(True)

            def b():
                go.wait()
                with pytest.raises(ShardIOError):
                    s.pin([(0, 0), (1, 1)])

            ts = [threading.Thread(target=f) for f in (a, b)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert ok == [True]
            lost += not s.cache.entries[(0, 0)].pinned
            s.unpin([(0, 0)])  # A's one pin undone: nothing pinned is left
            assert not any(e.pinned for e in s.cache.entries.values()) and not s.cache._pin_count
    assert lost == 0, f"A's pin of (0, 0) was taken back by B's rollback in {lost} of 60 rounds"


def test_pins_are_counted_per_expert(folder):
    """Two pin() calls of one expert take two unpin() calls to free it (each caller undoes its own)."""
    with open_shards(folder.root, cache_slots=4) as s:
        s.pin([(0, 0), (0, 1)])
        s.pin([(0, 0)])
        s.unpin([(0, 0), (0, 1)])
        assert [k for k, e in s.cache.entries.items() if e.pinned] == [(0, 0)]
        s.unpin([(0, 0)])
        s.unpin([(0, 0)])  # one more than were made: nothing to undo
        assert not any(e.pinned for e in s.cache.entries.values())
        s.pin([(0, 0), (0, 1), (1, 0)])  # all three slots that loads may spare, free again


def test_an_exception_at_any_line_of_pin_gives_back_what_it_took(folder):
    """pin() took a slot (acquire) and counted pins in separate statements: a KeyboardInterrupt (a signal handler's
    exception, raised between any two statements) after acquire returned left the slot held for ever, and one
    after a pin was counted but before the call recorded it left that pin standing. An exception is raised here,
    by a trace function, before each line pin() and its helpers run in turn; after each, the cache must hold what
    it held before: the one earlier pin, no slot held by anyone, no pin still counted as coming, and the slots
    free for a full pin of the experts this call named."""
    import linecache
    import sys

    from mer_runtime import cache as cache_mod

    def pin_code(frame):
        return frame.f_code.co_filename == cache_mod.__file__ and "pin" in frame.f_code.co_name

    keys = [(0, 0), (0, 1), (1, 0)]  # (0, 0) pinned already: the path of a key held and of keys loaded
    for at in range(1, 10_000):
        seen = 0

        def line(frame, event, arg):
            nonlocal seen
            # not at a `with` line: its line event comes again on the way out, between the block and __exit__,
            # where no signal's exception can come (CPython checks for signals at calls, and the lock's __exit__ is
            # C since the lock is entered as itself, not as its Condition: see the test of the way out below)
            if event == "line" and not linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip().startswith(
                    "with "):
                seen += 1
                if seen == at:
                    raise KeyboardInterrupt(f"line {frame.f_lineno} of {frame.f_code.co_name}")
            return line

        with open_shards(folder.root, cache_slots=4) as s:
            s.pin([(0, 0)])
            sys.settrace(lambda frame, event, arg: line if pin_code(frame) else None)
            try:
                s.pin(keys)
                done = True
            except KeyboardInterrupt as exc:
                done, where = False, str(exc)
            finally:
                sys.settrace(None)
            c = s.cache
            if done:
                assert at > 1  # every line of pin was interrupted once before it ran through
                break
            assert not [k for k, e in c.entries.items() if e.holders], where
            assert c._pin_count == {(0, 0): 1} and [k for k, e in c.entries.items() if e.pinned] == [(0, 0)], where
            s.unpin([(0, 0)])
            # nothing pinned nor counted as coming: three pins of other experts take the three slots loads spare
            s.pin([(1, 1), (1, 2), (1, 3)])
            s.unpin([(1, 1), (1, 2), (1, 3)])
            assert not c._pin_count and not any(e.pinned for e in c.entries.values()), where



def _interrupt_once(s, hit):
    """Load (0, 0) with a KeyboardInterrupt raised at the entry of the first Python call for which hit(frame) is
    true (a function's entry is where CPython runs a pending signal's handler); True if it was raised."""
    import sys

    fired = []

    def trace(frame, event, arg):
        if event == "call" and not fired and hit(frame):
            fired.append(frame.f_code.co_name)
            raise KeyboardInterrupt(frame.f_code.co_name)
        return None

    sys.settrace(trace)
    try:
        with s.load(0, 0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    return bool(fired)


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("callee", ["move_to_end", "_await"])
def test_an_exception_at_a_call_acquire_makes_after_taking_its_hold_gives_the_hold_back(folder, warm, callee):
    """acquire() counted the thread's hold, then called move_to_end and _await outside any handler: a
    KeyboardInterrupt at one of those calls' entries left the hold for ever, the slot never evicted again (pin's undo
    reads holds back, but a plain load has no undo). For a miss and for a hit."""
    from mer_runtime import cache as cache_mod

    with open_shards(folder.root, cache_slots=4) as s:
        if warm:
            with s.load(0, 0):
                pass
        assert _interrupt_once(s, lambda f: f.f_code.co_name == callee and f.f_back.f_code.co_name == "acquire"
                               and f.f_back.f_code.co_filename == cache_mod.__file__)
        assert not {k: e.holders for k, e in s.cache.entries.items() if e.holders}


@pytest.mark.parametrize("where", ["cache", "loader", "shards"])
def test_no_python_call_stands_between_a_runtime_block_and_its_locks_release(folder, where):
    """`with self._cv:` entered and left threading.Condition's __enter__/__exit__, Python functions: a
    KeyboardInterrupt at __exit__'s entry (a signal's handler runs at a function's entry) left the lock held, and
    the next call (the error path's own cleanup, or close()) waited for it for ever. The cache's, the loader's and
    the shard set's locks are now entered as the lock itself, whose __exit__ is C and releases before any handler
    runs. Raising there would hang the test before the fix, so the trace only records such calls: there must be
    none in a load (a miss, then a hit)."""
    import importlib
    import sys
    import threading

    module = importlib.import_module(f"mer_runtime.{where}")
    seen = []

    def trace(frame, event, arg):
        if (event == "call" and frame.f_code.co_filename == threading.__file__
                and frame.f_code.co_name in ("__enter__", "__exit__")
                and frame.f_back.f_code.co_filename == module.__file__):
            seen.append(f"{frame.f_code.co_name} from {frame.f_back.f_code.co_name}")
        return None

    with open_shards(folder.root, cache_slots=4) as s:
        sys.settrace(trace)
        try:
            for _ in range(2):
                with s.load(0, 0):
                    pass
        finally:
            sys.settrace(None)
    assert not seen, seen
