"""Nothing leaks: fds, rings, the pool's mapping and worker threads come back after open/close cycles, after
failing opens and after reads nobody waited for; a FIFO in a shard's place is an error, never a hang."""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time

import numpy as np
import pytest

from mer_runtime import ShardIOError, load_manifest, open_shards, uring
from mer_runtime.buffers import BufferPool
from mer_runtime.loader import BACKENDS, open_loader

from conftest import REAL

BACKEND_PARAMS = [
    pytest.param(b, marks=pytest.mark.skipif(b == "io_uring" and uring.probe() is not None,
                                             reason=f"io_uring refused here: {uring.probe()}"))
    for b in BACKENDS
]


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def maps(needle: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(needle in line for line in f)


def mapped_bytes() -> int:
    total = 0
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = line.split()[0].split("-")
            total += int(hi, 16) - int(lo, 16)
    return total


def mer_threads() -> int:
    return sum(t.name.startswith("mer-") for t in threading.enumerate())


def settle():
    gc.collect()


@pytest.fixture
def folder(extracted):
    return extracted(REAL / "mixtral-q4_0.gguf")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_open_close_cycles_leave_nothing(folder, backend):
    x = np.ones(256, np.float32)
    with open_shards(folder, io=backend, cache_slots=2) as s:  # warm-up: imports, kernel pools
        s.ffn(0, 0, x)
    settle()
    fd0, rings0, threads0 = fds(), maps("io_uring"), mer_threads()
    for i in range(5):
        with open_shards(folder, io=backend, cache_slots=3) as s:
            for e in range(4):
                s.ffn(i % 2, e, x)
            s.prefetch(1 - i % 2, 0)  # left in flight or unused at close
    settle()
    assert fds() == fd0
    assert maps("io_uring") == rings0
    assert mer_threads() == threads0


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_reads_nobody_waited_for_give_their_fds_back(folder, backend):
    m = load_manifest(folder)
    pool = BufferPool(m.max_expert_size, 4)
    fd0, threads0 = fds(), mer_threads()
    loader = open_loader(backend, pool, block_size=8192)
    with_loader = fds()
    try:
        tickets = [loader.start(str(m.path_of(e)), e.size, i) for i, e in enumerate(m.experts[:4])]
        while not all(loader.ready(t) for t in tickets):  # nobody calls wait()
            time.sleep(0.001)
        assert fds() == with_loader  # each finished read closed its own fd
        more = [loader.start(str(m.path_of(e)), e.size, i) for i, e in enumerate(m.experts[4:8])]
    finally:
        loader.close()  # with reads possibly still queued or in flight
    for t in more:
        assert loader.ready(t) and t.fd == -1
    settle()
    assert fds() == fd0 and mer_threads() == threads0
    pool.close()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("attack", ["fifo", "folder", "missing"])
def test_failing_opens_leave_nothing(folder, backend, attack, tmp_path):
    dst = tmp_path / "f"
    shutil.copytree(folder, dst)
    m = load_manifest(dst)
    first = m.path_of(m.experts[0])  # the file open_shards probes
    first.unlink()
    if attack == "fifo":
        os.mkfifo(first)
    elif attack == "folder":
        first.mkdir()
    slots = 64  # a pool of 64 slots: far larger than any allocator noise, so one left mapped shows

    def attempt(io):
        if attack == "missing":  # the probe cannot read it: auto falls back; a forced backend reports it
            with pytest.raises(ShardIOError, match="E0000.bin: cannot open") as ei:
                open_shards(dst, io=io, cache_slots=slots)
        else:
            kind = "a FIFO" if attack == "fifo" else "a directory"
            with pytest.raises(ShardIOError, match=f"E0000.bin: is {kind}, not a regular file") as ei:
                open_shards(dst, io=io, cache_slots=slots)
        return ei

    kept = [attempt(backend)]  # warm-up: thread stacks and allocator arenas that are reused afterwards
    settle()
    fd0, rings0, threads0, mapped0 = fds(), maps("io_uring"), mer_threads(), mapped_bytes()
    for _ in range(3):
        kept.append(attempt(backend))  # the tracebacks (and so the failed ShardSets) stay alive on purpose
        if attack != "missing":
            kept.append(attempt("auto"))
    assert fds() == fd0 and maps("io_uring") == rings0 and mer_threads() == threads0
    pool_bytes = slots * load_manifest(folder).max_expert_size
    assert mapped_bytes() - mapped0 < pool_bytes  # no pool mapping left behind by a failed open


def _with_fifo(folder, tmp_path, layer: int, expert: int):
    """A copy of folder (tmp_path/f) whose shard of (layer, expert) is a FIFO: opening it for reading would block."""
    dst = tmp_path / "f"
    shutil.copytree(folder, dst)
    m = load_manifest(dst)
    victim = m.path_of(m.expert(layer, expert))
    victim.unlink()
    os.mkfifo(victim)
    return dst


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_fifo_in_place_of_a_shard_is_an_error_not_a_hang(folder, backend, tmp_path):
    dst = _with_fifo(folder, tmp_path, 1, 2)
    x = np.ones(256, np.float32)
    with open_shards(dst, io=backend, cache_slots=2) as s:
        s.ffn(0, 1, x)
        with pytest.raises(ShardIOError, match=r"E0002.bin: is a FIFO, not a regular file"):
            s.ffn(1, 2, x)
        assert s.prefetch(1, 2) is False and s.cache.stats.prefetch_failed == 1  # speculative: counted only
        with pytest.raises(ShardIOError, match=r"E0002.bin: is a FIFO"):
            s.ffn(1, 2, x)  # ... and reported to whoever needs it
        s.ffn(1, 1, x)  # still usable


def test_smoke_and_golden_refuse_a_fifo(folder, tmp_path):
    from conftest import run_cli

    dst = _with_fifo(folder, tmp_path, 1, 3)
    p = run_cli("smoke", dst, "--tokens", "20", "--cache-slots", "2", "--workload", "uniform")
    assert p.returncode == 2 and "E0003.bin: is a FIFO" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("smoke", dst, "--tokens", "5", "--emit-golden", tmp_path / "g.npz")
    assert p.returncode == 2 and "E0003.bin: is a FIFO" in p.stderr and "Traceback" not in p.stderr


def test_latency_record_is_bounded():
    from mer_runtime.cache import CacheStats

    st = CacheStats()
    for i in range(100_000):
        st.load_latency.append(i * 1e-6)
    assert len(st.load_latency) == st.load_latency.capacity == 4096 and st.load_latency.count == 100_000
    # a uniform sample of the stream: its median is near the stream's
    assert abs(np.median(list(st.load_latency)) - 0.05) < 0.005
