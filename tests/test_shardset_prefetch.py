"""`open_shards(path, prefetch=True)`: plain `moe()` calls, layer after layer, token after token, drive the same
layer step as smoke (`StepDriver`): odds-ranked eviction behind its duel, gated guesses, the gate's feedback.

Real shard folders (extracted from the real fixtures), the real loader, cache, prefetcher and kernels; no timing is
asserted: results are compared byte for byte, hit rates by the cache's counters.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mer_runtime import load_manifest, open_shards, uring
from mer_runtime.errors import CacheError, ManifestError
from mer_runtime.smoke import make_routes
from mer_runtime.stepper import PrefetchConfig

from conftest import extract_fixture

SEED = 12648430


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return load_manifest(extract_fixture(tmp_path_factory, "sspf", "mixtral-q4_0.gguf"))


def cycle_routes(m, tokens):
    """A learnable trace: every layer follows the same 4-step cycle, longer than a small cache holds."""
    cyc = [[0, 1], [2, 3], [1, 2], [3, 0]]
    return np.array([[cyc[(t + li) % 4] for li in range(len(m.layers))] for t in range(tokens)])


def drive(s, m, routes, seed=0, batch=0):
    """Every step of `routes` through `s.moe`: a list of outputs (seeded weights and inputs per token)."""
    rng = np.random.default_rng(seed)
    d = m.model["d_model"]
    out = []
    for t in range(routes.shape[0]):
        x = rng.standard_normal((batch, d) if batch else d).astype(np.float32)
        for li, layer in enumerate(m.layers):
            w = rng.random(routes.shape[2]).astype(np.float32)
            out.append(s.moe(layer, [int(e) for e in routes[t, li]], w, x))
    return out


def configs():
    out = [True]
    if not uring.probe():  # a token ahead only where io_uring keeps guesses to the disk's idle time
        out.append(PrefetchConfig(ahead="token"))
    return out


@pytest.mark.parametrize("prefetch", configs(), ids=lambda p: "step" if p is True else "token")
@pytest.mark.parametrize("slots", [3, 5])
def test_results_are_byte_identical_with_prefetch_on_and_off(folder, prefetch, slots):
    routes = make_routes(folder, "markov", 60, SEED)
    with open_shards(folder.root, cache_slots=slots) as s:
        off = drive(s, folder, routes, batch=2)
        assert s.step_driver() is None and s.prefetch_stats() is None and s._drivers == []  # nothing per call
    with open_shards(folder.root, cache_slots=slots, prefetch=prefetch) as s:
        on = drive(s, folder, routes, batch=2)
        st = s.prefetch_stats()
        assert st["streams"] == 1 and st["ahead"] in ("step", "token")
        assert s.cache.stats.hits + s.cache.stats.misses == routes.size
    assert len(on) == len(off) == routes.shape[0] * routes.shape[1]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(on, off))


@pytest.mark.skipif(bool(uring.probe()), reason="a token ahead needs io_uring")
@pytest.mark.parametrize("slots", [4, 5])
def test_guesses_a_token_ahead_issued_through_moe_leave_results_byte_identical(folder, slots):
    """The token-ahead case above issues no guess on this fixture: its experts (108 KiB) are smaller than one 1 MiB
    chunk, so the gate's price of what a guess puts in the foreground's way (a whole window of chunks until
    measured) exceeds any gain. With 4 KiB chunks and reads priced free for the CPUs (`CostModel.read_frac = 0`, a
    machine where idle disk time is free), the cycle's guesses pay and are read: the results stay byte-identical."""
    routes = cycle_routes(folder, 60)
    with open_shards(folder.root, cache_slots=slots) as s:
        off = drive(s, folder, routes, batch=2)
    with open_shards(folder.root, cache_slots=slots, block_size=4096, prefetch=PrefetchConfig(ahead="token")) as s:
        assert s.prefetch_ahead == "token"
        s.step_driver().cost.read_frac = 0.0
        on = drive(s, folder, routes, batch=2)
        st = s.prefetch_stats()
        assert s.cache.stats.prefetch_issued > 0 and st["admitted"] > 0
        assert s.cache.stats.prefetch_used > 0
    assert all(a.tobytes() == b.tobytes() for a, b in zip(on, off))


