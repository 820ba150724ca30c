"""Every C kernel path reads only inside its buffers: weights, x and out end right before a PROT_NONE page, so a
read past the end (the last row of a short four-row pass, an odd last block, a tail) is a crash, not a silent
wrong-but-unused value. Run in a subprocess so a crash is a failure, not the end of the test session."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from mer_runtime import kernels

CODE = textwrap.dedent('''
    import ctypes, mmap, sys
    import numpy as np
    sys.path.insert(0, "tests")
    from gguf.constants import GGMLQuantizationType as T
    from test_kernels import random_blocks
    from mer_runtime import kernels
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    keep = []
    def guarded(nbytes, dtype):
        pg = mmap.PAGESIZE
        m = mmap.mmap(-1, (nbytes + pg - 1) // pg * pg + pg)
        keep.append(m)
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert libc.mprotect(base + len(m) - pg, pg, 0) == 0
        return np.frombuffer(m, np.uint8, nbytes, len(m) - pg - nbytes).view(dtype)
    rng = np.random.default_rng(5)
    F = kernels
    # 1184: Q4_0's groups of eight blocks, then two pairs and a last block (the AVX-512 q8 kernels); 8224 (257
    # blocks), 6656 and 8448: one vector over 32 KB of x, walked in column tiles by the exact AVX-512 kernels (Q8_0:
    # by the AVX2 kernel on x as it is)
    for qt, colss in ((T.Q4_0, (32, 96, 288, 1184, 8224)), (T.MXFP4, (32, 96, 288, 1184, 8224)),
                      (T.Q8_0, (32, 96, 1184, 8224)), (T.Q4_K, (256, 768, 6656)), (T.Q5_K, (256, 768, 6656)),
                      (T.Q6_K, (256, 768, 8448))):
        for cols in colss:
            for rows in (1, 3, 5, 67):
                for n in (1, 3):
                    src = random_blocks(qt, rows, cols, rng)
                    w = guarded(src.nbytes, np.uint8); w[:] = src
                    x = guarded(4 * n * cols, np.float32); x[:] = rng.standard_normal(n * cols)
                    out = guarded(4 * n * rows, np.float32)
                    for walk in (1, 4):
                        kernels._LIB.mer_set_rows(walk)
                        for fl in (0, F.FLAG_ACT_Q8, F.FLAG_NO_AVX512, F.FLAG_ACT_Q8 | F.FLAG_NO_AVX512,
                                   F.FLAG_ACT_Q8 | F.FLAG_NO_VNNI, F.FLAG_NO_PERM, F.FLAG_PORTABLE):
                            assert kernels._LIB.mer_matvec(int(qt), w.ctypes.data, w.nbytes, rows, cols, x.ctypes.data,
                                                           x.size, n, out.ctypes.data, out.size, fl) == 0
                    kernels._LIB.mer_set_rows(0)
    print("ok")
''')


@pytest.mark.skipif(kernels._LIB is None, reason="no C kernel")
def test_kernels_read_only_inside_their_buffers():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stderr[-2000:])
