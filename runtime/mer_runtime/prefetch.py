"""First-order Markov expert prefetcher.

Two transition tables, learned online from the routing it observes:
- same-layer: experts of layer L at token t-1 -> experts of layer L at token t;
- cross-layer: experts of layer L-1 at token t -> experts of layer L at token t.
After layer L of token t it predicts layer L+1 of the same token (cross-layer table), and after the last layer it
predicts the first layer of the next token (same-layer table). An expert is prefetched when its estimated
probability is at least `threshold_scale / n_experts`: with hundreds of experts every probability is small, so a
fixed threshold would never fire. Prefetches in flight are bounded by the caller's cache (`max_inflight`).
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
        if li + 1 < len(self.layers):
            target = li + 1
            probs = np.maximum(self._probs(self.cross[target], self.cur_token[li]),
                               self._probs(self.same[target], self.prev_token[target]))
        else:
            target = 0
            probs = self._probs(self.same[0], self.cur_token[0])
        picks = np.flatnonzero(probs >= self.threshold)
        picks = picks[np.argsort(-probs[picks], kind="stable")]
        return target, [int(e) for e in picks[: self.max_per_step or len(picks)]]
