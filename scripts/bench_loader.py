#!/usr/bin/env python3
"""Loader throughput against fio on the same files, block size and concurrency (not a test).

Reads every shard of a Mixtral-shaped Q4_0 folder (built from bench_extract's model if --folder is not given) and
compares, as medians of --repeat alternated rounds (the order within a round alternates too):

- the io_uring backend against `fio --ioengine=io_uring --direct=1`, one job, the same block size and queue depth
  (goal >= 0.95x);
- the O_DIRECT pread backend against `fio --ioengine=psync --direct=1` with as many jobs as the backend has
  worker threads, each job reading its own quarter (1/jobs) of every file, in the same file order (goal >= 0.9x).

fio reads the files in the manifest's order (file_service_type=sequential); GB/s is fio's own figure (bytes it read
over its time; psync jobs read whole blocks, so up to one block per file and job is left out). O_DIRECT bypasses
the page cache, so both sides measure the device. Interpreter start is excluded (the loader runs in this process).

    python scripts/bench_loader.py [--folder OUT] [--block-size 1M] [--queue-depth 32] [--threads 4] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def size_arg(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1].upper()] if s[-1].upper() in mult else int(s)


def ensure_folder(work: Path, layers: int) -> Path:
    from bench_extract import build_model
    from mertools import extract

    out = work / f"shards-{layers}L"
    if not (out / "manifest.json").exists():
        src = work / f"mixtral-shaped-q4_0-{layers}L.gguf"
        if not src.exists():
            print(f"building {src} ...", flush=True)
            build_model(src, layers)
        extract(src, out, overwrite=True)
    return out


def run_loader(folder: Path, io: str, block: int, depth: int, threads: int) -> tuple[float, str]:
    from mer_runtime import load_manifest
    from mer_runtime.buffers import BufferPool
    from mer_runtime.loader import open_loader

    m = load_manifest(folder)
    pool = BufferPool(m.max_expert_size, 2)
    loader = open_loader(io, pool, block_size=block, queue_depth=depth, threads=threads)
    try:
        loader.warm_up()  # the buffers are set up before the clock, as fio's are (ShardSet.warm_up does the same)
        t0 = time.perf_counter()
        for i, e in enumerate(m.experts):
            loader.read(str(m.path_of(e)), e.size, i % 2)
        dt = time.perf_counter() - t0
        desc = loader.describe()
    finally:
        loader.close()
        pool.close()
    return sum(e.size for e in m.experts) / dt / 1e9, desc


def run_fio(folder: Path, engine: str, block: int, depth: int, jobs: int) -> float:
    from mer_runtime import load_manifest

    m = load_manifest(folder)
    files = ":".join(str(m.path_of(e)).replace(":", "\\:") for e in m.experts)
    cmd = ["fio", "--name=mer", f"--ioengine={engine}", "--direct=1", "--rw=read", f"--bs={block}",
           f"--filename={files}", "--file_service_type=sequential", "--output-format=json", "--group_reporting"]
    if engine == "io_uring":
        cmd += [f"--iodepth={depth}", "--fixedbufs=1", "--registerfiles=1"]
    else:  # one block in flight per job, as per worker thread; job k reads the k-th 1/jobs of every file
        pct = 100 / jobs
        cmd += [f"--numjobs={jobs}", f"--size={pct:g}%", f"--offset_increment={pct:g}%"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["jobs"][0]["read"]["bw_bytes"] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, help="an extracted shard folder (default: build one in --dir)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mertools-bench"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--block-size", type=size_arg, default=1 << 20)
    ap.add_argument("--queue-depth", type=int, default=32)
    ap.add_argument("--threads", type=int, default=4, help="pread worker threads = fio psync jobs")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", nargs="+", choices=("io_uring", "pread"), default=["io_uring", "pread"])
    a = ap.parse_args()
    if not shutil.which("fio"):
        sys.exit("fio is not installed: apt-get install fio (or your system's package)")
    a.dir.mkdir(parents=True, exist_ok=True)
    folder = a.folder or ensure_folder(a.dir, a.layers)
    total = sum(p.stat().st_size for p in (folder / "experts").rglob("*.bin"))
    print(f"folder {folder}: {total / 1e9:.2f} GB of shards; block {a.block_size >> 10} KiB, io_uring queue depth "
          f"{a.queue_depth}, pread {a.threads} threads = fio psync {a.threads} jobs; medians of {a.repeat} "
          "alternated rounds", flush=True)
    pairs = {
        "io_uring": (lambda: run_fio(folder, "io_uring", a.block_size, a.queue_depth, 1),
                     lambda: run_loader(folder, "io_uring", a.block_size, a.queue_depth, a.threads), 0.95),
        "pread": (lambda: run_fio(folder, "psync", a.block_size, a.queue_depth, a.threads),
                  lambda: run_loader(folder, "pread", a.block_size, a.queue_depth, a.threads), 0.9),
    }
    runs: dict[str, tuple[list[float], list[float]]] = {io: ([], []) for io in a.only}
    desc: dict[str, str] = {}
    for i in range(a.repeat):
        for io in a.only:
            fio_fn, ours_fn, _ = pairs[io]
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for side in order:
                if side == 0:
                    runs[io][0].append(fio_fn())
                else:
                    gbps, desc[io] = ours_fn()
                    runs[io][1].append(gbps)
    print()
    for io in a.only:
        f, o = runs[io]
        mf, mo = statistics.median(f), statistics.median(o)
        limit = "fio io_uring" if io == "io_uring" else f"fio psync x{a.threads}"
        print(f"{io:9s} {limit:16s} {mf:5.2f} GB/s  mer_runtime {mo:5.2f} GB/s  ratio {mo / mf:4.2f} "
              f"(goal >= {pairs[io][2]})   runs fio: {', '.join(f'{v:.2f}' for v in f)}; "
              f"ours: {', '.join(f'{v:.2f}' for v in o)}   [{desc[io]}]")


if __name__ == "__main__":
    main()
