"""One conformance class every loader backend passes: same bytes, same errors. Plus `auto` and its fallbacks,
with io_uring and O_DIRECT refused for real by a seccomp filter in a child process."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from mer_runtime import ShardIOError, load_manifest, uring
from mer_runtime.buffers import BufferPool
from mer_runtime.loader import BACKENDS, open_loader

import seccomp
from conftest import REAL, ROOT

def until(pred, what: str, bound: float = 30.0) -> None:
    """Wait until pred() holds; a liveness bound, not a timing."""
    deadline = time.monotonic() + bound
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert pred(), what


BACKEND_PARAMS = [
    pytest.param(b, marks=pytest.mark.skipif(b == "io_uring" and uring.probe() is not None, reason="no io_uring"))
    for b in BACKENDS
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from mertools import extract

    out = tmp_path_factory.mktemp("lc") / "f16"
    extract(REAL / "mixtral-f16.gguf", out, fsync=False)
    return load_manifest(out)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
class TestLoaderConformance:
    def make(self, folder, backend, slots=4, **kw):
        pool = BufferPool(folder.max_expert_size, slots)
        return pool, open_loader(backend, pool, **kw)

    def test_every_shard_byte_identical(self, folder, backend):
        pool, loader = self.make(folder, backend)
        try:
            for i, e in enumerate(folder.experts):
                loader.read(str(folder.path_of(e)), e.size, i % 4)
                assert pool.view(i % 4, e.size).tobytes() == folder.path_of(e).read_bytes()
            assert loader.bytes_read == sum(e.size for e in folder.experts)
        finally:
            loader.close()

    @pytest.mark.parametrize("block_size, depth", [(4096, 1), (8192, 3), (1 << 20, 32)])
    def test_chunking_and_queue_depth_do_not_change_bytes(self, folder, backend, block_size, depth):
        pool, loader = self.make(folder, backend, block_size=block_size, queue_depth=depth)
        try:
            e = folder.experts[3]
            loader.read(str(folder.path_of(e)), e.size, 2)
            assert pool.view(2, e.size).tobytes() == folder.path_of(e).read_bytes()
        finally:
            loader.close()

    def test_many_in_flight_waited_out_of_order(self, folder, backend):
        pool, loader = self.make(folder, backend, slots=4, block_size=16384, queue_depth=8)
        try:
            es = folder.experts[:4]
            tickets = [loader.start(str(folder.path_of(e)), e.size, i) for i, e in enumerate(es)]
            for t, e in reversed(list(zip(tickets, es))):
                loader.wait(t)
                assert pool.view(t.slot, e.size).tobytes() == folder.path_of(e).read_bytes()
        finally:
            loader.close()

    def test_urgent_reads_jump_the_queue(self, folder, backend, tmp_path):
        """Checked on the order in which chunks were issued (recorded by the loader under its lock), not on which
        read happened to finish first: after an urgent read is queued, every chunk issued is its own until it is
        all issued, whatever the disk and the scheduler did before."""
        big = tmp_path / "big.bin"
        big.write_bytes(np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes())
        pool = BufferPool(4 << 20, 3)
        loader = open_loader(backend, pool, block_size=4096, queue_depth=1, threads=1)
        trace = loader.record_issues()
        b = folder.experts[1]
        nb = -(-b.size // 4096)
        try:
            ta = loader.start(str(big), 4 << 20, 0)  # a long prefetch, already being issued
            tb = loader.start(str(folder.path_of(b)), b.size, 1, urgent=True)
            loader.wait(tb)
            loader.wait(ta)
            assert pool.view(0).tobytes() == big.read_bytes()
            assert pool.view(1, b.size).tobytes() == folder.path_of(b).read_bytes()
            events = list(trace)
            at = events.index(("queued", tb.id, True, nb))
            after = [ev[1] for ev in events[at + 1:] if ev[0] == "issue"]
            assert after[:nb] == [tb.id] * nb and set(after[nb:]) <= {ta.id}
            # queued together (one step's experts): the urgent ones are issued first, all of them. On a loaded
            # machine the worker may issue all of td before promote() runs (nothing left to promote, no event):
            # that round says nothing about promotion and is run again
            for _ in range(5):
                trace.clear()
                tc, td = loader.start_many([(str(big), 4 << 20, 2), (str(folder.path_of(b)), b.size, 0)])
                te = loader.start(str(folder.path_of(b)), b.size, 1, urgent=True)
                loader.promote(td)  # a prefetch that became needed
                for t in (td, te, tc):
                    loader.wait(t)
                events = list(trace)
                if any(ev[:2] == ("promoted", td.id) for ev in events):
                    break
            issued = [ev[1] for ev in events if ev[0] == "issue"]
            at_e = events.index(("queued", te.id, True, nb))
            at_p = next(i for i, ev in enumerate(events) if ev[:2] == ("promoted", td.id))
            after_e = [ev[1] for ev in events[at_e + 1:at_p] if ev[0] == "issue"]
            assert set(after_e) <= {te.id}  # between te's queueing and the promotion: only te's chunks
            promoted = events[at_p][2]  # td's chunks still queued when it was promoted
            after_p = [ev[1] for ev in events[at_p + 1:] if ev[0] == "issue"]
            # the promoted chunks go to the very front, before even the urgent te's remaining ones
            assert after_p[:promoted] == [td.id] * promoted
            assert issued.count(td.id) == nb and issued.count(te.id) == nb and issued.count(tc.id) == 1024
            assert pool.view(2).tobytes() == big.read_bytes()
        finally:
            loader.close()

    @pytest.mark.parametrize("cap_each", [False, True])
    def test_urgent_reads_wait_behind_no_more_than_the_spec_window(self, folder, backend, tmp_path, cap_each):
        """spec_window on every backend: at most that many speculative chunks with the disk (or the workers) at
        once, none issued while a foreground chunk is queued or with the disk, so a foreground read queued while
        a guess streams finds at most the window ahead of it (`spec_in_way`). pread (and buffered) used to have
        no window: all its workers could be reading a guess when a miss came. Checked by replaying the loader's
        own record of issued and returned chunks (written under its lock), not on timings: 8 workers, a window of
        2, a 1024-chunk guess streaming, then two foreground reads. With cap_each the guess stops at its window
        until it is needed, and a wait() for it still gets it read (nothing else with the disk: it is forced)."""
        big = tmp_path / "big.bin"
        big.write_bytes(np.random.default_rng(1).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes())
        pool = BufferPool(4 << 20, 3)
        loader = open_loader(backend, pool, block_size=4096, queue_depth=8, threads=8)
        loader.spec_window, loader.spec_cap_each = 2, cap_each
        trace = loader.record_issues()
        b = folder.experts[1]
        try:
            g = loader.start(str(big), 4 << 20, 0)  # a guess
            deadline = time.monotonic() + 60  # a liveness bound, not a timing
            while g.issued < (2 if cap_each else 64) and time.monotonic() < deadline:
                loader.poll()  # io_uring issues guesses from calls into it; pread's workers on their own
                time.sleep(0.0005)
            assert g.issued >= 2
            before = loader.spec_in_way
            fg = [loader.start(str(folder.path_of(b)), b.size, 1 + i, urgent=True) for i in range(2)]
            assert loader.spec_in_way - before <= 4  # two foreground reads, each behind the window at most
            for t in fg:
                loader.wait(t)
                assert pool.view(t.slot, b.size).tobytes() == folder.path_of(b).read_bytes()
            if cap_each:
                assert g.issued == 2 and not g.done  # its window, until needed
            waited = len(trace)  # from here the guess is needed: what a wait forces is not speculation
            loader.wait(g)  # needed now, without a promotion: still read whole
            assert pool.view(0).tobytes() == big.read_bytes()
            events = list(trace)
        finally:
            loader.close()
            pool.close()
        urgent: dict[int, bool] = {}
        unissued: dict[int, int] = {}  # chunks queued and not yet issued, per ticket
        with_disk: dict[int, int] = {}
        spec_most, fg_found = 0, []
        for i, ev in enumerate(events):
            kind, tid = ev[0], ev[1]
            if i == waited:
                urgent[g.id] = True
            if kind == "queued":
                urgent[tid], unissued[tid] = ev[2], ev[3]
                if ev[2]:
                    fg_found.append(sum(n for t, n in with_disk.items() if not urgent[t]))
            elif kind == "issue":
                unissued[tid] -= 1
                with_disk[tid] = with_disk.get(tid, 0) + 1
                spec = sum(n for t, n in with_disk.items() if not urgent[t])
                spec_most = max(spec_most, spec)
                if not urgent[tid]:
                    fg_busy = [t for t in urgent if urgent[t] and (unissued[t] or with_disk.get(t, 0))]
                    assert not fg_busy, f"a guess chunk issued while foreground read(s) {fg_busy} needed the disk"
            elif kind == "returned":
                with_disk[tid] -= 1
        assert sum(with_disk.values()) == 0 and not any(unissued.values())
        assert g.issued == 1024 and spec_most <= 2, spec_most
        assert len(fg_found) == 2 and max(fg_found) <= 2, fg_found

    def test_widening_the_spec_window_lets_held_back_guesses_go_at_once(self, folder, backend, tmp_path):
        """pread and buffered inherited a poll() that did nothing, and setting spec_window woke no worker: a guess
        held back by a window of 0 stayed queued after the window was widened until some other chunk returned or
        somebody waited for it (io_uring issued it only on the next call into the loader). Setting the window now
        issues what it lets go, on every backend, with no other call. The workers are first seen asleep on the
        held-back guess (`_held`), so the wake-up cannot come from their own first look at the queue."""
        big = tmp_path / "guess.bin"
        big.write_bytes(np.random.default_rng(3).integers(0, 256, 32 * 4096, dtype=np.uint8).tobytes())
        pool = BufferPool(32 * 4096, 1)
        loader = open_loader(backend, pool, block_size=4096, queue_depth=8, threads=4)
        try:
            loader.spec_window = 0
            g = loader.start(str(big), 32 * 4096, 0)  # a guess: held back entirely by a window of 0
            if backend != "io_uring":
                until(lambda: loader._held, "no worker went to sleep on the held-back guess")
            assert g.issued == 0
            loader.spec_window = 4
            until(lambda: g.issued >= 1, "widening spec_window issued nothing of the held-back guess")
            loader.wait(g)  # needed now: read whole
            assert pool.view(0).tobytes() == big.read_bytes()
        finally:
            loader.close()
            pool.close()

    def test_poll_wakes_a_worker_asleep_on_held_back_guesses(self, folder, backend, tmp_path):
        """poll() on pread and buffered wakes a worker that went to sleep on guesses the window held back, so a
        window changed behind the setter's back (or anything else that lets one go) is acted on by the next
        poll() as io_uring's poll() does. The window is changed in its field, without the setter's wake-up."""
        big = tmp_path / "guess.bin"
        big.write_bytes(np.random.default_rng(4).integers(0, 256, 8 * 4096, dtype=np.uint8).tobytes())
        pool = BufferPool(8 * 4096, 1)
        loader = open_loader(backend, pool, block_size=4096, queue_depth=8, threads=2)
        try:
            loader.spec_window = 0
            g = loader.start(str(big), 8 * 4096, 0)
            if backend != "io_uring":
                until(lambda: loader._held, "no worker went to sleep on the held-back guess")
            loader._spec_window = 2
            loader.poll()
            until(lambda: g.issued >= 1, "poll() issued nothing of the guess the wider window lets go")
            loader.wait(g)
            assert pool.view(0).tobytes() == big.read_bytes()
        finally:
            loader.close()
            pool.close()

    def test_missing_file_names_it(self, folder, backend, tmp_path):
        pool, loader = self.make(folder, backend)
        try:
            with pytest.raises(ShardIOError, match="nothere.bin: cannot open"):
                loader.read(str(tmp_path / "nothere.bin"), 4096, 0)
        finally:
            loader.close()

    def test_truncated_file_is_an_error(self, folder, backend, tmp_path):
        e = folder.experts[0]
        short = tmp_path / "short.bin"
        short.write_bytes(folder.path_of(e).read_bytes()[: e.size - 8192])
        pool, loader = self.make(folder, backend, block_size=16384)
        try:
            with pytest.raises(ShardIOError, match="short.bin: file ends at byte .* truncated"):
                loader.read(str(short), e.size, 0)
            loader.read(str(folder.path_of(e)), e.size, 0)  # the loader still works afterwards
            assert pool.view(0, e.size).tobytes() == folder.path_of(e).read_bytes()
        finally:
            loader.close()

    def test_read_larger_than_slot_is_refused(self, folder, backend):
        pool, loader = self.make(folder, backend)
        try:
            with pytest.raises(ValueError):
                loader.read(str(folder.path_of(folder.experts[0])), pool.slot_size + 4096, 0)
        finally:
            loader.close()


def test_auto_prefers_io_uring_and_says_why(folder):
    pool = BufferPool(folder.max_expert_size, 2)
    loader = open_loader("auto", pool, probe_file=str(folder.path_of(folder.experts[0])))
    try:
        if uring.probe() is None:
            assert loader.name == "io_uring" and "O_DIRECT works" in loader.reason
        else:
            assert loader.name in ("pread", "buffered") and loader.reason
    finally:
        loader.close()


CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
import seccomp
seccomp.install(refuse_io_uring={uring}, refuse_o_direct={odirect})
from mer_runtime import open_shards, MerError
import numpy as np
out = {{}}
with open_shards({folder!r}, io="auto", cache_slots=2) as s:
    out["backend"] = s.loader.name
    out["reason"] = s.loader.reason
    x = np.ones(s.manifest.model["d_model"], np.float32)
    out["y"] = s.ffn(0, 1, x).tolist()
try:
    open_shards({folder!r}, io={forced!r}).close()
    out["forced"] = "ok"
except MerError as exc:
    out["forced"] = str(exc)
print(json.dumps(out))
"""