def test_a_learnable_trace_hits_at_least_as_often_and_ranks_by_the_odds(folder):
    """The 4-step cycle on 4 slots: the predictor's odds win the duel and rank the victims ("layer+odds"), and
    moe() with prefetch on hits at least as often as without (the odds keep what the cycle needs next)."""
    routes = cycle_routes(folder, 200)
    rates = {}
    for prefetch in (False, True):
        with open_shards(folder.root, cache_slots=4, prefetch=prefetch) as s:
            drive(s, folder, routes)
            rates[prefetch] = s.cache.stats.hit_rate
            if prefetch:
                assert s.cache.eviction == "layer+odds"
                st = s.prefetch_stats()
                assert st["eviction"] == "layer+odds" and st["duel_odds"] == 1
                assert st["right"] + st["wrong"] <= st["admitted"]
                assert s.cache.stats.prefetch_issued <= st["admitted"]
            else:
                assert s.cache.eviction == "layer"
    assert rates[True] >= rates[False], rates


def test_two_threads_two_streams_equal_one_thread_each(folder):
    """Each thread is one stream of tokens with its own driver (the prefetcher and the gate are single-threaded:
    sharing one would raise ConcurrentUseError); the cache is shared. Results equal each stream run alone."""
    streams = [make_routes(folder, "markov", 40, seed) for seed in (1, 2)]
    alone = []
    for i, r in enumerate(streams):
        with open_shards(folder.root, cache_slots=6, prefetch=True) as s:
            alone.append(drive(s, folder, r, seed=i))
    got: list = [None, None]
    errors: list = []
    with open_shards(folder.root, cache_slots=6, prefetch=True) as s:
        barrier = threading.Barrier(2)

        def run(i):
            try:
                barrier.wait()
                got[i] = drive(s, folder, streams[i], seed=i)
            except BaseException as exc:  # noqa: BLE001  # reported below, with the thread's stream
                errors.append((i, exc))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        st = s.prefetch_stats()
        assert st["streams"] == 2
        assert s.step_driver() is not None and s.prefetch_stats()["streams"] == 3  # this thread's own, now
    for i in range(2):
        assert all(a.tobytes() == b.tobytes() for a, b in zip(got[i], alone[i]))


def test_refused_calls_leave_the_stream_as_it_was(folder):
    routes = make_routes(folder, "markov", 10, SEED)
    d = folder.model["d_model"]
    x = np.ones(d, np.float32)
    with open_shards(folder.root, cache_slots=3, prefetch=True) as s:
        drive(s, folder, routes)
        drv = s.step_driver()

        def state():
            pf, cm = drv.pf, drv.cost
            return (pf.clock, pf.same.tobytes(), pf.cross.tobytes(), pf.seen.tobytes(), repr(pf.cur_token),
                    repr(pf.prev_token), pf.predicted, pf.came_true, cm.steps_seen, cm.admitted, cm.refused,
                    cm.right, cm.wrong, s.cache.stats.as_dict(), sorted(s.cache.entries), repr(drv._backlog))

        before = state()
        with pytest.raises(ManifestError):
            s.moe(folder.layers[0], [0, 99], [0.5, 0.5], x)  # unknown expert
        with pytest.raises(ManifestError):
            s.moe(99, [0, 1], [0.5, 0.5], x)  # unknown layer
        with pytest.raises(ValueError):
            s.moe(folder.layers[0], [0, 1], [0.5, 0.5], np.ones(d + 1, np.float32))
        with pytest.raises(ValueError):
            s.moe(folder.layers[0], [0, 1], [1.0], x)
        assert state() == before
        assert s.step_driver() is drv  # still this thread's one
        assert drv.duel is not None
    assert drv.duel is None  # close() closed the stream's driver, and with it its duel
    with pytest.raises(CacheError):
        s.moe(folder.layers[0], [0, 1], [0.5, 0.5], x)


def test_prefetch_values(folder):
    with pytest.raises(ValueError):
        open_shards(folder.root, prefetch="sometimes")
    with pytest.raises(ValueError):
        PrefetchConfig(ahead="week")
    with open_shards(folder.root, prefetch="markov", io="pread") as s:
        assert s.prefetch_ahead == "step"
    with open_shards(folder.root, prefetch=PrefetchConfig(ahead="token"), io="pread") as s:
        assert s.prefetch_ahead == "step"  # pread has no idle-time window for a token ahead: the one-step guesses
    with open_shards(folder.root, prefetch="none") as s:
        assert s.step_driver() is None


