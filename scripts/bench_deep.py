#!/usr/bin/env python3
"""Benchmark `verify --deep --against SRC` against reading the shards and the source once (not a test).

Uses (or builds once) a Mixtral-shaped Q4_0 GGUF (scripts/bench_extract.py's builder; d_model 4096, d_ff 14336,
8 experts x --layers layers, 0.8 GB a layer) and its `mertools extract` output, both kept for the next run. Then,
with a WARM page cache for both sides (everything is read once, untimed, before measuring; nothing is dropped),
alternating the two, --repeat times each, and reporting medians:
  - read: `cat` of every file of the folder (shards, dense.gguf, manifest) and the source into /dev/null;
  - deep: `python -m mertools.cli verify OUT --deep --against SRC --json -q` in a child process. Its time is given
    twice: the child's wall time (interpreter start and imports included) and verify()'s own `seconds` from the
    JSON report (excluded). The ratio read/deep uses the wall time, so it is the conservative figure.
Peak memory: the child's ru_maxrss (from wait4, so only that child) minus the same for a child that only imports
the CLI's modules (its baseline); mapped page-cache pages count in ru_maxrss, so the bound is honest.
Goal (issue 8 item 7): read / deep >= 0.5, peak beyond baseline < 1 GB.

    python scripts/bench_deep.py --dir /tmp/mertools-deep [--layers 2] [--repeat 5]
    python scripts/bench_deep.py --dir /tmp/mertools-deep4 --src /tmp/mertools-bench/mixtral-shaped-q4_0-4L.gguf
    python scripts/bench_deep.py --dir /tmp/x --d-model 256 --d-ff 512 --layers 2 --repeat 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_extract  # noqa: E402  (its Mixtral-shaped Q4_0 builder)


def run_child(cmd: list[str], keep_output: bool = True) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes of this child alone, stdout) of a command; exits on failure."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out if keep_output else subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)  # wait4, not wait: the rusage of this child alone
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode()
        if p.returncode != 0:
            raise SystemExit(f"{cmd[:5]} failed ({p.returncode}): {text[-2000:]}{err.read().decode()[-2000:]}")
    return wall, ru.ru_maxrss * 1024, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="holds model.gguf (unless --src) and out/; kept")
    ap.add_argument("--src", type=Path, help="an existing Mixtral-shaped GGUF to use read-only instead of building")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=bench_extract.D_MODEL)
    ap.add_argument("--d-ff", type=int, default=bench_extract.D_FF)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    bench_extract.D_MODEL, bench_extract.D_FF = a.d_model, a.d_ff
    a.dir.mkdir(parents=True, exist_ok=True)
    src, out = a.src or a.dir / "model.gguf", a.dir / "out"
    if not src.exists():
        tmp = src.with_suffix(".tmp")
        bench_extract.build_model(tmp, a.layers)
        tmp.rename(src)
    if not (out / "manifest.json").exists():
        from mertools import extract

        extract(src, out, fsync=False)
    files = [str(p) for p in sorted(out.rglob("*")) if p.is_file()] + [str(src)]
    size = sum(Path(f).stat().st_size for f in files)
    cat = ["cat", *files]
    deep = [sys.executable, "-m", "mertools.cli", "verify", str(out), "--deep", "--against", str(src), "--json",
            "-q"]
    base = [sys.executable, "-c", "import mertools.cli, mertools.verify, mertools.deep, mer_runtime"]
    run_child(cat, False)  # warm the page cache: both measurements below start from the same (warm) state
    _, base_rss, _ = run_child(base)
    reads, walls, insides, rss = [], [], [], []
    report: dict = {}
    for _ in range(a.repeat):  # alternated, so a neighbour's load hits both alike
        reads.append(run_child(cat, False)[0])
        wall, peak, text = run_child(deep)
        report = json.loads(text)
        if not report["ok"]:
            raise SystemExit(f"verify --deep reported problems: {report['problems'][:5]}")
        walls.append(wall)
        insides.append(report["seconds"])
        rss.append(peak)
    read_s, wall_s, inside_s = (statistics.median(v) for v in (reads, walls, insides))
    d = report["deep"]
    print(f"folder + source: {size / 2**30:.2f} GiB in {len(files)} files; {d['experts_run']} experts "
          f"(d_model {a.d_model}, d_ff {a.d_ff}); warm page cache; medians of {a.repeat} alternated runs")
    print(f"read once (cat):          {read_s:.3f} s ({size / read_s / 1e9:.2f} GB/s)  runs {fmt(reads)}")
    print(f"verify --deep --against:  {wall_s:.3f} s wall incl. interpreter start; {inside_s:.3f} s inside verify()"
          f"  runs {fmt(walls)}")
    shallow = report["bytes_read"] / report["gb_per_s"] / 1e9 if report["gb_per_s"] else float("nan")
    print(f"  of which the checksum pass {shallow:.3f} s, the deep part {d['seconds']:.3f} s; "
          f"{d['experts_whole_output']} experts whole output; worst error {d['worst_rel_err']:.2e}")
    print(f"ratio read/deep: {read_s / wall_s:.2f} wall, {read_s / inside_s:.2f} inside verify() (goal >= 0.5)")
    from mer_runtime import load_manifest

    cache = 2 * load_manifest(out).max_expert_size  # deep verify's 2 runtime cache slots
    print(f"peak RSS of verify: {max(rss) / 2**20:.0f} MiB; baseline (imports only) {base_rss / 2**20:.0f} MiB; "
          f"beyond baseline {(max(rss) - base_rss) / 2**20:.0f} MiB, of which the runtime's cache (2 slots) "
          f"{cache / 2**20:.0f} MiB (goal < 1024 MiB beyond the cache)")


def fmt(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in v) + "]"


if __name__ == "__main__":
    main()
