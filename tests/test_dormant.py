"""Dormant streams (`StepDriver`, docs/runtime.md "Dormant streams"): while the duel ranks by distance alone and the
gate lets no guess through, a stream's prefetcher bookkeeping waits and is done a batch of steps at a time, with
the step's reads under way. It must change nothing but when that work is done: the same victims, the same tables,
the same duel, no guess left behind; and the stream wakes when the prefetcher has something to give.

Replays through the real cache, prefetcher, gate and duel with the I/O-free loader, and `moe()` on a real shard
folder; no timing is asserted.
"""

from __future__ import annotations

import numpy as np
import pytest

from mer_runtime import open_shards
from mer_runtime.buffers import BufferPool
from mer_runtime.cache import ExpertCache
from mer_runtime.prefetch import CostModel, MarkovPrefetcher
from mer_runtime.smoke import make_routes
from mer_runtime.stepper import DORMANT_BATCH, DORMANT_WAIT, NullLoader, PrefetchConfig, StepDriver, dormant_idle

from test_shardset_prefetch import drive, folder  # noqa: F401  (the module's shard folder fixture)


class Shape:
    layers = [0, 1, 2, 3]
    model = {"n_experts": 8, "n_experts_used": 2}


def cycle(tokens: int, offset: int = 0) -> np.ndarray:
    """A learnable trace: each layer's pair of experts follows a 3-step cycle (24 keys for 16 slots)."""
    return np.array([[[(t % 3) * 2 + li % 2, ((t % 3) * 2 + 1 + li % 2) % 8] for li in range(4)]
                     for t in range(offset, offset + tokens)])


def driver(batch: int | None, ahead: str = "step", odds: bool = True, cache: ExpertCache | None = None):
    pool = None
    if cache is None:
        pool = BufferPool(4096, 16)
        cache = ExpertCache(pool, NullLoader(pool), lambda key: ("", 4096), layers=Shape.layers)
    cost = CostModel(unit_stall=1.0, window=32, window_frac=1.0)
    return pool, cache, StepDriver(cache, Shape.layers, MarkovPrefetcher(Shape.layers, 8), cost, batch=batch,
                                   ahead=ahead, odds=odds)


@pytest.mark.parametrize("seed", range(3))
def test_a_dormant_stream_decides_as_an_awake_one_and_learns_the_same(seed):
    """Uniform routing: nothing to learn, the stream falls dormant after `dormant_idle` steps. Against a stream
    that never does (batch 0), step by step: the same hits and the same experts cached; once caught up, the same
    tables, the same trust fit and the same duel."""
    routes = make_routes(Shape, "uniform", 60, seed)
    runs = [driver(None), driver(0)]
    try:
        for t in range(routes.shape[0]):
            for li in range(4):
                for _, cache, drv in runs:
                    drv.step(li, routes[t, li])
                (_, c1, _), (_, c0, _) = runs
                assert (c1.stats.hits, list(c1.entries)) == (c0.stats.hits, list(c0.entries)), (t, li)
        (_, _, d1), (_, _, d0) = runs
        assert d1.dormant_steps >= 240 - dormant_idle(4) - DORMANT_WAIT * DORMANT_BATCH and d0.dormant_steps == 0
        assert 0 <= 240 - d1.pf.clock < DORMANT_WAIT * DORMANT_BATCH  # the last steps wait for a batch ...
        d1.catch_up()  # ... until asked
        for name in ("same", "same_n", "cross", "cross_n", "seen", "steps"):
            assert np.array_equal(getattr(d1.pf, name), getattr(d0.pf, name)), name
        assert d1.pf.clock == d0.pf.clock == 240 and d1.pf._fit == d0.pf._fit
        assert [s.hits for s in d1.duel.shadows] == [s.hits for s in d0.duel.shadows]
        assert d1.stats()["duel_odds"] == d0.stats()["duel_odds"] is False
    finally:
        for pool, _, drv in runs:
            drv.close()
            pool.close()


