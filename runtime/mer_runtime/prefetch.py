"""First-order Markov expert prefetcher.

Two transition tables, learned online from the routing it observes:
- same-layer: experts of layer L at token t-1 -> experts of layer L at token t;
- cross-layer: experts of layer L-1 at token t -> experts of layer L at token t.
After layer L of token t it predicts layer L+1 of the same token (cross-layer table), and after the last layer it
predicts the first layer of the next token (same-layer table). An expert is prefetched when its estimated
probability is at least `threshold_scale / n_experts`: with hundreds of experts every probability is small, so a
fixed threshold would never fire. Prefetches in flight are bounded by the caller's cache (`max_inflight`).

`CostModel` decides whether a predicted expert is worth a speculative read at all (see its docstring): a wasted
read costs in full when the disk is the bottleneck, so the threshold alone can make prefetching lose. Neither
class is thread-safe: one of each per stream of tokens (smoke's driver).
"""

from __future__ import annotations

import numpy as np


class MarkovPrefetcher:
    def __init__(self, layers: list[int], n_experts: int, *, threshold_scale: float = 2.0, max_inflight: int = 2,
                 max_per_step: int | None = None):
        self.layers = list(layers)
        self.n = n_experts
        self.threshold = min(1.0, threshold_scale / n_experts)
        self.max_inflight = max_inflight
        self.max_per_step = max_per_step
        L = len(self.layers)
        self.same = np.zeros((L, n_experts, n_experts), np.float32)
        self.cross = np.zeros((L, n_experts, n_experts), np.float32)
        self.prev_token: list[list[int] | None] = [None] * L  # last seen experts per layer (previous token)
        self.cur_token: list[list[int] | None] = [None] * L

    def observe(self, li: int, experts: list[int]) -> None:
        """Layer index li (position in `layers`) of the current token routed to `experts`."""
        if li == 0:
            self.prev_token, self.cur_token = self.cur_token, [None] * len(self.layers)
        prev = self.prev_token[li]
        if prev is not None:
            self.same[li][np.ix_(prev, experts)] += 1
        if li > 0 and self.cur_token[li - 1] is not None:
            self.cross[li][np.ix_(self.cur_token[li - 1], experts)] += 1
        self.cur_token[li] = list(experts)

    def _probs(self, table: np.ndarray, sources: list[int] | None) -> np.ndarray:
        if not sources:
            return np.zeros(self.n, np.float32)
        rows = table[sources]
        totals = rows.sum(axis=1, keepdims=True)
        return (rows / np.maximum(totals, 1)).max(axis=0)  # the best evidence among the source experts

    def predict(self, li: int) -> tuple[int, list[int]]:
        """After observing layer index li: (layer index to prefetch for, experts ranked by probability)."""
        target, scored = self.predict_scored(li)
        return target, [e for e, _ in scored]

    def predict_scored(self, li: int) -> tuple[int, list[tuple[int, float]]]:
        """As predict(), with each expert's estimated probability."""
        if li + 1 < len(self.layers):
            target = li + 1
            probs = np.maximum(self._probs(self.cross[target], self.cur_token[li]),
                               self._probs(self.same[target], self.prev_token[target]))
        else:
            target = 0
            probs = self._probs(self.same[0], self.cur_token[0])
        picks = np.flatnonzero(probs >= self.threshold)
        picks = picks[np.argsort(-probs[picks], kind="stable")]
        return target, [(int(e), float(probs[e])) for e in picks[: self.max_per_step or len(picks)]]


