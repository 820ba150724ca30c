#!/usr/bin/env python3
"""Benchmark `verify --deep --against SRC` against reading the shards and the source once (not a test).

Uses (or builds once) a Mixtral-shaped Q4_0 GGUF (scripts/bench_extract.py's builder; d_model 4096, d_ff 14336,
8 experts x --layers layers, 0.8 GB a layer) and its `mertools extract` output, both kept for the next run. Then,
with a WARM page cache for both sides (everything is read once, untimed, before measuring; nothing is dropped),
alternating the two, --repeat times each, and reporting medians:
  - read: `cat` of every file of the folder (shards, dense.gguf, manifest) and the source into /dev/null;
  - deep: `python -m mertools.cli verify OUT --deep --against SRC --json -q` in a child process. Its time is given
    twice: the child's wall time (interpreter start and imports included; the packages byte-compiled first, as a
    pip install leaves them) and verify()'s own `seconds` from the JSON report (excluded). The ratio read/deep uses the wall time, so it is the conservative figure.
Peak memory: the child's VmHWM (its peak RSS since its exec, /proc/PID/status polled every 10 ms; the last poll is
at most 10 ms before it exits) minus the same for a child that only imports the CLI's modules (its baseline); mapped
page-cache pages count in it, so the bound is honest. Not ru_maxrss: a child's counts the pages of this process it
held between fork and exec, so it read as this process's size when this process had just extracted the model. Also
the peak of the child's anonymous memory (RssAnon): what it allocated, page cache apart.

--layout llama4 benchmarks a transformed SafeTensors source instead: a Llama-4-layout BF16 checkpoint (gate_up
[E, d_model, 2 d_ff] input-major and down [E, d_ff, d_model], so every projection is transposed and gate/up fused),
built once under DIR/llama4-... with --experts experts of one layer (default d_model 5120, d_ff 8192: Llama 4's).
Goal (issue 8 item 7): read / deep >= 0.5, peak beyond baseline < 1 GB.

    python scripts/bench_deep.py --dir /tmp/mertools-deep [--layers 2] [--repeat 5]
    python scripts/bench_deep.py --dir /tmp/mertools-deep4 --src /tmp/mertools-bench/mixtral-shaped-q4_0-4L.gguf
    python scripts/bench_deep.py --dir /tmp/x --d-model 256 --d-ff 512 --layers 2 --repeat 1   # a smoke run
    python scripts/bench_deep.py --dir /tmp/mertools-l4 --layout llama4 --experts 4 --repeat 3
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


def _status_bytes(pid: int) -> dict[str, int]:
    """VmHWM and RssAnon of a live process, in bytes ({} once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return {k: int(v.split()[0]) << 10 for k, _, v in (line.partition(":") for line in fh)
                    if k in ("VmHWM", "RssAnon")}
    except (OSError, ValueError):
        return {}


ANON_PEAKS: list[int] = []  # peak RssAnon of each run_child, in bytes (polled: a lower bound)


def run_child(cmd: list[str], keep_output: bool = True) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes of this child since its exec, stdout) of a command; exits on failure. Its
    peak anonymous memory goes to ANON_PEAKS. Both are polled, so lower bounds."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out if keep_output else subprocess.DEVNULL, stderr=err)
        anon = hwm = 0
        while True:
            pid, status = os.waitpid(p.pid, os.WNOHANG)
            if pid:
                break
            st = _status_bytes(p.pid)
            anon, hwm = max(anon, st.get("RssAnon", 0)), max(hwm, st.get("VmHWM", 0))
            time.sleep(0.01)  # coarse: polling must not cost the 2 cores the measured child runs on
        wall = time.perf_counter() - t0
        ANON_PEAKS.append(anon)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode()
        if p.returncode != 0:
            raise SystemExit(f"{cmd[:5]} failed ({p.returncode}): {text[-2000:]}{err.read().decode()[-2000:]}")
    return wall, hwm, text