def test_a_dormant_stream_wakes_when_the_odds_win_and_guesses_pay():
    """Uniform, then a learnable cycle: the dormant stream wakes within a few batches of the change, and then stays
    awake: its duel ranks with the odds, its gate admits guesses, and it hits as often as a stream never dormant."""
    routes = np.concatenate([make_routes(Shape, "uniform", 20, 1), cycle(60)])
    pool, cache, drv = driver(None)
    pool0, cache0, drv0 = driver(0)
    try:
        at = {}
        for t in range(80):
            for li in range(4):
                drv.step(li, routes[t, li])
                drv0.step(li, routes[t, li])
            at[t] = (drv.dormant_steps, cache.stats.hits, cache0.stats.hits)
        assert at[19][0] > 0  # dormant during the uniform part
        assert at[79][0] == at[39][0]  # awake from token 40 on
        assert drv.stats()["duel_odds"] and drv.cost.admitted > 0  # type: ignore[union-attr]
        late, late0 = at[79][1] - at[39][1], at[79][2] - at[39][2]
        assert late >= 0.98 * late0 and late > 0.8 * 40 * 8
    finally:
        for d, p in ((drv, pool), (drv0, pool0)):
            d.close()
            p.close()


@pytest.mark.parametrize("ahead", ["step", "token"])
def test_a_stream_falls_dormant_with_no_guess_of_its_own_left(ahead):
    """Guesses while the trace is learnable, then uniform routing: by the time the stream falls dormant, every guess
    it issued has met its step (a token ahead included): none is left unused, undemoted, for no one to judge."""
    routes = np.concatenate([cycle(8), make_routes(Shape, "uniform", 100, 2)])  # dormant from token 59
    pool, cache, drv = driver(None, ahead)
    try:
        went = False
        for t in range(routes.shape[0]):
            for li in range(4):
                drv.step(li, routes[t, li])
                if drv._backlog is not None:
                    went = True
                    live = [e.key for e in cache.entries.values()
                            if e.owner is drv.owner and e.prefetched and not e.used and not e.stale]
                    assert not live, (t, li, live)
        assert went and drv.own.prefetch_issued > 30
    finally:
        drv.close()
        pool.close()


@pytest.mark.parametrize("batch", [0, None])
def test_a_guess_issued_at_a_catch_up_step_is_due_when_an_awake_streams_would_be(batch):
    """A token-ahead guess issued at step s is for the same layer of the next token: due at s + L on the
    prefetcher's clock. A stream woken by its gate issues its first guesses at the catch-up step, which has already
    observed that step: they were due one step late (a wrong one neither judged at its step nor evictable there).
    With the odds off the gate alone wakes the stream, so the catch-up step issues guesses."""
    routes = np.concatenate([make_routes(Shape, "uniform", 20, 1), cycle(60)])
    pool, cache, drv = driver(batch, "token", odds=False)
    L, seen, bad = len(Shape.layers), set(), []
    try:
        for t in range(routes.shape[0]):
            for li in range(L):
                drv.step(li, routes[t, li])
                for e in cache.entries.values():
                    if e.owner is drv.owner and e.prefetched and id(e) not in seen:
                        seen.add(id(e))
                        if e.due != t * L + li + L:
                            bad.append((t, li, e.key, e.due, t * L + li + L))
        assert len(seen) > 10 and not bad, bad[:5]
        assert (drv.dormant_steps > 0) == (batch is None)
    finally:
        drv.close()
        pool.close()


@pytest.mark.parametrize("dormant", [True, False])
def test_with_two_streams_a_dormant_step_leaves_the_slope_as_an_awake_one_does(dormant):
    """Two streams on one cache: B learns a cycle and ranks with its odds (a slope above 0), A routes uniformly
    and is dormant. The cache keeps one slope, the latest step's: an awake A on distance sets it to 0 at each of
    its steps, and so must a dormant A (the layers' odds arrays may differ: docs/runtime.md, "Dormant streams")."""
    routes_a, routes_b = make_routes(Shape, "uniform", 60, 4), cycle(60)
    pool, cache, a = driver(None if dormant else 0)
    _, _, b = driver(0, cache=cache)
    try:
        slopes = set()
        for t in range(60):
            for li in range(4):
                b.step(li, routes_b[t, li])
                slopes.add(cache._odds_ab[1] > 0)
                a.step(li, routes_a[t, li])
                assert cache._odds_ab[1] == 0.0, (t, li)
        assert True in slopes and (a.dormant_steps > 0) == dormant
    finally:
        a.close()
        b.close()
        pool.close()


