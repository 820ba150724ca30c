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


@pytest.mark.parametrize("size", (2, 4))
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
