#!/usr/bin/env python3
"""Q4_0 expert kernel throughput against memory bandwidth and ggml, same bytes, same threads (not a test).

Streams over at least 1 GB of distinct Mixtral-shaped Q4_0 projections (4096 x 14336, 33 MB each), so no cache
holds them, and reports GB/s of weight bytes for:
  - memory read bandwidth (a multithreaded sum over the same buffers, via numpy on each thread);
  - mer_runtime's Q4_0 matvec (the C kernel; exact float32 activations);
  - ggml's ggml_mul_mat on the very same buffers (tensors point at them) with the same thread count; ggml
    quantizes the activations to Q8_0 first. Needs `pip install ggml-python` (builds ggml, about a minute).
Then a whole SwiGLU expert (gate, up, down) through mer_runtime.kernels.expert_ffn.

    python scripts/bench_kernels.py [--gb 1.1] [--threads N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

D_MODEL, D_FF = 4096, 14336


def make_mats(n: int, rows: int, cols: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    mats = []
    for _ in range(n):
        raw = rng.integers(0, 256, size=(rows, cols // 32, 18), dtype=np.uint8)
        raw[..., :2] = rng.uniform(0.001, 0.02, (rows, cols // 32)).astype(np.float16).view(np.uint8).reshape(
            rows, cols // 32, 2)
        mats.append(raw.reshape(-1))
    return mats


def best(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def memory_bandwidth(mats: list[np.ndarray], threads: int, repeat: int) -> float:
    views = [m.view(np.uint64) for m in mats]
    with ThreadPoolExecutor(threads) as ex:
        def run() -> None:
            parts = [v[i * len(v) // threads:(i + 1) * len(v) // threads] for v in views for i in range(threads)]
            list(ex.map(np.bitwise_xor.reduce, parts))  # numpy releases the GIL in reductions

        return sum(m.nbytes for m in mats) / best(repeat, run) / 1e9


def ggml_stream(mats: list[np.ndarray], x: np.ndarray, rows: int, cols: int, threads: int, repeat: int
                ) -> tuple[float, np.ndarray] | None:
    try:
        import ggml
    except ImportError:
        return None
    params = ggml.ggml_init_params(mem_size=64 * 1024 * 1024, mem_buffer=None, no_alloc=True)
    ctx = ggml.ggml_init(params)
    xt = ggml.ggml_new_tensor_2d(ctx, ggml.GGML_TYPE_F32, cols, 1)
    xt.contents.data = x.ctypes.data
    gf = ggml.ggml_new_graph(ctx)
    outs = []
    for m in mats:
        w = ggml.ggml_new_tensor_2d(ctx, ggml.GGML_TYPE_Q4_0, cols, rows)
        w.contents.data = m.ctypes.data  # the same bytes the runtime reads
        y = ggml.ggml_mul_mat(ctx, w, xt)
        outs.append(np.empty(rows, np.float32))
        y.contents.data = outs[-1].ctypes.data
        ggml.ggml_build_forward_expand(gf, y)
    plan = ggml.ggml_graph_plan(gf, threads, None)
    work = np.empty(max(int(plan.work_size), 1), np.uint8)
    plan.work_data = ctypes.cast(work.ctypes.data, type(plan.work_data))
    t = best(repeat, lambda: ggml.ggml_graph_compute(gf, ctypes.byref(plan)))
    ggml.ggml_free(ctx)
    return sum(m.nbytes for m in mats) / t / 1e9, outs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.1, help="distinct weight bytes to stream over")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    os.environ["MER_THREADS"] = str(a.threads)
    from gguf.constants import GGMLQuantizationType as T
    from gguf.quants import dequantize

    from mer_runtime import kernels

    rows, cols = D_FF, D_MODEL
    per = rows * cols // 32 * 18
    n = max(1, int(np.ceil(a.gb * 1e9 / per)))
    print(f"{n} distinct Q4_0 projections of {rows} x {cols} ({per / 1e6:.1f} MB each, {n * per / 1e9:.2f} GB), "
          f"{a.threads} threads, best of {a.repeat}; kernel: {kernels.kernel_for('Q4_0')}")
    mats = make_mats(n, rows, cols)
    x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
    total = n * per

    mem = memory_bandwidth(mats, a.threads, a.repeat)
    ours = total / best(a.repeat, lambda: [kernels.matvec("Q4_0", m, (rows, cols), x) for m in mats]) / 1e9
    ref = dequantize(mats[0].reshape(rows, -1), T.Q4_0).astype(np.float64) @ x.astype(np.float64)
    err = np.abs(kernels.matvec("Q4_0", mats[0], (rows, cols), x) - ref).max() / np.abs(ref).max()
    print(f"{'memory read bandwidth':34s} {mem:6.2f} GB/s")
    print(f"{'mer_runtime Q4_0 matvec':34s} {ours:6.2f} GB/s   {ours / mem:.2f}x memory   max rel err {err:.1e}")
    g = ggml_stream(mats, x, rows, cols, a.threads, a.repeat)
    if g is None:
        print("ggml: not installed (pip install ggml-python); no ggml ratio")
    else:
        gg, y0 = g
        gerr = np.abs(y0 - ref).max() / np.abs(ref).max()
        print(f"{'ggml_mul_mat Q4_0 x F32':34s} {gg:6.2f} GB/s   {gg / mem:.2f}x memory   max rel err {gerr:.1e} "
              "(activations quantized to Q8_0)")
        print(f"ratio mer_runtime / ggml: {ours / gg:.2f} (goal >= 0.5)")

    # a whole expert: gate and up (14336 x 4096) then down (4096 x 14336)
    down = make_mats(1, cols, rows, seed=2)[0]
    experts = [(mats[i % n], mats[(i + 1) % n], down) for i in range(min(n, 8))]
    t = best(a.repeat, lambda: [kernels.expert_ffn({"gate": ("Q4_0", (rows, cols), g_), "up": ("Q4_0", (rows, cols), u_),
                                                    "down": ("Q4_0", (cols, rows), d_)}, x, {"kind": "swiglu"})
                                for g_, u_, d_ in experts])
    print(f"{'SwiGLU expert (3 projections)':34s} {3 * per * len(experts) / t / 1e9:6.2f} GB/s of weights, "
          f"{t / len(experts) * 1e3:.1f} ms per expert")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
