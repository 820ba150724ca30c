"""One layer step of a stream of tokens through the cache, the Markov prefetcher and its gate: `StepDriver`.

Both smoke (`smoke._drive`, `run_smoke`) and `ShardSet.moe(..., prefetch=True)` drive their steps through this one
class, so a library user calling `moe()` layer after layer gets what smoke measures. Also here: `OddsDuel` (the
guard on the odds-ranked eviction), `NullLoader` (the I/O-free replay's loader) and `PrefetchConfig`.

Threads: a driver is one stream's state (its prefetcher, gate and duel are single-threaded by design); the cache it
drives may be shared. `ShardSet` keeps one driver per thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np

from .buffers import BufferPool  # noqa: F401  (the docstring examples use it)
from .cache import ExpertCache, Key
from .loader import Loader, Ticket
from .prefetch import CostModel, MarkovPrefetcher
from .shadow import ShadowCache

T = TypeVar("T")
AHEADS = ("step", "token")


@dataclass(frozen=True)
class PrefetchConfig:
    """What `ShardSet(prefetch=...)` drives: `prefetch=True` (or "markov") is `PrefetchConfig()`.

    ahead: "step" (guess the next layer step) or "token" (the same layer of the next token, read only in the disk's
    idle time: io_uring only, other backends keep "step"); max_inflight: guesses with the disk at once (0: none is
    read, the odds still rank the eviction);
    threshold_scale: a candidate's estimate must be at least this / n_experts; spec_window: "token" only, the
    speculative chunks with the disk at once; dormant: a stream whose prefetcher changes nothing does its
    bookkeeping in batches (docs/runtime.md, "Dormant streams"; False: every step, as before).

    >>> PrefetchConfig(ahead="token").max_inflight
    2
    """

    ahead: str = "step"
    max_inflight: int = 2
    threshold_scale: float = 2.0
    spec_window: int = 4
    dormant: bool = True

    def __post_init__(self) -> None:
        if self.ahead not in AHEADS:
            raise ValueError(f"ahead {self.ahead!r}: expected token or step")
        if self.max_inflight < 0 or self.spec_window < 1:  # max_inflight 0: the odds alone, no guess read
            raise ValueError("max_inflight must be at least 0 and spec_window at least 1")


class NullLoader(Loader):
    """Completes every read at once without reading: for comparing cache policies on the same trace."""

    name = "none"
    direct = False

    def start_many(self, reads: list[tuple[str, int, int]], urgent: bool = False,
                   created: list[Ticket] | None = None) -> list[Ticket]:
        return [Ticket(path, size, slot, next(self._ids), done=True) for path, size, slot in reads]

    def settle(self, t: Ticket) -> None:
        pass

    def ready(self, t: Ticket) -> bool:
        return True


DUEL_MARGIN = 2
DORMANT_IDLE = 32  # idle steps before a stream falls dormant (at least two tokens: `dormant_idle`)
DORMANT_BATCH = 8  # the steps of each batch while it is
DORMANT_WAIT = 4  # a batch waits for a step with reads up to this many batches


def dormant_idle(n_layers: int) -> int:
    """Idle steps before a stream falls dormant: at least two tokens, so that every guess of the stream (one issued
    a token ahead included) has met its step, and nothing is left for a dormant stream to withdraw or judge."""
    return max(DORMANT_IDLE, 2 * n_layers)


class OddsDuel:
    """Set dueling for the eviction ranking: two shadow caches of the same slots, keys only (`ShadowCache`), replay
    the steps, one ranked by distance alone, one with the predictor's odds; the real cache uses the odds only while
    their shadow has hit more (`DUEL_MARGIN` hits ahead to switch to them, back as soon as it is behind). Odds that
    carry information (markov, zipf) win within a few tokens; where recency says more than the one-step tables
    (router: replayed, the odds lost 1-3% of hits) or nothing can be learned (uniform: the ranking is the same) the
    distance ranking stays. The shadows are `ShadowCache`s (the cache's victim rule on keys alone); they cost two
    key-only caches' bookkeeping a step (on a model deeper than `max_layers`, only on a sample of its layers'
    steps), and never read.

    >>> duel = OddsDuel([0, 1], 4)
    >>> duel.step([(0, 1), (0, 2)], {}, 0.5, 0.0)    # no lead yet: distance alone
    False
    >>> duel.close()
    """

    def __init__(self, layers: list[int], slots: int, max_layers: int = 16):
        """`max_layers`: a deeper model's shadows replay only every s-th layer (at most `max_layers` of them) in
        proportionally fewer slots, as set dueling samples sets: the steps of the layers left out cost nothing."""
        stride = -(-len(layers) // max_layers) if max_layers > 0 else 1
        self.layers = list(layers)[::stride]
        self._sampled = set(self.layers)
        slots = max(2, round(slots * len(self.layers) / max(1, len(layers))))
        self.shadows = [ShadowCache(self.layers, slots) for _ in range(2)]
        self.odds = False

    def step(self, keys: list[tuple[int, int]], odds: dict[int, np.ndarray], intercept: float, slope: float) -> bool:
        """Replay one step's keys in both shadows (the odds given to the second first); True: rank with the odds.
        A step of a layer the shadows leave out changes nothing."""
        if not keys or keys[0][0] not in self._sampled:
            return self.odds
        self.shadows[1].set_odds({l: v for l, v in odds.items() if l in self._sampled}, intercept, slope)
        for c in self.shadows:
            c.step(keys)
        lead = self.shadows[1].hits - self.shadows[0].hits
        self.odds = lead > DUEL_MARGIN if not self.odds else lead >= 0
        return self.odds

    def close(self) -> None:
        """Nothing to release (the shadows hold keys only); kept for the callers that close what they made."""


class StepDriver:
    """One stream of layer steps through a cache: `step(li, experts, on_access)` for a caller that computes the
    experts one at a time (smoke), or `begin` / `before_compute` / `end` for one that computes a step at once
    (`ShardSet.moe`). A layer step, in order:

    1. (a) the prefetcher's guesses that this step proves wrong are withdrawn (`cancel_stale`) before its reads
       start: they take no more disk time than what was already with the disk; every wrong guess, withdrawn or read
       whole, is fed back to `cost` with what it read;
    2. (b) the step is observed, before its misses pick their victims; the odds of its layer and the next go to the
       cache's eviction ranking (`set_odds`), with a positive slope only while the duel says they win;
    3. (c) the step's absent experts are started together (`fetch`); the experts already cached are taken first
       (`begin` returns that order), so that computing them overlaps the reads of the others;
    4. (d) the duel replays the step (its verdict ranks from the next step);
    5. (e) the guesses for the next step are predicted and those the gate (`cost`) would refuse even in a free
       slot are dropped at once;
    6. (f) `before_compute(rest)`, called before each computation with the step's experts still to compute: as soon
       as none of them is being read (the disk would idle while they compute) the guesses are issued, those the
       gate admits weighing the expert each would evict, at most `max_inflight` reads in flight;
    7. (g) `end()`: the gate learns the step's I/O wait and misses (the cache's counters' deltas) and what the
       right guesses had landed.

    With `ahead="token"` the guesses are for the same layer of the next token (`predict_token_ahead`), issued in
    `begin` and held until that step (`prefetch(due=...)`, `cancel_stale(now=...)`): the loader reads them only
    while no foreground read is with the disk (its `spec_window`), and `before_compute` lets it issue their chunks
    before each computation; `cost` is fed what foreground reads queued behind them, and `compute(fn)` prices a
    read from the computations a guess streams through. Any `policy` but "markov" (or no `pf`) neither feeds nor
    asks the prefetcher: no per-step work beyond the fetch.

    Dormant: while the duel ranks by distance and the gate lets no guess through (`dormant_idle` steps running),
    a step is (c) alone; (b) and (d) are done `batch` steps at a time (`catch_up`), at a step whose reads are
    under way, and (e) for that step only; the stream wakes when either changes (docs/runtime.md, "Dormant
    streams").

    >>> pool = BufferPool(4096, 4)
    >>> cache = ExpertCache(pool, NullLoader(pool), lambda key: ("", 4096), layers=[0, 1])
    >>> drv = StepDriver(cache, [0, 1], MarkovPrefetcher([0, 1], 8))
    >>> for t in range(3):
    ...     drv.step(0, [1, 2]); drv.step(1, [3, 4])
    >>> cache.stats.hits + cache.stats.misses
    12
    >>> drv.close(); pool.close()
    """

    def __init__(self, cache: ExpertCache, layers: Sequence[int], pf: MarkovPrefetcher | None = None,
                 cost: CostModel | None = None, *, policy: str = "markov", max_inflight: int = 2,
                 ahead: str = "step", odds: bool = True, duel: OddsDuel | None = None,
                 guard: tuple[Callable[[], None], Callable[[], None]] | None = None, batch: int | None = None):
        """`duel`: a shared one (the caller closes it); None with the odds in use: the driver's own (`close()`).
        `guard`: (enter, leave) of the owner of the cache (`ShardSet`): `begin` and `step` call enter() before they
        touch anything (it raises once the owner is closed: the step then changes nothing) and leave() after, so
        the owner's close() waits for a step under way. `batch`: the steps a dormant stream's bookkeeping waits to be
        done together (`DORMANT_BATCH`; 0: never dormant)."""
        self._guard = guard
        self.cache, self.layers, self.pf, self.cost = cache, list(layers), pf, cost
        self.max_inflight = max_inflight
        self.markov = policy == "markov" and pf is not None
        self.token_ahead = self.markov and ahead == "token"
        self.odds = odds and self.markov and cache.eviction != "lru"
        self._own_duel = self.odds and duel is None
        self.duel = OddsDuel(self.layers, cache.pool.n_slots) if self._own_duel else duel
        self._index = {layer: li for li, layer in enumerate(self.layers)}
        self._measure = cost is not None and self.token_ahead  # token-ahead guesses are priced by the compute
        self._guesses: list[tuple[int, float]] = []
        # this stream's guesses are tagged with it: its steps judge only them, and its gate learns only their outcomes
        # (a small token, not the driver: an entry outliving the driver must not keep its tables alive)
        self.owner = object()
        self._closed = False
        self.own = cache.owner_stats(self.owner) if self.markov else cache.stats
        # a shared duel replays other streams' steps too: this one's must reach it in order, never a batch late
        self.batch = 0 if self.odds and not self._own_duel else DORMANT_BATCH if batch is None else batch
        self._idle_max = dormant_idle(len(self.layers))
        self._idle = 0  # steps running in which the prefetcher changed nothing
        self._backlog: list[tuple[int, list[int]]] | None = None  # dormant: the steps not yet observed
        self.dormant_steps = 0
        # the driver's own time (all of begin, before_compute and end but the step's fetch), over steps_done steps:
        # what prefetching adds to a step on the CPU, measured where it runs (smoke's prefetch_own_ms_per_step)
        self.own_s, self.steps_done = 0.0, 0

    # -- one step -----------------------------------------------------------------------------------------------
    def begin(self, li: int, experts: Sequence[int]) -> list[Key]:
        """Steps (a)-(e) for layer index li (position in `layers`) routed to `experts`; the step's keys, hits first.
        The caller acquires each, calling `before_compute` before it computes, then `end()`."""
        if self._guard is None:
            return self._begin(li, experts)
        self._guard[0]()
        try:
            return self._begin(li, experts)
        finally:
            self._guard[1]()

    def _begin(self, li: int, experts: Sequence[int]) -> list[Key]:
        t0, self._fetch_s = time.perf_counter(), 0.0
        try:
            return self._begin_step(li, experts)
        finally:
            self.own_s += time.perf_counter() - t0 - self._fetch_s

    def _fetch(self, keys: list[Key]) -> int:
        """(c), timed apart: the reads are the step's, not the driver's own work."""
        t0 = time.perf_counter()
        try:
            return self.cache.fetch(keys)
        finally:
            self._fetch_s += time.perf_counter() - t0

    def _begin_step(self, li: int, experts: Sequence[int]) -> list[Key]:
        cache, st, own, pf, cost = self.cache, self.cache.stats, self.own, self.pf, self.cost
        layers, L = self.layers, len(self.layers)
        experts = [int(e) for e in experts]
        if not 0 <= li < L or (self.markov and any(not 0 <= e < pf.n for e in experts)):  # type: ignore[union-attr]
            # refused before anything is withdrawn, fed to the gate or observed
            raise IndexError(f"step({li}, {experts}): layer index must be in [0, {L})"
                             + (f" and expert ids in [0, {pf.n})" if self.markov else ""))  # type: ignore[union-attr]
        keys = [(layers[li], e) for e in experts]
        self._w0, self._m0 = st.io_wait, st.misses
        self._u0, self._f0 = own.prefetch_used, own.prefetch_landed
        # hits first (stable), decided before the reads start, so that the LRU order, and with it the hit rate, does
        # not depend on the disk's speed. The I/O-free replay still differs from a real run: its reads complete at
        # once (no guess is ever withdrawn part-way, every wrong one is read whole) and it pins nothing (no pin_top)
        order = sorted(keys, key=lambda k: k not in cache.entries)
        tl = li + 1 if li + 1 < L else 0
        self._guesses = []
        caught_up = False
        if self._backlog is not None:  # dormant: no guess of this stream is left, and the cache ranks by distance
            self._backlog.append((li, experts))
            if self.odds:  # what an awake step on distance sets (another stream's step may have set a slope)
                cache.set_odds({}, pf.keep_trust()[0], 0.0)  # type: ignore[union-attr]  # (memoized)
            reading = self._fetch(keys)
            n = len(self._backlog)
            # caught up while this step's reads are with the disk (the bookkeeping then costs no time the step
            # would not wait anyway), or after DORMANT_WAIT batches without a miss
            if n < self.batch or (not reading and n < DORMANT_WAIT * self.batch):
                self.dormant_steps += 1
                return order
            self._catch_up()  # this step included: observed and replayed by the duel
            caught_up = True
        now = 0
        if self.markov:
            now = pf.clock - caught_up  # type: ignore[union-attr]  # this step's index (a catch-up observed it)
            if not caught_up:  # (a dormant stream has no guess to withdraw)
                self._withdraw(keys, now)
                # observed before this step's misses pick their victims: the odds of the layer's other experts are
                # then for the next token's step, and the next layer's are from this step's experts
                pf.observe(li, experts)  # type: ignore[union-attr]
            if self.odds:
                vectors, a, b = self._odds(li)
                cache.set_odds(vectors, a, b if self.duel.odds else 0.0)  # type: ignore[union-attr]
        if not caught_up:  # (a dormant step's reads have started, its victims chosen by distance, as awake)
            self._fetch(keys)
        if self.odds and not caught_up:  # replayed once the step's reads are with the disk: its verdict ranks from
            self.duel.step(keys, vectors, a, b)  # type: ignore[union-attr]  # the next step on
        guesses: list[tuple[int, float]] = []
        target = 0
        if self.markov:
            if self.token_ahead:
                target = li
                if cost is None or not cost.shut():  # the tables still learn while it is shut
                    guesses = pf.predict_token_ahead(  # type: ignore[union-attr]
                        li, {e for (layer, e) in list(cache.entries) if layer == layers[li]})
            else:
                target, guesses = pf.predict_scored(  # type: ignore[union-attr]
                    li, {e for (layer, e) in list(cache.entries) if layer == layers[tl]})
            if cost is not None:  # what would not pay even in a free slot is refused now, without asking the cache
                n_all = len(guesses)  # or the loader anything (that polling is most of the path's cost)
                # with the odds in the eviction ranking, the tables must first have shown skill there (a slope
                # above 0: better than a constant): on uniform routing they never do, and a guess is a coin flip
                skill = not self.odds or pf.keep_trust()[1] > 0  # type: ignore[union-attr]
                guesses = [(e, q) for e, q in guesses if skill and cost.pays(q)]
                cost.refused += n_all - len(guesses)
            self._idle_or_not(bool(guesses and self.max_inflight > 0), caught_up)
        self._now, self._tl, self._target, self._guesses = now, tl, target, guesses
        if self.token_ahead:  # the loader holds them back while this step's own reads are with the disk
            self._speculate(order)
        return order

    def _withdraw(self, keys: list[Key], now: int) -> None:
        """(a): this stream's guesses that the step proves wrong are withdrawn, and fed back to the gate."""
        cache, own, cost = self.cache, self.own, self.cost
        b0, r0, z0 = own.cancelled_inflight_bytes, own.cancelled_read_bytes, own.cancelled_size_bytes
        s0 = own.prefetch_stale
        n = cache.cancel_stale(keep=set(keys), now=now if self.token_ahead else None, owner=self.owner)
        if cost is None:
            return
        size = own.cancelled_size_bytes - z0  # the withdrawn guesses' own sizes (experts may differ)
        if n and size:
            cost.observe_stale((own.cancelled_read_bytes - r0) / size, (own.cancelled_inflight_bytes - b0) / size, n)
        if own.prefetch_stale > s0:  # wrong guesses read whole before they were found wrong
            cost.observe_stale(1.0, 0.0, own.prefetch_stale - s0)
        if self.token_ahead:
            cost.observe_in_way(cache.loader.spec_in_way, cache.stats.prefetch_issued)
        else:
            cache.loader.spec_window = cost.window

    # -- dormancy: while the prefetcher changes nothing, its work is done a batch of steps at a time --------------
    def _idle_or_not(self, guessing: bool, caught_up: bool) -> None:
        """After a step's prediction: the stream falls dormant once its duel has ranked by distance alone and the gate
        let no guess through for `dormant_idle` steps running, stays dormant while a catch-up finds the same, and
        wakes as soon as either changes."""
        # (waiting while the odds have skill and their shadow is not behind as well kept router awake 96 steps of
        # 160, for half a hit on zipf at 40 tokens over 30 seeds)
        useful = guessing or (self.odds and self.duel.odds)  # type: ignore[union-attr]
        if useful:
            self._idle, self._backlog = 0, None
        elif caught_up:
            self._backlog = []  # still nothing to do: another batch
        elif self.batch:
            self._idle += 1
            if self._idle >= self._idle_max:
                self._backlog = []

    def catch_up(self) -> None:
        """Observe now the steps a dormant stream has kept for its next batch (for a caller about to read the
        prefetcher's tables or the duel mid-stream); the stream stays dormant. Nothing to do for an awake one."""
        if self._backlog:
            self._catch_up()

    def _catch_up(self) -> None:
        """The backlog's steps, in order, as an awake stream would have done them but for the cache and the
        guesses: observed, their two layers' odds handed out (and so scored: the trust fit) and replayed by the
        duel. The prefetcher's tables, the trust fit and the duel are then what they would be had every step been
        done at once."""
        pf, layers = self.pf, self.layers
        backlog = self._backlog or []
        while backlog:  # taken one at a time: an interrupt loses at most the step under way, never the rest
            li, experts = backlog.pop(0)
            pf.observe(li, experts)  # type: ignore[union-attr]
            if self.odds:
                self.duel.step([(layers[li], e) for e in experts], *self._odds(li))  # type: ignore[union-attr]

    def _odds(self, li: int) -> tuple[dict[int, np.ndarray], float, float]:
        """After observing layer index li: the odds of its layer and the next (the two an observation changes),
        handed out (and so scored at their next step: the trust fit), and the trust's (intercept, slope)."""
        pf, layers = self.pf, self.layers
        tl = li + 1 if li + 1 < len(layers) else 0
        vectors = {layers[li]: pf.keep_odds(li), layers[tl]: pf.keep_odds(tl)}  # type: ignore[union-attr]
        return (vectors, *pf.keep_trust())  # type: ignore[union-attr]

    def before_compute(self, rest: Sequence[Key]) -> None:
        """(f): the caller holds an expert of the step and is about to compute; `rest` are the step's experts it has
        still to compute after this one (or to acquire)."""
        t0 = time.perf_counter()
        if self.token_ahead:  # their chunks go in the disk's idle time: while this expert computes
            self.cache.speculating() and self.cache.loader.poll()
        elif self.markov:
            self._speculate(rest)
        self.own_s += time.perf_counter() - t0

    def end(self) -> None:
        """(g): the gate's feedback for the step."""
        t0 = time.perf_counter()
        cost, st, own = self.cost, self.cache.stats, self.own
        if cost is not None:
            cost.observe(st.io_wait - self._w0, st.misses - self._m0)
            if self.markov and own.prefetch_used > self._u0:
                cost.observe_used((own.prefetch_landed - self._f0) / (own.prefetch_used - self._u0),
                                  own.prefetch_used - self._u0)
        self.steps_done += 1
        self.own_s += time.perf_counter() - t0

    def step(self, li: int, experts: Sequence[int],
             on_access: Callable[[int, int, Callable[[], None] | None], None] | None = None) -> None:
        """One whole layer step. `on_access(layer, expert, before_compute)` acquires the expert, calls
        `before_compute()` (if not None) once it holds it, computes and releases; without it (the I/O-free replay),
        each expert is acquired and released and the guesses follow it."""
        if self._guard is not None:  # the whole step, so that the owner's close() waits for it
            self._guard[0]()
            try:
                return self._step(li, experts, on_access)
            finally:
                self._guard[1]()
        self._step(li, experts, on_access)

    def _step(self, li: int, experts: Sequence[int],
              on_access: Callable[[int, int, Callable[[], None] | None], None] | None) -> None:
        order = self._begin(li, experts)  # step() holds the guard already
        for i, key in enumerate(order):
            hook = (lambda rest=order[i + 1:]: self.before_compute(rest)) if self.markov else None
            if on_access:
                on_access(*key, hook)
            else:  # the I/O-free replay: nothing to overlap, so guesses go after the expert, as room allows
                self.cache.acquire(key)
                self.cache.release(key)
                if hook:
                    hook()
        self.end()

    def compute(self, fn: Callable[[], T]) -> tuple[T, float]:
        """(fn(), seconds it took). A token ahead with a gate, the computation prices a read: a guess under way
        streams through it (none is issued during it), and what its landing costs is `CostModel.observe_compute`."""
        loader = self.cache.loader
        spec = self._measure and self.cache.speculating()
        b0 = loader.landed_bytes() if self._measure else 0
        t0 = time.perf_counter()
        y = fn()
        dt = time.perf_counter() - t0
        if self._measure:
            self.cost.observe_compute(dt, loader.landed_bytes() - b0, spec)  # type: ignore[union-attr]
        return y, dt

    # the counters stats() gives that add up over streams (`ShardSet.prefetch_stats` sums them)
    SUMMED = ("admitted", "right", "wrong", "refused", "dormant_steps", "own_s", "steps")

    def stats(self) -> dict:
        """What the gate decided and learned (zeros without one), the duel's choice, the steps done dormant and the
        driver's own time over its steps."""
        c = self.cost
        return {"admitted": c.admitted if c else 0, "right": c.right if c else 0, "wrong": c.wrong if c else 0,
                "refused": c.refused if c else 0, "duel_odds": bool(self.duel is not None and self.duel.odds),
                "dormant_steps": self.dormant_steps, "own_s": self.own_s, "steps": self.steps_done}

    def close(self) -> None:
        """Withdraw this stream's unused guesses (the reads under way stop, the complete ones are demoted: no other
        stream's step judges them, and one held for a later step would keep its slot), then drop the duel if the
        driver made it and the cache's counters of its guesses. Idempotent."""
        if self.markov and self.own.prefetch_issued and not self._closed:
            self.cache.cancel_stale(owner=self.owner)
        self._closed = True
        self.cache.forget_owner(self.owner)
        if self._own_duel and self.duel is not None:
            self.duel.close()
            self.duel = None
            self.odds = False

    # -- the guesses ----------------------------------------------------------------------------------------------
    def _speculate(self, rest: Sequence[Key]) -> None:
        cache, cost, pf = self.cache, self.cost, self.pf
        if not self._guesses or not self.token_ahead and not all(cache.loaded(k) for k in rest):
            return  # a read of this step is still under way: a guess would only slow it down
        keep = set(rest)
        flying = cache.in_flight()  # once: it takes the cache's lock and polls every read
        refused = False
        L, tl, index = len(self.layers), self._tl, self._index

        def admit(victim: Key | None, q: float) -> bool:
            nonlocal refused
            if victim is None:
                refused = not cost.admit(q)  # type: ignore[union-attr]
            else:
                lv = index[victim[0]]
                # steps until the victim's layer comes (the first is the next step's, tl)
                refused = not cost.admit(q, pf.prob_next(lv, victim[1]), (lv - tl) % L + 1)  # type: ignore
            return not refused

        for e, q in self._guesses:
            key = (self.layers[self._target], e)
            if key in cache.entries:
                continue
            if flying >= self.max_inflight:
                break
            # the step's experts not computed yet are never evicted for a guess (a hit lost for a maybe)
            flying += cache.prefetch(key, None if cost is None else (lambda v, q=q: admit(v, q)), keep,
                                     due=self._now + L if self.token_ahead else None, owner=self.owner)
            if refused:
                break  # ranked by q, and the next would face the same victim: it would not pay either
        self._guesses = []
