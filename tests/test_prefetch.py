"""The Markov prefetcher learns transitions; its hit rate is reported beside no-prefetch and an oracle."""

from __future__ import annotations

import numpy as np
import pytest

from mer_runtime import load_manifest
from mer_runtime.prefetch import CostModel, MarkovPrefetcher
from mer_runtime.smoke import SmokeConfig, compare_policies, make_routes

from conftest import GEN


def test_learns_same_layer_and_cross_layer_transitions():
    pf = MarkovPrefetcher([1, 2], 256, threshold_scale=2.0)
    assert pf.threshold == pytest.approx(2 / 256)  # reachable with hundreds of experts
    for _ in range(5):  # token pattern: layer 1 -> [3, 7], layer 2 -> [100, 200], every token
        pf.observe(0, [3, 7])
        target, cands = pf.predict(0)
        pf.observe(1, [100, 200])
    assert (target, sorted(cands)) == (1, [100, 200])
    target, cands = pf.predict(1)  # after the last layer: the first layer of the next token
    assert (target, sorted(cands)) == (0, [3, 7])


def test_nothing_predicted_without_evidence():
    pf = MarkovPrefetcher([0, 1], 8)
    pf.observe(0, [1, 2])
    assert pf.predict(0) == (1, [])


def test_threshold_filters_rare_transitions():
    pf = MarkovPrefetcher([0], 4, threshold_scale=2.0)  # threshold 0.5
    seq = [[0], [1], [0], [1], [0], [2], [0], [1]]
    for s in seq:
        pf.observe(0, s)
    _, cands = pf.predict(0)  # from [1]: always -> [0]
    assert cands == [0]
    pf.observe(0, [0])
    _, cands = pf.predict(0)  # from [0]: [1] 3 times of 4 (0.75) passes, [2] 1 of 4 (0.25) does not
    assert cands == [1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from mertools import extract

    out = tmp_path_factory.mktemp("pf") / "m"
    extract(GEN / "moe-merged-q4_0.gguf", out, fsync=False)
    return load_manifest(out)


def test_policy_comparison_on_a_learnable_trace(manifest):
    # a cycle longer than the cache: LRU alone misses every time; the pattern is fully learnable
    cycle = [[0, 1], [2, 3], [1, 2], [3, 0]]
    routes = np.array([[cycle[t % 4], cycle[(t + 1) % 4]] for t in range(400)])
    r = compare_policies(manifest, routes, 3, SmokeConfig(max_inflight=2))
    assert r["none"]["hit_rate"] < 0.3
    assert r["markov"]["hit_rate"] > r["none"]["hit_rate"] + 0.3
    assert r["oracle"]["hit_rate"] >= r["markov"]["hit_rate"] - 0.05
    assert r["markov"]["prefetch_issued"] > 0 and r["none"]["prefetch_issued"] == 0


@pytest.mark.parametrize("workload", ["zipf", "markov", "uniform", "router"])
def test_the_gated_replay_never_loses_hits(manifest, workload):
    """Replayed without I/O through the same gate, victim and calibration code as a real run, prefetching does not
    lower the hit rate: a wrong guess read whole is demoted when found wrong, a guess never evicts an expert its
    own step is about to use, and a victim likelier to be needed than the guess is worth is kept. (With 2 x 4
    experts top-2, a base rate of 1/2, many guesses pay here; the bench model's wasted reads are in the README.)

    Over several traces: on a model of 2 x 4 experts in 5 slots one guess's victim is a large share of the cache,
    and changes the rest of a trace. On router, one or two guesses a trace moved single traces by -17 to +26 hits
    of 1,600 over 20 seeds, with or without dormant streams, around a mean of -1 to -2: one trace is a coin flip,
    the mean over traces is what prefetching does."""
    diffs, issued = [], 0
    for seed in (7, 8, 9):
        routes = make_routes(manifest, workload, 400, seed)
        r = compare_policies(manifest, routes, 5, SmokeConfig())
        diffs.append((r["markov"]["hits"] - r["none"]["hits"]) / routes.size)
        issued += r["markov"]["prefetch_issued"]
    assert sum(diffs) / len(diffs) >= -0.005 and min(diffs) >= -0.015, diffs
    if workload == "uniform":  # nothing to learn: the odds never show skill (keep_trust's slope stays 0), no guess
        assert issued == 0
    else:
        assert issued > 0  # not by refusing everything: guesses pay on this small model


@pytest.mark.parametrize("workload", ["zipf", "markov", "uniform", "router"])
def test_workloads_are_seeded_and_valid(manifest, workload):
    a = make_routes(manifest, workload, 200, 5)
    b = make_routes(manifest, workload, 200, 5)
    assert a.shape == (200, 2, 2) and (a == b).all()
    assert ((a >= 0) & (a < 4)).all()
    assert all(len(set(row)) == 2 for tok in a for row in tok)  # k distinct experts per layer
    assert not (make_routes(manifest, workload, 200, 6) == a).all()


def test_cost_model_admits_a_guess_only_when_it_pays():
    """Decisions from given measurements (no clocks):
    q x landed x stall > (1 - q) x (waste x stall x miss_step + p_victim x stall)."""
    cm = CostModel(alpha=0.5, warmup=4, window_frac=1.0, window=8)
    assert not cm.admit(1.0)  # nothing measured yet: no speculation
    # every step misses and stalls 9 ms; priors: a guess reads (and a right one lands) a whole expert
    for _ in range(4):
        cm.observe(io_wait_s=0.009, misses=1)
    assert (cm.stall_s, cm.miss_step, cm.gain_s, cm.loss_s) == pytest.approx((0.009, 1.0, 0.009, 0.009))
    assert [cm.admit(p) for p in (0.3, 0.5, 0.6)] == [False, False, True]  # pays only above even odds
    # right guesses were needed with 40% landed; wrong ones had read 10%: break-even q = 0.1 / (0.4 + 0.1)
    for _ in range(20):
        cm.observe_used(0.4)
        cm.observe_stale(0.1, 0.0)
    assert (cm.landed_frac, cm.waste_frac) == pytest.approx((0.4, 0.1), abs=1e-4)
    assert (cm.right, cm.wrong) == (20, 20)
    assert [cm.admit(p) for p in (0.19, 0.21)] == [False, True]
    # the slot it would take holds an expert needed with probability 0.3 at its next step: break-even q = 0.4/0.8
    assert [cm.admit(0.49, p_victim=0.3), cm.admit(0.51, p_victim=0.3)] == [False, True]
    # an expert certain to be needed next is not evicted for an even-odds guess
    assert not cm.admit(0.5, p_victim=1.0)
    # ... unless its layer comes after a step that misses (every step does here): that miss would evict it anyway
    assert cm.admit(0.3, p_victim=1.0, victim_steps=2)
    # steps without foreground reads: nothing for a wrong guess to delay
    for _ in range(20):
        cm.observe(io_wait_s=0.0, misses=0)
    assert cm.miss_step < 1e-4 and cm.admit(0.01)
    assert (cm.admitted, cm.refused) == (5, 6)


def test_the_victim_is_priced_at_its_uncalibrated_odds_at_least():
    """The calibration is measured on uncached guesses that cleared the threshold (they overshoot); a victim is a
    cached expert, likelier than its estimate: scaling its odds by a calibration below 1 made a warm expert cheap
    to evict (1.3-2x too low on zipf, markov and uniform traces)."""
    pf = MarkovPrefetcher([0, 1], 8)
    for _ in range(20):  # nothing predicted, nothing scored: the pessimistic start, 0.5
        pf.observe(0, [1, 2])
        pf.observe(1, [5, 6])
    assert pf.calibration == 0.5
    raw = float(pf._raw(1)[5])  # 5 followed 5 in 19 of 19 steps
    assert raw > 0.9 and pf.prob_next(1, 5) == pytest.approx(raw)
    cm = CostModel(warmup=1, window_frac=0.5)
    cm.observe(io_wait_s=0.5, misses=5)  # gain = loss = 0.05 s: q = 0.7 pays only with p_victim below 2/3
    assert not cm.admit(0.7, pf.prob_next(1, 5))  # a victim needed nine times in ten is kept
    assert cm.admit(0.7, raw * pf.calibration)  # the old pricing (0.46) gave it away
    # a calibration above 1 (estimates too modest) still scales the victim up
    pf.predicted, pf.came_true = 10.0, 20.0
    assert pf.calibration > 1 and pf.prob_next(1, 5) == pytest.approx(min(1.0, raw * pf.calibration))


def test_one_sighting_is_weak_evidence_and_many_are_strong():
    """Estimates are shrunk towards the base rate: (count + a x base) / (sightings + a), a = 2."""
    pf = MarkovPrefetcher([0], 8)
    pf.observe(0, [1, 2])
    pf.observe(0, [3, 4])  # [1, 2] -> [3, 4], seen once
    pf.observe(0, [1, 2])
    base = (1 + 2 * 2 / 8) / (3 + 2)  # expert 3: chosen in 1 of 3 steps, shrunk towards k / n = 2 / 8
    assert pf._raw(0)[3] == pytest.approx((1 + 2 * base) / (1 + 2))  # about 0.43, not 1.0
    for _ in range(30):
        pf.observe(0, [3, 4])
        pf.observe(0, [1, 2])
    assert pf._raw(0)[3] > 0.9


def test_calibration_starts_pessimistic_and_follows_what_came_true():
    pf = MarkovPrefetcher([0], 4, threshold_scale=1.0)
    assert pf.calibration == 0.5  # no record yet: every estimate is halved
    for _ in range(50):  # [0] -> [1] always: every prediction comes true
        pf.observe(0, [0])
        pf.predict_scored(0)
        pf.observe(0, [1])
        pf.predict_scored(0)
    assert pf.calibration > 1.0  # the shrunk estimates were too modest for this trace
    _, scored = pf.predict_scored(0)
    assert scored[0][0] == 0 and scored[0][1] > 0.95  # (one standard deviation below its estimate)
    wrong = MarkovPrefetcher([0], 4, threshold_scale=1.0)
    rng = np.random.default_rng(0)
    for _ in range(200):  # uniformly random: what one sighting suggests rarely comes true
        wrong.observe(0, [int(rng.integers(4))])
        wrong.predict_scored(0)
    assert wrong.predicted > 0 and wrong.calibration < 0.8
    # an expert already cached is neither predicted nor scored
    _, scored = pf.predict_scored(0, cached={0})
    assert scored == [] and pf._pending[0] == []


def test_the_window_grows_while_guesses_land_in_time_and_halves_when_not():
    cm = CostModel(window=32)
    cm.window = 4
    for _ in range(3):
        cm.observe_stale(0.05, 0.0)
    assert cm.window == 7
    cm.observe_stale(0.05, 0.01)  # found with chunks still in flight: it took disk time from the next step
    assert cm.window == 3
    for _ in range(100):
        cm.observe_stale(0.05, 0.0)
    assert cm.window == 32  # never past the loader's queue


def test_predictions_carry_their_probabilities():
    pf = MarkovPrefetcher([0], 4, threshold_scale=1.0)  # candidates: estimates >= 1/4
    for s in [[0], [1], [0], [1], [0], [2], [0]]:
        pf.observe(0, s)
    target, scored = pf.predict_scored(0)
    # from [0]: [1] twice in 3, [2] once; base rates (2 + 0.5) / 9 and (1 + 0.5) / 9; calibration 0.5 at first;
    # the gate is given each estimate one standard deviation (3 sightings + 2 pseudo-sightings) below
    p1, p2 = (2 + 2 * 2.5 / 9) / 5, (1 + 2 * 1.5 / 9) / 5
    q1, q2 = (p - np.sqrt(p * (1 - p) / 6) for p in (p1, p2))
    assert target == 0 and scored == [(1, pytest.approx(q1 / 2)), (2, pytest.approx(q2 / 2))]
    assert pf.predict(0) == (0, [1, 2])


def test_a_replay_gated_at_a_fixed_stall_issues_guesses_and_loses_no_hits(manifest):
    """The replay with a cost model whose stall stays as first measured (NullLoader's steps take no time): guesses
    are read on this learnable cycle, and the hits never fall below no prefetch."""
    from mer_runtime.buffers import BufferPool
    from mer_runtime.cache import ExpertCache
    from mer_runtime.smoke import NullLoader, _drive

    cycle = [[0, 1], [2, 3], [1, 2], [3, 0]]
    routes = np.array([[cycle[t % 4], cycle[(t + 1) % 4]] for t in range(100)])
    results = {}
    for name in ("none", "gated"):
        pool = BufferPool(4096, 3)
        cache = ExpertCache(pool, NullLoader(pool), lambda key: ("", 4096))
        cm = CostModel(warmup=0)
        cm.observe(io_wait_s=1.0, misses=1)
        cm.observe = lambda *a: None  # keep the measured stall (NullLoader's steps take no time)
        pf = MarkovPrefetcher(manifest.layers, 4)
        _drive(cache, routes, manifest.layers, "markov" if name != "none" else "none", pf, 2, cost=cm)
        results[name] = cache.stats.as_dict()
    assert results["none"]["prefetch_issued"] == 0
    assert results["gated"]["prefetch_issued"] > 0
    assert results["gated"]["hits"] >= results["none"]["hits"]


def test_a_token_ahead_prediction_uses_the_same_layer_table():
    """After layer 0 of token t: layer 0 of token t+1, whatever layer 1 does in between (a guess made a whole token
    before it is needed); scored against that step when it comes."""
    pf = MarkovPrefetcher([0, 1], 8)
    assert pf.predict_token_ahead(0) == []  # no evidence yet
    for t in range(12):
        pf.observe(0, [1, 2] if t % 2 else [3, 4])
        pf.predict_token_ahead(0)
        pf.observe(1, [t % 8, (t + 1) % 8])
    assert pf.clock == 24  # steps observed: the clock `ExpertCache.prefetch(due=...)` runs on
    pf.observe(0, [1, 2])
    assert sorted(e for e, _ in pf.predict_token_ahead(0)[:2]) == [3, 4]  # ranked first (1, 2: their base rate)
    ahead = pf.predict_token_ahead(0, cached={3})
    assert ahead[0][0] == 4 and 3 not in [e for e, _ in ahead]  # a cached expert is not guessed
    before = pf.came_true
    pf.observe(1, [0, 5])  # layer 1 in between scores nothing of layer 0's guess
    assert pf.came_true == before
    pf.observe(0, [3, 4])
    assert pf.came_true == before + 1  # of the guesses for this step (3 was cached), 4 came true


def test_an_idle_time_guess_is_priced_at_what_it_costs_the_foreground_and_the_computation():
    """Given measurements (no clocks): q x landed x stall > in_way x chunk_frac x stall + read_s + p_victim x stall,
    the read priced at a whole miss until computations beside a guess have been measured (no exploration here)."""
    cm = CostModel(alpha=0.0, warmup=2, window_frac=1.0, window=4, chunk_frac=0.01, expert_bytes=100 << 20,
                   explore_frac=0.0)
    cm.observe(io_wait_s=0.1, misses=1)
    cm.observe(io_wait_s=0.1, misses=1)  # stall 0.1 s, every step misses
    assert not cm.pays(0.99)  # a read priced at a whole miss never pays
    cm.observe_compute(0.010, 0, False)
    for _ in range(2):
        cm.observe_compute(0.010, 10 << 20, True)  # a guess landing costs the computation nothing here
    assert cm.read_s == 0.0
    assert cm.loss_s == pytest.approx(4 * 0.01 * 0.1)  # a window in the way per guess until measured
    assert cm.pays(0.05) and not cm.pays(0.03)
    cm.observe_in_way(chunks=0, guesses=96)  # 100 guesses' worth of evidence: nothing was in the way
    assert cm.in_way == pytest.approx(16 / 100) and cm.pays(0.01)
    cm.observe_in_way(chunks=0, guesses=96)  # running totals, read once a step: the same totals again add nothing
    assert cm.in_way == pytest.approx(16 / 100)
    cm.observe_in_way(chunks=8, guesses=100)  # since then 4 more guesses found 8 chunks in the way
    assert cm.in_way == pytest.approx((8 + 16) / 104)
    assert not cm.pays(0.5, p_victim=0.6)  # the victim is priced even for a right guess
    cm.alpha = 1.0
    cm.observe_compute(0.015, 25 << 20, True)  # 25 MiB landing beside a guess cost 5 ms: 20 ms a 100 MiB read
    assert cm.read_s == pytest.approx(0.020)
    assert not cm.pays(0.2) and cm.pays(0.21)
    fixed = CostModel(warmup=0, chunk_frac=0.01, read_frac=0.5, unit_stall=1.0)  # the replay's: half a miss
    fixed.observe(io_wait_s=0.0, misses=1)
    assert fixed.read_s == 0.5


def test_the_token_ahead_replay_gains_on_a_learnable_trace_and_never_loses(manifest):
    cycle = [[0, 1], [2, 3], [1, 2], [3, 0]]
    routes = np.array([[cycle[t % 4], cycle[(t + 1) % 4]] for t in range(400)])
    # 4 slots: one guess held across the other layer's step (held guesses are evicted last: 0% used otherwise)
    r = compare_policies(manifest, routes, 4, SmokeConfig(max_inflight=2), chunk_frac=0.01, read_frac=0.0)
    assert r["markov"]["hit_rate"] > r["none"]["hit_rate"] + 0.15
    assert r["markov"]["prefetch_used"] > 0.9 * r["markov"]["prefetch_issued"]
    for workload in ("zipf", "markov", "uniform", "router"):
        routes = make_routes(manifest, workload, 400, 7)
        r = compare_policies(manifest, routes, 5, SmokeConfig(), chunk_frac=0.01, read_frac=0.0)
        assert r["markov"]["hits"] >= r["none"]["hits"] - 0.005 * routes.size, workload
        priced = compare_policies(manifest, routes, 5, SmokeConfig(), chunk_frac=0.01, read_frac=1.0)
        assert priced["markov"]["prefetch_issued"] == 0, workload  # a read that costs a miss never pays


def _reference_estimate(routes: np.ndarray, t: int, li: int, j: int, n_experts: int, a: float = 2.0) -> np.ndarray:
    """[2, E] from the trace alone, recounted from scratch (the module docstring's estimator): after observing
    layer index li of token t, P(e at layer index j's next step) and one standard deviation below it, the best over
    the sources: layer j's own step of token t if seen (same-layer table), else layer j at token t-1 (same-layer)
    and layer j-1 at token t (cross-layer)."""
    T, L, k = routes.shape
    done = [(u, lj) for u in range(T) for lj in range(L) if (u, lj) <= (t, li)]
    steps = sum(1 for _u, lj in done if lj == j)
    seen = np.zeros(n_experts)
    for u, lj in done:
        if lj == j:
            seen[routes[u, lj]] += 1
    base = (seen + a * min(1.0, k / n_experts)) / (steps + a)

    def rows(table: str, sources) -> list[tuple[np.ndarray, float]]:
        out = []
        for s in sources:
            c, n = np.zeros(n_experts), 0.0
            for u, lj in done:
                if lj != j:
                    continue
                before = routes[u - 1, j] if table == "same" else routes[u, j - 1]
                if (table == "same" and u == 0) or (table == "cross" and j == 0) or s not in before:
                    continue
                c[routes[u, j]] += 1
                n += 1
            out.append((c, n))
        return out

    if (t, j) in done:
        src = rows("same", routes[t, j])
    else:
        src = (rows("same", routes[t - 1, j]) if t > 0 else []) + (rows("cross", routes[t, j - 1]) if j > 0 else [])
    if not src:
        return np.stack([base, base])
    est = np.array([(c + a * base) / (n + a) for c, n in src])
    sd = np.sqrt(est * (1 - est) / np.array([[n + a + 1] for _c, n in src]))
    return np.stack([est.max(axis=0), (est - sd).max(axis=0)])


@pytest.mark.parametrize("workload", ["markov", "zipf"])
def test_the_estimates_equal_a_recount_of_the_trace_at_every_step(manifest, workload):
    """The tables are updated incrementally and each layer's estimate is computed once per observation (reused by
    keep_odds, predict_scored and prob_next): at every step, for every layer, they must equal the estimator
    recomputed from the routes seen so far."""
    E = manifest.model["n_experts"]
    L = len(manifest.layers)
    routes = make_routes(manifest, workload, 12, seed=3)
    pf = MarkovPrefetcher(manifest.layers, E)
    for t in range(routes.shape[0]):
        for li in range(L):
            pf.observe(li, [int(e) for e in routes[t, li]])
            for j in range(L):
                ref = _reference_estimate(routes, t, li, j, E)
                np.testing.assert_allclose(pf.keep_odds(j), ref[0], rtol=0, atol=1e-12)
                assert pf.prob_next(j, 1) == pytest.approx(min(1.0, ref[0][1] * max(1.0, pf.calibration)), abs=1e-12)
            target, scored = pf.predict_scored(li)
            if scored:
                ref = _reference_estimate(routes, t, li, target, E)
                q = np.minimum(1.0, np.maximum(0.0, ref[1]) * pf.calibration)
                assert [e for e, _ in scored] == sorted((e for e, _ in scored), key=lambda e: -q[e])
                assert [p for _, p in scored] == pytest.approx([q[e] for e, _ in scored], abs=1e-12)


def test_handed_out_odds_are_read_only_and_an_observation_gives_fresh_ones():
    """The cache keeps the arrays it is given (`ExpertCache.set_odds`): one handed out must never change later."""
    pf = MarkovPrefetcher([0, 1], 4)
    pf.observe(0, [1, 2])
    v = pf.keep_odds(1)
    before = v.copy()
    with pytest.raises(ValueError):
        v[0] = 1.0
    pf.observe(1, [3, 0])
    pf.observe(0, [1, 2])
    assert pf.keep_odds(1) is not v and not np.array_equal(pf.keep_odds(1), before)
    np.testing.assert_array_equal(v, before)


def test_an_observation_out_of_range_is_refused_before_anything_changes():
    pf = MarkovPrefetcher([0, 1], 4)
    pf.observe(0, [1, 2])
    pf.observe(1, [3, 0])
    pf.observe(0, [1, 2])
    pf.keep_odds(1)  # handed out: the next observation of layer index 1 scores it into the fit
    state = (pf.clock, list(pf._fit), pf.same.copy(), pf.same_n.copy(), pf.cross.copy(), pf.seen.copy(),
             pf.steps.copy(), list(pf.cur_token), pf.keep_trust(), pf.keep_odds(0).copy())
    for li, experts in ((1, [3, 9]), (1, [-1]), (2, [0])):
        with pytest.raises(IndexError, match="expert ids in"):
            pf.observe(li, experts)
    after = (pf.clock, list(pf._fit), pf.same, pf.same_n, pf.cross, pf.seen, pf.steps, list(pf.cur_token),
             pf.keep_trust(), pf.keep_odds(0))
    for x, y in zip(state, after):
        np.testing.assert_array_equal(np.asarray(x, dtype=object), np.asarray(y, dtype=object))


def test_changing_the_prior_or_the_bound_applies_at_once():
    """The estimates and the trust fit are computed once per observation: a changed knob must not be ignored."""
    pf = MarkovPrefetcher([0, 1], 4)
    low_z, big_prior = MarkovPrefetcher([0, 1], 4, keep_z=0.0), MarkovPrefetcher([0, 1], 4, prior=50.0)
    for p in (pf, low_z, big_prior):  # the counts, and with the same prior the odds handed out, are the same
        for t in range(8):
            p.observe(0, [1, 2] if t % 3 else [0, 3]); p.keep_odds(1); p.observe(1, [3, 0]); p.keep_odds(0)
    assert pf.keep_trust() != low_z.keep_trust()
    pf.keep_z = 0.0
    assert pf.keep_trust() == low_z.keep_trust()
    assert not np.array_equal(pf.keep_odds(1), big_prior.keep_odds(1))
    pf.prior = 50.0
    np.testing.assert_array_equal(pf.keep_odds(1), big_prior.keep_odds(1))
