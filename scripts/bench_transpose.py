#!/usr/bin/env python3
"""The transposed copy SafeTensors layouts need, against a plain memory copy of the same bytes (not a test).

A [--rows, --cols] BF16 (2-byte) matrix, copied as its transpose (Llama 4's gate_up/down) and as the transpose of its
even columns (GPT-OSS BF16's interleaved gate_up[:, :, 0::2], from a matrix twice as wide), in bands of 4 MiB of
output as extract and verify --deep make them (mertools/sources/safetensors.py `_band`), by:
  - numpy:      the NumPy fallback (column tiles of 64 source rows);
  - C 1 thread: kernels.strided_copy with FLAG_SERIAL;
  - C pool:     kernels.strided_copy on the pool (MER_THREADS or every CPU);
against np.copyto of the same number of bytes into a fresh band (the memory-speed bound), measured in the same run.
GB/s of output; best of --repeat.

    python scripts/bench_transpose.py [--rows 5120 --cols 16384] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from mer_runtime import kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import best  # noqa: E402  (best of `repeat` timed runs, as bench_kernels measures)

BAND = 4 << 20  # output bytes per band, as `_band`'s callers make them


def by_bands(v: np.ndarray, copy: Callable[[np.ndarray], np.ndarray]) -> Callable[[], None]:
    step = max(1, BAND // (v.shape[1] * v.itemsize))

    def run() -> None:
        for r0 in range(0, v.shape[0], step):
            copy(v[r0:r0 + step])
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5120)
    ap.add_argument("--cols", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 1 << 16, size=(a.rows, 2 * a.cols), dtype=np.uint16)
    plain = np.ascontiguousarray(wide[:, :a.cols])
    nbytes = plain.nbytes

    def memcpy(v: np.ndarray) -> np.ndarray:
        out = np.empty(v.shape, v.dtype)
        np.copyto(out, v)
        return out

    ref = best(a.repeat, by_bands(plain, memcpy))
    print(f"{a.rows} x {a.cols} BF16 ({nbytes / 2**20:.0f} MiB), {kernels.threads()} threads in the pool; "
          f"np.copyto of the same bytes in 4 MiB bands: {nbytes / ref / 1e9:.2f} GB/s")
    copies = {"numpy": kernels._copy_numpy, "C 1 thread": lambda v: kernels.strided_copy(v, flags=kernels.FLAG_SERIAL),
              "C pool": kernels.strided_copy}
    for name, view in (("transpose", plain.T), ("even columns, transposed", wide[:, 0::2].T)):
        for label, fn in copies.items():
            t = best(a.repeat, by_bands(view, fn))
            print(f"  {name:26s} {label:11s} {nbytes / t / 1e9:6.2f} GB/s  {ref / t:5.2f} of np.copyto")


if __name__ == "__main__":
    main()
