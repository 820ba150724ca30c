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


def _random_experts(rng, n, d_model, d_ff, dtype="F32"):
    np_t = {"F32": np.float32, "F16": np.float16}[dtype]
    shapes = {"gate": (d_ff, d_model), "up": (d_ff, d_model), "down": (d_model, d_ff)}
    return [{r: (dtype, s, (rng.standard_normal(s) * 0.05).astype(np_t).view(np.uint8).reshape(-1))
             for r, s in shapes.items()} for _ in range(n)]


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_the_kernel_pool_entered_from_several_threads_at_once_gives_the_same_bytes(dtype):
    """The C kernels' one persistent pthread pool, entered by several Python threads at once (ctypes releases the
    GIL): a caller that finds it busy runs its job alone. Matrices above the size that goes to the pool; every
    result byte-exact against the same call made alone, single- and multi-row, k = 1 and 2."""
    from mer_runtime.kernels import moe

    rng = np.random.default_rng(11)
    d_model, d_ff = 512, 1024  # 2 MiB (F32) a projection: well above the pool's threshold
    experts = _random_experts(rng, 3, d_model, d_ff, dtype)
    act = {"kind": "swiglu"}
    jobs = []
    for i in range(N_THREADS):
        x = rng.standard_normal((d_model,) if i % 2 else (3, d_model)).astype(np.float32)
        ks = [i % 3] if i % 4 == 0 else [i % 3, (i + 1) % 3]
        w = rng.random(len(ks)).astype(np.float32)
        jobs.append(([experts[k] for k in ks], w, x))
    alone = [moe(e, w, x, act).tobytes() for e, w, x in jobs]
    bad: list[int] = []

    def work(i):
        e, w, x = jobs[i]
        for _ in range(15):
            if moe(e, w, x, act).tobytes() != alone[i]:
                bad.append(i)

    hammer(work)
    assert not bad, f"results differ from the same call made alone: jobs {sorted(set(bad))}"


@pytest.mark.parametrize("slots", [3, 8])
def test_moe_from_8_threads_is_byte_exact_against_one_thread(extracted, slots):
    """ShardSet.moe hammered from 8 threads on one ShardSet (a cache too small for everyone's k experts at once
    with 3 slots: steps are split between calls into C) gives the bytes a single thread gets."""
    x, layers, y = reference("mixtral-q4_0")
    out = extracted(REAL / "mixtral-q4_0.gguf")
    n_exp = y.shape[1]
    rng = np.random.default_rng(3)
    steps = []
    for _ in range(24):
        ks = [int(v) for v in rng.choice(n_exp, size=2, replace=False)]
        steps.append((layers[int(rng.integers(len(layers)))], ks, rng.random(2).astype(np.float32)))
    xb = np.stack([x, -x, 0.5 * x]).astype(np.float32)
    with open_shards(out, cache_slots=16, checksums="always") as s:
        alone = [(s.moe(layer, ks, w, x).tobytes(), s.moe(layer, ks, w, xb).tobytes()) for layer, ks, w in steps]
    with open_shards(out, cache_slots=slots, block_size=16384, queue_depth=3, checksums="always") as s:
        bad: list[tuple] = []

        def work(i):
            for j in range(len(steps)):
                layer, ks, w = steps[(i * 5 + j) % len(steps)]
                got = (s.moe(layer, ks, w, x).tobytes(), s.moe(layer, ks, w, xb).tobytes())
                if got != alone[(i * 5 + j) % len(steps)]:
                    bad.append((i, j))

        hammer(work)
        assert not bad, bad[:5]
        assert all(not e.holders for e in s.cache.entries.values())
        assert len(s.cache.entries) + len(s.cache.free) == slots


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_close_racing_with_loads_either_finishes_a_call_or_refuses_it(extracted, backend):
    """close() from one thread while 6 others call ffn/moe/prefetch/load in a loop: each call returns the right
    result or is refused with the shard set's CacheError; nothing else is raised, nothing hangs, and every fd the
    shard set opened is closed afterwards."""
    import os

    x, layers, y = reference("mixtral-q4_0")
    out = extracted(REAL / "mixtral-q4_0.gguf")
    fds = set(os.listdir("/proc/self/fd"))
    s = open_shards(out, io=backend, cache_slots=3, block_size=16384, queue_depth=3, threads=2)
    n_exp = y.shape[1]
    wrong: list[tuple] = []
    refused = [0] * N_THREADS
    started = threading.Barrier(N_THREADS)

    def work(i):
        rng = np.random.default_rng(i)
        if i == 0:
            started.wait()
            for _ in range(3):  # let the others get going (not a timing assertion)
                s.ffn(layers[0], 0, x)
            s.close()
            return
        started.wait()
        while True:
            li = int(rng.integers(len(layers)))
            e = int(rng.integers(n_exp))
            try:
                if i % 3 == 0:
                    s.prefetch(layers[li], (e + 1) % n_exp)
                    got = s.moe(layers[li], [e], [1.0], x)
                elif i % 3 == 1:
                    with s.load(layers[li], e) as ex:
                        got = s.compute(ex, x)
                else:
                    got = s.ffn(layers[li], e, x)
            except CacheError as exc:
                assert "closed" in str(exc), exc
                refused[i] += 1
                return
            if rel_err(got, y[li, e]) > 1e-4:
                wrong.append((i, li, e))

    hammer(work)
    assert not wrong, wrong[:5]
    assert all(refused[1:])
    assert set(os.listdir("/proc/self/fd")) == fds


