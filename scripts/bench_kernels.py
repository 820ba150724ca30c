#!/usr/bin/env python3
"""Kernel throughput against memory bandwidth and ggml, same bytes, same threads, same run (not a test).

1. Memory read bandwidth: a multithreaded reduction over the very buffers the kernels read.
2. Per type (Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4): matvec GB/s of weight bytes, streaming over at least --gb of
   distinct Mixtral-shaped matrices (d_ff x d_model) so no cache holds them; exact float32 activations, and Q8_0
   activations (act="q8") where the type has that path. Against ggml's ggml_mul_mat on the same buffers with the
   same thread count (ggml quantizes activations first), when ggml-python is installed (`pip install -e
   '.[bench]'`; without it the script says so and prints no ggml ratio).
3. Layer steps/s of `kernels.moe` (one C call: top-k experts, gate+up fused, down summed), for a Mixtral-shaped
   Q4_0 top-2 step and a Q4_K_M one (gate/up Q4_K, down Q6_K), all experts in memory, distinct experts each step;
   also in weight bytes per second against memory bandwidth; against ggml's graph of the same computation.
4. --sweep-prefetch: matvec GB/s for several software prefetch distances (how the default was chosen).
5. --sweep-rows: matvec GB/s (exact and q8) with the kernels walking 1 and 4 rows per pass (how the default, 1,
   was chosen).
6. --sweep-avx512 (a CPU with AVX-512 only): the AVX-512 kernels against the AVX2 ones (FLAG_NO_AVX512), the two
   alternated in the same process, medians of max(--repeat, 5) rounds: matvec of the types that have them (exact
   and q8) and the moe() rows (how the kept ones were chosen; docs/runtime.md).

Each number is the best of --repeat runs. On a shared machine they are indicative only.

    python scripts/bench_kernels.py [--gb 1.1] [--threads N] [--repeat 3] [--d-model 4096 --d-ff 14336]
    python scripts/bench_kernels.py --gb 0.01 --d-model 256 --d-ff 512 --repeat 1   # smoke run, seconds
    python scripts/bench_kernels.py --types none --moe Q4_0   # only the moe() row (memory measured on its own)
    python scripts/bench_kernels.py --types Q6_K --moe none   # only the Q6_K matvec row
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

TYPES = ["Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4"]


def random_blocks(name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks (sane scales), raw bytes, row-major."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    blk, bb = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    raw = rng.integers(0, 256, size=(rows, cols // blk, bb), dtype=np.uint8)
    lead = raw.shape[:2]

    def f16(k: int) -> np.ndarray:
        return rng.uniform(0.001, 0.02, lead + (k,)).astype(np.float16).view(np.uint8).reshape(lead + (2 * k,))

    if name in ("Q4_0", "Q8_0"):
        raw[..., :2] = f16(1)
    elif name in ("Q4_K", "Q5_K"):
        raw[..., :4] = f16(2)
    elif name == "Q6_K":
        raw[..., 208:210] = f16(1)
    elif name == "MXFP4":
        raw[..., 0] = rng.integers(118, 124, lead)
    return raw.reshape(-1)


def best(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def alternated(rounds: int, new, old) -> tuple[float, float, int]:
    """Median seconds of `new` and of `old`, run in turn (the order swapped each round, so a drift in the machine's
    load falls on both), and the rounds in which `new` was faster."""
    tn: list[float] = []
    to: list[float] = []
    for r in range(rounds):
        pair = [(tn, new), (to, old)]
        for times, fn in pair if r % 2 == 0 else pair[::-1]:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(tn), statistics.median(to), sum(a < b for a, b in zip(tn, to))


def memory_bandwidth(mats: list[np.ndarray], threads: int, repeat: int) -> float:
    views = [m.view(np.uint8) for m in mats]
    with ThreadPoolExecutor(threads) as ex:
        def run() -> None:
            parts = [v[i * len(v) // threads // 8 * 8:(i + 1) * len(v) // threads // 8 * 8].view(np.uint64)
                     for v in views for i in range(threads)]
            list(ex.map(np.bitwise_xor.reduce, parts))  # numpy releases the GIL in reductions

        return sum(m.nbytes for m in mats) / best(repeat, run) / 1e9


# -- ggml (optional) -------------------------------------------------------------------------------------------
def ggml_module():
    try:
        import ggml  # type: ignore

        return ggml
    except ImportError:
        return None


class GgmlGraph:
    """A ggml context whose tensors point at our numpy buffers (no copy), a graph, and a plan."""

    def __init__(self, ggml, threads: int):
        self.g, self.threads = ggml, threads
        params = ggml.ggml_init_params(mem_size=256 * 1024 * 1024, mem_buffer=None, no_alloc=True)
        self.ctx = ggml.ggml_init(params)
        self.gf = ggml.ggml_new_graph_custom(self.ctx, 16384, False) if hasattr(ggml, "ggml_new_graph_custom") \
            else ggml.ggml_new_graph(self.ctx)
        self.keep: list[np.ndarray] = []

    def tensor(self, gtype, arr: np.ndarray, ne0: int, ne1: int):
        t = self.g.ggml_new_tensor_2d(self.ctx, gtype, ne0, ne1)
        t.contents.data = arr.ctypes.data
        self.keep.append(arr)
        return t

    def result(self, t, n: int) -> np.ndarray:
        out = np.empty(n, np.float32)
        t.contents.data = out.ctypes.data
        self.keep.append(out)
        self.g.ggml_build_forward_expand(self.gf, t)
        return out

    def scratch(self, t, n: int):
        out = np.empty(n, np.float32)
        t.contents.data = out.ctypes.data
        self.keep.append(out)
        return t

    def compute_fn(self):
        g = self.g
        plan = g.ggml_graph_plan(self.gf, self.threads, None) if _plan_takes_threadpool(g) else \
            g.ggml_graph_plan(self.gf, self.threads)
        work = np.empty(max(int(plan.work_size), 1), np.uint8)
        self.keep.append(work)
        plan.work_data = ctypes.cast(work.ctypes.data, type(plan.work_data))
        return lambda: g.ggml_graph_compute(self.gf, ctypes.byref(plan))

    def free(self) -> None:
        self.g.ggml_free(self.ctx)


def _plan_takes_threadpool(g) -> bool:
    try:
        return len(g.ggml_graph_plan.argtypes) == 3
    except (AttributeError, TypeError):
        return True


def ggml_type(ggml, name: str):
    return getattr(ggml, f"GGML_TYPE_{name}", None)


def ggml_matvec(ggml, name: str, mats: list[np.ndarray], x: np.ndarray, rows: int, cols: int, threads: int,
                repeat: int) -> tuple[float, np.ndarray] | str:
    gtype = ggml_type(ggml, name)
    if gtype is None:
        return f"this ggml has no {name}"
    gr = GgmlGraph(ggml, threads)
    xt = gr.tensor(ggml.GGML_TYPE_F32, x, cols, 1)
    outs = [gr.result(ggml.ggml_mul_mat(gr.ctx, gr.tensor(gtype, m, cols, rows), xt), rows) for m in mats]
    t = best(repeat, gr.compute_fn())
    y0 = outs[0].copy()
    gr.free()
    return sum(m.nbytes for m in mats) / t / 1e9, y0


def ggml_moe(ggml, steps: list[list[tuple[tuple[str, np.ndarray], ...]]], w: np.ndarray, x: np.ndarray,
             d_model: int, d_ff: int, threads: int, repeat: int) -> float | str:
    """Steps/s of ggml's graph for the same routed steps: per expert mul_mat gate, up; silu(g) * u; mul_mat down;
    scaled by the routing weight and summed. All steps in one graph (one compute call), as one would batch them."""
    gr = GgmlGraph(ggml, threads)
    xt = gr.tensor(ggml.GGML_TYPE_F32, x, d_model, 1)
    for step in steps:
        acc = None
        for k, ((gt, g), (ut, u), (dt, d)) in enumerate(step):
            types = [ggml_type(ggml, t) for t in (gt, ut, dt)]
            if None in types:
                return f"this ggml lacks one of {gt}, {ut}, {dt}"
            gg = ggml.ggml_mul_mat(gr.ctx, gr.tensor(types[0], g, d_model, d_ff), xt)
            uu = ggml.ggml_mul_mat(gr.ctx, gr.tensor(types[1], u, d_model, d_ff), xt)
            h = ggml.ggml_mul(gr.ctx, ggml.ggml_silu(gr.ctx, gg), uu)
            y = ggml.ggml_scale(gr.ctx, ggml.ggml_mul_mat(gr.ctx, gr.tensor(types[2], d, d_ff, d_model), h),
                                float(w[k]))
            acc = y if acc is None else ggml.ggml_add(gr.ctx, acc, y)
        gr.result(acc, d_model)
    # intermediate tensors need memory: give each its own buffer
    n = ggml.ggml_graph_n_nodes(gr.gf) if hasattr(ggml, "ggml_graph_n_nodes") else gr.gf.contents.n_nodes
    for i in range(n):
        node = ggml.ggml_graph_node(gr.gf, i) if hasattr(ggml, "ggml_graph_node") else gr.gf.contents.nodes[i]
        if not node.contents.data:
            gr.scratch(node, int(ggml.ggml_nelements(node)))
    t = best(repeat, gr.compute_fn())
    gr.free()
    return len(steps) / t


def guarded(fn, *args):
    """ggml-python's API moves between versions: a comparison that fails says why instead of ending the run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any binding mismatch
        return f"ggml comparison failed ({type(e).__name__}: {e})"


