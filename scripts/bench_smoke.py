#!/usr/bin/env python3
"""Smoke benchmark on a Mixtral-shaped Q4_0 model on disk (not a test).

Builds (once) a GGUF with d_model 4096, d_ff 14336, 8 experts x 4 MoE layers (3.2 GB, Q4_0), extracts it, then runs
the runtime's smoke loop (O_DIRECT loader, 16-slot cache, SwiGLU kernels) with and without the Markov prefetcher,
and prints tokens/s (whole model and per layer step), hit rate, I/O share and read throughput for each. The
hit rates of no prefetch / Markov / oracle on the same trace come from the same run.

    python scripts/bench_smoke.py [--dir /tmp/mertools-bench] [--tokens 200] [--workload markov] [--io auto]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mertools-bench"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--workload", nargs="+", default=["markov", "zipf"])
    ap.add_argument("--io", default="auto")
    ap.add_argument("--json", type=Path, help="also write all results here")
    a = ap.parse_args()
    from bench_loader import ensure_folder
    from mer_runtime.smoke import SmokeConfig, run_smoke

    a.dir.mkdir(parents=True, exist_ok=True)
    folder = ensure_folder(a.dir, a.layers)
    rows = []
    for workload in a.workload:
        for prefetch in (False, True):
            cfg = SmokeConfig(tokens=a.tokens, cache_slots=a.slots, workload=workload, io=a.io, prefetch=prefetch)
            r = run_smoke(folder, cfg)
            rows.append(r)
            pol = r["hit_rate_by_policy"]
            print(f"{workload:7s} prefetch {'on ' if prefetch else 'off'}: {r['tokens_per_s']:6.2f} tokens/s "
                  f"({r['layer_steps_per_s']:6.2f} layer-steps/s), hit rate {r['hit_rate']:.1%} "
                  f"(none {pol['none']['hit_rate']:.1%} / markov {pol['markov']['hit_rate']:.1%} / oracle "
                  f"{pol['oracle']['hit_rate']:.1%}), I/O share {r['io_share']:.1%}, read "
                  f"{r['read_mib_per_s']:.0f} MiB/s, compute p50 {r['compute_ms_per_expert']['p50']:.1f} ms/expert, "
                  f"{r['backend']}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
