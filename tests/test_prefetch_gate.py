"""Prefetch that never loses: the cost gate, stale guesses withdrawn, the idle-time window, results unchanged.

Real shard files, the real loader (io_uring where the kernel allows it, else pread) and the real cache; the cost
model is given its measurements (alpha=0 keeps them fixed), never a clock: no timing is asserted.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from mer_runtime import load_manifest, open_shards, uring
from mer_runtime.buffers import BufferPool
from mer_runtime.cache import ExpertCache
from mer_runtime.loader import open_loader
from mer_runtime.prefetch import CostModel, MarkovPrefetcher
from mer_runtime.smoke import _drive
from mer_runtime.stepper import StepDriver

from conftest import REAL


def assert_same_outputs(on, off, routes):
    """The (key, output) lists of a run with prefetching and one without hold the same experts and the same bytes,
    step by step (within a step the cached experts go first, so each step is compared sorted by expert)."""
    k = routes.shape[2]

    def steps(outs):
        return [sorted(outs[i:i + k], key=lambda kv: kv[0]) for i in range(0, len(outs), k)]

    assert len(on) == len(off) == routes.size
    for a, b in zip(steps(on), steps(off)):
        assert [key for key, _ in a] == [key for key, _ in b]
        assert all(np.array_equal(ya, yb) for (_, ya), (_, yb) in zip(a, b))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from mertools import extract

    out = tmp_path_factory.mktemp("gate") / "q4"
    extract(REAL / "mixtral-q4_0.gguf", out, fsync=False)
    return load_manifest(out)


def cycle_routes(m, tokens=40):
    """A learnable trace: every layer follows the same 4-step cycle, longer than the cache holds."""
    n = m.model["n_experts"]
    cyc = [[0, 1], [2, 3], [1, 2], [3, 0]]
    return np.array([[[e % n for e in cyc[(t + li) % 4]] for li in range(len(m.layers))] for t in range(tokens)])


def fixed_cost(stall=1.0, landed=1.0, waste=1.0) -> CostModel:
    """A cost model with given measurements: every step misses, a miss stalls `stall` s."""
    cm = CostModel(alpha=0.0, warmup=0)
    cm.observe(io_wait_s=stall, misses=1)
    cm.landed_frac, cm.waste_frac = landed, waste
    return cm


def run(m, routes, slots, policy, cost=None, outputs=None, odds=True):
    """One smoke pass over routes through a real ShardSet; returns the cache's counters."""
    x = np.random.default_rng(3).standard_normal(m.model["d_model"]).astype(np.float32)
    with open_shards(m.root, cache_slots=slots) as s:
        pf = MarkovPrefetcher(m.layers, m.model["n_experts"])
        if cost is not None:
            s.loader.spec_window = cost.window

        def access(layer, e, before_compute):
            with s.load(layer, e) as ex:
                if before_compute:
                    before_compute()
                if outputs is not None:
                    outputs.append(((layer, e), s.compute(ex, x)))

        _drive(s.cache, routes, m.layers, policy, pf, 2, on_access=access, cost=cost, odds=odds)
        return s.cache.stats.as_dict()


def test_the_gate_refuses_every_read_whose_expected_value_is_negative(folder):
    routes = cycle_routes(folder)
    base = run(folder, routes, 5, "none")
    # a right guess would save nothing (none of it lands before it is needed), a wrong one costs a whole read:
    # p x 0 > (1 - p) x 1 never holds, even for the certain guesses of this cycle
    cm = fixed_cost(landed=0.0, waste=1.0)
    refused = run(folder, routes, 5, "markov", cm, odds=False)  # the odds rank evictions, read nothing
    assert refused["prefetch_issued"] == 0 and cm.admitted == 0 and cm.refused > 0
    assert refused["hits"] == base["hits"] and refused["misses"] == base["misses"]


def test_the_gate_admits_reads_that_pay_and_only_those(folder):
    routes = cycle_routes(folder)
    cm = fixed_cost(landed=1.0, waste=0.5)  # break-even p = 0.5 / 1.5 = 1/3
    r = run(folder, routes, 5, "markov", cm)
    assert r["prefetch_issued"] > 0 and cm.admitted > 0
    # every admitted guess was started or found no slot: nothing is read that the gate did not admit
    assert cm.admitted == r["prefetch_issued"] + r["prefetch_skipped"] + r["prefetch_failed"]
    assert [cm.admit(p) for p in (0.3, 0.34)] == [False, True]


