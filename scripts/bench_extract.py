#!/usr/bin/env python3
"""Benchmark extract and verify against the physical limits measured in the same run (not a test).

Builds a Mixtral-shaped Q4_0 GGUF (d_model 4096, d_ff 14336; 8 experts x 3 layers = 2.4 GB by default), then:
  - extract GB/s as a ratio to `cp` of the same file (both without fsync, then both with it: `cp && sync`);
  - verify GB/s as a ratio to reading the output with `cat` into /dev/null.
Each timing is the best of --repeat runs, every run starting with `sync` so earlier writeback does not leak in.

    python scripts/bench_extract.py --dir /tmp/mertools-bench [--layers 3] [--repeat 3] [--keep]
"""

from __future__ import annotations

import argparse
import glob
import shutil
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
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best(n: int, setup, fn) -> float:
    times = []
    for _ in range(n):
        setup()
        times.append(timed(fn))
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mertools-bench"))
    ap.add_argument("--layers", type=int, default=3, help="MoE layers (each ~0.8 GB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the model and outputs")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    src = a.dir / f"mixtral-shaped-q4_0-{a.layers}L.gguf"
    if not src.exists():
        print(f"building {src} ...", flush=True)
        build_model(src, a.layers)
    size = src.stat().st_size
    print(f"source: {src} {size / 1e9:.2f} GB ({N_EXP} experts x {a.layers} layers, Q4_0, {D_MODEL}x{D_FF})")
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # same warm page cache for all

    from mertools import extract, verify

    cp_dst, out = a.dir / "cp-copy.gguf", a.dir / "out"

    def clean() -> None:
        cp_dst.unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)

    rows = []
    for label, fsync in (("no fsync", False), ("with fsync", True)):
        cp_cmd = ["cp", str(src), str(cp_dst)]
        t_cp = best(a.repeat, clean, lambda: (subprocess.run(cp_cmd, check=True),
                                              fsync and subprocess.run(["sync"], check=True)))
        t_ex = best(a.repeat, clean, lambda: extract(src, out, fsync=fsync))
        written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        rows.append((label, size / t_cp / 1e9, written / t_ex / 1e9, t_cp / t_ex))

    files = [f for f in glob.glob(str(out / "**" / "*"), recursive=True) if Path(f).is_file()]
    total = sum(Path(f).stat().st_size for f in files)
    t_cat = best(a.repeat, lambda: None, lambda: subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True))
    t_ver = best(a.repeat, lambda: None, lambda: verify(out))
    assert verify(out).ok

    print(f"\n{'':12s} {'cp GB/s':>9s} {'extract GB/s':>13s} {'ratio (goal >= 0.9)':>20s}")
    for label, cp_gbps, ex_gbps, ratio in rows:
        print(f"{label:12s} {cp_gbps:9.2f} {ex_gbps:13.2f} {ratio:20.2f}")
    print(f"\n{'':12s} {'cat GB/s':>9s} {'verify GB/s':>13s} {'ratio (goal >= 0.9)':>20s}")
    print(f"{'read output':12s} {total / t_cat / 1e9:9.2f} {total / t_ver / 1e9:13.2f} {t_cat / t_ver:20.2f}")
    print("(extract's ratio is time(cp)/time(extract): the same source bytes moved; its GB/s counts bytes written)")
    if not a.keep:
        clean()


if __name__ == "__main__":
    main()
