"""kernels.strided_copy: the C routine that makes the converter's transposed and even/odd SafeTensors projections
contiguous, against NumPy's own copy (np.ascontiguousarray) byte for byte; the NumPy tile path (the fallback) against
the same reference; bad arguments refused. With MER_KERNELS=numpy the same tests check the fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from mer_runtime import kernels
from mer_runtime.kernels import KernelError, strided_copy, strided_copy_from

needs_c = pytest.mark.skipif(kernels._LIB is None, reason="C kernel not built or MER_KERNELS=numpy")
SIZES = (1, 2, 4, 8)
SHAPES = [(1, 1), (1, 37), (37, 1), (2, 3), (8, 8), (13, 29), (67, 131), (128, 128), (129, 257), (200, 96)]


def _bytes(shape: tuple[int, ...], size: int, seed: int) -> np.ndarray:
    """Random bytes viewed as `size`-byte elements, with NaN and inf patterns (payloads included) sprinkled in for
    the float views of the same bytes."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(*shape[:-1], shape[-1] * size), dtype=np.uint8).view(f"<u{size}")
    special = {2: [0x7C00, 0xFC00, 0x7E01, 0x7D55, 0xFF81], 4: [0x7F800000, 0x7FC00001, 0x7F800001, 0xFFFFFFFF],
               8: [0x7FF0000000000000, 0x7FF8000000000123, 0xFFF0000000000001]}.get(size, [0xFF])
    flat = a.reshape(-1)
    flat[rng.integers(0, flat.size, size=min(flat.size, 16))] = rng.choice(special, size=min(flat.size, 16))
    return a


def _views(a: np.ndarray) -> dict[str, np.ndarray]:
    return {"T": a.T, "even.T": a[:, 0::2].T, "odd.T": a[:, 1::2].T, "odd": a[:, 1::2], "reversed.T": a[::-1, ::-1].T,
            "every-third-reversed.T": a[::-1, ::-3].T, "odd.T-reversed": a[:, 1::2].T[::-1], "row": a[-1],
            "column": a[:, -1], "plain": a}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_numpy_byte_for_byte(size, shape):
    a = _bytes(shape, size, seed=size * 1000 + shape[0])
    for name, v in _views(a).items():
        want = np.ascontiguousarray(v).tobytes()
        for dt in {f"<u{size}", {2: "<f2", 4: "<f4", 8: "<f8"}.get(size, "u1")}:  # floats: NaN payloads as bytes
            w = v.view(dt)  # the same bytes as floats: NaN and inf payloads compared as bytes
            for simd in (-1, 0):
                got = strided_copy(w, simd=simd)
                assert got.shape == v.shape and got.flags.c_contiguous, (name, simd)
                assert got.tobytes() == want, (size, shape, name, dt, simd)
            assert kernels._copy_numpy(w).tobytes() == want, (size, shape, name, "numpy tiles")


@pytest.mark.parametrize("size", (1, 2, 4, 8))  # 1 and 8: the element path through the tile buffer (sc_tiles)
@pytest.mark.parametrize("take", (0, 1))
def test_large_views_on_the_pool(size, take):
    """Big enough to be split over the pool's threads (several bands, tiles and edge columns), with the view's
    last element at the very end of its buffer (the step-2 loads must not read past it)."""
    a = _bytes((300, 2 * 1030 + 2), size, seed=7 + take)[:, take:2 * 1030 + take]
    root = np.ascontiguousarray(a)
    for v in (root.T, root[:, take::2].T, root[:, 1::2].T):
        want = np.ascontiguousarray(v).tobytes()
        for flags in (0, kernels.FLAG_SERIAL):
            assert strided_copy(v, flags=flags).tobytes() == want


def test_other_shapes_and_types_go_to_numpy():
    a = np.arange(24, dtype=np.complex128).reshape(2, 3, 4)
    assert strided_copy(a.transpose(2, 0, 1)).tobytes() == np.ascontiguousarray(a.transpose(2, 0, 1)).tobytes()
    b = np.arange(6, dtype=np.complex128).reshape(2, 3)  # 16-byte elements: NumPy
    assert strided_copy(b.T).tobytes() == np.ascontiguousarray(b.T).tobytes()
    assert strided_copy(np.zeros((0, 5), np.uint16).T).shape == (5, 0)


def test_from_a_buffer():
    buf = np.arange(64, dtype=np.uint8)
    got = strided_copy_from(buf, 3, (4, 5), (1, 12), np.uint8)
    assert got.tolist() == [[3 + i + 12 * j for j in range(5)] for i in range(4)]
    got = strided_copy_from(buf, 60, (2, 3), (-4, -20), np.uint16)  # negative strides, down to byte 16
    assert got.tobytes() == np.ndarray((2, 3), np.uint16, buf, 16, (4, 20))[::-1, ::-1].tobytes()