def test_prefetching_never_changes_results(folder):
    routes = cycle_routes(folder, 24)
    routes[::5] = routes[::5][:, :, ::-1]  # some wrong guesses too
    off, on = [], []
    run(folder, routes, 5, "none", outputs=off)
    # odds=False: guesses are read from the first tokens on, before the odds' skill clears keep_trust's bound
    r = run(folder, routes, 5, "markov", fixed_cost(landed=1.0, waste=0.0), outputs=on, odds=False)
    assert r["prefetch_issued"] > 0
    assert_same_outputs(on, off, routes)


def big_file(tmp_path, size=1 << 20):
    p = tmp_path / "big.bin"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())
    return p


@pytest.fixture
def window_cache(tmp_path):
    """A 3-slot cache whose key (9, e) is a 1 MiB file read in 4 KiB chunks by io_uring."""
    if uring.probe():
        pytest.skip(uring.probe())
    big = big_file(tmp_path)
    pool = BufferPool(1 << 20, 3)
    loader = open_loader("io_uring", pool, block_size=4096, queue_depth=8)
    cache = ExpertCache(pool, loader, lambda key: (str(big), 1 << 20))
    yield cache, loader, pool, big
    loader.close()
    pool.close()


def use(cache, *keys):
    """Acquire and release each key in turn: the cache then holds them, least recently used first."""
    for k in keys:
        cache.acquire(k)
        cache.release(k)


def settle(loader, t):
    """Let the chunks that were issued land (reaping them may issue no more: the window is full)."""
    while t.in_flight:
        loader.ready(t)


def test_a_guess_reads_only_its_window_and_a_stale_one_is_withdrawn(window_cache):
    cache, loader, pool, big = window_cache
    trace = loader.record_issues()
    loader.spec_window = 2
    assert cache.prefetch((9, 0))
    t = cache.entries[(9, 0)].ticket
    settle(loader, t)
    loader.ready(t)
    assert t.issued == 2 and not t.done  # 2 of 256 chunks: the rest waits until the guess is needed
    assert cache.cancel_stale(keep=set()) == 1
    st = cache.stats
    assert (st.prefetch_cancelled, st.cancelled_read_bytes, st.cancelled_inflight_bytes) == (1, 8192, 0)
    assert loader.bytes_read == 8192  # a wrong guess cost two chunks, nothing more
    cache.drain()
    assert (9, 0) not in cache.entries and len(cache.free) == 3
    assert not any(ev[:2] == ("issue", t.id) for ev in list(trace)[[e[0] for e in trace].index("withdrawn"):])


def test_a_right_guess_is_promoted_and_read_whole(window_cache):
    cache, loader, pool, big = window_cache
    loader.spec_window = 1
    assert cache.prefetch((9, 1))
    t = cache.entries[(9, 1)].ticket
    settle(loader, t)
    assert t.issued == 1
    assert cache.cancel_stale(keep={(9, 1)}) == 0  # still predicted: kept
    slot = cache.acquire((9, 1))  # needed now: promoted past the window
    assert pool.view(slot, 1 << 20).tobytes() == big.read_bytes()
    cache.release((9, 1))
    st = cache.stats
    assert (st.hits, st.misses, st.prefetch_used) == (1, 0, 1) and 0 < st.prefetch_landed < 1


def test_a_miss_that_needs_a_guess_slot_withdraws_the_guess_instead_of_reading_it(window_cache):
    """Every idle slot holds a guess held back by the window: a foreground miss takes one by withdrawing it (two
    chunks read for it in all), not by reading the whole guessed expert first with the cache's lock held."""
    cache, loader, pool, big = window_cache
    loader.spec_window = 2
    assert cache.prefetch((9, 0)) and cache.prefetch((9, 1))
    for k in ((9, 0), (9, 1)):
        settle(loader, cache.entries[k].ticket)
    guessed = loader.bytes_read
    slot = cache.acquire((1, 1))  # the free slot
    cache.acquire((1, 2))  # no free slot: one guess must go
    assert loader.bytes_read - guessed == 2 * (1 << 20)  # the two misses, and nothing more for the guess
    assert cache.stats.prefetch_cancelled == 1 and cache.stats.cancelled_read_bytes == 8192
    assert pool.view(slot, 1 << 20).tobytes() == big.read_bytes()
    cache.release((1, 1))
    cache.release((1, 2))


