"""An expert cache over a buffer pool, with pinning, in-use protection and a slot kept for foreground loads; it
evicts layer-aware when it knows the model's layer order, least recently used otherwise.

Rules:
- a pinned expert, or one in use (between `acquire` and `release`), is never evicted;
- a slot whose read is still in flight is never handed to another expert, even when the read failed or the wait
  for it did (the slot is then quarantined with the withdrawn prefetches' until the loader says it landed);
- a prefetch may take a slot only if, after it, one slot is still free or holds an expert that has been used and
  is neither pinned nor in use: a foreground load never waits behind prefetches for room. Unused prefetches that
  are not stale (below), whether their reads have finished or not, never count towards that reserve, so the
  decision does not depend on how fast the disk was;
- a prefetch never evicts another prefetched expert that has not been used yet (its read would be lost), unless
  that guess is stale (below);
- a prefetch evicts an expert only if its caller's `admit(victim)` agrees (the prefetcher weighs the victim's
  chance of being needed against the guess's), and never one in its caller's `keep` (the experts its step has
  still to compute): a guess never silently pushes out a warmer expert;
- a stale prefetch (its step has passed, unused) is withdrawn by `cancel_stale`: a guess issued with `due` (the
  step it is for, on the caller's clock) is stale only once `cancel_stale(now=...)` reaches that step, so it survives
  the steps in between (a guess made a token ahead); one without `due` is stale at the next `cancel_stale`. Its
  chunks not yet issued are
  dropped, and its slot comes back once the chunks already issued have landed ("draining"), so a wrong guess costs
  at most the reads that were with the disk when it was found wrong. A stale prefetch whose read had already
  completed stays cached but moves to the least-recently-used end: it never earned its recency, so it is the
  first to go (counted in `prefetch_stale`);
- a foreground miss takes, in order: a free slot, an idle expert whose read is complete and that is not a guess
  held for a later step, then such a held guess (fetch stops there); failing those, acquire withdraws a guess
  still reading, one not held for a later step first. A guess is held until its `due` step; once
  `cancel_stale(now=...)` of its owner (each stream has its own clock) has seen that step (judged or not) it is an
  ordinary entry again.

Eviction (with `layers`, the layer order a token sweeps, as `ShardSet` passes it from the manifest): a token visits
the layers in a cycle, so an expert of the layer just computed is not needed for a whole token, while the previous
token's experts of the next layers are needed soonest; LRU evicts exactly those first. Each thread's step under way
is the layer of its latest `acquire` or `fetch` (a `fetch` names its keys; acquires of the same layer join them):
threads interleaving sequences are each at their own layer, every thread's step is protected and d is the least over
the threads' positions. Among
the candidates each rule above allows, the victim is, in order: a stale guess; an ordinary idle expert with the
lowest P / d, where d is the number of steps until its layer's next step ((its position - the current layer's)
mod the number of layers, a whole token for the current layer) and P its odds of being chosen then (`set_odds`: a
predictor's, shrunk to a constant when it has shown no skill; a constant without one, so the furthest layer goes
first); then an expert of a step under way; a guess held for a later step last. Ties go least recently used.
The search is bounded (`_layer_victim`): the entries are kept per layer in LRU order, layers visited furthest first.
Without `layers` the order is pure LRU, as before.

Threads: every method may be called from any thread. One lock (`_lock`, with its condition `_cv`) guards the
entries, the free list and the counters. The wait for a read and the checksum run outside it: the first thread that
needs a loading expert finishes it, and any other thread that wants the same expert waits for that same load (never
a second read). A thread that needs a slot while every slot is pinned or held by other threads waits for a
release; if it would wait for itself (it holds the only slots that could be freed), it gets a CacheError instead of
a deadlock.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Hashable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .buffers import BufferPool
from .errors import CacheError, MerError
from .loader import Loader, Ticket

Key = tuple[int, int]  # (layer, expert)

ODDS_SCAN = 8  # with odds: the least recently used idle experts of each layer scored per eviction
THREAD_TTL = 4096  # steps (of any thread) after which a thread not seen is forgotten


def _keep_value(odds: np.ndarray | None, expert: int, a: float, b: float, d: int) -> float:
    """What keeping an expert is worth per step until its layer's next step: P / d, P = a + b x its odds (odds 0 for
    an expert the array does not cover, or without odds), floored above 0 so that d still ranks equal odds."""
    p = a + b * float(odds[expert]) if odds is not None and 0 <= expert < len(odds) else a
    return max(p, 1e-12) / d


class Reservoir:
    """A bounded, uniformly sampled record of a stream of values (Vitter's algorithm R), for percentiles.

    >>> r = Reservoir(capacity=3)
    >>> for v in range(1000): r.append(float(v))
    >>> len(r), r.count                 # keeps 3 samples, counted 1000
    (3, 1000)
    """

    def __init__(self, capacity: int = 4096, seed: int = 0):
        self.capacity, self.count = capacity, 0
        self._items: list[float] = []
        self._rng = random.Random(seed)  # seeded: the same run keeps the same samples

    def append(self, v: float) -> None:
        self.count += 1
        if len(self._items) < self.capacity:
            self._items.append(v)
        else:
            j = self._rng.randrange(self.count)
            if j < self.capacity:
                self._items[j] = v

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[float]:
        return iter(list(self._items))


@dataclass(eq=False)
class Entry:
    key: Key
    slot: int
    ticket: Ticket | None  # None once the read is complete and checked
    started: float
    pinned: bool = False
    holders: dict[int, int] = field(default_factory=dict)  # thread id -> acquires not yet released
    prefetched: bool = False
    used: bool = False
    finishing: bool = False  # a thread is waiting for the read and checking it, outside the lock
    error: BaseException | None = None  # the load failed; waiters raise it
    foreground: bool = False  # started by a miss: its latency is recorded
    fetched: bool = False  # started by fetch(): the first acquire counts it as the miss
    stale: bool = False  # an unused prefetch whose step passed with its read complete: first in line for eviction
    due: int | None = None  # a prefetch: the step it is for (the caller's clock); None: the next cancel_stale's
    tick: int = 0  # recency (larger: more recently used), to break ties between layers' buckets as LRU does
    owner: Hashable | None = None  # a prefetch: whose guess it is (`prefetch(owner=...)`); judged by its owner only


class _Entries(OrderedDict):
    """The cache's entries in LRU order, also kept per layer (each layer's bucket in LRU order, pinned entries
    left out) and with the stale guesses apart: the layer-aware victim is then found by looking at the head of a few
    buckets instead of ranking every entry under the lock. Not thread-safe: the cache's lock guards it."""

    def __init__(self) -> None:
        super().__init__()
        self.buckets: dict[int, OrderedDict[Key, Entry]] = {}
        self.stale: dict[Key, Entry] = {}
        self.clock = 0
        self.dirty: set[int] = set()  # layers whose bucket changed since the victim search last looked (its windows)

    def __setitem__(self, key: Key, e: Entry) -> None:
        if key in self:  # a re-inserted key goes to the most recent end, as its new tick says, in both orders
            del self[key]
        super().__setitem__(key, e)
        self.clock += 1
        e.tick = self.clock
        if not e.pinned:
            self.buckets.setdefault(key[0], OrderedDict())[key] = e
            self.dirty.add(key[0])

    def __delitem__(self, key: Key) -> None:
        super().__delitem__(key)
        self._forget(key)

    # OrderedDict's own pop/popitem/clear bypass __delitem__: routed through it so the buckets never keep a ghost
    def pop(self, key: Key, *default: Entry) -> Entry:  # type: ignore[override]
        if key not in self:
            if default:
                return default[0]
            raise KeyError(key)
        e = super().__getitem__(key)
        del self[key]
        return e

    def popitem(self, last: bool = True) -> tuple[Key, Entry]:
        if not self:
            raise KeyError("popitem(): no entries")
        key = next(reversed(self)) if last else next(iter(self))
        return key, self.pop(key)

    def clear(self) -> None:
        super().clear()
        self.dirty.update(self.buckets)
        self.buckets.clear()
        self.stale.clear()

    def _forget(self, key: Key) -> None:
        b = self.buckets.get(key[0])
        if b is not None:
            b.pop(key, None)
            self.dirty.add(key[0])
            if not b:
                del self.buckets[key[0]]
        self.stale.pop(key, None)

    def move_to_end(self, key: Key, last: bool = True) -> None:
        super().move_to_end(key, last)
        e = self[key]
        self.clock += 1
        e.tick = self.clock if last else -self.clock
        b = self.buckets.get(key[0])
        if b is not None and key in b:
            b.move_to_end(key, last)
            self.dirty.add(key[0])

    def mark_stale(self, key: Key) -> None:
        e = self[key]
        e.stale = True
        self.stale[key] = e

    def set_pinned(self, key: Key, pinned: bool) -> None:
        e = self[key]
        if e.pinned == pinned:
            return
        e.pinned = pinned
        self.dirty.add(key[0])
        if pinned:
            b = self.buckets.get(key[0])
            if b is not None:
                b.pop(key, None)
                if not b:
                    del self.buckets[key[0]]
        else:  # back in its bucket where its recency puts it (unpinning is rare: a re-sort of one bucket is fine)
            b = self.buckets.setdefault(key[0], OrderedDict())
            b[key] = e
            for k in sorted(b, key=lambda k: b[k].tick):
                b.move_to_end(k)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0  # evicted before any use
    prefetch_skipped: int = 0  # no slot could be spared
    prefetch_failed: int = 0  # the read or the checksum failed (reported to whoever acquires it, if anyone)
    prefetch_cancelled: int = 0  # stale (the step it was for has passed, unused) and withdrawn before it completed
    cancelled_inflight_bytes: int = 0  # of the withdrawn prefetches: bytes with the disk when withdrawn
    cancelled_read_bytes: int = 0  # of the withdrawn prefetches: bytes read or being read (all they cost the disk)
    cancelled_size_bytes: int = 0  # of the withdrawn prefetches: their whole sizes (what the fractions are of)
    prefetch_stale: int = 0  # stale (unused when their step passed) with their reads complete: kept, demoted
    prefetch_landed: float = 0.0  # summed over used prefetches: the fraction of the read complete at first use
    load_latency: Reservoir = field(default_factory=Reservoir)  # seconds, foreground misses: start to ready
    io_wait: float = 0.0  # seconds callers spent blocked on reads (summed over threads)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": round(self.hit_rate, 4),
                "evictions": self.evictions, "prefetch_issued": self.prefetch_issued,
                "prefetch_used": self.prefetch_used, "prefetch_wasted": self.prefetch_wasted,
                "prefetch_skipped": self.prefetch_skipped, "prefetch_failed": self.prefetch_failed,
                "prefetch_cancelled": self.prefetch_cancelled, "prefetch_stale": self.prefetch_stale,
                "cancelled_read_bytes": self.cancelled_read_bytes, "cancelled_size_bytes": self.cancelled_size_bytes,
                "cancelled_inflight_bytes": self.cancelled_inflight_bytes}


