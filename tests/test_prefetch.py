"""The Markov prefetcher learns transitions; its hit rate is reported beside no-prefetch and an oracle."""

from __future__ import annotations

import numpy as np
import pytest

from mer_runtime import load_manifest
from mer_runtime.prefetch import MarkovPrefetcher
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
def test_workloads_are_seeded_and_valid(manifest, workload):
    a = make_routes(manifest, workload, 200, 5)
    b = make_routes(manifest, workload, 200, 5)
    assert a.shape == (200, 2, 2) and (a == b).all()
    assert ((a >= 0) & (a < 4)).all()
    assert all(len(set(row)) == 2 for tok in a for row in tok)  # k distinct experts per layer
    assert not (make_routes(manifest, workload, 200, 6) == a).all()
