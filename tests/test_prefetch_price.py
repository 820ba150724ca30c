"""The price of a speculative read a token ahead: learned from computations beside a guess's read, per MiB,
pessimistic until measured, with a bounded exploration budget.

The cost model is fed synthetic observations (no clock is read and no timing asserted); the last test drives the
real cache and loader over real shard files, with the compute times given.
"""

from __future__ import annotations

import numpy as np
import pytest

from mer_runtime import load_manifest, open_shards
from mer_runtime.prefetch import CostModel, MarkovPrefetcher
from mer_runtime.smoke import _drive

from conftest import REAL

MiB = 1 << 20


def gate(expert_mib: float = 94.5, **kw) -> CostModel:
    """The token-ahead gate as smoke builds it for an expert of `expert_mib` read in 1 MiB chunks."""
    return CostModel(window=4, chunk_frac=1 / expert_mib, expert_bytes=int(expert_mib * MiB), **kw)


def simulate(cm: CostModel, spec_ms_per_mib: float, steps: int = 2000, q: float = 0.5, expert_mib: float = 94.5,
             burst_ms_per_mib: float = 0.0) -> list[int]:
    """A token-ahead run as numbers: every step misses once (30 ms stall) and computes two 10 ms experts, the first
    with nothing landing, the second beside the miss's burst (20 MiB at `burst_ms_per_mib`) or, while an admitted
    guess is still being read, beside 25 MiB of it at `spec_ms_per_mib`. One guess of probability q is offered a
    step. Returns the steps at which a guess was admitted."""
    left = 0.0
    admitted = []
    for step in range(steps):
        cm.observe(io_wait_s=0.030, misses=1)
        cm.observe_compute(0.010, 0, False)
        if left > 0:
            land = min(25.0, left)
            left -= land
            cm.observe_compute(0.010 + spec_ms_per_mib * land * 1e-3, int(land * MiB), True)
        else:
            cm.observe_compute(0.010 + burst_ms_per_mib * 20e-3, 20 * MiB, False)
        if cm.admit(q):
            admitted.append(step)
            left += expert_mib
    return admitted


def test_expensive_reads_shut_the_gate_after_its_exploration_budget():
    """0.2 ms of compute a MiB beside a guess (the bench VM's): a 99 MB read costs 19 ms, a right guess saves 30 x
    0.5: no guess pays. Cheap bursts beside misses (what the old measure priced) must not open it."""
    cm = gate()
    admitted = simulate(cm, spec_ms_per_mib=0.2, burst_ms_per_mib=0.0)
    assert cm.read_measured and cm.read_ms_per_mib == pytest.approx(0.2, rel=0.05)
    assert 1 <= len(admitted) == cm.explored <= 2  # every guess admitted was admitted to measure, then none
    assert max(admitted) < 200 and cm.refused > 1500
    assert cm.explore_spent_s <= 0.01 * cm.elapsed_s  # what exploring was charged: within 1% of the run


def test_free_reads_are_learned_and_the_gate_admits():
    cm = gate()
    admitted = simulate(cm, spec_ms_per_mib=0.0)
    assert cm.read_measured and cm.read_s == 0.0
    assert cm.explored <= 2 and len(admitted) > 1000  # after exploring, guesses are admitted on their merits


def test_the_price_is_per_mib_and_scales_with_the_expert():
    """The same 0.2 ms a MiB: a 94.5 MiB expert's read costs 19 ms and does not pay, a 9.45 MiB one's costs 1.9 ms
    and does (the stall and the odds alike)."""
    big, small = gate(94.5), gate(9.45)
    assert len(simulate(big, 0.2, expert_mib=94.5)) <= 2
    assert len(simulate(small, 0.2, expert_mib=9.45)) > 1000
    assert big.read_ms_per_mib == pytest.approx(small.read_ms_per_mib, rel=0.05)
    assert big.read_s == pytest.approx(10 * small.read_s, rel=0.05)
    assert big.read_s == pytest.approx(0.2e-3 * 94.5, rel=0.05)


