"""First-order Markov expert prefetcher, with estimates shrunk towards base rates and calibrated on its own record.

Two transition tables, learned online from the routing it observes:
- same-layer: experts of layer L at token t-1 -> experts of layer L at token t;
- cross-layer: experts of layer L-1 at token t -> experts of layer L at token t.
After layer L of token t it predicts layer L+1 of the same token (cross-layer table), and after the last layer it
predicts the first layer of the next token (same-layer table); `predict_token_ahead` predicts layer L of token t+1
(same-layer table), for guesses read over a whole token.

Probabilities, not frequencies: P(e in the next step | source s) is estimated as (c[s, e] + a x b[e]) / (n[s] + a),
where c counts how often e followed s, n how often s was followed at all, b[e] is e's base rate at that layer (its
share of that layer's steps, itself shrunk towards k / n_experts) and a = `prior` pseudo-sightings: one sighting is
weak evidence, not certainty. Every prediction is scored against the step that follows (whether or not a read was
issued for it), and the estimates are scaled by the ratio of what came true to what was predicted, starting
pessimistic (`calibration_prior`, worth `calibration_weight` predictions): a guess needs evidence before it is
believed. An expert is a candidate when its estimate is at least `threshold_scale / n_experts` (2/E: a fixed
threshold never fires with hundreds of experts); candidates are returned with their calibrated probabilities,
ranked, for the gate to judge.

`prob_next(li, e)` is the same estimate for any expert of any layer at that layer's next step: the cache asks it
for the expert a speculative load would evict (see `CostModel.admit`).

`CostModel` decides whether a predicted expert is worth a speculative read at all (see its docstring): a wasted
read costs in full when the disk is the bottleneck, and a load that evicts a warmer expert loses a hit.

Threads: neither class is thread-safe, deliberately (their state is one stream's history, and a lock per call on
smoke's per-step path would buy nothing): use one of each per stream of tokens (smoke's driver). They refuse
misuse loudly: a call made while another thread is inside one of their methods raises `ConcurrentUseError`
instead of corrupting the tables. Handing one to another thread between calls is fine.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Callable, TypeVar

import numpy as np

from .errors import ConcurrentUseError

F = TypeVar("F", bound=Callable)


def _one_thread(fn: F) -> F:
    """Refuse a call while another thread is inside any guarded method of the same object (the same thread may
    nest calls). Costs one non-blocking lock acquire a call: misuse is caught, never waited for.

    >>> class C:
    ...     _busy, _owner = threading.Lock(), None
    ...     @_one_thread
    ...     def f(self): return 1
    >>> C().f()
    1
    """
    @functools.wraps(fn)
    def guarded(self, *a, **kw):
        me = threading.get_ident()
        if self._owner == me:
            return fn(self, *a, **kw)
        if not self._busy.acquire(False):
            raise ConcurrentUseError(
                f"{type(self).__name__}.{fn.__name__}() called while another thread is using the same "
                f"{type(self).__name__}: it is single-threaded; give each stream of tokens (each thread) its own")
        self._owner = me
        try:
            return fn(self, *a, **kw)
        finally:
            self._owner = None
            self._busy.release()

    return guarded  # type: ignore[return-value]


class MarkovPrefetcher:
    """
    >>> pf = MarkovPrefetcher([0, 1], 8)
    >>> for _ in range(20):
    ...     pf.observe(0, [1, 2]); _ = pf.predict(0); pf.observe(1, [5, 6]); _ = pf.predict(1)
    >>> pf.predict(0)                    # after layer 0 chose [1, 2]: layer 1 will choose 5 and 6
    (1, [5, 6])
    >>> pf.prob_next(1, 5) > 0.9, pf.prob_next(1, 3) < 0.01   # 20 of 20 sightings; never seen
    (True, True)
    """

    def __init__(self, layers: list[int], n_experts: int, *, threshold_scale: float = 2.0,
                 max_per_step: int | None = None, prior: float = 2.0, calibration_prior: float = 0.5,
                 calibration_weight: float = 4.0, keep_z: float = 2.0):
        self._busy, self._owner = threading.Lock(), None  # see _one_thread
        # the estimates change only when a step is observed; a driver asks for the same layer's several times a step
        # (keep_odds, predict_scored, prob_next), so each is computed once per observation: read-only arrays, safe to
        # hand out (`ExpertCache.set_odds` keeps them)
        self._both_memo: dict[int, np.ndarray] = {}
        self._trust_memo: tuple[float, float] | None = None
        self.layers = list(layers)
        self.n = n_experts
        self.threshold = min(1.0, threshold_scale / n_experts)
        self.max_per_step = max_per_step
        self.prior = prior
        L = len(self.layers)
        self.same = np.zeros((L, n_experts, n_experts), np.float64)  # c[s, e]
        self.same_n = np.zeros((L, n_experts), np.float64)  # n[s]: sightings of s with a successor step
        self.cross = np.zeros((L, n_experts, n_experts), np.float64)
        self.cross_n = np.zeros((L, n_experts), np.float64)
        self.seen = np.zeros((L, n_experts), np.float64)  # how often e was chosen at each layer
        self.steps = np.zeros(L, np.float64)
        self.k = 1
        self.clock = 0  # layer steps observed: the index of the next one (what `ExpertCache.prefetch(due=...)` uses)
        self.prev_token: list[list[int] | None] = [None] * L  # last seen experts per layer (previous token)
        self.cur_token: list[list[int] | None] = [None] * L
        # self-scoring: the candidates predicted for a layer's next step, (expert, raw p), until that step is seen
        self._pending: dict[int, list[tuple[int, float]]] = {}
        self.cal_prior, self.cal_weight = calibration_prior, calibration_weight
        self.predicted = self.came_true = 0.0  # summed raw p of scored candidates; how many were chosen
        # the eviction odds (keep_odds) handed out per layer index, scored at that layer's next step: sums over every
        # (expert, step) scored of 1, p, chosen, p^2, p x chosen (a least-squares fit of chosen on p: keep_trust)
        self._odds_out: dict[int, np.ndarray] = {}
        self._fit = [0.0] * 5
        self.keep_z = keep_z

    @_one_thread
    def observe(self, li: int, experts: list[int]) -> None:
        """Layer index li (position in `layers`) of the current token routed to `experts`. Refused (IndexError)
        before anything changes if li or an expert id is out of range."""
        chosen = list(dict.fromkeys(int(e) for e in experts))  # a repeated expert counts once, as one step's choice
        if not 0 <= li < len(self.layers) or any(not 0 <= e < self.n for e in chosen):
            raise IndexError(f"observe({li}, {list(experts)}): layer index must be in [0, {len(self.layers)}) and "
                             f"expert ids in [0, {self.n})")
        self.clock += 1
        self._both_memo.clear()
        if li == 0:
            self.prev_token, self.cur_token = self.cur_token, [None] * len(self.layers)
        odds = self._odds_out.pop(li, None)
        if odds is not None:
            f = self._fit
            f[0] += len(odds)
            f[1] += float(odds.sum())
            f[2] += len(chosen)
            f[3] += float(odds @ odds)
            f[4] += float(odds[chosen].sum())
            self._trust_memo = None
        for e, p in self._pending.pop(li, ()):
            self.predicted += p
            self.came_true += e in chosen
        self.k = max(self.k, len(experts))
        # scalar increments: k x k of them cost less than building a fancy index each step (k is 1-8)
        prev = self.prev_token[li]
        if prev is not None:
            same, same_n = self.same[li], self.same_n[li]
            for s in prev:
                row = same[s]
                for e in chosen:
                    row[e] += 1.0
                same_n[s] += 1.0
        if li > 0 and self.cur_token[li - 1] is not None:
            cross, cross_n = self.cross[li], self.cross_n[li]
            for s in self.cur_token[li - 1]:  # type: ignore[union-attr]
                row = cross[s]
                for e in chosen:
                    row[e] += 1.0
                cross_n[s] += 1.0
        seen = self.seen[li]
        for e in chosen:
            seen[e] += 1.0
        self.steps[li] += 1
        self.cur_token[li] = chosen

    # the estimates and the trust fit are memoized (see __init__): changing what they are computed from drops them
    @property
    def prior(self) -> float:
        return self._prior

    @prior.setter
    def prior(self, value: float) -> None:
        self._prior = value
        self._both_memo.clear()

    @property
    def keep_z(self) -> float:
        return self._keep_z

    @keep_z.setter
    def keep_z(self, value: float) -> None:
        self._keep_z = value
        self._trust_memo = None

    @property
    def calibration(self) -> float:
        """What came true per unit of predicted probability, from a pessimistic start."""
        return (self.came_true + self.cal_prior * self.cal_weight) / (self.predicted + self.cal_weight)

    def _base(self, li: int) -> np.ndarray:
        a = self.prior
        return (self.seen[li] + a * min(1.0, self.k / self.n)) / (self.steps[li] + a)

    def _shrunk(self, rows: np.ndarray, n: np.ndarray, base: np.ndarray) -> np.ndarray:
        """[2, E]: the estimate, and one standard deviation below it (the Beta posterior's sd, large while a source
        has been seen little), each the best evidence among the source rows (counts [S, E], sightings n [S, 1])."""
        a = self.prior
        n = n + a
        est = (rows + a * base) / n
        out = np.empty((2, est.shape[1]))
        est.max(axis=0, out=out[0])
        (est - np.sqrt(est * (1.0 - est) / (n + 1.0))).max(axis=0, out=out[1])
        return out

    def _both(self, target: int) -> np.ndarray:
        """[2, E]: uncalibrated P(e at layer index `target`'s next step) for every e, from what has been observed,
        and one standard deviation below it (for the gate: a guess from little evidence must clear the bar by more).
        The best evidence among the sources: this token's own step if seen (its next step is the next token's,
        same-layer table), else the previous token's step at the layer (same-layer) and this token's step at the
        layer before (cross-layer). Computed once per observation (read-only)."""
        got = self._both_memo.get(target)
        if got is not None:
            return got
        base = self._base(target)
        cur, prev = self.cur_token[target], self.prev_token[target]
        src = None
        if cur is not None:
            src = (self.same[target][cur], self.same_n[target][cur])
        else:
            parts = []
            if prev is not None:
                parts.append((self.same[target][prev], self.same_n[target][prev]))
            if target > 0 and self.cur_token[target - 1] is not None:
                up = self.cur_token[target - 1]
                parts.append((self.cross[target][up], self.cross_n[target][up]))
            if len(parts) == 2:  # the max over both tables' rows is the max of the two tables' maxima
                src = (np.concatenate((parts[0][0], parts[1][0])), np.concatenate((parts[0][1], parts[1][1])))
            elif parts:
                src = parts[0]
        if src is None:
            both = np.stack([base, base])
        else:
            both = self._shrunk(src[0], src[1][:, None], base)
        both.flags.writeable = False
        self._both_memo[target] = both
        return both

    def _raw(self, target: int) -> np.ndarray:
        return self._both(target)[0]

    @_one_thread
    def keep_odds(self, li: int) -> np.ndarray:
        """Uncalibrated P(e chosen at layer index li's next step) for every expert e: what the cache's eviction
        ranking weighs (`ExpertCache.set_odds`, with `keep_trust()`). Remembered and scored against that step when it
        is observed. Costs one layer's estimate (k source rows of E): a driver asks it for the two layers whose
        odds an observation changes (the one observed, the next), never for the whole model each step.

        >>> pf = MarkovPrefetcher([0, 1], 4)
        >>> pf.observe(0, [1, 2]); pf.keep_odds(0).shape
        (4,)
        """
        v = self._raw(li)
        self._odds_out[li] = v
        return v

    def keep_bound(self, n: float) -> float:
        """How many standard errors the slope must clear after n scored (expert, step) pairs: `keep_z` plus
        sqrt(2 ln ln n), the law of the iterated logarithm's growth. keep_trust is asked at every step, and a
        fixed z is crossed sooner or later by chance alone over enough looks (iid routing crossed 2.0 on 3 seeds
        in 57, and reached 3.2 over 100 seeds' 800 looks each); this boundary is not, while real skill (a t
        statistic growing like sqrt(n)) clears it a few tokens later than a fixed one.

        >>> round(MarkovPrefetcher([0], 8).keep_bound(80), 2)
        3.72
        """
        return self.keep_z + math.sqrt(2.0 * math.log(math.log(max(n, math.e ** math.e))))

    @_one_thread
    def keep_trust(self) -> tuple[float, float]:
        """(intercept, slope): how far `keep_odds` is to be believed, fitted by least squares of what was chosen on
        the odds handed out, over every expert of every step scored; the slope is taken `keep_bound(n)` standard
        errors below its estimate and never below 0. Where the odds carry no information (uniform routing) the slope is 0
        and the cache ranks by distance alone, exactly as without a predictor; where they do, P = intercept + slope
        x odds is calibrated. Nothing scored yet: (0.5, 0.0).

        >>> MarkovPrefetcher([0], 8).keep_trust()
        (0.5, 0.0)
        """
        if self._trust_memo is not None:  # the fit changes only when odds handed out are scored
            return self._trust_memo
        n, sp, sy, spp, spy = self._fit
        if n < 2:
            return 0.5, 0.0
        mp, my = sp / n, sy / n
        var = spp / n - mp * mp
        b = 0.0
        if var > 1e-12:
            se = math.sqrt(max(my * (1.0 - my), 1e-12) / (n * var))
            b = max(0.0, (spy / n - mp * my) / var - self.keep_bound(n) * se)
        self._trust_memo = (float(my - b * mp), float(b))
        return self._trust_memo

    @_one_thread
    def prob_next(self, li: int, expert: int) -> float:
        """Probability that `expert` is chosen at layer index li's next step, scaled by max(1, calibration).

        Never scaled down: `calibration` is measured on guesses of experts the cache does not hold that cleared the
        threshold (they overshoot), while the expert asked about here is a cached one (the victim of a load), chosen
        recently and likelier than its estimate says. Scaled by a calibration below 1 its odds came out 1.3-2x too
        low on zipf, markov and uniform traces; unscaled they are 0.65-0.93x of what came true (a victim slightly
        overpriced: the gate errs towards keeping it)."""
        return min(1.0, float(self._raw(li)[expert]) * max(1.0, self.calibration))

    @_one_thread
    def predict(self, li: int) -> tuple[int, list[int]]:
        """After observing layer index li: (layer index to prefetch for, experts ranked by probability)."""
        target, scored = self.predict_scored(li)
        return target, [e for e, _ in scored]

    @_one_thread
    def predict_scored(self, li: int, cached: set[int] | frozenset[int] = frozenset()
                       ) -> tuple[int, list[tuple[int, float]]]:
        """As predict(), with each expert's calibrated probability, taken one standard deviation below its estimate
        (what the gate weighs: never losing matters more than the last guess that might pay), ranked by it.
        Nothing is predicted from no evidence (a layer
        and source never seen followed). `cached`: experts of the target layer already in the cache; they are
        neither returned nor scored, so the calibration measures the guesses that would be read (an expert the
        cache already holds was chosen recently, and is likelier to be chosen again than one it does not)."""
        target = li + 1 if li + 1 < len(self.layers) else 0
        if target == 0:
            has = self.cur_token[0] is not None and self.same_n[0][self.cur_token[0]].any()
        else:
            has = (self.cur_token[li] is not None and self.cross_n[target][self.cur_token[li]].any()) or (
                self.prev_token[target] is not None and self.same_n[target][self.prev_token[target]].any())
        if not has:
            return target, []
        return target, self._scored(target, cached)

    @_one_thread
    def predict_token_ahead(self, li: int, cached: set[int] | frozenset[int] = frozenset()
                            ) -> list[tuple[int, float]]:
        """After observing layer index li of token t: the experts of layer index li at token t+1 (same-layer table),
        ranked, with calibrated probabilities taken as in predict_scored(). A guess made a whole token ahead has the
        other layers' steps to land in, instead of one expert's compute.

        >>> pf = MarkovPrefetcher([0, 1], 8)
        >>> for t in range(20):
        ...     pf.observe(0, [1, 2] if t % 2 else [3, 4]); _ = pf.predict_token_ahead(0); pf.observe(1, [5, 6])
        >>> [e for e, _ in pf.predict_token_ahead(0)]     # the last token (t = 19) chose [1, 2]: [3, 4] comes next
        [3, 4]
        """
        cur = self.cur_token[li]
        if cur is None or not self.same_n[li][cur].any():
            return []
        return self._scored(li, cached)

    def _scored(self, target: int, cached: set[int] | frozenset[int]) -> list[tuple[int, float]]:
        """The candidates for layer index target's next step, recorded for scoring against it."""
        both = self._both(target)
        raw = both[0].copy()
        if cached:
            raw[list(cached)] = 0.0
        # candidates by the raw estimate: a threshold on the calibrated one would, with a pessimistic start, never
        # predict, so never be scored, so never learn; the gate judges the calibrated one
        picks = np.flatnonzero(raw >= self.threshold)
        q = np.minimum(1.0, np.maximum(0.0, both[1][picks]) * self.calibration)
        order = np.argsort(-q, kind="stable")[: self.max_per_step or len(picks)]
        es, qs = picks[order].tolist(), q[order].tolist()
        self._pending[target] = list(zip(es, raw[es].tolist()))
        return list(zip(es, qs))


def chunk_share(block_size: int, expert_bytes: int) -> float:
    """A loader chunk's share of an expert, as `CostModel`'s `chunk_frac` means it: at most 1, since an expert
    smaller than one chunk is read as a single chunk of its own size (what a speculative chunk puts in a foreground
    read's way is then at most one expert's read, not block_size / expert_bytes of them).

    >>> chunk_share(1 << 20, 4 << 20), chunk_share(1 << 20, 108 << 10)
    (0.25, 1.0)
    """
    if block_size <= 0 or expert_bytes <= 0:
        raise ValueError(f"block_size {block_size} and expert_bytes {expert_bytes} must be positive")
    return min(1.0, block_size / expert_bytes)


class CostModel:
    """Issue a speculative read only when it is expected to pay, measured online:

        q x gain > (1 - q) x (loss + p_victim x stall_s)

    - q: the guess's (calibrated) probability of being needed at the step it is read for;
    - gain: what a right guess saves: `landed_frac` (the fraction of its read complete when it is first needed,
      measured at each use; the rest is still waited for) x `stall_s` (seconds the consumer blocks per
      foreground miss);
    - loss: the disk time a wrong guess takes from foreground reads: `waste_frac` (what it read, or was reading,
      when it was found wrong, as a fraction of an expert: measured at each withdrawal, and 1 for a wrong guess
      whose read had completed) x `stall_s` x `miss_step` (the fraction of steps with a foreground read to delay).
      Every byte counts, even one read while the consumer computed: on a shared or throttled disk idle time is not
      free, and a gate that assumed it was would let prefetching lose;
    - p_victim x stall_s: the load takes a slot; if that slot holds an expert (the cache's first victim), evicting it
      costs a whole miss if the guess is wrong and the victim is needed before the next miss would have evicted it
      anyway, about its probability of being chosen at its layer's next step (`MarkovPrefetcher.prob_next`, never calibrated
      down: the victim is a cached expert, likelier than the uncached guesses the calibration is measured on). A
      right guess costs no victim: the miss it saves would have evicted that same expert (first in the cache's order). A
      free slot costs nothing.
    Both fractions start at `window_frac` (what a guess may read before it is needed, as a fraction of an expert)
    and move from there (one sample never decides alone). Each figure is an exponential moving average (weight
    `alpha`). Until `warmup` misses have been measured nothing is admitted: speculation starts only once it can be
    judged. `admitted` and `refused` count the decisions, `right` and `wrong` the outcomes fed back.

    `window` is how many chunks a guess may read before it is needed (the loader's `spec_window`): it grows by one
    while withdrawals find nothing in flight and halves when they find some, so that what a wrong guess reads
    lands in the disk's idle time.

    >>> cm = CostModel(warmup=1, window_frac=0.5)
    >>> cm.observe(io_wait_s=0.5, misses=5)  # stall 0.1 s, every step misses
    >>> cm.admit(0.6), cm.admit(0.4)    # gain 0.5 x 0.1 s, loss 0.5 x 0.1 s x 1: pays above even odds
    (True, False)
    >>> cm.admit(0.6, p_victim=0.3)     # ... but not at the price of a victim needed three times in ten
    False
    >>> for _ in range(30):             # right guesses landed half-way, wrong ones had read 5%
    ...     cm.observe_used(0.5); cm.observe_stale(0.05, 0.0)
    >>> cm.admit(0.2)
    True

    `chunk_frac` set (a chunk's share of an expert): the guesses are made a token ahead and read only in the disk's
    idle time, behind a loader window of `window` chunks (io_uring's `spec_window`: a speculative chunk is issued
    only while no foreground chunk is with the disk, at most `window` at once). Then what a guess takes from the
    foreground is not its bytes but the time foreground reads queue behind speculative chunks already with the
    disk, measured (`observe_in_way`: such chunks per guess issued, starting at a whole window per guess), and the
    test is

        q x gain > in_way x chunk_frac x stall_s + read_s + p_victim x stall_s

    with the victim priced whether the guess is right or wrong: held for a token, a guess evicts its victim
    that much earlier than the miss it saves would have. `read_s` is what reading one expert while the consumer
    computes costs the computation, right guess or wrong: on a virtual machine the guest's CPUs do work for every
    byte read (on the 2-core bench VM a guess streaming beside the expert kernel slowed it from 9.7 to 14-15 ms,
    about 0.2 ms of compute per MiB read, 20 ms per 99 MB expert), so idle disk time is not free.

    How `read_s` is learned (`observe_compute(seconds, bytes_landed, speculating)`): an expert computed with no
    guess under way and nothing landing sets the base compute time; an expert computed while a guess's chunks are
    with the disk prices a read at (seconds - base) / bytes landed meanwhile, per byte, so the price scales with the
    size of the expert a guess reads (`expert_bytes`). Computations beside a foreground miss's reads alone are not
    used: a miss lands in bursts early in a computation (about 0.06 ms a MiB here), a guess streams through it.
    Until `warmup` such computations are measured a read is priced at a whole miss (pessimistic), and the only
    guesses admitted are exploration: one that would pay if reads cost nothing, admitted while what exploration has
    been charged (each explored guess at its expected net cost with the read at a whole miss) stays within
    `explore_frac` of the time observed so far (I/O wait plus compute: about 1% of the run). Once measured,
    exploration stops for good and the measured price decides; where reads are expensive the gate then stays shut,
    where they are free it admits. `read_frac` fixes the price at that fraction of a miss instead (the I/O-free
    replay).

    >>> cm = CostModel(warmup=1, window_frac=1.0, window=4, chunk_frac=0.01, expert_bytes=100 << 20)
    >>> cm.observe(io_wait_s=0.5, misses=5)
    >>> cm.observe_compute(0.010, 0, False); cm.observe_compute(0.010, 50 << 20, True)  # reads cost no compute
    >>> cm.admit(0.1), cm.admit(0.03)   # 0.1 x 0.1 s > 4 x 0.01 x 0.1 s: a one-in-ten guess pays when it lands
    (True, False)
    >>> cm.admit(0.3, p_victim=0.3)     # but never at the price of a victim as likely as itself
    False
    >>> for _ in range(30): cm.observe_compute(0.015, 25 << 20, True)   # 25 MiB beside a guess cost 5 ms
    >>> round(cm.read_ms_per_mib, 3), cm.admit(0.2), cm.admit(0.3)      # 20 + 4 ms a guess: right 1 in 4
    (0.2, False, True)
    """

    def __init__(self, alpha: float = 0.2, warmup: int = 4, window_frac: float = 1.0, window: int = 32,
                 unit_stall: float | None = None, chunk_frac: float | None = None, expert_bytes: int = 0,
                 read_frac: float | None = None, explore_frac: float = 0.01):
        """unit_stall: price every miss at this many seconds instead of the time measured (I/O-free replays).
        chunk_frac: guesses read in idle time only (see above); None: every byte a guess reads is priced.
        expert_bytes: the size of a guess's read (for read_s); read_frac: read_s as a fraction of a miss, fixed.
        explore_frac: what guesses admitted only to measure a read's price may cost, as a share of the time observed
        (0: none, and the price of a read is never learned)."""
        self._busy, self._owner = threading.Lock(), None  # see _one_thread
        self.alpha, self.warmup, self.unit_stall = alpha, warmup, unit_stall
        self.chunk_frac, self.expert_bytes, self.read_frac = chunk_frac, expert_bytes, read_frac
        self.compute_base = 0.0  # seconds an expert's compute takes with nothing landing meanwhile (EMA)
        self.base_seen = 0
        self._extra_s = self._extra_bytes = 0.0  # beside a guess: compute beyond the base, bytes landed (EMAs)
        self.read_seen = 0  # computations measured beside a guess's read
        self.explore_frac = explore_frac
        self.elapsed_s = 0.0  # I/O wait plus compute observed: what the exploration budget is a share of
        self.explore_spent_s = 0.0  # explored guesses, each charged at its expected net cost, the read at a miss
        self.explored = 0
        self.in_way_chunks = 0.0  # speculative chunks found with the disk by foreground reads, in all
        self.in_way_guesses = 0  # guesses issued over the same period
        self.max_window = self.window = max(1, window)
        self.stall_s = self.miss_step = 0.0
        self.waste_frac = self.landed_frac = min(1.0, max(0.0, window_frac))
        self.misses_seen = self.steps_seen = 0
        self.admitted = self.refused = 0
        self.right = self.wrong = 0

    def _ema(self, old: float, new: float, first: bool) -> float:
        return new if first else old + self.alpha * (new - old)

    @_one_thread
    def observe(self, io_wait_s: float, misses: int) -> None:
        """One step's figures: the time blocked on reads and its foreground misses."""
        if self.unit_stall is not None:
            io_wait_s = misses * self.unit_stall
        self.elapsed_s += io_wait_s
        self.miss_step = self._ema(self.miss_step, 1.0 if misses else 0.0, self.steps_seen == 0)
        self.steps_seen += 1
        if misses:
            self.stall_s = self._ema(self.stall_s, io_wait_s / misses, self.misses_seen == 0)
            self.misses_seen += misses

    @_one_thread
    def observe_stale(self, read_frac: float, inflight_frac: float = 0.0, n: int = 1) -> None:
        """n wrong guesses were found stale having read (or reading) read_frac of an expert on average, of which
        inflight_frac was still with the disk (1.0, 0.0 for a guess whose read had completed)."""
        for _ in range(n):
            self.waste_frac = self._ema(self.waste_frac, min(1.0, max(0.0, read_frac)), False)
        self.wrong += n
        # the window a guess may read ahead: as large as lands before the next step (additive increase while
        # withdrawals find nothing in flight, halved when they find some)
        if n and self.chunk_frac is None:  # idle-time guesses read whole: the window bounds only what is in the way
            self.window = min(self.max_window, self.window + 1) if inflight_frac <= 0 else max(1, self.window // 2)

    @_one_thread
    def observe_used(self, landed_frac: float, n: int = 1) -> None:
        """n right guesses were first needed with, on average, this fraction of their read complete."""
        for _ in range(n):
            self.landed_frac = self._ema(self.landed_frac, min(1.0, max(0.0, landed_frac)), False)
        self.right += n

    @property
    def gain_s(self) -> float:
        return self.landed_frac * self.stall_s

    @_one_thread
    def observe_compute(self, seconds: float, bytes_landed: int, speculating: bool) -> None:
        """One expert computed in `seconds` while `bytes_landed` bytes of reads (any) completed; `speculating`: a
        guess's read was under way meanwhile (see the class docstring for which computations price a read).

        >>> cm = CostModel(warmup=2, chunk_frac=0.01, expert_bytes=10 << 20)
        >>> cm.observe_compute(0.010, 0, False)          # the base: nothing landing, no guess
        >>> cm.observe_compute(0.013, 30 << 20, False)   # a miss's burst: not a guess's price
        >>> cm.read_seen, cm.observe_compute(0.012, 10 << 20, True), cm.read_seen
        (0, None, 1)
        """
        self.elapsed_s += seconds
        if not speculating:
            if bytes_landed <= 0:
                self.compute_base = self._ema(self.compute_base, seconds, self.base_seen == 0)
                self.base_seen += 1
        elif self.base_seen and bytes_landed > 0:
            # extra seconds and bytes averaged apart, not their ratio: a computation with little landing (a guess
            # held back behind a miss) would give a per-byte figure all noise, and weigh as much as a whole stream
            first = self.read_seen == 0
            self._extra_s = self._ema(self._extra_s, max(0.0, seconds - self.compute_base), first)
            self._extra_bytes = self._ema(self._extra_bytes, float(bytes_landed), first)
            self.read_seen += 1

    @property
    def read_cost(self) -> float:
        """Extra compute seconds per byte that lands beside a guess (0 until measured)."""
        return self._extra_s / self._extra_bytes if self._extra_bytes else 0.0

    @property
    def read_measured(self) -> bool:
        """The price of a read is known: fixed (`read_frac`, the replay's) or measured over `warmup` computations."""
        return self.read_frac is not None or self.read_seen >= self.warmup

    @property
    def read_ms_per_mib(self) -> float:
        """The measured price of a read, in ms of compute per MiB (0 until measured)."""
        return self.read_cost * 1e3 * (1 << 20)

    @property
    def read_s(self) -> float:
        """What reading one guess costs the computation it overlaps (see the class docstring): a whole miss until
        measured."""
        if self.read_frac is not None:
            return self.read_frac * self.stall_s
        if not self.read_measured:
            return self.stall_s
        return self.read_cost * self.expert_bytes

    @_one_thread
    def observe_in_way(self, chunks: int, guesses: int) -> None:
        """Running totals, not increments (the loader's `spec_in_way` and the cache's `prefetch_issued`, read once a
        step): foreground reads have found `chunks` speculative chunks with the disk while `guesses` guesses were
        issued."""
        self.in_way_chunks = chunks
        self.in_way_guesses = guesses

    @property
    def in_way(self) -> float:
        """Speculative chunks a foreground read queues behind, per guess issued: a whole window per guess until
        measured (four guesses' worth of evidence)."""
        w = 4.0
        return (self.in_way_chunks + self.window * w) / (self.in_way_guesses + w)

    @property
    def loss_s(self) -> float:
        if self.chunk_frac is not None:
            return self.in_way * self.chunk_frac * self.stall_s + self.read_s
        return self.waste_frac * self.stall_s * self.miss_step

    def _decide(self, q: float, p_victim: float, victim_steps: int) -> tuple[bool, float]:
        """(admit?, what exploring costs: 0.0 for a guess admitted on its measured merits)."""
        q = min(1.0, max(0.0, q))
        pv = min(1.0, max(0.0, p_victim)) * (1.0 - self.miss_step) ** max(0, victim_steps - 1)
        if self.misses_seen < self.warmup:
            return False, 0.0
        if self.chunk_frac is None:
            return q * self.gain_s > (1.0 - q) * (self.loss_s + pv * self.stall_s), 0.0
        other = self.in_way * self.chunk_frac * self.stall_s + pv * self.stall_s
        if q * self.gain_s > other + self.read_s:
            return True, 0.0
        if self.read_measured or q * self.gain_s <= other:
            return False, 0.0  # measured and too dear, or not worth it even were reads free
        # the read's price is unknown: explore, within the budget, with a guess that pays if reads are cheap
        charge = other + self.read_s - q * self.gain_s
        return self.explore_spent_s + charge <= self.explore_frac * self.elapsed_s, charge

    @_one_thread
    def shut(self) -> bool:
        """A token ahead, with the price of a read measured: not even a certain guess in a free slot would pay, so
        nothing need be predicted (the prediction is most of the prefetch path's own cost). It reopens if the stall
        grows."""
        return (self.chunk_frac is not None and self.misses_seen >= self.warmup and self.read_measured
                and not self.pays(1.0))

    @_one_thread
    def pays(self, q: float, p_victim: float = 0.0, victim_steps: int = 1) -> bool:
        """admit()'s decision without counting it (a free slot when p_victim is 0: the most a guess can hope for)."""
        return self._decide(q, p_victim, victim_steps)[0]

    @_one_thread
    def admit(self, q: float, p_victim: float = 0.0, victim_steps: int = 1) -> bool:
        """Is a read of an expert needed with probability q expected to gain more than it costs, when the slot it
        takes holds an expert needed with probability p_victim (0: a free slot) at its layer's next step, which
        comes `victim_steps` steps from now (1: the step the guess is for)? A victim whose layer comes later is lost
        only if no step before it misses (a miss would evict it anyway, being first in the cache's order): its odds are
        discounted by (1 - miss_step) per step in between. A guess admitted to explore (a token ahead, the price of
        a read not yet measured) is charged against the exploration budget."""
        ok, charge = self._decide(q, p_victim, victim_steps)
        if ok:
            self.admitted += 1
            if charge:
                self.explored += 1
                self.explore_spent_s += charge
        else:
            self.refused += 1
        return ok