def test_close_withdraws_the_guesses_instead_of_reading_them(window_cache):
    cache, loader, pool, big = window_cache
    loader.spec_window = 2
    assert cache.prefetch((9, 0))
    settle(loader, cache.entries[(9, 0)].ticket)
    cache.close()
    assert loader.bytes_read == 8192 and cache.stats.prefetch_cancelled == 1


def test_a_guess_whose_read_is_complete_is_not_in_flight(window_cache):
    """smoke bounds its guesses by in_flight(): two complete but unused guesses must not block speculation."""
    cache, loader, pool, big = window_cache
    loader.spec_window = 1 << 10
    assert cache.prefetch((9, 0))
    t = cache.entries[(9, 0)].ticket
    while not loader.ready(t):
        pass
    assert t.done and cache.in_flight() == 0 and (9, 0) in cache.entries


def test_prefetch_withdraw_and_acquire_from_many_threads(folder):
    """Readers acquire and check experts while another thread guesses and withdraws, with a small window."""
    keys = [(layer, e) for layer in folder.layers for e in range(folder.model["n_experts"])]
    want = {k: folder.path_of(folder.expert(*k)).read_bytes() for k in keys}
    errors: list[BaseException] = []
    with open_shards(folder.root, cache_slots=5, block_size=4096) as s:
        s.loader.spec_window = 1
        stop = threading.Event()

        def reader(seed):
            rng = random.Random(seed)
            try:
                for _ in range(60):
                    k = rng.choice(keys)
                    with s.load(*k) as ex:
                        assert ex.buffer.tobytes() == want[k]
            except BaseException as exc:
                errors.append(exc)

        def guesser():
            rng = random.Random(9)
            try:
                while not stop.is_set():  # guesses with and without a gate that refuses some victims
                    s.cache.prefetch(rng.choice(keys), rng.choice([None, lambda v: v is None or v[1] % 2 == 0]))
                    s.cache.cancel_stale(keep={rng.choice(keys)})
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
        g = threading.Thread(target=guesser)
        g.start()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        stop.set()
        g.join()
        s.cache.drain()
        assert not errors, errors
        st = s.cache.stats
        assert st.prefetch_issued > 0 and st.prefetch_cancelled > 0
        assert len(s.cache.entries) + len(s.cache.free) == 5  # every slot accounted for


def test_two_guesses_each_read_their_window(window_cache):
    """A guess held back at its window must not hold back the guess queued behind it."""
    cache, loader, pool, big = window_cache
    loader.spec_window = 2
    assert cache.prefetch((9, 0)) and cache.prefetch((9, 1))
    a, b = cache.entries[(9, 0)].ticket, cache.entries[(9, 1)].ticket
    for _ in range(4):
        settle(loader, a)
        settle(loader, b)
    assert (a.issued, b.issued) == (2, 2) and not a.done and not b.done
    assert cache.cancel_stale(keep=set()) == 2 and cache.stats.cancelled_read_bytes == 4 * 4096
    cache.drain()
    assert len(cache.free) == 3


def test_a_guess_takes_a_slot_only_if_admitted_with_its_victim(window_cache):
    cache, loader, pool, big = window_cache
    use(cache, (1, 0), (1, 1), (1, 2))
    asked = []
    assert not cache.prefetch((9, 0), admit=lambda v: asked.append(v) or False)
    assert asked == [(1, 0)]  # the least recently used expert is what it would evict
    assert list(cache.entries) == [(1, 0), (1, 1), (1, 2)] and cache.stats.evictions == 0
    assert cache.prefetch((9, 0), admit=lambda v: True)
    assert (1, 0) not in cache.entries and cache.stats.evictions == 1
    cache.drain()


