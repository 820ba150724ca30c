"""The io_uring binding on its own: a real ring, real O_DIRECT reads into registered buffers."""

from __future__ import annotations

import errno
import json
import mmap
import os
import platform
import subprocess
import sys

import pytest

from mer_runtime import uring
from mer_runtime.buffers import BufferPool

import seccomp
from conftest import ROOT

needs_uring = pytest.mark.skipif(uring.probe() is not None, reason=f"io_uring unavailable: {uring.probe()}")


def _sparse_table() -> bool:
    """Whether this kernel has the sparse buffer table (5.19) that registers a slot at its first read."""
    if uring.probe() is not None:
        return False
    with uring.Ring(2) as r:
        try:
            r.register_sparse(1)
        except OSError:
            return False
    return True


needs_sparse = pytest.mark.skipif(not _sparse_table(), reason="no sparse buffer table (Linux before 5.19): the "
                                  "pool is registered whole at open (test_without_a_sparse_table_...)")


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "data.bin"
    p.write_bytes(os.urandom(3 * 1024 * 1024))
    return p


@needs_uring
@pytest.mark.parametrize("fixed", [True, False])
def test_o_direct_reads_land_in_aligned_buffers(data_file, fixed):
    pool = BufferPool(1 << 20, 3)
    fd = os.open(data_file, os.O_RDONLY | os.O_DIRECT)
    with uring.Ring(8) as ring:
        if fixed:
            ring.register_buffers(pool.regions())
        for slot in range(3):
            ring.prep_read(fd, pool.address(slot), 1 << 20, slot << 20, 100 + slot, slot if fixed else None)
        got = {}
        while len(got) < 3:
            got.update(ring.wait(3 - len(got)))
    os.close(fd)
    assert got == {100: 1 << 20, 101: 1 << 20, 102: 1 << 20}
    blob = data_file.read_bytes()
    for slot in range(3):
        assert pool.view(slot).tobytes() == blob[slot << 20:(slot + 1) << 20]


@needs_uring
def test_more_reads_than_ring_entries_wrap_around(data_file):
    pool = BufferPool(4096, 1)
    fd = os.open(data_file, os.O_RDONLY | os.O_DIRECT)
    blob = data_file.read_bytes()
    with uring.Ring(2) as ring:
        ring.register_buffers(pool.regions())
        for i in range(50):  # 25 times round a 2-entry ring
            ring.prep_read(fd, pool.address(0), 4096, i * 4096, i, 0)
            ((ud, res),) = ring.wait(1)
            assert (ud, res) == (i, 4096)
            assert pool.view(0).tobytes() == blob[i * 4096:(i + 1) * 4096]
    os.close(fd)


@needs_uring
def test_errors_come_back_as_negative_errno(data_file):
    pool = BufferPool(4096, 2)
    with uring.Ring(4) as ring:
        ring.prep_read(12345, pool.address(0), 4096, 0, 7, None)  # not an open fd
        assert ring.wait(1) == [(7, -errno.EBADF)]
        fd = os.open(data_file, os.O_RDONLY | os.O_DIRECT)
        ring.prep_read(fd, pool.address(0) + 1, 4096, 0, 8, None)  # misaligned for O_DIRECT
        assert ring.wait(1) == [(8, -errno.EINVAL)]
        ring.prep_read(fd, pool.address(0), 4096, 3 << 20, 9, None)  # at end of file: 0 bytes
        assert ring.wait(1) == [(9, 0)]
        os.close(fd)


@needs_uring
def test_retract_takes_back_what_the_kernel_has_not_consumed(data_file):
    """After a refused submission the loader takes its SQEs back: they must never reach the kernel afterwards (their
    buffers may be given to another read)."""
    pool = BufferPool(4096, 2)
    fd = os.open(data_file, os.O_RDONLY | os.O_DIRECT)
    blob = data_file.read_bytes()
    pool.view(1)[:] = 0xAB
    with uring.Ring(4) as ring:
        ring.prep_read(fd, pool.address(0), 4096, 0, 1, None)
        ring.submit()
        ring.prep_read(fd, pool.address(1), 4096, 4096, 2, None)
        ring.prep_read(fd, pool.address(1), 4096, 8192, 3, None)
        assert ring.retract() == [2, 3]
        assert ring.pending == 0 and ring.in_flight == 1
        assert ring.wait(1) == [(1, 4096)]
        ring.prep_read(fd, pool.address(0), 4096, 12288, 4, None)
        assert ring.wait(1) == [(4, 4096)]  # the retracted reads never ran (they would complete with it)
        assert ring.in_flight == 0 and ring.reap() == []
    os.close(fd)
    assert pool.view(1).tobytes() == b"\xab" * 4096
    assert pool.view(0).tobytes() == blob[12288:16384]