def test_the_price_starts_at_a_whole_miss_and_bursts_beside_misses_do_not_set_it():
    cm = gate(explore_frac=0.0)  # no exploration: nothing is ever measured
    admitted = simulate(cm, spec_ms_per_mib=0.0, steps=300, q=0.99, burst_ms_per_mib=0.0)
    assert admitted == [] and cm.read_seen == 0 and cm.read_s == cm.stall_s == pytest.approx(0.030)


def test_exploring_waits_for_its_budget():
    """An explored guess is charged at its expected net cost with the read at a whole miss (30 + 1.3 - 15 ms
    here); the budget is 1% of the time observed, 0.5 ms a step: the first exploration comes after ~33 steps."""
    cm = gate()
    admitted = simulate(cm, spec_ms_per_mib=0.2, steps=400)
    assert 25 <= admitted[0] <= 40 and cm.explored == len(admitted)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from mertools import extract

    out = tmp_path_factory.mktemp("price") / "q4"
    extract(REAL / "mixtral-q4_0.gguf", out, fsync=False)
    return load_manifest(out)


@pytest.mark.parametrize("expensive", [True, False])
def test_real_shards_the_gate_learns_the_price_from_computations_beside_guesses(folder, expensive):
    """Real cache, loader and shards, a learnable cycle, guesses a token ahead: each computation is reported with
    whether the real cache had a guess under way (`ExpertCache.speculating`), its time and bytes given. A read
    that costs more than the miss it saves shuts the gate after exploring; a free one keeps it open."""
    cyc = [[0, 1], [2, 3], [1, 2], [3, 0]]
    routes = np.array([[cyc[(t + li) % 4] for li in range(len(folder.layers))] for t in range(300)])
    size = max(e.size for e in folder.experts)
    per_byte = 0.045 / size if expensive else 0.0  # a whole read: 45 ms of compute, or nothing
    with open_shards(folder.root, cache_slots=4) as s:
        cm = CostModel(window=2, chunk_frac=0.01, expert_bytes=size, unit_stall=0.030)
        s.loader.spec_window, s.loader.spec_cap_each = 2, False

        def access(layer, e, before_compute):
            with s.load(layer, e):
                if before_compute:
                    before_compute()
                spec = s.cache.speculating()
                land = size // 4 if spec else 0
                cm.observe_compute(0.010 + per_byte * land, land, spec)

        _drive(s.cache, routes, folder.layers, "markov", MarkovPrefetcher(folder.layers, folder.model["n_experts"]),
               2, on_access=access, cost=cm, ahead="token")
        issued = s.cache.stats.prefetch_issued
    assert cm.explore_spent_s <= 0.01 * cm.elapsed_s
    if expensive:
        # how many explorations the price takes depends on how many computations happen to see a guess under way
        # (real reads' timing: 2-5 across runs), so their number is bounded by the budget above, not by a constant;
        # what does not depend on timing: nothing is admitted but explorations, and once the price is measured the
        # gate is shut (a 45 ms read against a 30 ms stall: not even a certain guess pays)
        assert issued <= cm.admitted == cm.explored
        assert cm.read_measured or cm.explored == 0
        assert cm.shut() or not cm.read_measured
    else:
        # a free read never shuts the gate; once measured (whether a computation saw a guess under way at all is
        # real reads' timing: a loaded CI machine once saw none) its price is nothing and the gate admits far more
        # than it explores
        assert not cm.shut()
        if cm.read_measured:
            # (how many guesses were explored before that is real reads' timing too: 12 on one slow NumPy-kernel run;
            # the budget above bounds them) and a free read makes any likely guess pay
            assert cm.read_s == 0.0 and cm.pays(0.5)
            assert cm.admitted - cm.explored > max(1, cm.explored)  # admitted on their merits: most of them


def test_a_gate_measured_shut_stops_predicting_and_reopens_if_misses_grow_dearer():
    cm = gate(window_frac=0.34)  # a right guess lands a third of its read, as smoke starts on the bench model
    simulate(cm, spec_ms_per_mib=0.2, steps=300)
    assert cm.shut() and not cm.pays(1.0)  # 19 ms a read against a 30 ms stall x 0.34 landed
    for _ in range(40):
        cm.observe(io_wait_s=0.200, misses=1)  # misses now stall 200 ms: a certain guess pays again
    assert not cm.shut() and cm.pays(1.0)
    assert not gate().shut()  # unmeasured: exploration may still admit
