"""The cost of the cache's layer-aware victim search on a deep model, without I/O (NullLoader).

A DeepSeek-V3-like shape (58 MoE layers x 256 experts, top-8) replayed through an `ExpertCache` with the layer order,
with and without a predictor's odds on every layer: prints the entries looked at per eviction and the time of an
acquire (a miss: fetch, victim search, bookkeeping), against the same run ranked by distance alone and by LRU.

    python scripts/bench_evict.py                       # 512 slots, 6 tokens
    python scripts/bench_evict.py --slots 2048 --tokens 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mer_runtime.buffers import BufferPool
from mer_runtime.cache import ExpertCache
from mer_runtime.smoke import NullLoader


def run(slots: int, mode: str, tokens: int, layers: int, experts: int, k: int) -> tuple[float, float, int]:
    """(entries looked at per eviction, microseconds per acquire, evictions)."""
    order = list(range(3, 3 + layers))
    pool = BufferPool(4096, slots)
    cache = ExpertCache(pool, NullLoader(pool), lambda key: ("", 4096), layers=None if mode == "lru" else order)
    rng = np.random.default_rng(0)
    steps = [[(layer, int(e)) for e in rng.choice(experts, k, replace=False)] for _ in range(tokens) for layer in order]
    n_acq = 0
    t0 = time.perf_counter()
    for i, keys in enumerate(steps):
        if mode == "odds":  # a driver hands the odds of two layers a step (smoke's); every layer has some
            if i == 0:
                cache.set_odds({l: rng.random(experts) / 8 for l in order}, intercept=0.01, slope=1.0)
            else:
                layer = keys[0][0]
                cache.set_odds({layer: rng.random(experts) / 8}, intercept=0.01, slope=1.0)
        cache.fetch(keys)
        for key in keys:
            cache.acquire(key)
            cache.release(key)
            n_acq += 1
    dt = time.perf_counter() - t0
    pool.close()
    ev = max(1, cache.stats.evictions)
    return cache.examined / ev, dt / n_acq * 1e6, cache.stats.evictions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--k", type=int, default=8)
    a = ap.parse_args()
    for mode in ("lru", "layer", "odds"):
        per, us, ev = run(a.slots, mode, a.tokens, a.layers, a.experts, a.k)
        print(f"{mode:6s} slots={a.slots} evictions={ev:5d} examined/eviction={per:7.1f} us/acquire={us:7.1f}")


if __name__ == "__main__":
    main()