# -- main --------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.1, help="distinct weight bytes to stream over, per type")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-ff", type=int, default=14336)
    ap.add_argument("--types", default=",".join(TYPES), help="matvec rows to run ('none': only moe())")
    ap.add_argument("--moe", default="Q4_0,Q4_K_M", help="moe() rows to run: Q4_0, Q4_K_M ('none': only matvec)")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--sweep-prefetch", action="store_true", help="also time several prefetch distances")
    ap.add_argument("--sweep-rows", action="store_true", help="also time 1 and 4 rows per pass")
    ap.add_argument("--sweep-avx512", action="store_true", help="also time the AVX-512 kernels against the AVX2 ones")
    ap.add_argument("--no-ggml", action="store_true")
    a = ap.parse_args()
    os.environ["MER_THREADS"] = str(a.threads)
    from gguf.constants import GGMLQuantizationType as T
    from gguf.quants import dequantize

    from mer_runtime import kernels

    if kernels._LIB is None:
        print("the C kernel is not built (or MER_KERNELS=numpy): numbers are for the NumPy fallback")
    ggml = None if a.no_ggml else ggml_module()
    ggml_note = "ggml: --no-ggml" if a.no_ggml else (
        "ggml: not installed (pip install -e '.[bench]'); no ggml ratios" if ggml is None else "ggml: ggml-python")
    rows, cols = a.d_ff, a.d_model
    rng = np.random.default_rng(0)
    x = rng.standard_normal(cols).astype(np.float32)
    avx512 = " + AVX-512 (Q4_0, MXFP4; Q8_0 and K-quants exact)" if kernels.AVX512 else ""
    print(f"{a.threads} threads, best of {a.repeat}, matrices {rows} x {cols}; SIMD {'AVX2' if kernels.SIMD else 'no'}{avx512}"
          f", AVX-VNNI {'yes' if kernels.VNNI else 'no'}; prefetch {kernels._LIB.mer_get_prefetch() if kernels._LIB else '-'}"
          f" bytes; {ggml_note}")
    print("Figures on a shared machine are indicative only.\n")

    mem_all = []
    print(f"{'type':6s} {'MB each':>8s} {'n':>4s} {'memory GB/s':>12s} {'exact GB/s':>11s} {'x mem':>6s} "
          f"{'q8 GB/s':>8s} {'ggml GB/s':>10s} {'exact/ggml':>10s} {'max rel err':>11s}")
    for name in [t for t in a.types.split(",") if t and t != "none"]:
        info = kernels.DTYPES[name]
        per = info.nbytes(rows, cols)
        n = max(1, int(np.ceil(a.gb * 1e9 / per)))
        mats = [random_blocks(name, rows, cols, rng) for _ in range(n)]
        mem = memory_bandwidth(mats, a.threads, a.repeat)
        mem_all.append(mem)
        total = n * per
        ours = total / best(a.repeat, lambda: [kernels.matvec(name, m, (rows, cols), x) for m in mats]) / 1e9
        q8 = (total / best(a.repeat, lambda: [kernels.matvec(name, m, (rows, cols), x, act="q8") for m in mats]) / 1e9
              if name in kernels.Q8_ACT_TYPES and kernels._LIB is not None else None)
        ref = dequantize(mats[0].reshape(rows, -1), T[name]).astype(np.float64) @ x.astype(np.float64)
        err = np.abs(kernels.matvec(name, mats[0], (rows, cols), x) - ref).max() / np.abs(ref).max()
        gg = guarded(ggml_matvec, ggml, name, mats, x, rows, cols, a.threads, a.repeat) if ggml is not None else None
        gtxt = f"{gg[0]:10.2f} {ours / gg[0]:10.2f}" if isinstance(gg, tuple) else f"{'-':>10s} {'-':>10s}"
        print(f"{name:6s} {per / 1e6:8.2f} {n:4d} {mem:12.2f} {ours:11.2f} {ours / mem:6.2f} "
              f"{(f'{q8:8.2f}' if q8 else '       -')} {gtxt} {err:11.1e}"
              + (f"   ({gg})" if isinstance(gg, str) else ""))
        if a.sweep_prefetch and kernels._LIB is not None:
            default = kernels._LIB.mer_get_prefetch()
            res = []
            for pf in (0, 1024, 2048, 4096, 8192, 16384):
                kernels._LIB.mer_set_prefetch(pf)
                res.append(f"{pf}: {total / best(a.repeat, lambda: [kernels.matvec(name, m, (rows, cols), x) for m in mats]) / 1e9:.2f}")
            kernels._LIB.mer_set_prefetch(default)
            print(f"       prefetch distance (bytes: GB/s): {', '.join(res)}")
        if a.sweep_rows and kernels._LIB is not None:
            res = []
            for mode in ("f32", "q8") if name in kernels.Q8_ACT_TYPES else ("f32",):
                for nr in (1, 4):
                    kernels._LIB.mer_set_rows(nr)
                    gbs = total / best(a.repeat, lambda: [kernels.matvec(name, m, (rows, cols), x, act=mode)
                                                          for m in mats]) / 1e9
                    res.append(f"{mode} {nr}: {gbs:.2f}")
            kernels._LIB.mer_set_rows(0)
            print(f"       rows per pass (GB/s): {', '.join(res)}")
        if a.sweep_avx512 and kernels.AVX512 and name in kernels.AVX512_TYPES:
            res = []
            for mode in ("f32", "q8"):
                def run(flags: int, mode: str = mode) -> None:
                    for m in mats:
                        kernels.matvec(name, m, (rows, cols), x, act=mode, flags=flags)

                tn, to, wins = alternated(max(a.repeat, 5), lambda: run(0), lambda: run(kernels.FLAG_NO_AVX512))
                res.append(f"{mode} {total / to / 1e9:.2f} -> {total / tn / 1e9:.2f} (x{to / tn:.3f}, "
                           f"faster in {wins} of {max(a.repeat, 5)})")
            print(f"       AVX2 -> AVX-512 (GB/s, medians, alternated): {'; '.join(res)}")
        del mats
    moe_rows = [t for t in a.moe.split(",") if t and t != "none"]
    if moe_rows and not mem_all:  # moe() only: its ratio still needs the memory bandwidth of this run
        probe = [random_blocks("Q8_0", rows, cols, rng) for _ in range(max(1, int(a.gb * 1e9 / (rows * cols * 34 / 32))))]
        mem_all.append(memory_bandwidth(probe, a.threads, a.repeat))
        del probe
    mem = max(mem_all) if mem_all else float("nan")
    if not moe_rows:
        return

    print(f"\nmoe(): top-{a.top_k} layer steps, all experts in memory, distinct experts each step "
          f"(memory bandwidth {mem:.2f} GB/s, best of the runs above)")
    for label, (gt, ut, dt) in (("Q4_0", ("Q4_0", "Q4_0", "Q4_0")), ("Q4_K_M", ("Q4_K", "Q4_K", "Q6_K"))):
        if label not in moe_rows:
            continue
        per_exp = kernels.DTYPES[gt].nbytes(rows, cols) * 2 + kernels.DTYPES[dt].nbytes(cols, rows)
        n_exp = max(a.top_k, int(np.ceil(a.gb * 1e9 / per_exp)))
        experts = [((gt, random_blocks(gt, rows, cols, rng)), (ut, random_blocks(ut, rows, cols, rng)),
                    (dt, random_blocks(dt, cols, rows, rng))) for _ in range(n_exp)]
        tensors = [{"gate": (g[0], (rows, cols), g[1]), "up": (u[0], (rows, cols), u[1]),
                    "down": (d[0], (cols, rows), d[1])} for g, u, d in experts]
        n_steps = max(1, n_exp // a.top_k)
        steps = [list(range(s * a.top_k, (s + 1) * a.top_k)) for s in range(n_steps)]
        w = np.full(a.top_k, 1.0 / a.top_k, np.float32)
        act = {"kind": "swiglu"}
        line, sps_of = [], {}
        for mode in ("f32", "q8"):
            t = best(a.repeat, lambda: [kernels.moe([tensors[i] for i in st], w, x, act, act=mode) for st in steps])
            sps = sps_of[mode] = n_steps / t
            line.append(f"{mode}: {sps:8.1f} steps/s, {sps * a.top_k * per_exp / 1e9:6.2f} GB/s "
                        f"({sps * a.top_k * per_exp / 1e9 / mem:.2f}x memory)")
        gtxt = ""
        if ggml is not None:
            g = guarded(ggml_moe, ggml, [[experts[i] for i in st] for st in steps], w, x, cols, rows, a.threads,
                        a.repeat)
            gtxt = (f"; ggml graph {g:.1f} steps/s (exact {sps_of['f32'] / g:.2f}x, q8 {sps_of['q8'] / g:.2f}x ggml)"
                    if isinstance(g, float) else f"; ggml: {g}")
        print(f"  {label:7s} {n_steps} steps of {a.top_k} x {per_exp / 1e6:.1f} MB: " + "; ".join(line) + gtxt)
        if a.sweep_avx512 and kernels.AVX512:
            res = []
            for mode in ("f32", "q8"):
                def step(flags: int, mode: str = mode) -> None:
                    for st in steps:
                        kernels.moe([tensors[i] for i in st], w, x, act, act=mode, flags=flags)

                tn, to, wins = alternated(max(a.repeat, 5), lambda: step(0), lambda: step(kernels.FLAG_NO_AVX512))
                res.append(f"{mode} {n_steps / to:.1f} -> {n_steps / tn:.1f} (x{to / tn:.3f}, "
                           f"faster in {wins} of {max(a.repeat, 5)})")
            print(f"          AVX2 -> AVX-512 (steps/s, medians, alternated): {'; '.join(res)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