def test_a_stale_guess_read_whole_is_demoted_and_counted_once(window_cache):
    cache, loader, pool, big = window_cache
    loader.spec_window = None
    use(cache, (1, 0), (1, 1))
    assert cache.prefetch((9, 0))  # the free slot
    while not loader.ready(cache.entries[(9, 0)].ticket):
        pass
    assert cache.cancel_stale(keep=set()) == 0  # nothing to withdraw: it was read whole
    assert cache.stats.prefetch_stale == 1 and next(iter(cache.entries)) == (9, 0)
    assert cache.cancel_stale(keep=set()) == 0 and cache.stats.prefetch_stale == 1
    cache.acquire((1, 2))  # a miss: the wrong guess goes first, not the least recently used expert
    cache.release((1, 2))
    assert (9, 0) not in cache.entries and (1, 0) in cache.entries
    assert cache.stats.prefetch_wasted == 1


def test_every_wrong_guess_is_fed_back_with_its_own_size(tmp_path):
    """A withdrawn guess's waste is a fraction of ITS expert (not of the step's), and a guess read whole before it
    was found wrong counts as wrong with all it read."""
    if uring.probe():
        pytest.skip(uring.probe())
    big = big_file(tmp_path)
    small = tmp_path / "small.bin"
    small.write_bytes(big.read_bytes()[:65536])
    pool = BufferPool(1 << 20, 4)
    loader = open_loader("io_uring", pool, block_size=4096, queue_depth=8)
    cache = ExpertCache(pool, loader, lambda key: (str(big), 1 << 20) if key[0] == 9 else (str(small), 65536))
    try:
        loader.spec_window = 2
        cm = CostModel(alpha=1.0)  # each figure is its last sample
        drv = StepDriver(cache, [1], MarkovPrefetcher([1], 4), cm)  # a step judges its own stream's guesses
        assert cache.prefetch((9, 0), owner=drv.owner)
        settle(loader, cache.entries[(9, 0)].ticket)
        drv.step(0, [0, 1])
        assert cache.stats.cancelled_size_bytes == 1 << 20
        assert cm.wrong == 1 and cm.waste_frac == pytest.approx(8192 / (1 << 20))
        loader.spec_window = None
        assert cache.prefetch((9, 1), owner=drv.owner)
        while not loader.ready(cache.entries[(9, 1)].ticket):
            pass
        drv.step(0, [2, 3])
        assert cm.wrong == 2 and cm.waste_frac == 1.0 and cache.stats.prefetch_stale == 1
        cache.drain()
    finally:
        loader.close()
        pool.close()


def test_a_guess_never_evicts_an_expert_its_step_is_about_to_use(window_cache):
    """smoke issues guesses before the step's last expert is computed: that expert, a hit, must not be the victim."""
    cache, loader, pool, big = window_cache
    use(cache, (1, 0), (1, 1), (1, 2))
    asked = []
    assert cache.prefetch((9, 0), admit=lambda v: asked.append(v) or True, keep={(1, 0)})
    assert asked == [(1, 1)] and (1, 0) in cache.entries and (1, 1) not in cache.entries
    cache.drain()


# -- guesses made a token ahead -------------------------------------------------------------------------------
def test_a_guess_for_a_later_step_survives_the_steps_in_between_and_is_used(window_cache):
    cache, loader, pool, big = window_cache
    loader.spec_window, loader.spec_cap_each = 2, False
    assert cache.prefetch((9, 0), due=12)  # made at step 10 for step 12 (the same layer, next token)
    t = cache.entries[(9, 0)].ticket
    for now in (10, 11):  # the steps in between: other layers' experts; the guess is not theirs to judge
        assert cache.cancel_stale(keep={(1, now)}, now=now) == 0
        use(cache, (1, now))
    assert (9, 0) in cache.entries and cache.stats.prefetch_cancelled == cache.stats.prefetch_stale == 0
    assert cache.cancel_stale(keep={(9, 0)}, now=12) == 0  # its step, and it is needed
    slot = cache.acquire((9, 0))
    assert pool.view(slot, 1 << 20).tobytes() == big.read_bytes()
    cache.release((9, 0))
    st = cache.stats
    assert (st.prefetch_used, st.hits, st.misses) == (1, 1, 2) and t.issued == 256


