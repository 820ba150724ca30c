#!/usr/bin/env python3
"""Smoke benchmark on a Mixtral-shaped Q4_0 model on disk (not a test): prefetch on against off, every workload.

Builds (once) a GGUF with d_model 4096, d_ff 14336, 8 experts x 4 MoE layers (3.2 GB, Q4_0), extracts it, then runs
the runtime's smoke loop (O_DIRECT loader, 16-slot cache, C moe() kernel) with the Markov prefetcher on and off,
ALTERNATED (on off, off on, on off, ...) after one discarded warm-up run, so that a drift of the disk or of the machine
(another process, the host's cache) falls on both sides alike. Per workload it prints the median tokens/s on and
off, their ratio (on / off: >= 1.00 means prefetching did not lose) and the figures of the median runs: hit rate,
I/O share, prefetches issued / used / cancelled. The hit rates of no prefetch / Markov / oracle on the same trace
come from the same run.

    python scripts/bench_smoke.py [--dir /tmp/mertools-bench] [--tokens 40] [--reps 3] [--workload markov zipf]
                                  [--ahead step|token] [--spec-window 4] [--evict layer|lru] [--awake]

Run one workload per invocation on a shared machine (each takes about a minute at the defaults).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _median_run(runs: list[dict]) -> dict:
    """The run whose tokens/s is the (lower) median: its other figures are printed beside the median."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[(len(runs) - 1) // 2]


def main() -> None:
    from mer_runtime.smoke import SmokeConfig, run_smoke

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mertools-bench"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3, help="runs per side (on and off), alternated")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--workload", nargs="+", default=["markov", "zipf", "uniform", "router"])
    ap.add_argument("--io", default="auto")
    ap.add_argument("--block", type=int, default=1 << 20, help="the loader's chunk in bytes")
    ap.add_argument("--depth", type=int, default=32, help="chunks with the disk at most")
    ap.add_argument("--ahead", choices=("step", "token"), default=SmokeConfig.prefetch_ahead,
                    help="guess the next layer step, or the same layer of the next token (io_uring only)")
    ap.add_argument("--spec-window", type=int, default=SmokeConfig.spec_window,
                    help="--ahead token: speculative chunks with the disk")
    ap.add_argument("--evict", choices=("layer", "lru"), default=SmokeConfig.evict,
                    help="the cache's victims: by the layer order (with the odds when on), or LRU (the old cache)")
    ap.add_argument("--awake", action="store_true",
                    help="prefetch on never falls dormant: its bookkeeping at every step (docs/runtime.md)")
    ap.add_argument("--json", type=Path, help="also write every run here")
    a = ap.parse_args()
    from bench_loader import ensure_folder

    a.dir.mkdir(parents=True, exist_ok=True)
    folder = ensure_folder(a.dir, a.layers)
    out = []
    for workload in a.workload:
        def run(prefetch: bool) -> dict:
            cfg = SmokeConfig(tokens=a.tokens, cache_slots=a.slots, workload=workload, io=a.io, prefetch=prefetch,
                              block_size=a.block, queue_depth=a.depth, prefetch_ahead=a.ahead,
                              spec_window=a.spec_window, evict=a.evict, prefetch_dormant=not a.awake)
            return run_smoke(folder, cfg)

        run(True)  # warm-up, discarded: the first run of a process pays for imports and the host's cold cache
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for i in range(a.reps):  # on off, off on, on off, ...: a drift, or an edge of the second run of a pair
            for prefetch in ((True, False) if i % 2 == 0 else (False, True)):  # (a warmed host cache), falls on both
                runs[prefetch].append(run(prefetch))
        med = {p: statistics.median(r["tokens_per_s"] for r in runs[p]) for p in (True, False)}
        ratio = med[True] / med[False] if med[False] else float("nan")
        on, off = _median_run(runs[True]), _median_run(runs[False])
        pol = on["hit_rate_by_policy"]
        fmt = {p: " ".join(f"{r['tokens_per_s']:.2f}" for r in runs[p]) for p in (True, False)}
        print(f"{workload:8s} tokens/s on {med[True]:6.2f}  off {med[False]:6.2f}  on/off {ratio:.3f}  "
              f"(medians of {a.reps} alternated runs of {a.tokens} tokens; "
              f"all on: {fmt[True]}; all off: {fmt[False]})", flush=True)
        print(f"{'':8s} hit rate on {on['hit_rate']:.1%} off {off['hit_rate']:.1%} (replayed without I/O: none "
              f"{pol['none']['hit_rate']:.1%} / markov behind the gate {pol['markov']['hit_rate']:.1%} "
              f"({pol['markov']['prefetch_issued'] - pol['markov']['prefetch_used']} wasted) / ungated "
              f"{pol['markov_ungated']['hit_rate']:.1%} / oracle {pol['oracle']['hit_rate']:.1%}); "
              f"I/O share on {on['io_share']:.0%} off {off['io_share']:.0%}; "
              f"prefetches issued {on['prefetch_issued']} used {on['prefetch_used']} withdrawn "
              f"{on['prefetch_cancelled']} stale {on.get('prefetch_stale', 0)} refused {on.get('prefetch_refused', 0)}; "
              f"{on['backend']}; eviction on {on['eviction']} (odds at the end: {on.get('eviction_odds_at_end')}; "
              f"dormant steps {on.get('prefetch_dormant_steps')}) "
              f"off {off['eviction']}", flush=True)
        print(f"{'':8s} gate (median run on): {on.get('prefetch_gate')}", flush=True)
        gates = [r.get("prefetch_gate") or {} for r in runs[True]]
        print(f"{'':8s} every run on: admitted {[g.get('admitted') for g in gates]}, of which explored "
              f"{[g.get('explored') for g in gates]}; read ms/MiB {[g.get('read_ms_per_mib') for g in gates]}; "
              f"MiB read on {[r['bytes_read'] >> 20 for r in runs[True]]} off "
              f"{[r['bytes_read'] >> 20 for r in runs[False]]}", flush=True)
        # the disk's speed drifts run to run (here +-25% in I/O wait for the same bytes): each on run against the off
        # run of its own pair, and the time outside I/O waits (what prefetching's own work adds to), on against off
        pairs = [r1["tokens_per_s"] / r0["tokens_per_s"] for r1, r0 in zip(runs[True], runs[False])]
        cpu = {p: statistics.median(r["wall_s"] - r["io_wait_s"] for r in runs[p]) for p in (True, False)}
        own = {p: statistics.median(r["driver_ms_per_step"] for r in runs[p]) for p in (True, False)}
        print(f"{'':8s} paired on/off: median {statistics.median(pairs):.3f}, "
              f"{' '.join(f'{q:.3f}' for q in pairs)}; outside I/O waits (median s) on {cpu[True]:.2f} "
              f"off {cpu[False]:.2f}, on/off {cpu[True] / cpu[False]:.3f}; I/O wait (median s) on "
              f"{statistics.median(r['io_wait_s'] for r in runs[True]):.2f} "
              f"off {statistics.median(r['io_wait_s'] for r in runs[False]):.2f}; the step driver's own work (median "
              f"ms a layer step) on {own[True]:.3f} off {own[False]:.3f}", flush=True)
        out.append({"workload": workload, "tokens_per_s_on": med[True], "tokens_per_s_off": med[False],
                    "on_off": ratio, "on_off_paired": pairs, "outside_io_s": cpu,
                    "runs_on": runs[True], "runs_off": runs[False]})
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
