"""Open a shard folder and compute with it: the runtime's front door.

    from mer_runtime import open_shards
    with open_shards("out/", io="auto", cache_slots=16) as s:
        with s.load(1, 3) as ex:          # aligned buffer, gate/up/down views
            ex.gate.dtype, ex.gate.raw    # ("Q4_0", uint8 view of the shard bytes)
        y = s.ffn(1, 3, x)                # x float32 [d_model] or [n, d_model]
        y = s.moe(1, [3, 5], [0.6, 0.4], x)  # a routed layer step: one call into the C kernel

Prefetching (off by default, costing nothing per call): `open_shards(path, prefetch=True)` (or "markov", or a
`PrefetchConfig`) makes each `moe()` (and `ffn()`) call one layer step of the calling thread's stream of tokens
(a token starts at the first of `manifest.layers`), driven as smoke drives it (`stepper.StepDriver`): odds-ranked
eviction behind its duel, guesses behind the cost gate issued once the step's experts are loaded and before the
kernel computes. One driver per thread (the prefetcher and the gate are single-threaded; the cache is shared);
`prefetch_stats()` sums their gates. docs/runtime.md, "One driver for smoke and `moe()`".

    with open_shards("out/", cache_slots=16, prefetch=True) as s:
        for layer in s.manifest.layers:
            y = s.moe(layer, [3, 5], [0.6, 0.4], x)

Threads: a ShardSet may be shared by any number of threads; `load`, `ffn`, `moe`, `compute`, `prefetch`, `pin`,
`unpin` and `describe_io` are safe to call concurrently (results byte for byte those of one thread) (the cache and
the loader each have one lock; see docs/runtime.md).
With prefetching on, each thread is its own stream (its own driver, from `step_driver()`); `prefetch_stats()` may
be called from any thread.
`close()` refuses new calls at once (CacheError) and waits for the calls already running to finish; calling it
from inside a `load()` block of the same thread is an error, not a deadlock.
"""

from __future__ import annotations

import os
import threading
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import xxhash

from .buffers import BufferPool
from .cache import ExpertCache, Key
from .errors import CacheError, MerError, ShardIOError
from .kernels import expert_ffn, moe
from .loader import open_loader
from .manifest import Manifest, manifest_from_bytes, read_manifest_bytes
from .prefetch import CostModel, MarkovPrefetcher, chunk_share
from .stepper import PrefetchConfig, StepDriver

CHECKSUMS = ("first", "always", "never")
EVICTIONS = ("layer", "lru")


@dataclass(frozen=True)
class ProjectionView:
    role: str
    dtype: str
    shape: tuple[int, ...]
    raw: np.ndarray  # uint8 view into the aligned slot: the source bytes, unchanged


@dataclass(frozen=True)
class ExpertView:
    layer: int
    expert: int
    buffer: np.ndarray  # the whole shard, 4096-aligned
    tensors: dict[str, ProjectionView]

    @property
    def gate(self) -> ProjectionView:
        return self.tensors["gate"]

    @property
    def up(self) -> ProjectionView:
        return self.tensors["up"]

    @property
    def down(self) -> ProjectionView:
        return self.tensors["down"]