def test_one_threads_step_leaves_another_threads_guesses_alone(folder):
    """Thread B's right guess for its next step survives thread A's step in between: A's step judges only A's own
    guesses (`cancel_stale(owner=...)`), so B's hit is counted as a used guess (not stale or withdrawn), and neither
    gate learns another stream's outcome."""
    m = folder
    x = np.ones(m.model["d_model"], np.float32)
    cyc = [[0, 1], [2, 3], [1, 2], [3, 0]]
    go, done = threading.Event(), threading.Event()
    a_stats: list = []

    with open_shards(m.root, cache_slots=4, prefetch=True, io="pread") as s:
        def thread_a():  # another stream: one step of its own, when B says so
            go.wait()
            try:
                s.moe(m.layers[0], [0, 1], [0.5, 0.5], x)
                a_stats.append(s.step_driver().stats())
            finally:
                done.set()

        # B's gate with fixed figures (every miss priced at 10 ms, as the I/O-free replays price them; alpha 0: the
        # landed and wasted fractions stay at their starting 1.0): whether a guess gets through must not hang on how
        # much of a read landed in time on this machine (with its cores loaded, the measured landed fraction fell to
        # 0.15 and the gate let no guess through in 100 steps; the test is about whose guesses a step judges)
        cost = s.step_driver().cost
        cost.unit_stall, cost.alpha = 0.010, 0.0
        a = threading.Thread(target=thread_a)
        a.start()
        try:
            for t in range(200):  # B (this thread) learns the cycle
                for li, layer in enumerate(m.layers):
                    s.moe(layer, cyc[(t + li) % 4], [0.5, 0.5], x)
            st, b = s.cache.stats, s.step_driver()
            t = 200
            for _ in range(100):  # a layer-0 step after which B has a guess out for its layer-1 step
                s.moe(m.layers[0], cyc[t % 4], [0.5, 0.5], x)
                guesses = [k for k, e in s.cache.entries.items() if e.prefetched and not e.used and not e.stale]
                if guesses:
                    break
                s.moe(m.layers[1], cyc[(t + 1) % 4], [0.5, 0.5], x)
                t += 1
            assert guesses and all(k in [(m.layers[1], e) for e in cyc[(t + 1) % 4]] for k in guesses), guesses
            before = (st.prefetch_used, st.prefetch_stale, st.prefetch_cancelled, b.own.prefetch_used, b.cost.wrong)
            go.set()
            done.wait()
            s.moe(m.layers[1], cyc[(t + 1) % 4], [0.5, 0.5], x)  # B's step: its guess was right
            after = (st.prefetch_used, st.prefetch_stale, st.prefetch_cancelled, b.own.prefetch_used, b.cost.wrong)
        finally:
            go.set()
            a.join()
        n = len(guesses)
        assert [y - x0 for x0, y in zip(before, after)] == [n, 0, 0, n, 0]
        assert a_stats and a_stats[0]["wrong"] == 0 and a_stats[0]["right"] == 0  # A learnt nothing of B's guess


def test_a_driver_is_retired_when_its_thread_ends_even_a_thread_threading_did_not_start(folder):
    """A thread started by `_thread` (or C) is a `_DummyThread` to `threading`, "alive" for ever: its driver (the
    Markov tables, the duel's pools) goes when its thread-local data goes, at the next prefetch_stats()."""
    _thread = pytest.importorskip("_thread")
    if not hasattr(_thread, "_set_sentinel"):
        pytest.skip("no _thread._set_sentinel to wait for the thread's end")
    routes = make_routes(folder, "markov", 4, SEED)
    box: list = []
    ready, errors = threading.Event(), []

    with open_shards(folder.root, cache_slots=4, prefetch=True) as s:
        def worker():
            box.append(_thread._set_sentinel())  # released once this thread's state (its locals) is gone
            try:
                drive(s, folder, routes)
                box.append(s.step_driver())
            except BaseException as exc:  # noqa: BLE001  # reported below
                errors.append(exc)
            finally:
                ready.set()

        _thread.start_new_thread(worker, ())
        ready.wait()
        box[0].acquire()  # the thread has ended
        assert not errors, errors
        drv = box[1]
        assert drv.duel is not None
        st = s.prefetch_stats()
        assert st["streams"] == 1 and s._drivers == [] and s._retired["streams"] == 1
        assert drv.duel is None  # retired: its duel's pools released
        assert st["admitted"] == drv.stats()["admitted"]  # its record kept


