"""First-order Markov expert prefetcher.

Two transition tables, learned online from the routing it observes:
- same-layer: experts of layer L at token t-1 -> experts of layer L at token t;
- cross-layer: experts of layer L-1 at token t -> experts of layer L at token t.
After layer L of token t it predicts layer L+1 of the same token (cross-layer table), and after the last layer it
predicts the first layer of the next token (same-layer table). An expert is prefetched when its estimated
probability is at least `threshold_scale / n_experts`: with hundreds of experts every probability is small, so a
fixed threshold would never fire. Prefetches in flight are bounded by the caller's cache (`max_inflight`).

`CostModel` decides whether a predicted expert is worth a speculative read at all (see its docstring): a wasted
read costs in full when the disk is the bottleneck, so the threshold alone can make prefetching lose.
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
    """Issue a speculative read only when it is expected to pay: p x stall > read x busy, measured online.

    - stall: seconds the consumer blocks per foreground miss (what a right guess saves);
    - read: seconds one expert read takes from start to ready (the disk time a wrong guess uses);
    - busy: the fraction of wall time the consumer is blocked on reads: the chance that a speculative read is in
      the way of a foreground one. While compute dominates the disk idles, speculation is nearly free and any
      likely expert is worth reading; when the disk is the bottleneck only near-certain guesses are.
    Each is an exponential moving average (weight `alpha`) of what the caller observes per step. Until `warmup`
    misses have been measured nothing is admitted: speculation starts only once it can be judged.

    >>> cm = CostModel(warmup=1)
    >>> cm.observe(wall_s=1.0, io_wait_s=0.5, misses=5, miss_latency_s=0.5)  # stall 0.1 s, read 0.1 s, busy 0.5
    >>> cm.admit(0.6), cm.admit(0.4)
    (True, False)
    """

    def __init__(self, alpha: float = 0.2, warmup: int = 4):
        self.alpha, self.warmup = alpha, warmup
        self.stall_s = self.read_s = self.busy = 0.0
        self.misses_seen = 0

    def _ema(self, old: float, new: float, first: bool) -> float:
        return new if first else old + self.alpha * (new - old)

    def observe(self, wall_s: float, io_wait_s: float, misses: int, miss_latency_s: float) -> None:
        """One step's figures: its wall time, the time blocked on reads, its foreground misses and their summed
        start-to-ready latency."""
        if wall_s > 0:
            self.busy = self._ema(self.busy, min(1.0, io_wait_s / wall_s), self.misses_seen == 0 and self.busy == 0)
        if misses:
            first = self.misses_seen == 0
            self.stall_s = self._ema(self.stall_s, io_wait_s / misses, first)
            self.read_s = self._ema(self.read_s, miss_latency_s / misses, first)
            self.misses_seen += misses

    def admit(self, p: float) -> bool:
        """Is a read of an expert predicted with probability p expected to gain more than it costs?"""
        if self.misses_seen < self.warmup:
            return False
        return p * self.stall_s > self.read_s * self.busy
