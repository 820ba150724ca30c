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
from mer_runtime.stepper import DORMANT_BATCH, DORMANT_WAIT, NullLoader, StepDriver, dormant_idle

from test_shardset_prefetch import drive, folder  # noqa: F401  (the module's shard folder fixture)


class Shape:
    layers = [0, 1, 2, 3]
    model = {"n_experts": 8, "n_experts_used": 2}


def cycle(tokens: int, offset: int = 0) -> np.ndarray:
    """A learnable trace: each layer's pair of experts follows a 3-step cycle (24 keys for 16 slots)."""
    return np.array([[[(t % 3) * 2 + li % 2, ((t % 3) * 2 + 1 + li % 2) % 8] for li in range(4)]
                     for t in range(offset, offset + tokens)])


def driver(batch: int | None, ahead: str = "step"):
    pool = BufferPool(4096, 16)
    cache = ExpertCache(pool, NullLoader(pool), lambda key: ("", 4096), layers=Shape.layers)
    cost = CostModel(unit_stall=1.0, window=32, window_frac=1.0)
    return pool, cache, StepDriver(cache, Shape.layers, MarkovPrefetcher(Shape.layers, 8), cost, batch=batch,
                                   ahead=ahead)


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


def test_moe_reports_its_dormant_steps_and_results_do_not_change(folder):  # noqa: F811
    """Through `ShardSet.moe()` on real shards: a uniform trace leaves the stream dormant most of the time
    (`prefetch_stats()["dormant_steps"]`), with results byte-identical to prefetching off."""
    routes = make_routes(folder, "uniform", 40, 5)
    with open_shards(folder.root, cache_slots=3) as off:
        want = drive(off, folder, routes)
    with open_shards(folder.root, cache_slots=3, prefetch=True) as on:
        got = drive(on, folder, routes)
        st = on.prefetch_stats()
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert st["dormant_steps"] > 0 and st["admitted"] == 0