def test_the_prefetcher_is_single_threaded_and_refuses_a_second_thread_loudly():
    """MarkovPrefetcher and CostModel are one per stream of tokens by design: a call made while another thread is
    inside one of their methods raises ConcurrentUseError (it used to interleave and corrupt the tables silently).
    The other thread is held inside predict_token_ahead by its own `cached` argument, a set that blocks when read:
    no timing involved."""
    from mer_runtime.errors import ConcurrentUseError
    from mer_runtime.prefetch import CostModel, MarkovPrefetcher

    pf = MarkovPrefetcher([0, 1], 8)
    for _ in range(6):
        pf.observe(0, [1, 2])
        pf.observe(1, [3, 4])
    inside, go = threading.Event(), threading.Event()

    class Blocking(set):
        def __iter__(self):
            inside.set()
            go.wait(60)
            return super().__iter__()

    got: list = []
    th = threading.Thread(target=lambda: got.append(pf.predict_token_ahead(0, Blocking({5}))), daemon=True)
    th.start()
    assert inside.wait(60)
    before = (pf.clock, pf.same.copy())
    with pytest.raises(ConcurrentUseError, match=r"MarkovPrefetcher\.observe\(\) called while another thread.*"
                                                 "single-threaded.*its own"):
        pf.observe(0, [1, 2])
    with pytest.raises(ConcurrentUseError):
        pf.prob_next(1, 3)
    assert pf.clock == before[0] and (pf.same == before[1]).all()  # refused before touching anything
    go.set()
    th.join(60)
    assert got and [e for e, _ in got[0]] == [1, 2]
    pf.observe(0, [1, 2])  # once the other thread is out, any thread may use it (handing over is fine)
    t2 = threading.Thread(target=pf.observe, args=(1, [3, 4]))
    t2.start()
    t2.join()
    assert pf.clock == before[0] + 2
    # CostModel is guarded the same way. Its methods take no callback, but their arithmetic does: a number whose
    # addition blocks holds a thread inside observe()
    cm = CostModel()
    inside.clear()
    go.clear()

    class SlowSeconds:
        def __radd__(self, other):
            inside.set()
            go.wait(60)
            return other + 0.01

        def __truediv__(self, n):
            return 0.01 / n

    th = threading.Thread(target=cm.observe, args=(SlowSeconds(), 1), daemon=True)
    th.start()
    assert inside.wait(60)
    with pytest.raises(ConcurrentUseError, match=r"CostModel\.observe\(\) called while another thread"):
        cm.observe(0.01, 1)
    with pytest.raises(ConcurrentUseError, match=r"CostModel\.admit\(\)"):
        cm.admit(0.5)
    assert cm.steps_seen == 0  # refused before touching anything
    go.set()
    th.join(60)
    assert not th.is_alive() and cm.steps_seen == 1
    cm.observe(0.01, 1)  # free again once the other thread is out
    assert cm.steps_seen == 2
    assert isinstance(ConcurrentUseError("x"), MerError)
