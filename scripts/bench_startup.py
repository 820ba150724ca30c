#!/usr/bin/env python3
"""Start-up cost of the commands (interpreter start, imports, exit): median wall time of fresh runs (not a test).

    python scripts/bench_startup.py [--repeat 11] [--folder OUT [--src SRC]]

Runs, each --repeat times in a fresh process, round-robin so that load from other processes hits every command
alike: `python -c pass` and `import numpy, gguf` (the floor for any command that reads a model), `import
mertools.cli`, `mertools --help`, `--version`, `verify --help`; with --folder also `inspect OUT --json`, `verify OUT`
and `verify OUT --deep [--against SRC]`. Then prints the slowest top-level imports of the last command
(`python -X importtime`).

Says whether the packages have .pyc files: without them (PYTHONDONTWRITEBYTECODE=1 and no __pycache__, as on a
machine that never wrote one) every start compiles the sources it imports, about 50 ms on the deep-verify path; a pip
install writes them.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mer_runtime
import mertools


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=11)
    ap.add_argument("--folder", type=Path, help="a shard folder: also time inspect, verify and verify --deep on it")
    ap.add_argument("--src", type=Path, help="with --folder: its source, for verify --deep --against")
    a = ap.parse_args()
    py, cli = sys.executable, [sys.executable, "-m", "mertools.cli"]
    cmds = {"python -c pass": [py, "-c", "pass"], "import numpy, gguf": [py, "-c", "import numpy, gguf"],
            "import mertools.cli": [py, "-c", "import mertools.cli"], "mertools --help": [*cli, "--help"],
            "mertools --version": [*cli, "--version"], "mertools verify --help": [*cli, "verify", "--help"]}
    if a.folder:
        against = ["--against", str(a.src)] if a.src else []
        cmds |= {"mertools inspect OUT --json": [*cli, "inspect", str(a.folder), "--json"],
                 "mertools verify OUT --json -q": [*cli, "verify", str(a.folder), "--json", "-q"],
                 f"mertools verify OUT --deep{' --against SRC' if a.src else ''} --json -q":
                     [*cli, "verify", str(a.folder), "--deep", *against, "--json", "-q"]}
    pyc = all(any((Path(p) / "__pycache__").glob("__init__.*.pyc"))
              for p in (*mertools.__path__, *mer_runtime.__path__))
    print(f"{sys.version.split()[0]}, .pyc files {'present' if pyc else 'absent: every start compiles the sources'}; "
          f"median of {a.repeat}, ms")
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(a.repeat):
        for name, cmd in cmds.items():
            t = time.perf_counter()
            p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            times[name].append(time.perf_counter() - t)
            if p.returncode not in (0, 1):  # verify exits 1 for a folder with problems: still a start
                sys.exit(f"{name}: exit {p.returncode}: {p.stderr.strip()[-500:]}")
    for name, ts in times.items():
        print(f"  {name:50s} {statistics.median(ts) * 1000:7.1f}  (min {min(ts) * 1000:.1f})")
    last = list(cmds.values())[-1]
    err = subprocess.run([py, "-X", "importtime", *last[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True).stderr
    top = [(int(m[2]), m[3]) for m in re.finditer(r"^import time:\s+(\d+) \|\s+(\d+) \| (\S+)$", err, re.M)]
    print(f"slowest top-level imports of `{list(cmds)[-1]}` (cumulative, ms):")
    for us, name in sorted(top, reverse=True)[:12]:
        print(f"  {name:50s} {us / 1000:7.1f}")


if __name__ == "__main__":
    main()