class ShardSet:
    def __init__(self, path: str | os.PathLike[str], *, io: str = "auto", cache_slots: int = 16,
                 queue_depth: int = 32, block_size: int = 1 << 20, threads: int = 4, checksums: str = "first",
                 evict: str = "layer", prefetch: bool | str | PrefetchConfig = False):
        """evict: "layer" (default) ranks the cache's victims by the manifest's layer order (docs/runtime.md,
        "Eviction"); "lru" evicts the least recently used.
        prefetch: True or "markov" (`PrefetchConfig()`), or a `PrefetchConfig`: each `moe()` call is one layer step
        of the calling thread's stream of tokens, driven as smoke drives it (`StepDriver`: odds-ranked eviction
        behind its duel, gated guesses); False (default) or "none": no prefetching, nothing per call."""
        if prefetch is True or prefetch == "markov":
            prefetch = PrefetchConfig()
        elif prefetch is False or prefetch is None or prefetch == "none":
            prefetch = None
        elif not isinstance(prefetch, PrefetchConfig):
            raise ValueError(f"prefetch must be True, False, 'markov', 'none' or a PrefetchConfig, got {prefetch!r}")
        if checksums not in CHECKSUMS:
            raise ValueError(f"checksums must be one of {CHECKSUMS}")
        if evict not in EVICTIONS:
            raise ValueError(f"evict must be one of {EVICTIONS}")
        self.manifest, self._manifest_xxh3, self._folder_fd = _load_still(path)
        m = self.manifest
        # the folder held open while the set is: a folder removed frees its inode number, which the next folder made
        # (an extract's staging folder) takes at once on ext4, so the number alone would not show a replacement
        self._folder_id = _fd_identity(self._folder_fd)
        if not m.experts:
            os.close(self._folder_fd)
            raise ShardIOError(0, f"{m.root}: the manifest lists no experts")
        self.checksums = checksums
        self._checked: set[Key] = set()  # experts whose checksum passed once; guarded by _lock
        # guards _checked, _active, _closing; blocks enter the lock itself, not the Condition, whose Python __exit__
        # a signal's handler can interrupt before it releases (see mer_runtime.cache)
        self._mutex = threading.Lock()
        self._lock = threading.Condition(self._mutex)
        self._active = 0  # load() blocks running now, in any thread
        self._closing = False
        self._mine = threading.local()  # per thread: how many load() blocks it is inside
        self.pool = BufferPool(m.max_expert_size, max(2, cache_slots))
        self.loader = None
        try:  # a loader that fails to open must not leave the pool's mapping (or a ring, or threads) behind
            self.loader = open_loader(io, self.pool, probe_file=str(m.path_of(m.experts[0])), block_size=block_size,
                                      queue_depth=queue_depth, threads=threads)
            self.cache = ExpertCache(self.pool, self.loader, self._locate, self._check,
                                     layers=m.layers if evict == "layer" else None)
        except BaseException:
            if self.loader is not None:
                self.loader.close()
            self.pool.close()
            os.close(self._folder_fd)
            raise
        self.activation = m.model.get("activation", {"kind": "swiglu"})
        self.prefetch_config: PrefetchConfig | None = prefetch
        self._layer_index = {layer: li for li, layer in enumerate(m.layers)}
        # every driver made (one per thread that called moe with prefetch on), with its thread: closed by close(),
        # and those of threads that have ended closed as new ones come (their counters kept in _retired)
        self._drivers: list[tuple[threading.Thread, StepDriver]] = []
        self._drivers_closed = False
        self._retired = dict.fromkeys(("streams", *StepDriver.SUMMED), 0)
        # drivers whose thread's thread-local data is gone (any thread, a `threading.Thread` or not: one started by
        # `_thread` or C never stops being "alive"), appended by a finalizer that may run in any thread, at any time
        # (even while this thread holds _lock): a list append needs no lock; they are retired at the next
        # step_driver(), prefetch_stats() or close()
        self._ended: list[weakref.ref[StepDriver]] = []
        self.prefetch_ahead = None
        if prefetch is not None:
            # a token ahead only where speculative reads can be kept to the disk's idle time (io_uring's window)
            self.prefetch_ahead = "token" if prefetch.ahead == "token" and self.loader.name == "io_uring" else "step"
            if self.prefetch_ahead == "token":
                self.loader.spec_window, self.loader.spec_cap_each = prefetch.spec_window, False
                self.loader.spec_background = True  # type: ignore[attr-defined]  # reads on while experts compute
            else:  # speculative reads only in the disk's idle time, the gate's window chunks at most a guess
                self.loader.spec_window = max(1, self.loader.queue_depth)

    # -- plumbing for the cache ---------------------------------------------------------------------------
    def _locate(self, key: Key) -> tuple[str, int]:
        e = self.manifest.expert(*key)
        return str(self.manifest.path_of(e)), e.size

    def _check(self, key: Key, slot: int) -> None:
        """End-to-end check of a finished load: read from the folder this set opened, and against the manifest's
        whole-file checksum."""
        # a folder extracted again in its place (mertools renames a whole new folder there) holds shards of other
        # types and offsets, which the checksum, passed once already or never asked for, would not catch; the read
        # has ended, so a folder still the same now was the same when the shard was opened
        now = _identity(self.manifest.root)
        if now != self._folder_id:
            self._same_folder(now)
        if self.checksums == "never":
            return
        with self._mutex:
            if self.checksums == "first" and key in self._checked:
                return
        e = self.manifest.expert(*key)
        got = xxhash.xxh3_64_hexdigest(self.pool.view(slot, e.size))  # outside the lock: hashing takes a while
        if got != e.xxh3_64:
            raise ShardIOError(0, f"{self.manifest.path_of(e)}: checksum mismatch after loading (xxh3 {got}, "
                                  f"manifest {e.xxh3_64}); run `mertools verify` and re-extract")
        with self._mutex:
            self._checked.add(key)

    def _same_folder(self, now: tuple[int, int] | None) -> None:
        """The folder's identity changed: a new folder with the very manifest bytes read at open holds shards that
        match them (and a file system whose inode numbers are not stable, sshfs's, changes it too); else refuse."""
        fd = _open_folder(self.manifest.root)
        try:
            same = (fd is not None and _fd_identity(fd) == now
                    and xxhash.xxh3_64_hexdigest(read_manifest_bytes(self.manifest.root)) == self._manifest_xxh3)
        except MerError:
            same = False
        if not same or now is None:
            if fd is not None:
                os.close(fd)
            raise ShardIOError(0, f"{self.manifest.root}: the folder was replaced since it was opened (extracted "
                                  "again?); its shards no longer match the manifest read then: open it again")
        with self._mutex:
            if self._closing and self._folder_fd < 0:
                os.close(fd)
                return
            old, self._folder_fd, self._folder_id = self._folder_fd, fd, now
        os.close(old)  # the new folder is held instead

    def _enter(self) -> None:
        with self._mutex:
            if self._closing:
                raise CacheError(f"{self.manifest.root}: the shard set is closed")
            self._active += 1
        self._mine.depth = getattr(self._mine, "depth", 0) + 1

    def _leave(self) -> None:
        self._mine.depth -= 1
        with self._mutex:
            self._active -= 1
            self._lock.notify_all()

    # -- public -------------------------------------------------------------------------------------------
    @contextmanager
    def load(self, layer: int, expert: int) -> Iterator[ExpertView]:
        """The expert in an aligned buffer, safe from eviction until the with-block ends."""
        key = (layer, expert)
        e = self.manifest.expert(layer, expert)
        self._enter()
        try:
            slot = self.cache.acquire(key)
            try:
                buf = self.pool.view(slot, e.size)
                views = {r: ProjectionView(r, t.dtype, t.shape, buf[t.offset:t.offset + t.nbytes])
                         for r, t in e.tensors.items()}
                yield ExpertView(layer, expert, buf, views)
            finally:
                self.cache.release(key)
        finally:
            self._leave()

    def ffn(self, layer: int, expert: int, x: np.ndarray) -> np.ndarray:
        """The expert's output for x (float32 [d_model] or [n, d_model]), biases and activation as the model has."""
        return self.moe(layer, [expert], [1.0], x)

    def moe(self, layer: int, experts: Sequence[int], weights: Sequence[float] | np.ndarray, x: np.ndarray, *,
            act: str = "f32") -> np.ndarray:
        """sum_k weights[k] * ffn(layer, experts[k], x): a routed layer step, computed in one call into the C
        kernel (gate and up fused, down summed over the experts) with all k experts held in the cache.

        act="q8" quantizes activations to Q8_0 blocks (faster; error in docs/runtime.md); the default is exact.
        If the cache cannot hold all k at once (pins, other threads), the experts it could hold are computed and
        the rest follow: the result is the same.

            y = s.moe(1, [3, 5], [0.6, 0.4], x)
        """
        x = np.asarray(x, dtype=np.float32)
        d = self.manifest.model["d_model"]
        if x.shape[-1:] != (d,) or x.ndim not in (1, 2):
            raise ValueError(f"x must have shape [{d}] or [n, {d}], got {list(x.shape)}")
        experts = [int(e) for e in experts]
        w = np.asarray(weights, dtype=np.float32).reshape(-1)
        if len(w) != len(experts) or not experts:
            raise ValueError(f"{len(experts)} experts and {len(w)} weights: give one weight per expert (at least one)")
        for e in experts:
            self.manifest.expert(layer, e)  # an unknown expert is refused before any read starts (or is observed)
        drv = None
        self._enter()
        try:
            if self.prefetch_config is None:
                # every absent expert of the step is read at once, ahead of prefetches; the first computes while the
                # rest arrive
                self.cache.fetch([(layer, e) for e in experts])
            else:
                drv = self.step_driver()
                drv.begin(self._layer_index[layer], experts)  # withdraw, observe, odds, fetch, duel, predict
        finally:
            self._leave()
        y, i = None, 0
        while i < len(experts):
            with ExitStack() as held:
                views: list[ExpertView] = []
                while i < len(experts):
                    try:
                        views.append(held.enter_context(self.load(layer, experts[i])))
                    except CacheError:
                        if not views:
                            raise
                        break
                    i += 1
                tensors = [self._tensors(v) for v in views]
                if drv is None:
                    part = moe(tensors, w[i - len(views):i], x, self.activation, act=act)
                else:
                    # the step's experts held are loaded: the guesses go now, before the kernel, so that they
                    # land while it computes (those not held yet are kept from eviction and must be loaded first)
                    drv.before_compute([(layer, e) for e in experts[i:]])
                    part, _ = drv.compute(lambda: moe(tensors, w[i - len(views):i], x, self.activation, act=act))
            y = part if y is None else y + part
        if drv is not None:
            drv.end()  # the gate learns this step's I/O wait and misses
        return y

    def step_driver(self) -> StepDriver | None:
        """The calling thread's `StepDriver` (made at its first call; None with prefetch off): what `moe()` drives,
        for a caller that computes a step's experts one at a time instead (smoke: `drv.step(li, experts,
        on_access)`). Not to be shared with another thread (its prefetcher and gate refuse a second one).

            drv = s.step_driver()
            drv.step(0, [3, 5], lambda layer, e, before: ...)
        """
        cfg = self.prefetch_config
        if cfg is None:
            return None
        drv = getattr(self._mine, "driver", None)
        if drv is not None:
            return drv
        m, loader = self.manifest, self.loader
        # before anything is measured, a guess is assumed to read (and, if right, land) what its window allows
        biggest = max(e.size for e in m.experts)
        frac = min(1.0, loader.queue_depth * loader.block_size / biggest)
        if self.prefetch_ahead == "token":
            cost = CostModel(window=cfg.spec_window, window_frac=frac,
                             chunk_frac=chunk_share(loader.block_size, biggest), expert_bytes=biggest)
        else:
            cost = CostModel(window=loader.queue_depth, window_frac=frac)
        pf = MarkovPrefetcher(m.layers, m.model["n_experts"], threshold_scale=cfg.threshold_scale)
        # its steps refuse (before observing anything) once the set is closed, and close() waits for a step under way
        drv = StepDriver(self.cache, m.layers, pf, cost, max_inflight=cfg.max_inflight, ahead=self.prefetch_ahead,
                         guard=(self._enter, self._leave), batch=None if cfg.dormant else 0)
        with self._mutex:
            if self._drivers_closed:
                drv.close()
                raise CacheError(f"{self.manifest.root}: the shard set is closed")
            self._reap()
            live = []
            for t, d in self._drivers:
                if t.is_alive():
                    live.append((t, d))
                else:  # its stream has ended: keep its record, free its duel
                    self._retire(d)
            self._drivers = live + [(threading.current_thread(), drv)]
        sentinel = _StreamEnd()  # goes with this thread's thread-local data: its driver is then retired
        # a weak reference: the finalizer registry lives as long as the thread, and the driver leads back to this
        # ShardSet (its cache's callbacks), which must go when the user drops it
        weakref.finalize(sentinel, self._ended.append, weakref.ref(drv)).atexit = False
        self._mine.driver, self._mine.sentinel = drv, sentinel
        return drv

    def _reap(self) -> None:
        """Retire the drivers whose threads have ended (under _lock)."""
        while self._ended:
            d = self._ended.pop()()
            if d is None:
                continue
            for i, (_, dd) in enumerate(self._drivers):
                if dd is d:  # not yet retired (by is_alive() or close())
                    del self._drivers[i]
                    self._retire(d)
                    break

    def _retire(self, drv: StepDriver) -> None:
        r = self._retired
        r["streams"] += 1
        st = drv.stats()
        for k in StepDriver.SUMMED:
            r[k] += st[k]
        drv.close()

    def prefetch_stats(self) -> dict | None:
        """The prefetcher's gate summed over every stream (thread) that has called `moe()`: guesses `admitted`,
        `right`, `wrong`, `refused`; `dormant_steps` (steps whose bookkeeping waited for a batch: docs/runtime.md,
        "Dormant streams"); `own_s` over `steps`: the drivers' own time, all of a step's work but its reads and
        kernels; `streams`; `duel_odds`: the streams whose duel now ranks with the odds; `eviction`:
        the cache's ranking now ("layer+odds", "layer" or "lru"); `ahead`. None with prefetch off.

            s.prefetch_stats()["admitted"]
        """
        if self.prefetch_config is None:
            return None
        with self._mutex:
            self._reap()
            out = {**self._retired, "duel_odds": 0}
            for _, d in self._drivers:
                out["streams"] += 1
                for k, v in d.stats().items():
                    out[k] += v
        return {**out, "eviction": self.cache.eviction, "ahead": self.prefetch_ahead}

    @staticmethod
    def _tensors(ex: ExpertView) -> dict:
        return {r: (p.dtype, p.shape, p.raw) for r, p in ex.tensors.items()}

    def compute(self, ex: ExpertView, x: np.ndarray) -> np.ndarray:
        """The FFN of an expert already loaded (inside `load()`), with the model's activation and biases."""
        return expert_ffn(self._tensors(ex), x, self.activation)

    def prefetch(self, layer: int, expert: int) -> bool:
        """Start loading an expert in the background if a slot can be spared; True if started."""
        self.manifest.expert(layer, expert)
        self._enter()
        try:
            return self.cache.prefetch((layer, expert))
        finally:
            self._leave()

    def pin(self, keys: list[Key]) -> None:
        """Load `keys` and keep them cached until `unpin`; all the pins together leave one slot for loads (a pin that
        would take it is refused whole: CacheError, nothing pinned). Counted per expert: two pins of one expert
        take two unpins."""
        self._enter()
        try:
            self.cache.pin(keys)
        finally:
            self._leave()

    def unpin(self, keys: list[Key]) -> None:
        """Undo one pin of each of `keys`; an expert no pin holds any more may be evicted again (keys not pinned are
        ignored)."""
        self._enter()
        try:
            self.cache.unpin(keys)
        finally:
            self._leave()

    def warm_up(self) -> None:
        """Fault in every cache slot now and, with io_uring, register it with the ring, instead of at each slot's
        first read: what a timed run (smoke) or a latency-sensitive engine wants paid before its first token. It
        takes as long as faulting in the cache's memory (0.3-1.6 s a GB on the 2-core virtual machine of
        2026-11-30, whose first touch of fresh memory is slow) and, with io_uring, pins all of it.

        >>> with open_shards("out/", cache_slots=16) as s:   # doctest: +SKIP
        ...     s.warm_up()
        """
        self._enter()
        try:
            self.loader.warm_up()
        finally:
            self._leave()

    def describe_io(self) -> str:
        return f"{self.loader.describe()}: {self.loader.reason}"

    def close(self) -> None:
        """Refuse new calls, wait for running ones, then release reads, fds, ring, threads and the pool. Idempotent."""
        if getattr(self._mine, "depth", 0):
            raise CacheError("close() called inside a load() block of the same thread: leave the block first")
        with self._mutex:
            first = not self._closing
            self._closing = True
            while self._active:
                self._lock.wait()
        if not first:
            return
        with self._mutex:  # no call is running: the drivers can be retired
            for _, d in self._drivers:
                self._retire(d)
            self._drivers, self._drivers_closed = [], True
            self._ended.clear()
        try:
            self.cache.close()
        finally:
            try:
                self.loader.close()
            finally:
                self.pool.close()
                with self._mutex:
                    fd, self._folder_fd = self._folder_fd, -1
                if fd >= 0:
                    os.close(fd)

    def __enter__(self) -> "ShardSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _identity(root: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(root)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _fd_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _open_folder(root: str | os.PathLike[str]) -> int | None:
    """An fd that holds the folder (its inode, and so its number) while the set is open; O_PATH: a folder readable
    only by its path (x without r) is held too."""
    try:
        return os.open(root, getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def _load_still(path: str | os.PathLike[str]) -> tuple[Manifest, str, int]:
    """(manifest, xxh3 of its bytes, an fd of the folder) of a folder that stayed the same folder while its manifest
    was read (one being replaced meanwhile is read again), so that the folder held is the manifest's."""
    for _ in range(10):
        fd = _open_folder(path)
        try:
            data = read_manifest_bytes(path)  # (a missing folder or manifest: its usual error)
            m = manifest_from_bytes(data, path)
            if fd is not None and _identity(m.root) == _fd_identity(fd):
                return m, xxhash.xxh3_64_hexdigest(data), fd
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            os.close(fd)
    raise ShardIOError(0, f"{path}: the folder keeps being replaced while it is opened; open it once it is done")


class _StreamEnd:
    """A thread's marker in `ShardSet._mine`: freed with the thread's thread-local data."""


def open_shards(path: str | os.PathLike[str], **kw) -> ShardSet:
    return ShardSet(path, **kw)