def test_a_guess_is_withdrawn_exactly_when_its_own_step_is_routed_without_it(window_cache):
    cache, loader, pool, big = window_cache
    loader.spec_window, loader.spec_cap_each = 2, False
    assert cache.prefetch((9, 0), due=12)
    assert cache.prefetch((9, 1))  # no due: judged at the next step, as before
    assert cache.cancel_stale(keep=set(), now=11) == 1  # the one without a step; the other's has not come
    assert (9, 0) in cache.entries and (9, 1) not in cache.entries
    assert cache.cancel_stale(keep={(9, 5)}, now=12) == 1  # its step came, routed to another expert
    assert (9, 0) not in cache.entries and cache.stats.prefetch_cancelled == 2
    cache.drain()
    assert len(cache.free) == 3


def test_a_miss_evicts_a_guess_held_for_a_later_step_last(window_cache):
    cache, loader, pool, big = window_cache
    loader.spec_window = None
    assert cache.prefetch((9, 0), due=5)  # the least recently used entry: plain LRU would evict it first
    while not loader.ready(cache.entries[(9, 0)].ticket):
        pass
    use(cache, (1, 0), (1, 1))
    assert list(cache.entries) == [(9, 0), (1, 0), (1, 1)]
    use(cache, (1, 2))  # no free slot: the used expert goes, not the guess still waiting for its step
    assert (9, 0) in cache.entries and (1, 0) not in cache.entries and cache.stats.prefetch_wasted == 0
    assert cache.fetch([(1, 3)]) == 1  # fetch's choice of victim follows the same rule
    assert (9, 0) in cache.entries and (1, 1) not in cache.entries
    cache.acquire((1, 3))
    cache.release((1, 3))


@pytest.mark.parametrize("forgotten", [False, True])
def test_a_guess_is_held_until_its_own_streams_step_not_another_streams(window_cache, forgotten):
    """Each stream counts its own steps. Stream A has passed step 100 while stream B, at its step 10, guesses for
    its step 12: B's guess is held (evicted last) until B's clock passes 12, however far A's has run. (With one
    cache-wide clock, A's 100 made B's guess an ordinary entry at once, the least recently used: a miss evicted it
    before its step.) An owner the cache has forgotten falls back to the highest step any stream has passed."""
    cache, loader, pool, big = window_cache
    loader.spec_window = None
    cache.cancel_stale(keep=set(), now=100, owner="A")
    cache.cancel_stale(keep=set(), now=10, owner="B")
    assert cache.prefetch((9, 0), due=12, owner="B")  # the least recently used entry
    while not loader.ready(cache.entries[(9, 0)].ticket):
        pass
    use(cache, (1, 0), (1, 1))
    if forgotten:
        cache.forget_owner("B")
    use(cache, (1, 2))  # no free slot
    if forgotten:  # judged against A's step 100: its step has passed, it goes first
        assert (9, 0) not in cache.entries and (1, 0) in cache.entries
        return
    assert (9, 0) in cache.entries and (1, 0) not in cache.entries and cache.stats.prefetch_wasted == 0
    assert cache.cancel_stale(keep={(9, 0)}, now=13, owner="B") == 0  # B's step 12 went by without a judgement
    use(cache, (1, 3))
    assert (9, 0) not in cache.entries and cache.stats.prefetch_wasted == 1


def test_a_guess_whose_step_has_passed_is_no_longer_held(window_cache):
    """A caller that never judged a guess at its step (here it kept it) must not have it held, and evicted last,
    for ever: once the cache has seen a later step the guess is an ordinary entry, LRU first."""
    cache, loader, pool, big = window_cache
    loader.spec_window = None
    assert cache.prefetch((9, 0), due=5)
    while not loader.ready(cache.entries[(9, 0)].ticket):
        pass
    use(cache, (1, 0), (1, 1))
    assert cache.cancel_stale(keep={(9, 0)}, now=6) == 0  # its step went by without a judgement
    use(cache, (1, 2))
    assert (9, 0) not in cache.entries and (1, 0) in cache.entries and cache.stats.prefetch_wasted == 1


def test_a_miss_withdraws_a_guess_held_for_a_later_step_last(window_cache):
    """Every idle slot holds a guess still reading: the miss withdraws the one not held for a later step, even
    when the held one is older."""
    cache, loader, pool, big = window_cache
    loader.spec_window = 2
    assert cache.prefetch((9, 0), due=7) and cache.prefetch((9, 1))
    for k in ((9, 0), (9, 1)):
        settle(loader, cache.entries[k].ticket)
    cache.acquire((1, 1))  # the free slot, held
    cache.acquire((1, 2))  # nothing complete is idle: a guess is withdrawn
    cache.release((1, 1))
    cache.release((1, 2))
    assert (9, 0) in cache.entries and (9, 1) not in cache.entries and cache.stats.prefetch_cancelled == 1
    cache.drain()


