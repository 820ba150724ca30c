"""The runtime under many threads: ShardSet.ffn, the cache and every loader, on a real extracted fixture, checked
against the float64 reference of fixtures/real/*.ref.npz (llama.cpp's bytes, gguf's dequantization, NumPy)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mer_runtime import MerError, ShardIOError, open_shards, uring
from mer_runtime.errors import CacheError
from mer_runtime.loader import BACKENDS

from conftest import REAL

BACKEND_PARAMS = [
    pytest.param(b, marks=pytest.mark.skipif(b == "io_uring" and uring.probe() is not None,
                                             reason=f"io_uring refused here: {uring.probe()}"))
    for b in BACKENDS
]
N_THREADS = 8


def reference(name):
    z = np.load(REAL / f"{name}.ref.npz")
    return z["x"], [int(v) for v in z["layers"]], z["y"]


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def hammer(fn, n=N_THREADS):
    """Run fn(i) on n threads released together by a barrier; re-raise the first failure."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i):
        try:
            barrier.wait()
            fn(i)
        except BaseException as exc:  # reported below, with its thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)  # not a timing check: a generous bound that turns a deadlock into a failure, not a hang
    assert not any(t.is_alive() for t in threads), "threads still running after 120 s: a deadlock"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("fixture", ["mixtral-q4_0", "mixtral-f16"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("slots", [2, 3])
def test_ffn_from_8_threads_on_a_tiny_cache(extracted, backend, slots, fixture):
    x, layers, y = reference(fixture)
    out = extracted(REAL / f"{fixture}.gguf")
    keys = [(li, layer, e) for li, layer in enumerate(layers) for e in range(y.shape[1])]
    # small chunks, shallow queue: every load is several reads that interleave with other threads' loads
    with open_shards(out, io=backend, cache_slots=slots, block_size=16384, queue_depth=3, threads=3,
                     checksums="always") as s:
        assert s.loader.name == backend
        bad: list[tuple] = []

        def work(i):
            rng = np.random.default_rng(i)
            for step in range(40):
                li, layer, e = keys[rng.integers(len(keys))]
                if step % 7 == 3:  # speculative loads mixed in, as a prefetcher would issue them
                    s.prefetch(layer, int(rng.integers(y.shape[1])))
                got = s.ffn(layer, e, x)
                if rel_err(got, y[li, e]) > 1e-4:
                    bad.append((i, step, layer, e, rel_err(got, y[li, e])))

        for _ in range(3):
            hammer(work)
        assert not bad, bad[:5]
        st = s.cache.stats
        assert st.hits + st.misses == 3 * N_THREADS * 40
        assert all(not e.holders for e in s.cache.entries.values())  # every acquire was released
        assert len(s.cache.entries) + len(s.cache.free) == slots


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_threads_wanting_the_same_expert_share_one_read(extracted, backend):
    out = extracted(REAL / "mixtral-q4_0.gguf")
    x, layers, y = reference("mixtral-q4_0")
    with open_shards(out, io=backend, cache_slots=3, block_size=8192) as s:
        trace = s.loader.record_issues()
        results = [None] * N_THREADS

        def work(i):
            results[i] = s.ffn(layers[1], 2, x)

        hammer(work)
        queued = [ev for ev in trace if ev[0] == "queued"]
        assert len(queued) == 1  # one load, seven waiters on it
        assert s.cache.stats.misses == 1 and s.cache.stats.hits == N_THREADS - 1
        assert all(rel_err(r, y[1, 2]) < 1e-4 for r in results)


def test_release_without_acquire_is_a_clear_error(extracted):
    out = extracted(REAL / "mixtral-q4_0.gguf")
    with open_shards(out, cache_slots=2) as s:
        with pytest.raises(CacheError, match=r"release\(\(0, 1\)\) without a matching acquire"):
            s.cache.release((0, 1))
        s.cache.acquire((0, 1))
        s.cache.release((0, 1))
        with pytest.raises(CacheError, match="without a matching acquire"):
            s.cache.release((0, 1))
        # held by another thread is not held by this one
        s.cache.acquire((0, 2))
        errs = []
        t = threading.Thread(target=lambda: errs.append(pytest.raises(CacheError, s.cache.release, (0, 2))))
        t.start()
        t.join()
        assert errs
        s.cache.release((0, 2))


def test_a_full_cache_waits_for_other_threads_and_refuses_a_self_deadlock(extracted):
    out = extracted(REAL / "mixtral-q4_0.gguf")
    x, layers, y = reference("mixtral-q4_0")
    with open_shards(out, cache_slots=2) as s:
        entered, go = threading.Event(), threading.Event()

        def holder():
            with s.load(layers[0], 0):
                entered.set()
                go.wait()

        t = threading.Thread(target=holder)
        t.start()
        entered.wait()
        with s.load(layers[0], 1):  # the second slot
            # both slots held: by this thread and by `holder`. A load here would wait for `holder`...
            result = []
            waiter = threading.Thread(target=lambda: result.append(s.ffn(layers[1], 3, x)))
            waiter.start()
            waiter.join(0.3)
            assert waiter.is_alive() and not result  # ... it is waiting, not failing
            go.set()
            waiter.join()
            assert rel_err(result[0], y[1, 3]) < 1e-4
        t.join()
        # a thread holding every slot itself would wait for itself forever: refused instead
        with s.load(layers[0], 0), s.load(layers[0], 1):
            with pytest.raises(CacheError, match="every cache slot is pinned or in use"):
                s.ffn(layers[0], 2, x)


def test_close_waits_for_running_calls_and_refuses_new_ones(extracted):
    out = extracted(REAL / "mixtral-q4_0.gguf")
    x, layers, _ = reference("mixtral-q4_0")
    s = open_shards(out, cache_slots=2)
    inside, leave = threading.Event(), threading.Event()

    def user():
        with s.load(layers[0], 0) as ex:
            inside.set()
            leave.wait()
            s.compute(ex, x)

    u = threading.Thread(target=user)
    u.start()
    inside.wait()
    closer = threading.Thread(target=s.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # close() waits for the load() block still running
    with pytest.raises(CacheError, match="closed"):
        s.ffn(layers[0], 1, x)  # new calls are refused at once
    leave.set()
    u.join()
    closer.join()
    with pytest.raises(MerError, match="closed"):
        s.ffn(layers[0], 0, x)
    s.close()  # idempotent


def test_close_inside_a_load_block_is_refused(extracted):
    out = extracted(REAL / "mixtral-q4_0.gguf")
    with open_shards(out, cache_slots=2) as s:
        with s.load(0, 0):
            with pytest.raises(CacheError, match="inside a load"):
                s.close()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_failing_load_is_reported_to_every_waiting_thread(extracted, backend, tmp_path):
    import shutil

    src = extracted(REAL / "mixtral-q4_0.gguf")
    dst = tmp_path / "t"
    shutil.copytree(src, dst)
    x, layers, y = reference("mixtral-q4_0")
    with open_shards(dst, io=backend, cache_slots=3) as s:
        e = s.manifest.expert(layers[1], 1)
        p = s.manifest.path_of(e)
        p.write_bytes(p.read_bytes()[: e.size - 8192])  # truncated after open_shards checked the folder
        msgs: list[str] = []

        def work(i):
            try:
                s.ffn(layers[1], 1, x)
            except ShardIOError as exc:
                msgs.append(str(exc))

        hammer(work)
        assert len(msgs) == N_THREADS and all("E0001.bin: file ends at byte" in m for m in msgs)
        assert rel_err(s.ffn(layers[0], 1, x), y[0, 1]) < 1e-4  # the cache is still usable


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_ffn_from_8_threads_many_rounds(extracted, backend):
    """The same check as above for many rounds (CI skips it: `pytest -m slow` runs it)."""
    x, layers, y = reference("mixtral-q4_k_m")
    out = extracted(REAL / "mixtral-q4_k_m.gguf")
    keys = [(li, layer, e) for li, layer in enumerate(layers) for e in range(y.shape[1])]
    with open_shards(out, io=backend, cache_slots=2, block_size=8192, queue_depth=2, threads=2,
                     checksums="always") as s:
        bad: list[tuple] = []

        def work(i):
            rng = np.random.default_rng(100 + i)
            for _ in range(50):
                li, layer, e = keys[rng.integers(len(keys))]
                if rng.random() < 0.2:
                    s.prefetch(layer, int(rng.integers(y.shape[1])))
                got = s.ffn(layer, e, x)
                if rel_err(got, y[li, e]) > 1e-4:
                    bad.append((i, layer, e))

        for _ in range(40):
            hammer(work)
        assert not bad, bad[:5]