@pytest.mark.skipif(not seccomp.supported(), reason="the seccomp filter is written for x86-64 Linux")
@pytest.mark.parametrize(
    "refuse_uring, refuse_odirect, backend, forced, forced_error",
    [
        (True, False, "pread", "io_uring", "--io io_uring is not available here"),
        (False, True, "buffered", "pread", "refuses O_DIRECT: use --io buffered"),
        (True, True, "buffered", "io_uring", "--io io_uring is not available here"),
    ],
)
def test_auto_falls_back_when_refused(folder, refuse_uring, refuse_odirect, backend, forced, forced_error):
    code = CHILD.format(tests=str(ROOT / "tests"), uring=refuse_uring, odirect=refuse_odirect,
                        folder=str(folder.root), forced=forced)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["backend"] == backend
    if refuse_uring:
        assert "io_uring_setup failed (Operation not permitted)" in got["reason"]
    if refuse_odirect:
        assert "O_DIRECT refused" in got["reason"]
    assert forced_error in got["forced"]
    # and the numbers are the same as with no refusal at all
    from mer_runtime import open_shards
    import numpy as np

    with open_shards(folder.root, io="buffered", cache_slots=2) as s:
        ref = s.ffn(0, 1, np.ones(s.manifest.model["d_model"], np.float32))
    assert got["y"] == ref.tolist()


@pytest.mark.parametrize("backend", ["auto", *BACKEND_PARAMS])
@pytest.mark.parametrize("kw, needle", [("queue_depth=0", "queue_depth must be at least 1, got 0"),
                                        ("queue_depth=-5", "queue_depth must be at least 1, got -5"),
                                        ("block_size=0", "block_size must be a positive multiple of 4096, got 0")])
def test_a_queue_depth_or_block_size_that_cannot_read_is_refused(folder, backend, kw, needle):
    """open_shards(queue_depth=0) spun for ever in io_uring's pump (the default backend: the probe read never
    ended), pread and buffered took 0 or -5 and went on; block_size=0 failed with "range() arg 3 must not be
    zero". Run in a child: a regression hangs the child, not the suite."""
    code = (f"from mer_runtime import open_shards\ntry:\n    open_shards({str(folder.root)!r}, io={backend!r}, {kw})\n"
            "except ValueError as e:\n    print(e)\nelse:\n    print('accepted')\n")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"open_shards(io={backend!r}, {kw}) hung")
    assert p.stdout.strip() == needle, (p.stdout, p.stderr)