def test_a_foreground_read_waits_behind_no_more_than_the_window(window_cache):
    """Speculative chunks go only while no foreground chunk is with the disk, at most spec_window at once; a
    foreground read queued while a guess streams goes ahead of every chunk of it not yet issued."""
    cache, loader, pool, big = window_cache
    trace = loader.record_issues()
    loader.spec_window, loader.spec_cap_each = 2, False
    assert cache.prefetch((9, 0), due=3)
    g = cache.entries[(9, 0)].ticket
    while g.issued <= 2:  # each poll reaps what landed and issues what the window allows
        loader.poll()
    assert not g.done  # not stopped at its window: it streams while the disk is idle
    before = loader.spec_in_way
    cache.fetch([(1, 0)])  # a miss
    f = cache.entries[(1, 0)].ticket
    assert loader.spec_in_way - before <= 2  # what the miss found with the disk: the window at most
    events = list(trace)
    queued = next(i for i, ev in enumerate(events) if ev[:2] == ("queued", f.id))
    while not f.done:
        loader.ready(f)
    events = list(trace)
    last = max(i for i, ev in enumerate(events) if ev[:2] == ("issue", f.id))
    assert not any(ev[:2] == ("issue", g.id) for ev in events[queued:last])  # no guess chunk in between
    cache.acquire((1, 0))
    cache.release((1, 0))
    cache.close()


def test_a_background_thread_streams_guesses_while_the_caller_does_not_call(window_cache):
    """io_uring's spec_background: the guess's chunks are reaped and the next issued by the loader's own thread,
    so a guess lands while the caller computes (makes no call into the loader)."""
    import time

    cache, loader, pool, big = window_cache
    loader.spec_window, loader.spec_cap_each, loader.spec_background = 2, False, True
    assert cache.prefetch((9, 0), due=3)
    t = cache.entries[(9, 0)].ticket
    th = loader._background
    assert th is not None
    deadline = time.monotonic() + 60  # a liveness bound, not a timing: without the thread it never completes
    while not t.done and time.monotonic() < deadline and th.is_alive():  # a thread that died fails at once
        time.sleep(0.01)
    assert t.done and t.issued == 256 and loader.bytes_read >= 1 << 20
    slot = cache.acquire((9, 0))
    assert pool.view(slot, 1 << 20).tobytes() == big.read_bytes()
    cache.release((9, 0))
    loader.close()
    assert not th.is_alive()


def test_token_ahead_prefetching_never_changes_results_and_uses_its_guesses(folder):
    """The whole path on real shards: guesses a token ahead, held across the other layers' steps, used at theirs;
    the outputs are those of prefetching off."""
    routes = cycle_routes(folder, 24)
    routes[::5] = routes[::5][:, :, ::-1]
    off, on = [], []
    x = np.random.default_rng(3).standard_normal(folder.model["d_model"]).astype(np.float32)
    for outs, policy in ((off, "none"), (on, "markov")):
        with open_shards(folder.root, cache_slots=4) as s:
            pf = MarkovPrefetcher(folder.layers, folder.model["n_experts"])
            cm = CostModel(alpha=0.0, warmup=0, window=2, chunk_frac=0.01, read_frac=0.0, unit_stall=1.0)
            cm.observe(io_wait_s=0.0, misses=1)
            s.loader.spec_window, s.loader.spec_cap_each = 2, False

            def access(layer, e, before_compute):
                with s.load(layer, e) as ex:
                    if before_compute:
                        before_compute()
                    outs.append(((layer, e), s.compute(ex, x)))

            # odds=False: guesses are read from the first tokens on, before the odds' skill clears keep_trust's bound
            _drive(s.cache, routes, folder.layers, policy, pf, 2, on_access=access, cost=cm, ahead="token", odds=False)
            st = s.cache.stats
            if policy == "markov":
                assert st.prefetch_issued > 0 and st.prefetch_used > 0
                assert len(s.cache.entries) + len(s.cache.free) + len(s.cache._draining) == 4
    assert_same_outputs(on, off, routes)