@dataclass(eq=False)  # one per call, found by identity
class _PinCall:
    """What one pin() call has done so far, for its undo."""
    pinned: dict[Key, None] = field(default_factory=dict)  # the pins it counted
    coming: dict[Key, None] = field(default_factory=dict)  # keys it will pin once loaded
    holds: dict[Key, int] = field(default_factory=dict)  # the calling thread's holds of each key before the call


class ExpertCache:
    """`locate(key) -> (path, size)` says where an expert lives; `check(key, slot)` validates a finished load.

    >>> slot = cache.acquire((1, 3))      # doctest: +SKIP
    >>> view = pool.view(slot)            # doctest: +SKIP
    >>> cache.release((1, 3))             # doctest: +SKIP

    The view holds expert 3 of layer 1 until the release.
    """

    def __init__(self, pool: BufferPool, loader: Loader, locate: Callable[[Key], tuple[str, int]],
                 check: Callable[[Key, int], None] | None = None, layers: Sequence[int] | None = None):
        """`layers`: the model's MoE layers in the order a token visits them (the manifest's): the eviction
        ranking is then layer-aware (see "Eviction" below); None keeps pure LRU."""
        if pool.n_slots < 2:
            raise ValueError("the cache needs at least 2 slots: one is kept for foreground loads")
        self.pool, self.loader, self.locate, self.check = pool, loader, locate, check
        self.entries: _Entries = _Entries()  # LRU order: first is least recently used (and per layer)
        self.free = list(range(pool.n_slots - 1, -1, -1))
        self._draining: list[tuple[Ticket, int]] = []  # withdrawn prefetches: (ticket, slot) until their reads land
        self.stats = CacheStats()
        # `with self._lock`, never `with self._cv`: Condition's __enter__/__exit__ are Python functions, at whose
        # entry CPython runs a pending signal's handler, so a KeyboardInterrupt there left the lock held and every
        # later call (close() included) waiting for ever; the lock's own are C and release before any handler runs
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._pin_calls: set[_PinCall] = set()  # pin() calls under way: their keys still to pin count in the next check
        self._pin_count: dict[Key, int] = {}  # pin() calls standing per pinned expert (see pin); guarded by _cv
        self._closed = False
        # the latest step cancel_stale(now=..., owner=...) saw, per owner (each stream counts its own steps; None:
        # a caller judging every guess): a guess due at its owner's step or before is no longer held for later, even
        # if the caller never judged it at its step (it would otherwise be held, and evicted last, for ever)
        self._last_now: dict[Hashable, int] = {}
        # layer-aware eviction: the position of each layer in a token's sweep, the step under way (the layer of the
        # latest acquire or fetch and the keys it has taken), and the predictor's odds pushed by set_odds
        self._order: dict[int, int] | None = None if layers is None else {l: i for i, l in enumerate(layers)}
        # per thread (interleaved sequences, e.g. ShardSet.moe from several threads, are each at their own layer):
        # thread id -> [its layer, the keys of its step, when last seen (a count of steps entered)]
        self._threads: dict[int, list] = {}
        self._steps_entered = 0
        self._by_distance: tuple[tuple, list[tuple[int, int]]] | None = None  # (positions, [(layer, d)] furthest first)
        self.examined = 0  # entries looked at by layer-aware victim searches (a measure of their cost, for tests)
        self._odds: dict[int, np.ndarray] = {}
        self._odds_ab = (1.0, 0.0)  # (intercept, slope): P(used at its layer's next step) = a + b x odds
        # per layer with odds: (the odds array it was built with, its bucket's ODDS_SCAN least recently used entries
        # by ascending odds), kept until the bucket changes (entries.dirty) or new odds come
        self._windows: dict[int, tuple[np.ndarray, list[Entry]]] = {}
        # owner -> the prefetch counters of its guesses alone (`owner_stats`): a stream's gate learns its own outcomes
        self._owners: dict[Hashable, CacheStats] = {}

    # -- slots (all under self._cv) -------------------------------------------------------------------------
    def _count(self, e: Entry, name: str, v: float = 1) -> None:
        """Add v to a prefetch counter, in `stats` and in the counters of the guess's owner (if it has them)."""
        setattr(self.stats, name, getattr(self.stats, name) + v)
        o = self._owners.get(e.owner) if e.owner is not None else None
        if o is not None:
            setattr(o, name, getattr(o, name) + v)

    def _reclaim(self) -> None:
        """Give back the slots of withdrawn prefetches whose issued chunks have all landed (never blocks)."""
        if self._draining:
            still = []
            for t, slot in self._draining:
                if self.loader.ready(t):
                    self.free.append(slot)
                else:
                    still.append((t, slot))
            self._draining = still

    def _landed(self, e: Entry) -> float:
        """The fraction of e's read that is complete (chunks of the loader's block size)."""
        t = e.ticket
        if t is None or self.loader.ready(t):  # ready() accounts for the chunks that have landed (io_uring)
            return 1.0
        chunks = max(1, -(-t.size // self.loader.block_size))
        return max(0.0, 1.0 - t.remaining / chunks)

    def _held_for_later(self, e: Entry) -> bool:
        """An unused guess made for a step that has not come (`prefetch(due=...)`)."""
        if not (e.prefetched and not e.used and not e.stale and e.due is not None):
            return False
        clocks = self._last_now
        now = clocks.get(e.owner)
        if now is None:  # an owner that has passed no step (or is forgotten): the highest step any caller has passed
            now = max(clocks.values(), default=None)
        elif None in clocks:  # a caller that judges every guess judges this one too
            now = max(now, clocks[None])
        return now is None or e.due > now

    def _victim(self, ok: Callable[[Entry], bool]) -> Entry | None:
        """The first idle entry (neither pinned nor held) that ok() accepts in eviction order: without the layer
        order, the least recently used, one held for a later step only if there is no other; with it, see
        `_layer_victim`."""
        if self._order is not None:
            return self._layer_victim(ok)
        held: Entry | None = None
        for e in self.entries.values():
            if e.pinned or e.holders or not ok(e):
                continue
            if not self._held_for_later(e):
                return e
            if held is None:
                held = e
        return held

    def _layer_victim(self, ok: Callable[[Entry], bool]) -> Entry | None:
        """Layer-aware eviction order (the module docstring, "Eviction"): a stale guess; then an ordinary idle expert
        by what keeping it is worth per step until its layer's next step, P(used then) / steps until then; then an
        expert of a step under way; a guess held for a later step last. Ties least recently used.

        Bounded work under the lock: the layers are visited furthest first, and the visit stops at the first layer
        whose best possible score (odds 0) cannot beat the best found. Without odds for a layer P is the same for
        all its experts, so its candidate is the first ordinary entry of its bucket (least recently used first):
        by distance alone the search is O(layers), not O(entries). With odds a layer's candidate is its ordinary
        entry of lowest odds among the `ODDS_SCAN` least recently used entries of its bucket (a layer's experts share
        d; the recently used, which the odds favour anyway, are not looked at); only if none of those is ordinary
        (a step under way, held guesses), the lowest among its `ODDS_SCAN` least recently used ordinary entries.
        Those first entries, sorted by odds, are kept per layer until its bucket changes or its odds are replaced
        (a step changes two or three layers), so a layer costs about one look: its first ordinary entry in that
        order is its candidate (58 layers x 256 experts at 512 slots: about 350 entries an eviction before).
        """
        ents = self.entries
        best: Entry | None = None
        for e in ents.stale.values():
            self.examined += 1
            if not e.holders and not e.pinned and ok(e) and (best is None or e.tick < best.tick):
                best = e
        if best is not None:
            return best
        if ents.dirty:
            for layer in ents.dirty:
                self._windows.pop(layer, None)
            ents.dirty.clear()
        threads = self._threads.values()
        a, b = self._odds_ab
        use_odds = b > 0 and bool(self._odds)
        floor = max(a, 1e-12)
        bval = 0.0
        for layer, d in self._distances():
            bucket = ents.buckets.get(layer)
            if not bucket:
                continue
            if best is not None and floor / d > bval:
                break
            odds = self._odds.get(layer) if use_odds else None
            if odds is None:  # one P for all: the first ordinary entry, least recently used first
                for e in bucket.values():
                    self.examined += 1
                    if self._ordinary(e, ok, threads):
                        if best is None or floor / d < bval or (floor / d == bval and e.tick < best.tick):
                            best, bval = e, floor / d
                        break
                continue
            win = self._windows.get(layer)
            if win is None or win[0] is not odds:
                win = (odds, self._window(bucket, odds))
                self._windows[layer] = win
            cand: Entry | None = None
            cval = 0.0
            for e in win[1]:  # by ascending odds, ties least recently used: the first candidate is the layer's
                self.examined += 1
                v = _keep_value(odds, e.key[1], a, b, d)
                if cand is not None and v > cval:
                    break  # the rest score higher (equal scores, clamped ones too, went on to compare ticks)
                if self._ordinary(e, ok, threads) and (cand is None or v < cval or e.tick < cand.tick):
                    cand, cval = e, v
            if cand is None and len(bucket) > len(win[1]):
                # none of its least recently used entries is a candidate now (a step under way, held guesses):
                # the layer's first ODDS_SCAN ordinary entries, as they lie
                cand, cval = self._scan_layer(bucket, odds, d, ok, threads, a, b)
            if cand is not None and (best is None or cval < bval or (cval == bval and cand.tick < best.tick)):
                best, bval = cand, cval
        if best is not None:
            return best
        return self._fallback_victim(ok, threads, a, b, use_odds)

    def _window(self, bucket: OrderedDict[Key, Entry], odds: np.ndarray) -> list[Entry]:
        """A layer's `ODDS_SCAN` least recently used entries, by ascending odds, ties least recently used."""
        n = len(odds)
        win = list(islice(bucket.values(), ODDS_SCAN))
        self.examined += len(win)
        win.sort(key=lambda e: (float(odds[e.key[1]]) if 0 <= e.key[1] < n else 0.0, e.tick))
        return win

    def _scan_layer(self, bucket: OrderedDict[Key, Entry], odds: np.ndarray, d: int, ok: Callable[[Entry], bool],
                    threads: Iterable[list], a: float, b: float) -> tuple[Entry | None, float]:
        """The layer's candidate scored as it lies: the best of its `ODDS_SCAN` least recently used ordinary
        entries (ties least recently used); (None, 0.0) if it has none."""
        cand: Entry | None = None
        cval = 0.0
        scored = 0
        for e in bucket.values():
            self.examined += 1
            if not self._ordinary(e, ok, threads):
                continue
            v = _keep_value(odds, e.key[1], a, b, d)
            if cand is None or v < cval or (v == cval and e.tick < cand.tick):
                cand, cval = e, v
            scored += 1
            if scored >= ODDS_SCAN:
                break
        return cand, cval

    def _ordinary(self, e: Entry, ok: Callable[[Entry], bool], threads: Iterable[list]) -> bool:
        """An idle entry ok() accepts that is neither a guess held for a later step nor in a step under way."""
        return (not e.holders and ok(e) and not self._held_for_later(e)
                and not any(e.key in st[1] for st in threads))

    def _fallback_victim(self, ok: Callable[[Entry], bool], threads: Iterable[list], a: float, b: float,
                         use_odds: bool) -> Entry | None:
        """No ordinary candidate in the windows: every entry, the old way (rare: the cache is all steps under way,
        held guesses, entries in use or ones ok() refuses). The best ordinary entry beyond the windows; failing
        that an expert of a step under way, a guess held for a later step last, least recently used first."""
        best: Entry | None = None
        bval = 0.0
        fallback: Entry | None = None
        fkey: tuple[int, int] = (0, 0)
        for layer, d in self._distances():
            bucket = self.entries.buckets.get(layer)
            if not bucket:
                continue
            odds = self._odds.get(layer) if use_odds else None
            for e in bucket.values():
                self.examined += 1
                if e.holders or not ok(e):
                    continue
                # held-for-later outranks the step under way: a step that names a cached guess still wants its read
                if self._held_for_later(e):
                    k = (3, e.tick)
                elif any(e.key in st[1] for st in threads):
                    k = (2, e.tick)
                else:
                    v = _keep_value(odds, e.key[1], a, b, d)
                    if best is None or v < bval or (v == bval and e.tick < best.tick):
                        best, bval = e, v
                    continue
                if fallback is None or k < fkey:
                    fallback, fkey = e, k
        return best if best is not None else fallback

    def _distances(self) -> list[tuple[int, int]]:
        """[(layer, d)], furthest first: d the steps until the layer's next step, the least over the threads'
        positions (a layer is as near as the nearest sequence that will need it); a whole token for a thread's own
        layer. Layers without a known position (not in the order) come first, a whole token away."""
        order = self._order
        assert order is not None
        pos = tuple(sorted({order.get(st[0], -1) for st in self._threads.values()})) or (-1,)
        if self._by_distance is None or self._by_distance[0] != pos:
            n = len(order)
            ds = [(layer, min((li - now) % n or n for now in pos)) for layer, li in order.items()]
            ds.sort(key=lambda x: -x[1])  # stable: equal distances keep the layer order
            self._by_distance = (pos, ds)
        ds = self._by_distance[1]
        extra = [layer for layer in self.entries.buckets if layer not in order]
        if extra:  # experts of layers outside the order: a whole token away
            ds = [(layer, len(order)) for layer in extra] + ds
        return ds

    def _enter_step(self, layer: int, keys: Iterable[Key], new: bool) -> None:
        """Note the calling thread's step under way (layer-aware eviction): `new` starts one (fetch: one step's
        experts), else an acquire joins the thread's current step unless its layer differs. A thread not seen for
        `THREAD_TTL` steps (of any thread) is forgotten: threads come and go, the state stays bounded."""
        if self._order is None:
            return
        me = threading.get_ident()
        self._steps_entered += 1
        st = self._threads.get(me)
        if st is None or new or layer != st[0]:
            self._threads[me] = [layer, set(keys), self._steps_entered]
        else:
            st[1].update(keys)
            st[2] = self._steps_entered
        if len(self._threads) > 1 and self._steps_entered % 64 == 0:
            old = self._steps_entered - THREAD_TTL
            for t in [t for t, st in self._threads.items() if st[2] < old and t != me]:
                del self._threads[t]

    def _read_complete(self, e: Entry) -> bool:
        return e.ticket is None or (not e.finishing and self.loader.ready(e.ticket))

    def _evict(self, v: Entry) -> int:
        if v.ticket is not None:  # an unused prefetch whose read is complete: nothing to check, the fd is gone
            # settle, not wait: wait() would also hand over the loader's own pending error (its background thread's
            # failure), meant for the user and lost here; it stays for the next wait that reports to a caller
            self.loader.settle(v.ticket)
            if v.ticket.error is not None:
                self.stats.prefetch_failed += 1
        del self.entries[v.key]
        self.stats.evictions += 1
        if v.prefetched and not v.used:
            self._count(v, "prefetch_wasted")
        return v.slot

    def _take_slot_prefetch(self, admit: Callable[[Key | None], bool] | None, keep: set[Key] | frozenset[Key]
                            ) -> int | None | bool:
        """A slot for a guess; None if none can be spared, False if `admit` refused the victim."""
        self._reclaim()
        # a stale guess's read is complete (that is what made it stale rather than withdrawn)
        def spare(e: Entry) -> bool:
            return (e.used or e.stale) and not e.pinned and not e.holders and e.key not in keep

        need = 2 - len(self.free)  # one slot must stay for the foreground
        if need > 0:
            for e in self.entries.values():  # stops as soon as enough are found: usually at the first entries
                if spare(e):
                    need -= 1
                    if need == 0:
                        break
            if need > 0:
                return None
        # the first in eviction order among used experts and stale guesses: never a live guess
        victim = None if self.free else self._victim(spare)
        if admit is not None and not admit(None if victim is None else victim.key):
            return False
        return self.free.pop() if victim is None else self._evict(victim)

    def _withdraw(self, e: Entry) -> str:
        """Withdraw an unused prefetch: "freed" (nothing was in flight: its slot is free now), "draining" (its
        issued chunks are still landing: the slot comes back through `_reclaim`) or "done" (its read completed
        meanwhile: nothing changed, the entry stays)."""
        assert e.ticket is not None
        if self.loader.cancel(e.ticket):
            self.free.append(e.slot)
            how = "freed"
        else:
            inflight = self.loader.withdraw(e.ticket)
            if inflight is None:
                return "done"
            self._count(e, "cancelled_inflight_bytes", inflight)
            self._count(e, "cancelled_read_bytes", min(e.ticket.size, e.ticket.issued * self.loader.block_size))
            self._draining.append((e.ticket, e.slot))
            how = "draining"
        self._count(e, "cancelled_size_bytes", e.ticket.size)
        del self.entries[e.key]
        self._count(e, "prefetch_cancelled")
        return how

    def _take_slot_foreground(self) -> int | None:
        """A slot for a miss, or None after waiting (the caller looks again: another thread may have loaded it)."""
        self._reclaim()
        if self.free:
            return self.free.pop()
        # a guess held for a later step goes last: evicting it would lose its read and the victim it already cost.
        # One pass that stops at the first victim (LRU first), not a sort: the cost of the default path, where no
        # guess is held, does not grow with the cache
        v = self._victim(self._read_complete)
        if v is not None:
            return self._evict(v)
        if not self._draining and (v := self._victim(lambda e: True)) is not None:
            # only unused prefetches still reading: withdraw the oldest, one held for a later step last (its chunks
            # not yet issued are dropped; a guess held back by the speculative window would otherwise be read whole,
            # with this lock held)
            if self._withdraw(v) == "done":
                return self._evict(v)
            if self.free:
                return self.free.pop()
        if self._draining:  # a withdrawn prefetch's last chunks are landing in its slot: the oldest is nearly done
            t, slot = self._draining.pop(0)
            t0 = time.perf_counter()
            try:
                # its read's error (ECANCELED, as withdrawn) is nobody's business; the loader's own is left for the
                # next wait that reports to a caller (settle does not take it)
                self.loader.settle(t)
            except Exception:  # the wait itself failed, the read still under way
                self._draining.insert(0, (t, slot))  # still quarantined: never hand out a slot being written
                raise
            finally:
                self.stats.io_wait += time.perf_counter() - t0
            return slot
        me = threading.get_ident()
        # Waiting while holding a slot is the hold-and-wait of a deadlock (two threads each holding one of the
        # last slots and wanting another): a thread that holds one gets CacheError instead (ShardSet.moe then
        # computes what it holds and goes on); a thread that holds none waits for another thread's release.
        if not any(me in e.holders for e in self.entries.values()) and any(
                set(e.holders) - {me} for e in self.entries.values()):
            self._cv.wait()
            return None
        raise CacheError("every cache slot is pinned or in use; use more --cache-slots or pin fewer")

    def _start_reads(self, todo: list[tuple[Key, int]], urgent: bool) -> list[Ticket]:
        """Start the reads of `todo` ((key, slot) each). On any exception the slots go back, except those a read was
        created for: an asynchronous exception (KeyboardInterrupt) raised after the reads were handed over may leave
        chunks with the kernel, so those reads are withdrawn (nothing more is issued) and their slots quarantined in
        `_draining` until what was in flight has landed; a slot handed out sooner would be overwritten."""
        created: list[Ticket] = []
        try:
            reads = [(*self.locate(k), slot) for k, slot in todo]
            return self.loader.start_many(reads, urgent=urgent, created=created)
        except BaseException:
            for t in created:
                self.loader.withdraw(t)
                self._draining.append((t, t.slot))
            busy = {t.slot for t in created}
            self.free.extend(slot for _, slot in todo if slot not in busy)
            self._cv.notify_all()
            raise

    def _start(self, key: Key, slot: int, urgent: bool) -> Entry:
        ticket, = self._start_reads([(key, slot)], urgent)
        e = Entry(key, slot, ticket, time.perf_counter(), foreground=urgent)
        self.entries[key] = e
        return e

    def _ensure_open(self) -> None:
        if self._closed:
            raise CacheError("the cache is closed (the shard set was closed)")

    # -- the wait for a load, outside the lock --------------------------------------------------------------
    def _await(self, e: Entry) -> None:
        """Called with the lock held and e held by this thread: return once e is loaded and checked, or raise."""
        while e.ticket is not None and e.error is None:
            if e.finishing:
                self._cv.wait()
                continue
            e.finishing = True
            ticket = e.ticket
            self._cv.release()
            err: BaseException | None = None
            own = False  # err is the loader's own (not this read's, not the check's)
            t0 = time.perf_counter()
            try:
                try:
                    self.loader.wait(ticket)
                except BaseException:
                    own = ticket.done and ticket.error is None
                    raise
                if self.check:
                    self.check(e.key, e.slot)
            except BaseException as exc:
                err = exc
            finally:
                waited = time.perf_counter() - t0
                self._cv.acquire()
            self.stats.io_wait += waited
            e.finishing = False
            if own:
                # the loader's own error (its background thread failed), not this read's: the bytes are fine and
                # stay cached (the next acquire checks them); this caller is the one it is reported to, once
                self._cv.notify_all()
                self._drop_hold(e)
                raise err
            if err is None:
                e.ticket = None
                if e.foreground:
                    self.stats.load_latency.append(time.perf_counter() - e.started)
            else:
                e.error = err
                if e.prefetched:
                    self.stats.prefetch_failed += 1
                if self.entries.get(e.key) is e:
                    del self.entries[e.key]
                if self.loader.ready(ticket):  # a failed read raises only once nothing of it is with the kernel
                    self.free.append(e.slot)
                else:  # the wait itself failed: the kernel may still write the slot; it comes back once it landed
                    self._draining.append((ticket, e.slot))
            self._cv.notify_all()
        if e.error is not None:
            self._drop_hold(e)
            raise e.error

    def _drop_hold(self, e: Entry) -> None:
        me = threading.get_ident()
        n = e.holders.get(me, 0) - 1
        if n > 0:
            e.holders[me] = n
        else:
            e.holders.pop(me, None)
        self._cv.notify_all()

    # -- public -------------------------------------------------------------------------------------------
    def acquire(self, key: Key) -> int:
        """The slot holding `key`, loading it if needed (blocking). Call release(key), from the same thread, when
        done with it; until then the slot's bytes stay put."""
        me = threading.get_ident()
        with self._lock:
            self._ensure_open()
            self._enter_step(key[0], (key,), new=False)  # before a miss picks its victim: the sweep is here now
            counted = False
            while True:
                e = self.entries.get(key)
                if e is not None:
                    if not counted:  # a read fetch() started for this step is this access's miss
                        if e.fetched and not e.used:
                            self.stats.misses += 1
                        else:
                            self.stats.hits += 1
                    if e.prefetched and not e.used and not e.stale:  # a stale guess needed later is a plain hit:
                        self._count(e, "prefetch_used")                  # it was already counted wrong
                        self._count(e, "prefetch_landed", self._landed(e))
                    if e.ticket is not None:
                        self.loader.promote(e.ticket)  # needed now: its remaining reads go before other prefetches
                    break
                if not counted:
                    self.stats.misses += 1
                    counted = True
                slot = self._take_slot_foreground()
                self._ensure_open()
                if slot is None:
                    continue
                if key in self.entries:  # loaded by another thread while this one waited for the evicted read
                    self.free.append(slot)
                    continue
                e = self._start(key, slot, urgent=True)
                break
            e.used = True
            n = e.holders.get(me, 0)
            try:
                e.holders[me] = n + 1
                self.entries.move_to_end(key)
                self._await(e)
            except BaseException:
                # a signal's exception at a call before _await's own handling (its entry, move_to_end's) must not
                # leave this hold for ever; _await gives it back itself where it raises, so count down to n only
                while e.holders.get(me, 0) > n:
                    self._drop_hold(e)
                raise
            return e.slot

    def fetch(self, keys: list[Key]) -> int:
        """Start the foreground loads of every absent key at once (the k experts of one step), queued together
        ahead of prefetches, without waiting; then acquire() each, computing on the first while the rest arrive.
        Starts as many as slots allow now (never waits for one); returns how many it started. With the layer order
        known, `keys` are the step under way for the eviction ranking (kept until every other candidate is gone).

        >>> cache.fetch([(3, 1), (3, 6)])     # doctest: +SKIP
        2
        """
        with self._lock:
            self._ensure_open()
            step = set(keys)
            if keys:
                self._enter_step(keys[0][0], step, new=True)
            todo: list[tuple[Key, int]] = []
            self._reclaim()
            for key in dict.fromkeys(keys):
                if key in self.entries:
                    continue
                slot = self.free.pop() if self.free else None
                if slot is None:  # a complete, idle entry that is not part of this step, one held for later last
                    v = self._victim(lambda e: e.key not in step and self._read_complete(e))
                    if v is None:
                        break
                    slot = self._evict(v)
                todo.append((key, slot))
            if not todo:
                return 0
            try:
                tickets = self._start_reads(todo, urgent=True)  # the slots taken go back (or are quarantined)
            except MerError:  # e.g. a file that cannot be opened: the acquire that needs it says so
                return 0
            now = time.perf_counter()
            for (key, slot), t in zip(todo, tickets):
                self.entries[key] = Entry(key, slot, t, now, foreground=True, fetched=True)  # acquire counts it
            return len(todo)

    def cancel_stale(self, keep: set[Key] | frozenset[Key] = frozenset(), now: int | None = None,
                     owner: Hashable | None = None) -> int:
        """Withdraw the unused prefetches (not in keep) whose reads have not completed: their step has passed and
        the rest of their reads would only take disk time from foreground reads. A read none of whose chunks was
        issued gives its slot back at once; one part-way through stops reading (its chunks already with the disk
        land, counted in `stats.cancelled_inflight_bytes`) and its slot comes back when they have; the withdrawn
        guesses' whole sizes are summed in `stats.cancelled_size_bytes`. A complete, unused prefetch stays cached
        (it may still be needed) but moves to the least-recently-used end, first to be evicted, and is counted
        once in `stats.prefetch_stale`: it was a wrong guess too, and read whole.
        `now`: the step being routed (the clock of `prefetch(due=...)`): a guess due at a later step is left alone
        (its step has not come), one due at `now` or before is judged; without `now` every guess is.
        `owner`: judge only the guesses `prefetch(owner=owner)` issued (one stream's step says nothing about another
        stream's guesses); None: every guess, whoever issued it.
        Returns how many were withdrawn.

        >>> cache.cancel_stale(keep={(3, 1), (3, 6)})   # doctest: +SKIP
        1
        >>> cache.cancel_stale(keep={(3, 1)}, now=17)   # a guess prefetch(..., due=20) stays   # doctest: +SKIP
        0
        """
        with self._lock:
            if now is not None and now > self._last_now.get(owner, now - 1):
                self._last_now[owner] = now
            n = 0
            for e in list(self.entries.values()):
                if not (e.prefetched and not e.used and not e.stale and e.ticket is not None and not e.holders
                        and not e.finishing and e.key not in keep):
                    continue
                if now is not None and e.due is not None and e.due > now or owner is not None and e.owner != owner:
                    continue
                if self._withdraw(e) == "done":  # its read completed meanwhile: keep it (unchecked; acquire checks it)
                    self.entries.mark_stale(e.key)
                    self.entries.move_to_end(e.key, last=False)
                    self._count(e, "prefetch_stale")
                    continue
                n += 1
            self._reclaim()
            if n:
                self._cv.notify_all()
            return n

    @property
    def eviction(self) -> str:
        """The eviction ranking in use now: "lru", "layer" (layer-aware, by distance alone) or "layer+odds" (with a
        predictor's odds, given with a positive slope: at slope 0 they change nothing and it is "layer")."""
        with self._lock:
            if self._order is None:
                return "lru"
            return "layer+odds" if self._odds and self._odds_ab[1] > 0 else "layer"

    def set_odds(self, odds: Mapping[int, np.ndarray], intercept: float = 0.0, slope: float = 1.0) -> None:
        """Tell the layer-aware ranking how likely each expert is to be chosen at its layer's next step:
        P = intercept + slope x odds[layer][expert] (`odds[layer]` indexed by expert id; layers not given keep the
        arrays given before; a layer never given counts as odds 0). An idle expert is then kept by P / steps until
        its layer's next step; slope 0 (or never calling this) ranks by those steps alone. The arrays are kept,
        not copied: pass fresh ones, never change one after handing it over (rankings read them under the lock
        from any thread). A bare cache (no layer order) ignores the odds.

        >>> cache.set_odds({3: np.array([0.1, 0.7, 0.2, 0.0])}, intercept=0.05, slope=0.8)  # doctest: +SKIP
        """
        with self._lock:
            self._odds.update(odds)
            self._odds_ab = (float(intercept), float(slope))

    def speculating(self) -> bool:
        """Is a guess's read still under way (never blocks, collects nothing)?"""
        with self._lock:
            return any(e.prefetched and not e.used and e.ticket is not None and not e.ticket.done
                       for e in self.entries.values())

    def loaded(self, key: Key) -> bool:
        """Is key in the cache with its read complete (an acquire would not wait for the disk)? Never blocks."""
        with self._lock:
            e = self.entries.get(key)
            return e is not None and e.error is None and self._read_complete(e)

    def release(self, key: Key) -> None:
        """Give back what acquire(key) gave this thread; releasing what this thread does not hold is an error."""
        with self._lock:
            e = self.entries.get(key)
            if e is None or threading.get_ident() not in e.holders:
                raise CacheError(f"release({key}) without a matching acquire by this thread")
            self._drop_hold(e)

    def prefetch(self, key: Key, admit: Callable[[Key | None], bool] | None = None,
                 keep: set[Key] | frozenset[Key] = frozenset(), due: int | None = None,
                 owner: Hashable | None = None) -> bool:
        """Start loading `key` in the background if it is absent and a slot can be spared. True if started.

        `admit(victim)`, if given, is asked (under the cache's lock: it must not call the cache) with the expert the
        load would evict, or None for a free slot; False leaves the cache as it was. Without it any spare slot is
        taken. `keep`: experts the caller is about to use (the rest of its step): never evicted for a guess.
        `due`: the step the guess is for, on the caller's clock (see `cancel_stale(now=...)`); None: the next step.
        `owner`: whose guess it is (a stream): `cancel_stale(owner=...)` judges it only for that owner, and its
        outcomes are counted in `owner_stats(owner)` too.

        A speculative load never raises for the expert's file: a failure to open it, to read it or a checksum
        mismatch is counted in `stats.prefetch_failed` and raised by the `acquire` that needs the expert."""
        with self._lock:
            self._ensure_open()
            if key in self.entries:
                return False
            slot = self._take_slot_prefetch(admit, keep)
            if slot is None:
                self.stats.prefetch_skipped += 1
                return False
            if slot is False:
                return False
            try:
                e = self._start(key, slot, urgent=False)
            except MerError:  # e.g. the file cannot be opened: counted; whoever needs the expert gets the error
                self.stats.prefetch_failed += 1
                return False
            e.prefetched = True
            e.due, e.owner = due, owner
            self._count(e, "prefetch_issued")
            return True

    def owner_stats(self, owner: Hashable) -> CacheStats:
        """The prefetch counters (`prefetch_*`, `cancelled_*`) of `owner`'s guesses alone, counted from this call on
        (live: read them as deltas). `forget_owner` drops them.

        >>> mine = cache.owner_stats("stream-1")   # doctest: +SKIP
        >>> cache.prefetch((3, 1), owner="stream-1"); mine.prefetch_issued   # doctest: +SKIP
        1
        """
        with self._lock:
            return self._owners.setdefault(owner, CacheStats())

    def forget_owner(self, owner: Hashable) -> None:
        with self._lock:
            self._owners.pop(owner, None)
            if owner is not None:
                self._last_now.pop(owner, None)

    def in_flight(self) -> int:
        """Loads started and not yet finished and checked, and withdrawn prefetches whose reads are still landing."""
        with self._lock:
            self._reclaim()
            # a guess whose read is complete (unused, unchecked) no longer takes disk time: not in flight
            return sum(1 for e in self.entries.values()
                       if e.ticket is not None and not self.loader.ready(e.ticket)) + len(self._draining)

    def pin(self, keys: list[Key]) -> None:
        """Load `keys` and keep them from eviction until `unpin`. The pins already held count: all of them together
        must leave one slot for loads. All or nothing: a pin that is refused, or whose load fails, leaves the pins as
        they were. Pins are counted per key: an expert pinned by two calls (two threads with one hot set) stays
        pinned until both are undone, each by one `unpin` (or by its own failure).

        An exception at any point (a KeyboardInterrupt a signal handler raises between two statements included)
        undoes this call's pins and gives back the slots it held: what it did is recorded with each step, and what
        it held is read back from the entries, not from where the exception came."""
        me = threading.get_ident()
        call = _PinCall()
        try:
            with self._lock:
                held = {k for k, e in self.entries.items() if e.pinned}
                new = [k for k in dict.fromkeys(keys) if k not in held]
                # a pin is a mark, not a count: a key this call and another call (or the pins held) both name is one
                # pin
                total = len(held.union(*(c.coming for c in self._pin_calls), new))
                if total > self.pool.n_slots - 1:
                    raise CacheError(f"cannot pin {total} experts ({total - len(new)} pinned already or being pinned) "
                                     f"in {self.pool.n_slots} cache slots: one stays for loads; use more "
                                     "--cache-slots, pin fewer or unpin some")
                # this thread's holds before: one above them after a failure is this call's (acquire's own included)
                call.holds = {k: self._holds(k, me) for k in new}
                # counted, not locked: a lock held across the loads below would deadlock with a thread that holds a
                # slot and pins too
                call.coming = dict.fromkeys(new)
                self._pin_calls.add(call)
                for k in dict.fromkeys(keys):
                    if k in held:
                        self._add_pin(k, call)
            for k in new:
                self.acquire(k)
                with self._lock:
                    self._add_pin(k, call)
                    call.coming.pop(k, None)  # counted as held from now on
                self.release(k)
            with self._lock:  # in the try: an exception up to the last statement undoes the call
                self._pin_calls.discard(call)
        except BaseException:
            with self._lock:
                self._pin_calls.discard(call)
                self._unpin_locked(call.pinned)  # this call's pins only: another call's pin of the same expert stands
                for k, n in call.holds.items():
                    for _ in range(self._holds(k, me) - n):
                        self._drop_hold(self.entries[k])
                self._cv.notify_all()
            raise

    def _holds(self, k: Key, me: int) -> int:
        e = self.entries.get(k)
        return e.holders.get(me, 0) if e is not None else 0

    def _add_pin(self, k: Key, call: _PinCall) -> None:
        n = self._pin_count.get(k, 0) + 1
        # the count and the call's record of it are stored with no call between them: CPython runs a signal's
        # handler (and raises its exception) at calls, function entries and loop back-edges only, so a failure
        # undoes exactly the pins counted
        self._pin_count[k] = n; call.pinned[k] = None  # noqa: E702
        self.entries.set_pinned(k, True)

    def pin_top(self, profile: dict[Key, int], n: int) -> list[Key]:
        """Pin the n most used experts of a routing profile ({(layer, expert): count}); returns them."""
        top = [k for k, _ in sorted(profile.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]
        self.pin(top)
        return top

    def unpin(self, keys: list[Key]) -> None:
        """Undo one pin of each of `keys` (an expert no call has pinned is left as it is)."""
        with self._lock:
            self._unpin_locked(dict.fromkeys(keys))
            self._cv.notify_all()

    def _unpin_locked(self, keys: Iterable[Key]) -> None:
        for k in keys:
            n = self._pin_count.get(k, 0) - 1
            if n > 0:
                self._pin_count[k] = n
                continue
            self._pin_count.pop(k, None)
            if k in self.entries:
                self.entries.set_pinned(k, False)

    def drain(self) -> None:
        """Wait for every read in flight (before the pool or loader goes away). Nothing is checked here, and a failed
        read is not raised: it stays with its entry and is raised by the acquire that needs it. An error of the
        loader's own (a wait that failed with its read not failed, e.g. io_uring's background thread reporting what
        ended it) is raised once every read has been waited for."""
        with self._lock:
            tickets = [e.ticket for e in self.entries.values() if e.ticket is not None]
            tickets += [t for t, _ in self._draining]
        other: BaseException | None = None
        for t in tickets:  # outside the lock: other threads may go on meanwhile
            try:
                self.loader.wait(t)
            except Exception as exc:
                if t.error is None and other is None:  # not the read's own error (e.g. the loader's thread failed)
                    other = exc
        with self._lock:
            self._reclaim()  # the withdrawn prefetches' slots are free again
        if other is not None:
            raise other

    def close(self) -> None:
        """Withdraw the unused prefetches (nothing more is read for them), drain, then refuse every later call with
        CacheError. The cache is closed even when the drain raises the loader's own error (its speculation
        thread's failure), which is then raised."""
        self.cancel_stale(keep=frozenset())
        try:
            self.drain()  # ends with _reclaim: the withdrawn prefetches' slots are back
        finally:
            with self._lock:
                self._closed = True
                self._cv.notify_all()
