#!/usr/bin/env python3
"""Benchmark extract and verify against the physical limits measured in the same run (not a test).

Builds a Mixtral-shaped Q4_0 GGUF once (d_model 4096, d_ff 14336; 8 experts x 2 layers = 1.6 GB by default; kept in
--dir and reused), then, in this process (interpreter start excluded), with the source warm in the page cache:
  - durable: default extract (fsync) against `cp SRC DST && sync`;
  - no fsync: `extract --no-fsync` against `cp SRC DST`;
  - verify: verify of the output against `cat` of its files into /dev/null.
Each pair is run --repeat times alternately (A B, then B A, ...), every run after a `sync` and with the previous
outputs removed, so earlier writeback does not leak in; the medians are compared. The ratio is time(limit) /
time(mertools): the same source bytes moved (>= 0.9 is the goal).

    python scripts/bench_extract.py [--dir /tmp/mertools-bench] [--layers 2] [--repeat 5] [--only durable]
"""

from __future__ import annotations

import argparse
import glob
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

import gguf
from gguf.constants import GGMLQuantizationType as T

D_MODEL, D_FF, N_EXP = 4096, 14336, 8


def build_model(path: Path, layers: int) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_embedding_length(D_MODEL)
    w.add_expert_count(N_EXP)
    w.add_expert_used_count(2)
    row = {"gate": D_MODEL, "up": D_MODEL, "down": D_FF}
    out = {"gate": D_FF, "up": D_FF, "down": D_MODEL}
    specs = []
    for b in range(layers):
        w.add_tensor_info(f"blk.{b}.ffn_gate_inp.weight", (N_EXP, D_MODEL), np.dtype(np.float32), N_EXP * D_MODEL * 4)
        specs.append(("router", None))
        for role in ("gate", "up", "down"):
            shape = (N_EXP, out[role], row[role] // 32 * 18)
            w.add_tensor_info(f"blk.{b}.ffn_{role}_exps.weight", shape, np.dtype(np.uint8), int(np.prod(shape)), T.Q4_0)
            specs.append((role, shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for kind, shape in specs:
        if kind == "router":
            w.write_tensor_data(rng.standard_normal((N_EXP, D_MODEL)).astype(np.float32))
            continue
        data = rng.integers(0, 256, size=shape, dtype=np.uint8)
        blocks = data.reshape(-1, 18)
        blocks[:, :2] = np.full(len(blocks), 0.01, np.float16).view(np.uint8).reshape(-1, 2)  # finite scales
        w.write_tensor_data(data)
    w.close()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternated(n: int, setup, a, b) -> tuple[list[float], list[float]]:
    """n timings each of a and b, alternating which goes first; setup (untimed) before every run."""
    ta: list[float] = []
    tb: list[float] = []
    for i in range(n):
        order = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for fn, into in order:
            setup()
            subprocess.run(["sync"], check=True)
            into.append(timed(fn))
    return ta, tb


def row(label: str, limit: str, size: int, t_lim: list[float], t_ours: list[float]) -> str:
    ml, mo = statistics.median(t_lim), statistics.median(t_ours)
    runs = lambda ts: ", ".join(f"{t:.2f}" for t in ts)  # noqa: E731
    return (f"{label:10s} {limit:12s} {size / ml / 1e9:6.2f} GB/s  mertools {size / mo / 1e9:6.2f} GB/s  "
            f"ratio {ml / mo:5.2f}  (s, {limit}: {runs(t_lim)}; mertools: {runs(t_ours)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mertools-bench"))
    ap.add_argument("--layers", type=int, default=2, help="MoE layers (each ~0.8 GB)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each side (alternated); medians compared")
    ap.add_argument("--only", nargs="+", choices=("durable", "nofsync", "verify"),
                    default=["durable", "nofsync", "verify"])
    ap.add_argument("--keep", action="store_true", help="keep the outputs (the model is always kept)")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    src = a.dir / f"mixtral-shaped-q4_0-{a.layers}L.gguf"
    if not src.exists():
        print(f"building {src} ...", flush=True)
        build_model(src, a.layers)
    size = src.stat().st_size
    print(f"source: {src} {size / 1e9:.2f} GB ({N_EXP} experts x {a.layers} layers, Q4_0, {D_MODEL}x{D_FF}); "
          f"medians of {a.repeat} alternated runs each", flush=True)
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # same warm page cache for all

    from mertools import extract, verify

    cp_dst, out = a.dir / "cp-copy.gguf", a.dir / "out"

    def clean() -> None:
        cp_dst.unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)

    def cp(durable: bool):
        def run() -> None:
            subprocess.run(["cp", str(src), str(cp_dst)], check=True)
            if durable:
                subprocess.run(["sync"], check=True)
        return run

    lines = []
    if "durable" in a.only:
        t_cp, t_ex = alternated(a.repeat, clean, cp(True), lambda: extract(src, out))
        lines.append(row("durable", "cp && sync", size, t_cp, t_ex))
        print(lines[-1], flush=True)
    if "nofsync" in a.only:
        t_cp, t_ex = alternated(a.repeat, clean, cp(False), lambda: extract(src, out, fsync=False))
        lines.append(row("no fsync", "cp", size, t_cp, t_ex))
        print(lines[-1], flush=True)
    if "verify" in a.only:
        if not (out / "manifest.json").exists():
            clean()
            extract(src, out, fsync=False)
        files = [f for f in glob.glob(str(out / "**" / "*"), recursive=True) if Path(f).is_file()]
        total = sum(Path(f).stat().st_size for f in files)
        assert verify(out).ok
        t_cat, t_ver = alternated(a.repeat, lambda: None,
                                  lambda: subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True),
                                  lambda: verify(out))
        lines.append(row("verify", "cat", total, t_cat, t_ver))
        print(lines[-1], flush=True)
    print("\nsummary (ratio = median time of the limit / median time of mertools; goal >= 0.9):")
    for line in lines:
        print("  " + line.split("  (s,")[0])
    if not a.keep:
        clean()


if __name__ == "__main__":
    main()