@pytest.mark.parametrize("offset, shape, strides, dtype, what", [
    (1, (4, 5), (1, 15), np.uint8, "last element one past the end"),
    (60, (2, 3), (-4, -30), np.uint16, "first element before the start"),
    (-1, (1, 1), (1, 1), np.uint8, "negative offset"),
    (63, (1, 1), (2, 2), np.uint16, "element straddling the end"),
    (0, (-1, 4), (4, 1), np.uint8, "negative rows"),
    (0, (2, 2), (1 << 62, 1), np.uint8, "stride overflowing"),
    (0, (2, 2), (3, 6), "V3", "3-byte elements"),
])
def test_bad_arguments_are_refused(offset, shape, strides, dtype, what):
    buf = np.zeros(64, np.uint8)
    with pytest.raises(KernelError, match="strided copy"):
        strided_copy_from(buf, offset, shape, strides, dtype)


@needs_c
def test_c_refuses_a_short_output():
    buf = np.zeros(64, np.uint8)
    out = np.zeros(15, np.uint8)
    rc = kernels._LIB.mer_strided_copy(buf.ctypes.data, buf.nbytes, 0, 1, 4, 4, 4, 1, out.ctypes.data, out.nbytes, 0)
    assert rc == -3 and not out.any()
    rc = kernels._LIB.mer_strided_copy(None, 64, 0, 1, 4, 4, 4, 1, out.ctypes.data, 16, 0)
    assert rc == -5
    assert kernels._LIB.mer_strided_copy(None, 0, 0, 1, 0, 4, 4, 1, None, 0, 0) == 0  # nothing to copy


def test_without_the_c_kernel_results_are_the_same():
    """MER_KERNELS=numpy: the fallback an install without a compiler gets, same bytes, same refusals."""
    code = ("import numpy as np; from mer_runtime import kernels as k; assert k._LIB is None; "
            "a = np.arange(5 * 14, dtype=np.uint16).reshape(5, 14)\n"
            "for v in (a.T, a[:, 1::2].T, a[::-1].T):\n"
            "    assert k.strided_copy(v).tobytes() == np.ascontiguousarray(v).tobytes()\n"
            "try:\n    k.strided_copy_from(np.zeros(8, np.uint8), 0, (4, 4), (1, 4), np.uint8)\n"
            "except k.KernelError as e:\n    print('refused', e)\n")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MER_KERNELS": "numpy"},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("refused strided copy [4, 4]"), p.stdout


GUARDED = '''
import ctypes, mmap, sys
import numpy as np
from mer_runtime import kernels
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []
def guarded(shape, dtype):
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    pg = mmap.PAGESIZE
    m = mmap.mmap(-1, (nbytes + pg - 1) // pg * pg + pg)
    keep.append(m)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mprotect(base + len(m) - pg, pg, 0) == 0
    a = np.frombuffer(m, np.uint8, nbytes, len(m) - pg - nbytes).view(dtype).reshape(shape)
    a[...] = np.arange(a.size, dtype=np.uint64).astype(dtype).reshape(shape)
    return a
for dt in ("<u2", "<u4", "<u1", "<u8"):
    for shape in ((16, 16), (24, 34), (67, 130), (9, 2 * 264)):
        a = guarded(shape, dt)
        for v in (a.T, a[:, 0::2].T, a[:, 1::2].T, a[::-1, 1::2].T, a[:, ::-1].T):
            assert kernels.strided_copy(v).tobytes() == np.ascontiguousarray(v).tobytes()
print("ok")
'''