class CostModel:
    """Issue a speculative read only when it is expected to pay: p x gain > (1 - p) x loss, measured online.

    - gain: what a right guess saves: `landed_frac` (the fraction of its read complete when it is first needed,
      measured at each use; the rest is still waited for) x `stall_s` (seconds the consumer blocks per
      foreground miss);
    - loss: the disk time a wrong guess takes from foreground reads: `waste_frac` (what it read, or was reading,
      when it was found wrong and withdrawn, as a fraction of an expert; measured at each withdrawal) x `stall_s`
      x `miss_step` (the fraction of steps with a foreground read to delay). Every byte counts, even one read
      while the consumer computed: on a shared or throttled disk idle time is not free, and a gate that assumed
      it was would let prefetching lose.
    p itself is calibrated: a first-order table says 1.0 after one sighting, so admit() judges p x `calibration`,
    the ratio of the right guesses among those resolved (used, or withdrawn as wrong) to the mean p they were
    admitted with (1 until guesses resolve).
    Both fractions start at `window_frac` and move from there (one sample never decides alone). Each figure is an
    exponential moving average (weight `alpha`). Until `warmup` misses have been measured nothing is admitted:
    speculation starts only once it can be judged. `admitted` and `refused` count the decisions.

    `window` is how many chunks a guess may read before it is needed (the loader's `spec_window`): it grows by one
    while withdrawals find nothing left in flight and halves when they find some, so that what a wrong guess reads
    lands in the disk's idle time.

    >>> cm = CostModel(warmup=1, window_frac=0.5)
    >>> cm.observe(io_wait_s=0.5, misses=5)  # stall 0.1 s, every step misses
    >>> cm.admit(0.6), cm.admit(0.4)    # gain 0.5 x 0.1 s, loss 0.5 x 0.1 s x 1: pays above even odds
    (True, False)
    >>> for _ in range(30):             # half the guesses were right (half landed), half wrong (5% read)
    ...     cm.observe_used(0.5); cm.observe_stale(0.05, 0.0)
    >>> cm.admit(0.2)
    True
    """

    def __init__(self, alpha: float = 0.2, warmup: int = 4, window_frac: float = 1.0, window: int = 32):
        self.alpha, self.warmup = alpha, warmup
        self.max_window = self.window = max(1, window)
        self.stall_s = self.miss_step = 0.0
        self.waste_frac = self.landed_frac = min(1.0, max(0.0, window_frac))
        self.misses_seen = self.steps_seen = 0
        self.admitted = self.refused = 0
        self.p_admitted = self.right = 0.5  # moving averages of admitted p and of outcomes: calibration 1 at first

    def _ema(self, old: float, new: float, first: bool) -> float:
        return new if first else old + self.alpha * (new - old)

    def observe(self, io_wait_s: float, misses: int) -> None:
        """One step's figures: the time blocked on reads and its foreground misses."""
        self.miss_step = self._ema(self.miss_step, 1.0 if misses else 0.0, self.steps_seen == 0)
        self.steps_seen += 1
        if misses:
            self.stall_s = self._ema(self.stall_s, io_wait_s / misses, self.misses_seen == 0)
            self.misses_seen += misses

    def observe_stale(self, read_frac: float, inflight_frac: float = 0.0, n: int = 1) -> None:
        """n wrong guesses were withdrawn having read (or reading) read_frac of an expert on average, of which
        inflight_frac was still with the disk."""
        for _ in range(n):
            self.waste_frac = self._ema(self.waste_frac, min(1.0, max(0.0, read_frac)), False)
            self.right = self._ema(self.right, 0.0, False)
        # the window a guess may read ahead: as large as lands before the next step (additive increase while
        # withdrawals find nothing in flight, halved when they find some)
        self.window = min(self.max_window, self.window + 1) if inflight_frac <= 0 else max(1, self.window // 2)

    def observe_used(self, landed_frac: float, n: int = 1) -> None:
        """n right guesses were first needed with, on average, this fraction of their read complete."""
        for _ in range(n):
            self.landed_frac = self._ema(self.landed_frac, min(1.0, max(0.0, landed_frac)), False)
            self.right = self._ema(self.right, 1.0, False)

    @property
    def calibration(self) -> float:
        return self.right / self.p_admitted if self.p_admitted > 0 else 1.0

    @property
    def gain_s(self) -> float:
        return self.landed_frac * self.stall_s

    @property
    def loss_s(self) -> float:
        return self.waste_frac * self.stall_s * self.miss_step

    def admit(self, p: float) -> bool:
        """Is a read of an expert predicted with probability p expected to gain more than it costs?"""
        q = min(1.0, p * self.calibration)
        ok = self.misses_seen >= self.warmup and q * self.gain_s > (1.0 - q) * self.loss_s
        if ok:
            self.admitted += 1
            self.p_admitted = self._ema(self.p_admitted, p, False)
        else:
            self.refused += 1
        return ok