def test_a_step_after_close_changes_nothing(folder):
    """A smoke-style caller of `step_driver().step()` after close(): CacheError before anything is observed."""
    routes = make_routes(folder, "markov", 6, SEED)
    s = open_shards(folder.root, cache_slots=3, prefetch=True)
    drv = s.step_driver()

    def access(layer, e, before):
        with s.load(layer, e):
            if before:
                before()

    for t in range(routes.shape[0]):
        for li in range(len(folder.layers)):
            drv.step(li, routes[t, li], access)
    s.close()
    before = (drv.pf.clock, drv.pf.same.tobytes(), drv.cost.steps_seen, s.cache.stats.as_dict(), s._retired)
    with pytest.raises(CacheError):
        drv.step(0, routes[0, 0], access)
    with pytest.raises(CacheError):
        drv.begin(0, routes[0, 0])
    assert (drv.pf.clock, drv.pf.same.tobytes(), drv.cost.steps_seen, s.cache.stats.as_dict(), s._retired) == before
    assert s.step_driver() is drv and s._active == 0


def test_a_closed_shard_set_with_prefetching_is_freed(folder):
    """The driver's retirement hook lives as long as the thread (the main thread here): it must not keep the
    ShardSet, its pool and its drivers' tables alive after the user closed and dropped it."""
    import gc
    import weakref

    s = open_shards(folder.root, cache_slots=4, prefetch=True)
    drive(s, folder, cycle_routes(folder, 3))
    s.close()
    ref = weakref.ref(s)
    del s
    gc.collect()
    assert ref() is None


def test_a_retired_stream_leaves_no_guess_behind():
    """No other stream's step judges a stream's guesses (they are its own): when its driver is closed (its thread
    ended, or the set closed) its unused guesses are withdrawn or demoted, so none keeps a slot for a step that will
    never come, and a step refuses an unknown layer or expert before it withdraws or observes anything."""
    from mer_runtime.buffers import BufferPool
    from mer_runtime.cache import ExpertCache
    from mer_runtime.prefetch import MarkovPrefetcher
    from mer_runtime.stepper import NullLoader, StepDriver

    layers = [0, 1, 2, 3]
    cyc = [[0, 1], [2, 3], [4, 5], [6, 7]]
    for ahead in ("step", "token"):
        pool = BufferPool(4096, 16)
        cache = ExpertCache(pool, NullLoader(pool), lambda k: ("", 4096), layers=layers)
        a = StepDriver(cache, layers, MarkovPrefetcher(layers, 16), ahead=ahead, odds=False)
        for t in range(40):
            for li in range(4):
                a.step(li, cyc[(t + li) % 4])

        def live_guesses():
            return [e.key for e in cache.entries.values()
                    if e.owner is a.owner and e.prefetched and not e.used and not e.stale]

        assert live_guesses(), ahead  # the stream's last guesses, for steps that will not come
        clock, issued = a.pf.clock, cache.stats.prefetch_issued
        for li, experts in ((4, [0, 1]), (0, [0, 99])):
            with pytest.raises(IndexError):
                a.step(li, experts)
        assert live_guesses() and a.pf.clock == clock and cache.stats.prefetch_issued == issued
        a.close()
        assert live_guesses() == [], ahead
        a.close()  # idempotent
        pool.close()


@pytest.mark.skipif(bool(uring.probe()), reason="a token ahead needs io_uring")
def test_a_chunks_share_of_an_expert_is_at_most_one(folder):
    """CostModel's chunk_frac is a chunk's share of an expert: this fixture's experts (108 KiB) are smaller than one
    1 MiB chunk, which is read as one chunk of the expert's size, so the share is 1, not 1 MiB / 108 KiB = 9.48
    (which priced what a guess puts in the foreground's way at 9.48 whole misses a chunk). Smoke's replay gets the
    same value (`chunk_share`)."""
    biggest = max(e.size for e in folder.experts)
    with open_shards(folder.root, cache_slots=4, prefetch=PrefetchConfig(ahead="token")) as s:
        assert s.prefetch_ahead == "token" and s.loader.block_size > biggest  # the case in question
        assert s.step_driver().cost.chunk_frac == 1.0
    with open_shards(folder.root, cache_slots=4, block_size=4096, prefetch=PrefetchConfig(ahead="token")) as s:
        assert s.step_driver().cost.chunk_frac == pytest.approx(4096 / biggest)  # smaller chunks: their share
    from mer_runtime.prefetch import chunk_share

    assert chunk_share(1 << 20, biggest) == 1.0 and chunk_share(4096, 8192) == 0.5