@needs_c
def test_reads_only_inside_the_buffer():
    """The source ends right before a PROT_NONE page: an odd take's last element is the buffer's last, so the
    step-2 loads (which read one element past the last they keep) must stop short of it. In a subprocess, so a
    crash is a failure, not the end of the test session."""
    p = subprocess.run([sys.executable, "-c", GUARDED], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "ok\n", (p.returncode, p.stderr[-2000:])


# -- review: adversarial views, bases that are not NumPy's, out-of-range arguments, threads, Ctrl-C -----------------

def _kinds() -> dict[str, np.ndarray]:
    """Views of every origin the converter (or a caller) could hand over, each with a transposed and/or even/odd
    walk: F order, views of views, broadcasts (zero strides), overlapping windows, unaligned read-only bytes, an
    anonymous mmap, a memoryview, a memmap of a file, structured fields, byte-swapped and non-integer dtypes."""
    import mmap
    import tempfile

    a = np.arange(40 * 64, dtype=np.uint16).reshape(40, 64)
    x = np.arange(1000, dtype=np.uint16)
    w = np.lib.stride_tricks.sliding_window_view(x, 64)  # sc = one element, sr = one element: rows overlap
    u = np.frombuffer(bytes(range(256)) * 20, np.uint8)[1:1 + 2 * 32 * 16].view(np.uint16).reshape(32, 16)
    m = mmap.mmap(-1, 4 * 4096)
    mm = np.frombuffer(m, np.uint32).reshape(64, 64)
    mm[...] = np.arange(4096, dtype=np.uint32).reshape(64, 64)
    mv = np.asarray(memoryview(bytearray(range(256)) * 16)).view(np.uint16).reshape(32, 64)
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(np.arange(128 * 256, dtype=np.uint16).tobytes())
    mp = np.memmap(f.name, np.uint16, "r", shape=(128, 256))
    os.unlink(f.name)
    st = np.zeros((64, 64), dtype=[("a", "<u2"), ("b", "<u4"), ("c", "<u2")])
    st["a"], st["b"], st["c"] = np.arange(4096).reshape(64, 64), 7, 9
    c = (np.arange(64 * 64) + 1j).reshape(64, 64).astype(np.complex64)
    return {
        "F": np.asfortranarray(a), "F.T": np.asfortranarray(a).T, "view of view": a[::-1][3:30, 5::3].T[::2],
        ">u2.T": a.astype(">u2").T, ">u2 odd.T": a.astype(">u2")[:, 1::2].T,
        "broadcast.T": np.broadcast_to(x[:16], (64, 16)).T, "broadcast": np.broadcast_to(x[:16], (64, 16)),
        "windows": w, "windows.T": w.T, "windows even.T": w[:, ::2].T, "windows odd.T": w[::3, 1::2].T,
        "unaligned.T": u.T, "unaligned odd.T": u[:, 1::2].T, "mmap.T": mm.T, "mmap odd.T": mm[:, 1::2].T,
        "memoryview odd.T": mv[:, 1::2].T, "memmap.T": mp.T, "memmap odd.T": mp[:, 1::2].T,
        "memmap rows odd.T": mp[10:50][:, 1::2].T, "1-D reversed": x[::-3], "1-D": x[5:900:2],
        "field.T": st["a"].T, "field odd.T": st["b"][:, 1::2].T, "last field odd.T": st["c"][::-1, 1::2].T,
        "real.T": c.real.T, "imag odd.T": c.imag[:, 1::2].T,
        "datetime.T": np.arange(4096).astype("M8[s]").reshape(64, 64).T,
        "U1.T": np.array(list("abcd" * 1024)).reshape(64, 64).T, "bool.T": (a % 3 == 0).T,
        "object.T": np.array([[1, 2], [3, 4]], object).T,
        "3-D": np.arange(24, dtype=np.uint16).reshape(2, 3, 4).transpose(2, 0, 1),
    }


def test_views_of_every_origin_equal_numpy():
    for name, v in _kinds().items():
        want = np.ascontiguousarray(v)
        for simd in (-1, 0):
            got = strided_copy(v, simd=simd)
            assert got.shape == v.shape and got.dtype == v.dtype and got.flags.c_contiguous, (name, simd)
            assert got.tobytes() == want.tobytes(), (name, simd)
            assert not np.shares_memory(got, v), name
        if v.ndim in (1, 2):
            assert kernels._copy_numpy(v).tobytes() == want.tobytes(), name


def test_a_base_that_is_not_the_views_memory():
    """A WRITEBACKIFCOPY temporary's .base is the array it writes back to, in other memory: the view must be
    checked against its own bytes, not refused (the C routine used to see it outside its "root")."""
    a = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)[:, ::2]
    it = np.nditer(a, op_flags=[["readwrite", "updateifcopy"]], op_dtypes=[np.float64], casting="same_kind")
    with it:
        op = it.operands[0]
        assert op.base is a and not np.shares_memory(op, a)
        for v in (op.T, op[:, 1::2].T):
            assert strided_copy(v).tobytes() == np.ascontiguousarray(v).tobytes()


@pytest.mark.parametrize("offset, shape, strides", [
    ((1 << 64) + 3, (4, 5), (1, 12)),   # ctypes wrapped it to 3: a bogus offset read bytes 3..
    (3, (4, 5), ((1 << 64) + 1, 12)),   # ... and a bogus stride to 1
    (3, (4, 5), (1, -(1 << 64) + 12)),
    (3, ((1 << 64) + 4, 5), (1, 12)),   # NumPy's ValueError, not a KernelError
    (-(1 << 63) - 1, (1, 1), (1, 1)),
    (0, (1 << 20, 1 << 20), (1, 1)),    # a view far outside the buffer: its terabyte output was allocated first
    (0, (1 << 31, 1 << 31), (1, 1)),    # (a MemoryError, not the refusal)
])
def test_numbers_outside_int64_are_refused(offset, shape, strides):
    with pytest.raises(KernelError, match="strided copy"):
        strided_copy_from(np.arange(64, dtype=np.uint8), offset, shape, strides, np.uint8)