def compile_sources() -> None:
    """Byte-compile mertools and mer_runtime, as a pip install does: from an editable install with
    PYTHONDONTWRITEBYTECODE set (this development machine) every child would compile them anew at each start, some
    50 ms that no installed copy pays (scripts/bench_startup.py)."""
    import compileall

    import mer_runtime
    import mertools

    for p in (*mertools.__path__, *mer_runtime.__path__):
        compileall.compile_dir(p, quiet=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="holds model.gguf (unless --src) and out/; kept")
    ap.add_argument("--src", type=Path, help="an existing Mixtral-shaped GGUF to use read-only instead of building")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=bench_extract.D_MODEL)
    ap.add_argument("--d-ff", type=int, default=bench_extract.D_FF)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--layout", choices=("gguf", "llama4"), default="gguf",
                    help="llama4: a transformed SafeTensors source (see above) instead of a Q4_0 GGUF")
    ap.add_argument("--experts", type=int, default=4, help="experts of the llama4 layout's one layer")
    a = ap.parse_args()
    if a.layout == "llama4" and (a.d_model, a.d_ff) == (bench_extract.D_MODEL, bench_extract.D_FF):
        a.d_model, a.d_ff = 5120, 8192
    bench_extract.D_MODEL, bench_extract.D_FF = a.d_model, a.d_ff
    a.dir.mkdir(parents=True, exist_ok=True)
    if a.layout == "llama4":
        src = a.src or a.dir / f"llama4-{a.d_model}-{a.d_ff}-{a.experts}"
        out = a.dir / f"out-{src.name}"
        if not (src / "config.json").exists():
            build_llama4(src, a.d_model, a.d_ff, a.experts)
    else:
        src, out = a.src or a.dir / "model.gguf", a.dir / "out"
    if not src.exists():
        tmp = src.with_suffix(".tmp")
        bench_extract.build_model(tmp, a.layers)
        tmp.rename(src)
    if not (out / "manifest.json").exists():
        from mertools import extract

        extract(src, out, fsync=False)
    files = [str(p) for p in sorted(out.rglob("*")) if p.is_file()] + (
        [str(p) for p in sorted(src.iterdir()) if p.is_file()] if src.is_dir() else [str(src)])
    size = sum(Path(f).stat().st_size for f in files)
    cat = ["cat", *files]
    deep = [sys.executable, "-m", "mertools.cli", "verify", str(out), "--deep", "--against", str(src), "--json",
            "-q"]
    base = [sys.executable, "-c", "import mertools.cli, mertools.verify, mertools.deep, mer_runtime"]
    compile_sources()
    run_child(cat, False)  # warm the page cache: both measurements below start from the same (warm) state
    _, base_rss, _ = run_child(base)
    base_anon = ANON_PEAKS[-1]
    reads, walls, insides, rss, anons = [], [], [], [], []
    report: dict = {}
    for _ in range(a.repeat):  # alternated, so a neighbour's load hits both alike
        reads.append(run_child(cat, False)[0])
        wall, peak, text = run_child(deep)
        anons.append(ANON_PEAKS[-1])
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

    slot = load_manifest(out).max_expert_size  # deep verify's runtime cache: 2 slots, each in memory once read into
    print(f"peak RSS of verify: {max(rss) / 2**20:.0f} MiB; baseline (imports only) {base_rss / 2**20:.0f} MiB; "
          f"beyond baseline {(max(rss) - base_rss) / 2**20:.0f} MiB (goal < 1024 MiB beyond the runtime's cache, "
          f"at most 2 slots of {slot / 2**20:.0f} MiB)")
    print(f"peak anonymous memory (RssAnon) of verify: {max(anons) / 2**20:.0f} MiB, baseline "
          f"{base_anon / 2**20:.0f} MiB; beyond the baseline {(max(anons) - base_anon) / 2**20:.0f} MiB")


def build_llama4(root: Path, h: int, f: int, n_exp: int) -> None:
    """A Llama-4-layout BF16 checkpoint with one MoE layer of `n_exp` experts (random weights), written by hand
    (8-byte header length, JSON header, raw bytes), a tensor at a time so that memory stays small."""
    import numpy as np

    tmp = root.with_name(root.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    p = "model.layers.0.feed_forward."
    shapes = {"model.embed_tokens.weight": (8, h), p + "router.weight": (n_exp, h),
              p + "experts.gate_up_proj": (n_exp, h, 2 * f), p + "experts.down_proj": (n_exp, f, h)}
    header, off = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    with open(tmp / "model.safetensors", "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        for shape in shapes.values():
            rows = int(np.prod(shape[:-1]))
            for r0 in range(0, rows, 4096):  # BF16 of float32 normals, a band of rows at a time
                x = rng.standard_normal((min(4096, rows - r0), shape[-1]), np.float32) * 0.05
                fh.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    (tmp / "config.json").write_text(json.dumps({
        "model_type": "llama4_text", "hidden_size": h, "num_hidden_layers": 1, "num_local_experts": n_exp,
        "num_experts_per_tok": 1, "intermediate_size": f}))
    tmp.rename(root)


def fmt(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in v) + "]"


if __name__ == "__main__":
    main()