def test_moe_reports_its_dormant_steps_and_decides_as_an_awake_stream(folder):  # noqa: F811
    """Through `ShardSet.moe()` on real shards: a uniform trace leaves the stream dormant most of the time
    (`prefetch_stats()["dormant_steps"]`), with the same hits, misses and reads as a stream that never falls
    dormant (`PrefetchConfig(dormant=False)`), and results byte-identical to prefetching off."""
    routes = make_routes(folder, "uniform", 40, 5)
    with open_shards(folder.root, cache_slots=3) as off:
        want = drive(off, folder, routes)
    runs = {}
    for dormant in (True, False):
        with open_shards(folder.root, cache_slots=3, prefetch=PrefetchConfig(dormant=dormant)) as on:
            got = drive(on, folder, routes)
            runs[dormant] = (on.prefetch_stats(), on.cache.stats.as_dict())
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    (st, cs), (st0, cs0) = runs[True], runs[False]
    assert st["dormant_steps"] > 0 and st0["dormant_steps"] == 0 and st["admitted"] == st0["admitted"] == 0
    assert cs == cs0
    # every call is a step whose driver's own time (its work but the reads and the kernel) is counted
    assert st["steps"] == st0["steps"] == routes.shape[0] * len(folder.layers) and st["own_s"] > 0


def test_a_stream_with_a_shared_duel_never_falls_dormant():
    """A duel shared by several streams (`duel=`) must see each stream's steps in order: a stream with one does
    its bookkeeping at every step."""
    from mer_runtime.stepper import OddsDuel

    routes = make_routes(Shape, "uniform", 30, 0)
    pool = BufferPool(4096, 16)
    cache = ExpertCache(pool, NullLoader(pool), lambda key: ("", 4096), layers=Shape.layers)
    drv = StepDriver(cache, Shape.layers, MarkovPrefetcher(Shape.layers, 8), duel=OddsDuel(Shape.layers, 16))
    try:
        for t in range(30):
            for li in range(4):
                drv.step(li, routes[t, li])
        assert drv.dormant_steps == 0 and drv.pf.clock == 120
    finally:
        drv.close()
        pool.close()


def test_an_interrupted_catch_up_loses_at_most_the_step_under_way(monkeypatch):
    """Ctrl-C in the middle of a catch-up: the steps not yet observed stay in the backlog for the next one (they
    were all dropped with it)."""
    routes = make_routes(Shape, "uniform", 30, 0)
    pool, cache, drv = driver(None)
    try:
        for t in range(30):
            for li in range(4):
                drv.step(li, routes[t, li])
        drv.catch_up()
        for li in range(4):
            drv.step(li, routes[0, li])
        assert drv._backlog is not None and len(drv._backlog) == 4
        real, calls = drv.pf.observe, []

        def observe(li, experts):
            calls.append(li)
            if len(calls) == 2:
                raise KeyboardInterrupt
            real(li, experts)

        monkeypatch.setattr(drv.pf, "observe", observe)
        with pytest.raises(KeyboardInterrupt):
            drv.catch_up()
        monkeypatch.undo()
        assert [li for li, _ in drv._backlog] == [2, 3]  # the one under way is lost, the two after it are kept
        drv.step(0, routes[1, 0])  # and come first, in their order
        assert [li for li, _ in drv._backlog] == [2, 3, 0]
        drv.catch_up()
        assert drv.pf.clock == 120 + 4 and not drv._backlog
    finally:
        drv.close()
        pool.close()