def test_an_array_of_references_is_no_buffer():
    with pytest.raises(KernelError, match="strided copy"):
        strided_copy_from(np.array([object()] * 64), 0, (2, 2), (1, 2), np.uint8)


def test_a_length_one_axis_takes_any_stride():
    """Its stride is never used (NumPy may give it any): INT64_MIN used to reach llabs() (UB, seen by UBSan)."""
    buf = np.arange(64, dtype=np.uint8)
    assert strided_copy_from(buf, 0, (1, 4), (-(1 << 63), 2), np.uint8).tolist() == [[0, 2, 4, 6]]
    assert strided_copy_from(buf, 0, (4, 1), (2, -(1 << 63)), np.uint8).tolist() == [[0], [2], [4], [6]]
    assert strided_copy_from(buf, 0, (8, 1), (4, (1 << 63) - 1), np.uint16).reshape(-1).tolist() == \
        np.arange(64, dtype=np.uint8).view(np.uint16)[:16:2].tolist()


GUARDED_BEFORE = GUARDED.replace(
    "a = np.frombuffer(m, np.uint8, nbytes, len(m) - pg - nbytes)",
    "a = np.frombuffer(m, np.uint8, nbytes, pg)").replace(
    "assert libc.mprotect(base + len(m) - pg, pg, 0) == 0", "assert libc.mprotect(base, pg, 0) == 0").replace(
    "for v in (a.T, a[:, 0::2].T, a[:, 1::2].T, a[::-1, 1::2].T, a[:, ::-1].T):",
    "for v in (a[::-1, ::-1].T, a[::-1, -2::-2].T, a[::-1, -1::-2].T, a[::-1, ::-2], a[::-1].T[::-1]):")


@needs_c
def test_reads_nothing_before_the_buffer():
    """The same with the PROT_NONE page right before the source and reversed views (negative strides), whose
    lowest element is the buffer's first byte."""
    assert all(s in GUARDED_BEFORE for s in ("mprotect(base, pg", "nbytes, pg)", "a[::-1, ::-1].T"))
    p = subprocess.run([sys.executable, "-c", GUARDED_BEFORE], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "ok\n", (p.returncode, p.stderr[-2000:])


@needs_c
def test_python_threads_at_once_while_other_kernels_use_the_pool():
    import threading

    rng = np.random.default_rng(3)
    srcs = [_bytes((520, 1100), size, seed=s) for s, size in enumerate((2, 4, 2, 4, 1, 8))]
    views = [s[:, 1::2].T if i % 2 else s.T for i, s in enumerate(srcs)]
    wants = [np.ascontiguousarray(v).tobytes() for v in views]
    w = rng.standard_normal((256, 512)).astype(np.float32)
    x = rng.standard_normal(512).astype(np.float32)
    y = kernels.matvec("F32", w.view(np.uint8).reshape(-1), (256, 512), x)
    bad: list[str] = []

    def copier(k: int) -> None:
        for _ in range(6):
            if strided_copy(views[k]).tobytes() != wants[k]:
                bad.append(f"copy {k}")

    def multiplier() -> None:
        for _ in range(20):
            if not np.array_equal(kernels.matvec("F32", w.view(np.uint8).reshape(-1), (256, 512), x), y):
                bad.append("matvec")

    ts = [threading.Thread(target=copier, args=(k,)) for k in range(len(views))] + \
        [threading.Thread(target=multiplier) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not bad and not any(t.is_alive() for t in ts), bad


CTRL_C = '''
import numpy as np, sys
from mer_runtime.kernels import strided_copy
a = np.zeros((2048, 4096), np.uint16)
print("go", flush=True)
while True:
    strided_copy(a[:, 1::2].T)
'''


@needs_c
def test_ctrl_c_during_copies_ends_the_process():
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-c", CTRL_C], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "go\n"
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        _out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode != 0 and "KeyboardInterrupt" in err, (p.returncode, err[-2000:])


def test_band_is_a_copy_not_a_view_of_the_mapping():
    """_band's transposed copies own their bytes: the mapping they came from may be closed right after."""
    import mmap

    from mertools.sources.safetensors import _band

    m = mmap.mmap(-1, 64 * 96 * 2)
    a = np.frombuffer(m, np.uint16).reshape(64, 96)
    a[...] = np.arange(64 * 96, dtype=np.uint16).reshape(64, 96)
    for v in (a.T, a[:, 0::2].T, a[:, 1::2].T, a[:, :48].T):
        want = np.ascontiguousarray(v[5:37])
        got = _band(v, 5, 37, True)
        assert got.tobytes() == want.tobytes() and not np.shares_memory(got, a)
    del a, v, got
    m.close()  # no export left: a view kept alive by _band's result would make this raise BufferError
