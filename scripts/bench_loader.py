#!/usr/bin/env python3
"""Loader throughput against fio on the same files, block size and queue depth (not a test).

Reads every shard of a Mixtral-shaped Q4_0 folder (built with bench_extract's model if --folder is not given)
once with each runtime backend, then runs `fio --ioengine=io_uring --direct=1` over the same files in the same
order, and prints GB/s and the ratio. O_DIRECT bypasses the page cache, so both measure the device.

    python scripts/bench_loader.py [--folder OUT] [--block-size 1M] [--queue-depth 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def run_loader(folder: Path, io: str, block: int, depth: int) -> tuple[float, str]:
    from mer_runtime import load_manifest
    from mer_runtime.buffers import BufferPool
    from mer_runtime.loader import open_loader

    m = load_manifest(folder)
    pool = BufferPool(m.max_expert_size, 2)
    loader = open_loader(io, pool, block_size=block, queue_depth=depth)
    t0 = time.perf_counter()
    for i, e in enumerate(m.experts):
        loader.read(str(m.path_of(e)), e.size, i % 2)
    dt = time.perf_counter() - t0
    desc = loader.describe()
    loader.close()
    return sum(e.size for e in m.experts) / dt / 1e9, desc


def run_fio(folder: Path, block: int, depth: int) -> float:
    from mer_runtime import load_manifest

    m = load_manifest(folder)
    files = ":".join(str(m.path_of(e)).replace(":", "\\:") for e in m.experts)
    cmd = ["fio", "--name=mer", "--ioengine=io_uring", "--direct=1", "--rw=read", f"--bs={block}",
           f"--iodepth={depth}", f"--filename={files}", "--file_service_type=sequential", "--output-format=json",
           "--fixedbufs=1", "--registerfiles=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    job = json.loads(r.stdout)["jobs"][0]["read"]
    return job["bw_bytes"] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, help="an extracted shard folder (default: build one in --dir)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mertools-bench"))
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--block-size", type=size_arg, default=1 << 20)
    ap.add_argument("--queue-depth", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if not shutil.which("fio"):
        sys.exit("fio is not installed: apt-get install fio (or your system's package)")
    a.dir.mkdir(parents=True, exist_ok=True)
    folder = a.folder or ensure_folder(a.dir, a.layers)
    total = sum(p.stat().st_size for p in (folder / "experts").rglob("*.bin"))
    print(f"folder {folder}: {total / 1e9:.2f} GB of shards; block {a.block_size >> 10} KiB, "
          f"queue depth {a.queue_depth}, best of {a.repeat}")
    # alternate the runs so that neither side always meets a warmer (host-cached) disk
    fio_runs: list[float] = []
    ours: dict[str, list[tuple[float, str]]] = {"io_uring": [], "pread": []}
    for _ in range(a.repeat):
        fio_runs.append(run_fio(folder, a.block_size, a.queue_depth))
        for io in ours:
            ours[io].append(run_loader(folder, io, a.block_size, a.queue_depth))
    fio = max(fio_runs)
    print(f"{'fio io_uring O_DIRECT':28s} {fio:6.2f} GB/s   runs: {', '.join(f'{v:.2f}' for v in fio_runs)}")
    for io, runs in ours.items():
        gbps = max(r[0] for r in runs)
        print(f"{'mer_runtime ' + io:28s} {gbps:6.2f} GB/s   runs: {', '.join(f'{r[0]:.2f}' for r in runs)};  "
              f"ratio to fio {gbps / fio:.2f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