def child(code: str, env: dict | None = None) -> dict:
    p = subprocess.run([sys.executable, "-c", f"import sys, json; sys.path.insert(0, {str(ROOT / 'tests')!r})\n" + code],
                       capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.skipif(not seccomp.supported(), reason="the seccomp filter is written for x86-64 Linux")
def test_probe_says_why_when_refused():
    """The kernel really refuses (seccomp answers io_uring_setup with EPERM, as Docker's default profile does)."""
    got = child("import seccomp; seccomp.install(refuse_io_uring=True)\n"
                "from mer_runtime import uring\n"
                "print(json.dumps({'probe': uring.probe()}))")
    assert got["probe"] == ("io_uring_setup failed (Operation not permitted): refused: kernel.io_uring_disabled is "
                            "set, or a container's seccomp profile blocks it")


def test_without_ordered_access_io_uring_is_refused_on_weakly_ordered_cpus():
    """Only the CPU name is faked (the helper is really left out): auto must say why and read with pread."""
    got = child("import platform; platform.machine = lambda: 'aarch64'\n"
                "from mer_runtime import uring\n"
                "from mer_runtime.buffers import BufferPool\n"
                "from mer_runtime.loader import open_loader\n"
                "l = open_loader('auto', BufferPool(4096, 2)); l.close()\n"
                "print(json.dumps({'probe': uring.probe(), 'name': l.name, 'reason': l.reason, 'ord': uring.ORDERING}))",
                env={"MER_URING_ATOMICS": "plain"})
    assert got["probe"].startswith("io_uring on aarch64 needs the mer_runtime._uring_atomics helper")
    assert got["name"] == "pread" and "io_uring on aarch64 needs" in got["reason"] and got["ord"] == "unavailable"


def test_ordering_rule():
    assert uring.ordering_refusal("x86_64", helper=False) is None  # TSO: plain access is acquire/release
    assert uring.ordering_refusal("aarch64", helper=True) is None
    assert "riscv64" in uring.ordering_refusal("riscv64", helper=False)


@needs_uring
def test_ring_indices_use_the_c11_helper_when_built():
    from pathlib import Path

    built = any(Path(uring.__file__).parent.glob("_uring_atomics*.so"))
    if not built:
        pytest.skip("mer_runtime._uring_atomics was not built (no C compiler at install)")
    assert uring.ORDERING.startswith("C11 acquire/release")
    with uring.Ring(2) as r:
        # the index objects read and write the kernel's words through the helper
        assert r.cq_tail.load() == r.cq_head.load() == 0
        assert r.sq_tail.load() == 0


@needs_uring
def test_plain_access_on_x86_64_reads_the_same(tmp_path):
    if platform.machine() not in uring.TSO_MACHINES:
        pytest.skip("plain access is only allowed on x86-64")
    data = tmp_path / "d.bin"
    data.write_bytes(os.urandom(1 << 16))
    got = child("from mer_runtime import uring\n"
                "from mer_runtime.buffers import BufferPool\n"
                "from mer_runtime.loader import open_loader\n"
                "p = BufferPool(1 << 16, 2); l = open_loader('io_uring', p, block_size=4096, queue_depth=4)\n"
                f"l.read({str(data)!r}, 1 << 16, 1); l.close()\n"
                "print(json.dumps({'ord': uring.ORDERING, 'bytes': p.view(1).tobytes().hex()}))",
                env={"MER_URING_ATOMICS": "plain"})
    assert got["ord"] == "plain loads/stores (x86-64 TSO)" and bytes.fromhex(got["bytes"]) == data.read_bytes()


@needs_uring
@pytest.mark.parametrize("depth", [1, 2, 3, 8, 9, 33])
def test_a_pump_never_submits_behind_its_own_back(tmp_path, monkeypatch, depth):
    """UringLoader._pump prepares up to queue_depth SQEs, then submits them once; Ring.prep_read submits by itself
    only when the SQ is full, which this loader's ring (at least queue_depth entries) never is. So the kernel's
    refusal can come only from that one submission (handled by `_refused`), never from preparing a chunk: the
    try/except that used to guard prep_read in `_pump` was dead code, removed. Counted on the real ring: the
    kernel is made to take none of the SQEs (the ring's syscall wrapper answers 0, as in test_spec_thread), so
    all queue_depth of them stay in the SQ at once, and one read's start makes exactly one submitting
    io_uring_enter."""
    import ctypes

    from mer_runtime.loader import UringLoader

    path = tmp_path / "d.bin"
    path.write_bytes(os.urandom(4096 * 2 * depth))
    pool = BufferPool(4096 * 2 * depth, 1)
    loader = UringLoader(pool, block_size=4096, queue_depth=depth)
    real, submits = uring._syscall, []

    def taking_none(nr, *a):
        if nr == uring.SYS_IO_URING_ENTER and a[1] > 0:  # (fd, to_submit, min_complete, flags, sigset, size)
            submits.append(a[1])
            ctypes.set_errno(0)
            return 0
        return real(nr, *a)

    try:
        assert loader.ring.entries >= depth
        monkeypatch.setattr(uring, "_syscall", taking_none)
        t = loader.start(str(path), 4096 * 2 * depth, 0)
        assert submits == [depth] and loader.ring.pending == depth and t.error is None
        monkeypatch.undo()
        loader.ring.submit()  # now the kernel takes them: the read completes as usual
        loader.wait(t)
        assert pool.view(0, 4096 * 2 * depth).tobytes() == path.read_bytes()
    finally:
        monkeypatch.undo()
        loader.close()
        pool.close()


needs_setpriv = pytest.mark.skipif(not os.path.exists("/usr/bin/setpriv"),
                                   reason="setpriv (util-linux) drops CAP_IPC_LOCK")


def _without_ipc_lock(code: str, *args) -> subprocess.CompletedProcess:
    """Run `code` in a child without CAP_IPC_LOCK (as any user but root is), so that RLIMIT_MEMLOCK counts what
    io_uring pins; skip where setpriv cannot drop it."""
    cmd = ["/usr/bin/setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", sys.executable, "-c", code,
           *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    if p.returncode and "setpriv" in p.stderr:
        pytest.skip(f"setpriv cannot drop the capability here: {p.stderr.strip()[-200:]}")
    assert p.returncode == 0, p.stderr[-2000:]
    return p

_MEMLOCK_CHILD = """
import resource, sys
from mer_runtime.buffers import BufferPool
from mer_runtime.loader import open_loader
resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))  # lowering needs no privilege
pool = BufferPool(int(sys.argv[1]), 2)
loader = open_loader("io_uring", pool, probe_file=sys.argv[2])  # a slot is registered at its first read
data = open(sys.argv[2], "rb").read(pool.slot_size)
for slot in (0, 1):
    loader.read(sys.argv[2], len(data), slot)
    assert pool.view(slot)[:len(data)].tobytes() == data
print(loader.fixed, loader.reason, loader.describe(), sep="|")
"""


@needs_uring
@needs_setpriv
@pytest.mark.parametrize("slot, fixed", [(4 << 20, False), (256 << 10, True)])
def test_memlock_limit_says_what_to_raise(slot, fixed, data_file):
    """Without CAP_IPC_LOCK (any user but root) registered buffers count against RLIMIT_MEMLOCK, 8 MiB by default:
    a cache above it is read with plain READ, and the reason names the limit, the cache and what to raise."""
    p = _without_ipc_lock(_MEMLOCK_CHILD, slot, data_file)
    got, reason, describe = p.stdout.strip().split("|")
    assert got == str(fixed), p.stdout
    if fixed:
        assert "registered buffers refused" not in reason and "fixed buffers;" in describe
    else:
        assert "plain READ;" in describe
        assert "the cache's 8 MiB exceed the locked-memory limit of 1 MiB" in reason, reason
        assert "ulimit -l" in reason and reason.endswith("using plain READ")


def _pinned_kib() -> int:
    with open("/proc/self/status") as fh:
        return next((int(line.split()[1]) for line in fh if line.startswith("VmPin:")), -1)


@needs_uring
@needs_sparse
def test_slots_are_registered_at_their_first_read(data_file):
    """Registering a slot pins its pages (VmPin): a 16-slot cache of Mixtral experts took 0.55-2.7 s to open when
    the whole pool was registered at once. Now only the slots read into are pinned, one by one, and every read of a
    registered slot is READ_FIXED."""
    from mer_runtime.loader import open_loader

    if _pinned_kib() < 0:
        pytest.skip("no VmPin in /proc/self/status")
    base = _pinned_kib()
    pool = BufferPool(1 << 20, 4)
    # where transparent huge pages are on ("always": Fedora, Arch), the kernel counts a pinned huge page whole: a
    # 1 MiB slot inside a 2 MiB page would read as 2 MiB pinned. Small pages keep the count the slots' own.
    pool._mem.madvise(mmap.MADV_NOHUGEPAGE)
    loader = open_loader("io_uring", pool)
    try:
        assert loader.fixed and _pinned_kib() == base
        blob = data_file.read_bytes()
        for n, slot in enumerate((2, 0, 2), 1):
            loader.read(str(data_file), 1 << 20, slot)
            assert pool.view(slot).tobytes() == blob[:1 << 20]
            assert _pinned_kib() - base == 1024 * min(n, 2), n
        assert "fixed buffers;" in loader.describe()
    finally:
        loader.close()
        pool.close()


@needs_uring
@needs_sparse
@needs_setpriv
def test_memlock_limit_between_slots_registers_what_fits(data_file):
    """A limit that holds one slot but not two: the first slot read is registered, the second reads with plain READ,
    and both land; describe() and the reason say which."""
    p = _without_ipc_lock(_MEMLOCK_CHILD, 768 << 10, data_file)
    got, reason, describe = p.stdout.strip().split("|")
    assert got == "True"
    assert "1 of 2 slots registered, plain READ for the others" in reason, reason
    assert "fixed buffers for 1 of 2 slots, plain READ for the others;" in describe, describe


@needs_uring
@pytest.mark.skipif(not seccomp.supported(), reason="the seccomp filter is written for x86-64 Linux")
def test_without_a_sparse_table_the_pool_is_registered_at_open(data_file):
    """Before Linux 5.19 the kernel has no sparse buffer table (a seccomp filter answers IORING_REGISTER_BUFFERS2 with
    EINVAL, as such a kernel does): the whole pool is registered at open, and every read is still READ_FIXED."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import seccomp
seccomp.install(refuse_sparse_buffers=True)
from mer_runtime.buffers import BufferPool
from mer_runtime.loader import open_loader
def pinned():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmPin:"))
pool = BufferPool(1 << 20, 3)
loader = open_loader("io_uring", pool)
at_open = pinned()
data = open({str(data_file)!r}, "rb").read(1 << 20)
for slot in range(3):
    loader.read({str(data_file)!r}, 1 << 20, slot)
    assert pool.view(slot).tobytes() == data
print(at_open, pinned(), loader.describe(), sep="|")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    at_open, after, describe = p.stdout.strip().split("|")
    assert int(at_open) == int(after) == 3 * 1024, p.stdout
    assert ", fixed buffers;" in describe


@needs_uring
@pytest.mark.parametrize("io", ["io_uring", "pread"])
def test_warm_up_faults_in_and_registers_the_whole_cache(extracted, io):
    """`ShardSet.warm_up()` (smoke calls it before its clock starts) pays for the cache's memory before the first
    load: with io_uring every slot is registered (pinned), with pread every page is resident; loads still give the
    shard's bytes, and a closed ShardSet refuses it."""
    from mer_runtime import open_shards
    from mer_runtime.errors import MerError

    folder = extracted(ROOT / "fixtures" / "real" / "mixtral-q4_0.gguf")
    base = _pinned_kib()
    s = open_shards(folder, io=io, cache_slots=4, checksums="never")
    try:
        size = s.pool.slot_size * s.pool.n_slots
        before = (_pinned_kib() - base) * 1024
        assert before <= s.pool.slot_size  # at most the probe read's slot
        s.warm_up()
        if io == "io_uring":
            assert (_pinned_kib() - base) * 1024 == size
            assert "fixed buffers;" in s.describe_io()
        release = tuple(int(p) for p in platform.release().split("-")[0].split(".")[:2])
        assert s.pool.prefault() or release < (5, 14)  # idempotent, where MADV_POPULATE_WRITE exists
        e = s.manifest.experts[-1]
        with s.load(e.layer, e.expert) as ex:
            assert ex.buffer[:e.size].tobytes() == (folder / e.path).read_bytes()[:e.size]
    finally:
        s.close()
    with pytest.raises(MerError):
        s.warm_up()


_SHARED_MEMLOCK_CHILD = """
import resource, sys
from mer_runtime.buffers import BufferPool
from mer_runtime.loader import open_loader
resource.setrlimit(resource.RLIMIT_MEMLOCK, (768 << 10, 768 << 10))
first = BufferPool(256 << 10, 2)  # 512 KiB of the 768 KiB, registered by another loader of the same user
other = open_loader("io_uring", first)
for slot in (0, 1):
    other.read(sys.argv[1], 256 << 10, slot)
pool = BufferPool(128 << 10, 3)  # 384 KiB: below the limit, above what is left of it
loader = open_loader("io_uring", pool)
data = open(sys.argv[1], "rb").read(128 << 10)
for slot in range(3):
    loader.read(sys.argv[1], 128 << 10, slot)
    assert pool.view(slot).tobytes() == data
print(loader.reason)
"""


@needs_uring
@needs_setpriv
def test_memlock_limit_spent_elsewhere_is_named(data_file):
    """The kernel counts registered buffers against the locked-memory limit per user, with the rings' own pages on
    newer kernels: a cache below the limit can still be refused for it (here another loader holds part of it, and
    a limit set to exactly the cache's size does the same). The reason still names the limit and what to raise."""
    p = _without_ipc_lock(_SHARED_MEMLOCK_CHILD, data_file)
    reason = p.stdout.strip()
    assert "slots registered, plain READ for the others" in reason, reason
    assert "locked-memory limit of 768 KiB" in reason and "ulimit -l" in reason, reason


@needs_uring
def test_an_interrupt_while_a_chunk_is_issued_loses_nothing(data_file):
    """A KeyboardInterrupt at any call of `_pump`'s issuing step (CPython runs a signal's handler at a call): the
    chunk was popped from the queue before its SQE was prepared and recorded, so a Ctrl-C there lost it (its read
    never finished) or left an SQE nobody knew, whose completion raised KeyError in the next read. Now every read,
    the interrupted one too, finishes with the file's bytes."""
    import threading

    from mer_runtime.loader import UringLoader, open_loader

    blob = data_file.read_bytes()
    pump, submit = UringLoader._pump.__code__, UringLoader._submit.__code__
    at = 0
    while True:
        at += 1
        pool = BufferPool(1 << 20, 2)
        loader = open_loader("io_uring", pool, queue_depth=4, block_size=256 << 10)
        seen, where = 0, []

        def in_issue(frame):  # a call made by _pump's issuing step, or by what it calls (its submission apart)
            while frame is not None:
                if frame.f_code is submit:
                    return False
                if frame.f_code is pump:
                    return True
                frame = frame.f_back
            return False

        def trace(frame, event, arg):
            nonlocal seen
            if event == "call" and not where and in_issue(frame.f_back):
                seen += 1
                if seen == at:
                    where.append(frame.f_code.co_name)
                    raise KeyboardInterrupt(frame.f_code.co_name)
            return None

        try:
            sys.settrace(trace)
            try:
                t = loader.start(str(data_file), 1 << 20, 0)
            except KeyboardInterrupt:
                t = None
            finally:
                sys.settrace(None)
            done: list[str] = []

            def rest():
                try:
                    if t is not None:
                        loader.wait(t)
                        done.append(f"first {pool.view(0).tobytes() == blob[:1 << 20]}")
                    loader.read(str(data_file), 1 << 20, 1)
                    done.append(f"second {pool.view(1).tobytes() == blob[:1 << 20]}")
                except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
                    done.append(repr(exc))

            th = threading.Thread(target=rest, daemon=True)
            th.start()
            th.join(20)
            assert not th.is_alive(), f"a read never finished after an interrupt at {where}"
            assert done[-1] == "second True" and "first False" not in done, (where, done)
            assert not loader._queue and loader.ring.pending == 0, where
        finally:
            loader.close()
            pool.close()
        if not where:
            assert at > 5  # the step's calls were each interrupted once before it ran through
            break
