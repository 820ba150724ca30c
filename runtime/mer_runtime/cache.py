"""An LRU expert cache over a buffer pool, with pinning, in-use protection and a slot kept for foreground loads.

Rules:
- a pinned expert, or one in use (between `acquire` and `release`), is never evicted;
- a prefetch may take a slot only if, after it, one slot is still free or evictable: a foreground load never waits
  behind prefetches for room;
- a slot whose read is still in flight is never handed to another expert.
- a prefetch never evicts another prefetched expert that has not been used yet.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from .buffers import BufferPool
from .errors import CacheError
from .loader import Loader, Ticket

Key = tuple[int, int]  # (layer, expert)


@dataclass
class Entry:
    key: Key
    slot: int
    ticket: Ticket | None  # None once the read is complete and checked
    started: float
    pinned: bool = False
    users: int = 0
    prefetched: bool = False
    used: bool = False


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0  # evicted before any use
    prefetch_skipped: int = 0  # no slot could be spared
    load_latency: list[float] = field(default_factory=list)  # seconds, foreground misses: start to ready
    io_wait: float = 0.0  # seconds the caller spent blocked on reads

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": round(self.hit_rate, 4),
                "evictions": self.evictions, "prefetch_issued": self.prefetch_issued,
                "prefetch_used": self.prefetch_used, "prefetch_wasted": self.prefetch_wasted,
                "prefetch_skipped": self.prefetch_skipped}


class ExpertCache:
    """`locate(key) -> (path, size)` says where an expert lives; `check(key, slot)` validates a finished load."""

    def __init__(self, pool: BufferPool, loader: Loader, locate: Callable[[Key], tuple[str, int]],
                 check: Callable[[Key, int], None] | None = None):
        if pool.n_slots < 2:
            raise ValueError("the cache needs at least 2 slots: one is kept for foreground loads")
        self.pool, self.loader, self.locate, self.check = pool, loader, locate, check
        self.entries: OrderedDict[Key, Entry] = OrderedDict()  # LRU order: first is least recently used
        self.free = list(range(pool.n_slots - 1, -1, -1))
        self.stats = CacheStats()

    # -- slots --------------------------------------------------------------------------------------------
    def _evictable(self) -> list[Entry]:
        self._settle()
        return [e for e in self.entries.values() if not e.pinned and e.users == 0 and e.ticket is None]

    def _settle(self) -> None:
        """Finish prefetches whose reads are already complete, so that they can be used or evicted."""
        for e in [e for e in self.entries.values() if e.ticket is not None]:
            if self.loader.ready(e.ticket):
                try:
                    self._finish(e)
                except Exception:
                    pass  # entry dropped by _finish; a foreground acquire reloads it and reports the error

    def _take_slot(self, foreground: bool) -> int | None:
        victims = self._evictable()
        if not foreground:
            if len(self.free) + len(victims) < 2:  # one slot must stay for the foreground
                return None
            if self.free:
                return self.free.pop()
            victims = [e for e in victims if e.used]  # a guess never evicts an unused guess: its read would be lost
            if not victims:
                return None
        elif self.free:
            return self.free.pop()
        elif not victims:
            # only in-flight prefetches left: finish the oldest, then it can go
            loading = [e for e in self.entries.values() if e.ticket is not None and not e.pinned and e.users == 0]
            if not loading:
                raise CacheError("every cache slot is pinned or in use; use more --cache-slots or pin fewer")
            self._finish(loading[0])
            victims = [loading[0]]
        v = victims[0]
        del self.entries[v.key]
        self.stats.evictions += 1
        if v.prefetched and not v.used:
            self.stats.prefetch_wasted += 1
        return v.slot

    def _start(self, key: Key, slot: int, urgent: bool) -> Entry:
        path, size = self.locate(key)
        e = Entry(key, slot, None, time.perf_counter())
        try:
            e.ticket = self.loader.start(path, size, slot, urgent=urgent)
        except BaseException:
            self.free.append(slot)
            raise
        self.entries[key] = e
        return e

    def _finish(self, e: Entry) -> None:
        if e.ticket is None:
            return
        t0 = time.perf_counter()
        try:
            self.loader.wait(e.ticket)
            if self.check:
                self.check(e.key, e.slot)
        except BaseException:
            del self.entries[e.key]
            self.free.append(e.slot)
            raise
        finally:
            self.stats.io_wait += time.perf_counter() - t0
        e.ticket = None

    # -- public -------------------------------------------------------------------------------------------
    def acquire(self, key: Key) -> int:
        """The slot holding `key`, loading it if needed (blocking). Call release(key) when done with it."""
        e = self.entries.get(key)
        if e is not None:
            self.stats.hits += 1
            if e.prefetched and not e.used:
                self.stats.prefetch_used += 1
            if e.ticket is not None:
                self.loader.promote(e.ticket)  # needed now: its remaining reads go before other prefetches
            self._finish(e)
        else:
            self.stats.misses += 1
            e = self._start(key, self._take_slot(foreground=True), urgent=True)
            self._finish(e)
            self.stats.load_latency.append(time.perf_counter() - e.started)
        e.used = True
        e.users += 1
        self.entries.move_to_end(key)
        return e.slot

    def release(self, key: Key) -> None:
        self.entries[key].users -= 1

    def prefetch(self, key: Key) -> bool:
        """Start loading `key` in the background if it is absent and a slot can be spared. True if started."""
        if key in self.entries:
            return False
        slot = self._take_slot(foreground=False)
        if slot is None:
            self.stats.prefetch_skipped += 1
            return False
        e = self._start(key, slot, urgent=False)
        e.prefetched = True
        self.stats.prefetch_issued += 1
        return True

    def in_flight(self) -> int:
        return sum(1 for e in self.entries.values() if e.ticket is not None)

    def pin(self, keys: list[Key]) -> None:
        if len(keys) > self.pool.n_slots - 1:
            raise CacheError(f"cannot pin {len(keys)} experts in {self.pool.n_slots} cache slots: one stays for loads; "
                             "use more --cache-slots or pin fewer")
        for k in keys:
            self.acquire(k)
            self.entries[k].pinned = True
            self.release(k)

    def pin_top(self, profile: dict[Key, int], n: int) -> list[Key]:
        """Pin the n most used experts of a routing profile ({(layer, expert): count}); returns them."""
        top = [k for k, _ in sorted(profile.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]
        self.pin(top)
        return top

    def unpin(self, keys: list[Key]) -> None:
        for k in keys:
            if k in self.entries:
                self.entries[k].pinned = False

    def drain(self) -> None:
        """Wait for every read in flight (before the pool or loader goes away)."""
        for e in list(self.entries.values()):
            try:
                self._finish(e)
            except Exception:
                pass
