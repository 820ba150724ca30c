#!/usr/bin/env python3
"""Benchmark `verify --deep --against SRC` against reading the shards and the source once (not a test).

Builds a Mixtral-shaped Q4_0 GGUF (scripts/bench_extract.py's builder; d_model 4096, d_ff 14336, 8 experts x 2
layers = 1.6 GB by default), extracts it without fsync, then times, best of --repeat:
  - `cat` of every shard, dense.gguf and the source into /dev/null (the read-once floor);
  - `mertools verify OUT --deep --against SRC` in a child process, with its peak resident memory.
Goal (issue 8 item 7): read time / deep time >= 0.5, peak memory < 1 GB beyond the cache (2 slots of one expert).

    python scripts/bench_deep.py --dir /tmp/mertools-bench-deep [--layers 2] [--repeat 2] [--keep]
    python scripts/bench_deep.py --dir /tmp/x --d-model 256 --d-ff 512 --layers 2 --repeat 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_extract  # noqa: E402  (its Mixtral-shaped Q4_0 builder)
from bench_kernels import best  # noqa: E402  (best of N runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=bench_extract.D_MODEL)
    ap.add_argument("--d-ff", type=int, default=bench_extract.D_FF)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    bench_extract.D_MODEL, bench_extract.D_FF = a.d_model, a.d_ff
    a.dir.mkdir(parents=True, exist_ok=True)
    src, out = a.dir / "model.gguf", a.dir / "out"
    try:
        if not src.exists():
            bench_extract.build_model(src, a.layers)
        if not out.exists():
            from mertools import extract

            extract(src, out, fsync=False)
        files = [str(p) for p in sorted(out.rglob("*")) if p.is_file()] + [str(src)]
        size = sum(Path(f).stat().st_size for f in files)
        read_s = best(a.repeat, lambda: subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True))
        cmd = [sys.executable, "-m", "mertools.cli", "verify", str(out), "--deep", "--against", str(src), "--json",
               "-q"]
        result: dict = {}

        def deep() -> None:
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"verify --deep failed ({p.returncode}): {p.stdout[-2000:]}{p.stderr[-2000:]}")
            result.update(json.loads(p.stdout))

        deep_s = best(a.repeat, deep)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        from mer_runtime import load_manifest

        cache_mb = 2 * load_manifest(out).max_expert_size / 2**20
        d = result["deep"]
        print(f"folder + source: {size / 2**30:.2f} GiB in {len(files)} files")
        print(f"read once (cat):        {read_s:.2f} s ({size / read_s / 1e9:.2f} GB/s)")
        print(f"verify --deep --against: {deep_s:.2f} s; {d['experts_run']} experts, {d['experts_whole_output']} whole "
              f"output, worst error {d['worst_rel_err']:.2e}")
        print(f"ratio read/deep: {read_s / deep_s:.2f} (goal >= 0.5)")
        print(f"peak RSS of the verify process: {peak_mb:.0f} MiB (cache {cache_mb:.0f} MiB; goal < cache + 1024)")
    finally:
        if not a.keep:
            shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
