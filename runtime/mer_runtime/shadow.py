"""`ShadowCache`: the layer-aware eviction of `ExpertCache` on keys alone, for the odds duel (`stepper.OddsDuel`).

The duel replays every layer step in two shadow caches. Built from `ExpertCache` itself (a pool, a loader that reads
nothing, locks, tickets, per-thread steps), a shadow step cost about 0.12 ms of Python, twice a step: most of what
the prefetcher's bookkeeping costs. A shadow needs none of that machinery: one thread, no reads, no pins, no guesses,
every expert released before the next is taken. What is left is the victim rule (`ExpertCache._layer_victim`, the
module docstring of cache.py, "Eviction"), written out again here on plain dicts. The two must agree decision for
decision: tests/test_eviction.py replays random traces through both and compares hits, misses and contents after
every step. Change the rule in one, change it in the other.
"""

from __future__ import annotations

from itertools import islice

import numpy as np

from .cache import ODDS_SCAN, Key, _keep_value


class ShadowCache:
    """A key-only cache of `slots` experts of the layers `layers` (in a token's order), evicting as `ExpertCache`
    with that layer order does. `step(keys)` is `fetch(keys)` then `acquire` and `release` of each key in turn.

    >>> c = ShadowCache([0, 1], 2)
    >>> c.step([(0, 1), (0, 2)]); c.step([(1, 3)])   # (0, 1) goes: its layer's least recently used
    >>> c.step([(0, 2)])
    >>> c.hits, c.misses, sorted(c.keys())
    (1, 3, [(0, 2), (1, 3)])
    """

    def __init__(self, layers: list[int], slots: int):
        if slots < 2:
            raise ValueError("a shadow cache needs at least 2 slots, as ExpertCache does")
        self.order = {layer: i for i, layer in enumerate(layers)}
        self.n_slots = slots
        self.free = slots
        self.buckets: dict[int, dict[int, int]] = {}  # layer -> {expert: tick}, least recently used first
        self.clock = 0
        self.hits = self.misses = 0
        self.odds: dict[int, np.ndarray] = {}
        self.ab = (1.0, 0.0)
        self._pos = -1  # the order index of the step under way
        self._ds: dict[int, list[tuple[int, int]]] = {}  # pos -> [(layer, d)], furthest first

    def keys(self) -> list[Key]:
        return [(layer, e) for layer, b in self.buckets.items() for e in b]

    def set_odds(self, odds: dict[int, np.ndarray], intercept: float, slope: float) -> None:
        self.odds.update(odds)
        self.ab = (float(intercept), float(slope))

    def step(self, keys: list[Key]) -> None:
        if not keys:
            return
        layer = keys[0][0]
        self._pos = self.order.get(layer, -1)
        step = set(keys)
        fresh: set[Key] = set()  # fetched for this step, not yet acquired: its first acquire is the miss
        for key in dict.fromkeys(keys):  # fetch: every absent key at once, as slots allow
            if self._has(key):
                continue
            if self.free:
                self.free -= 1
            else:
                v = self._victim(step)
                if v is None:
                    break
                self._drop(v)
            self._put(key)
            fresh.add(key)
        for key in keys:  # acquire (and release) each in turn
            if key in fresh:
                fresh.discard(key)
                self.misses += 1
            elif self._has(key):
                self.hits += 1
            else:  # fetch found no slot for it: only the step's own experts are left, the least recent goes
                self.misses += 1
                self._drop(self._oldest())
                self._put(key)
                step.add(key)
                continue
            self._touch(key)
            step.add(key)

    # -- the cache ---------------------------------------------------------------------------------------------
    def _has(self, key: Key) -> bool:
        b = self.buckets.get(key[0])
        return b is not None and key[1] in b

    def _put(self, key: Key) -> None:
        self.clock += 1
        self.buckets.setdefault(key[0], {})[key[1]] = self.clock

    def _touch(self, key: Key) -> None:
        b = self.buckets[key[0]]
        del b[key[1]]
        self.clock += 1
        b[key[1]] = self.clock

    def _drop(self, key: Key) -> None:
        b = self.buckets[key[0]]
        del b[key[1]]
        if not b:
            del self.buckets[key[0]]

    def _oldest(self) -> Key:
        return min(((layer, e) for layer, b in self.buckets.items() for e in b),
                   key=lambda key: self.buckets[key[0]][key[1]])

    def _distances(self) -> list[tuple[int, int]]:
        ds = self._ds.get(self._pos)
        if ds is None:
            n = len(self.order)
            ds = sorted(((layer, (li - self._pos) % n or n) for layer, li in self.order.items()), key=lambda x: -x[1])
            self._ds[self._pos] = ds
        extra = [layer for layer in self.buckets if layer not in self.order]
        return [(layer, len(self.order)) for layer in extra] + ds if extra else ds

    def _victim(self, step: set[Key]) -> Key | None:
        """`ExpertCache._layer_victim` for entries that are all idle, complete, unpinned and not guesses: the step
        under way's experts are not candidates."""
        a, b = self.ab
        use_odds = b > 0 and bool(self.odds)
        floor = max(a, 1e-12)
        best: Key | None = None
        bval, btick = 0.0, 0
        for layer, d in self._distances():
            bucket = self.buckets.get(layer)
            if not bucket:
                continue
            if best is not None and floor / d > bval:
                break
            odds = self.odds.get(layer) if use_odds else None
            if odds is None:  # one P for all: the first ordinary entry
                for e, t in bucket.items():
                    if (layer, e) not in step:
                        v = floor / d
                        if best is None or v < bval or (v == bval and t < btick):
                            best, bval, btick = (layer, e), v, t
                        break
                continue
            n = len(odds)
            win = sorted(islice(bucket.items(), ODDS_SCAN),
                         key=lambda et: (float(odds[et[0]]) if 0 <= et[0] < n else 0.0, et[1]))
            cand: int | None = None
            cval, ctick = 0.0, 0
            for e, t in win:
                v = _keep_value(odds, e, a, b, d)
                if cand is not None and v > cval:
                    break
                if (layer, e) not in step and (cand is None or v < cval or t < ctick):
                    cand, cval, ctick = e, v, t
            if cand is None and len(bucket) > len(win):  # the layer's first ODDS_SCAN entries not in the step
                scored = 0
                for e, t in bucket.items():
                    if (layer, e) in step:
                        continue
                    v = _keep_value(odds, e, a, b, d)
                    if cand is None or v < cval or (v == cval and t < ctick):
                        cand, cval, ctick = e, v, t
                    scored += 1
                    if scored >= ODDS_SCAN:
                        break
            if cand is not None and (best is None or cval < bval or (cval == bval and ctick < btick)):
                best, bval, btick = (layer, cand), cval, ctick
        if best is not None:
            return best
        # ExpertCache's fallback: every entry (only the step's own are left out above; none remains outside it)
        return None
