"""Smoke runs: a stream of routing decisions loaded through cache, prefetcher and loader, each expert computed.

What a "token" is: one pass through every MoE layer of the model, k experts per layer. The seed engine (MER)
counts one top-k step of ONE layer as a token; both figures are reported (`tokens_per_s` for the whole model,
`layer_steps_per_s` for the seed engine's unit).

Workloads (all seeded): `uniform` (k distinct experts uniformly), `zipf` (per-layer Zipf(1.1) popularity),
`markov` (each expert tends to follow a few successors, token to token and layer to layer), `router` (the model's
own router weights from dense.gguf applied to a seeded random walk of hidden states), `replay FILE` (a JSONL trace:
one line per token, `{"experts": [[...] per MoE layer]}` or `{"layers": {"<block>": [...]}}`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .buffers import BufferPool
from .cache import ExpertCache
from .errors import MerError
from .kernels import dequantize_tensor, reference_ffn, reference_weights
from .loader import check_regular_file
from .manifest import Manifest, load_manifest, router_names
from .safeopen import read_regular
from .prefetch import CostModel, MarkovPrefetcher, chunk_share
from .shards import open_shards
# moved to stepper (one driver for smoke and ShardSet.moe); re-exported here for compatibility
from .stepper import DUEL_MARGIN, NullLoader, OddsDuel, PrefetchConfig, StepDriver  # noqa: F401

WORKLOADS = ("zipf", "markov", "uniform", "router", "replay")
DEFAULT_SEED = 12648430


@dataclass
class SmokeConfig:
    tokens: int = 5000
    cache_slots: int = 16
    seed: int = DEFAULT_SEED
    workload: str = "zipf"
    replay: str | None = None
    io: str = "auto"
    prefetch: bool = True
    threshold_scale: float = 2.0
    max_inflight: int = 2
    compute: bool = True
    pin_top: int = 0  # pin the N experts this trace uses most (its routing profile) before the run
    block_size: int = 1 << 20  # the loader's chunk; queue_depth chunks are with the disk at most
    queue_depth: int = 32
    # "step": guess the next layer step; "token": the same layer of the next token, read only in the disk's idle
    # time (io_uring's window; pread and buffered have none and keep "step"). "step" by default: on the 2-core bench
    # VM a read beside the kernel costs it about 20 ms an expert, so a token ahead admits (almost) nothing there
    # either; the integrator decides the default (docs/runtime.md, "Guesses a token ahead")
    prefetch_ahead: str = "step"
    spec_window: int = 4  # "token": speculative chunks with the disk at once (what a foreground read may wait behind)
    # the cache's eviction: "layer" (by the layer order, with the predictor's odds when prefetch is on) or "lru"
    evict: str = "layer"
    prefetch_dormant: bool = True  # PrefetchConfig.dormant: False does the prefetcher's work at every step


# -- routing traces -----------------------------------------------------------------------------------------
def _topk_without_replacement(rng: np.random.Generator, logp: np.ndarray, k: int, shape: tuple[int, ...]) -> np.ndarray:
    """k distinct experts per row, drawn by the Gumbel-top-k trick from log-probabilities logp [E]."""
    g = logp + rng.gumbel(size=(*shape, logp.shape[-1]))
    return np.argsort(-g, axis=-1)[..., :k]


def _zipf_logp(rng: np.random.Generator, n_layers: int, n: int, s: float = 1.1) -> np.ndarray:
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return np.stack([np.log(ranks[rng.permutation(n)] ** -s) for _ in range(n_layers)])


def make_routes(m: Manifest, workload: str, tokens: int, seed: int, replay: str | None = None) -> np.ndarray:
    """Routing decisions as expert ids [tokens, n_moe_layers, k]."""
    layers = m.layers
    n = m.model["n_experts"]
    k = m.model.get("n_experts_used") or min(2, n)
    rng = np.random.default_rng(seed)
    L = len(layers)
    if workload == "uniform":
        return _topk_without_replacement(rng, np.zeros(n), k, (tokens, L))
    if workload == "zipf":
        logp = _zipf_logp(rng, L, n)
        return np.stack([_topk_without_replacement(rng, logp[li], k, (tokens,)) for li in range(L)], axis=1)
    if workload == "markov":
        logp = _zipf_logp(rng, L, n)
        succ = rng.integers(0, n, size=(L, n, 3))  # each expert's likely successors, same layer
        cross = rng.integers(0, n, size=(L, n, 2))  # likely experts of layer l given layer l-1
        out = np.zeros((tokens, L, k), np.int64)
        for t in range(tokens):
            for li in range(L):
                chosen: list[int] = []
                for i in range(k):
                    r = rng.random()
                    if t > 0 and r < 0.55:
                        cand = int(succ[li, out[t - 1, li, i], rng.integers(3)])
                    elif li > 0 and r < 0.85:
                        cand = int(cross[li, out[t, li - 1, i], rng.integers(2)])
                    else:
                        cand = int(_topk_without_replacement(rng, logp[li], 1, ())[0])
                    while cand in chosen:
                        cand = int(_topk_without_replacement(rng, logp[li], 1, ())[0])
                    chosen.append(cand)
                out[t, li] = chosen
        return out
    if workload == "router":
        return _router_routes(m, tokens, k, rng)
    if workload == "replay":
        if not replay:
            raise MerError("--workload replay needs a trace file (JSONL)")
        return _replay_routes(m, Path(replay), k)
    raise MerError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}")


def _router_routes(m: Manifest, tokens: int, k: int, rng: np.random.Generator) -> np.ndarray:
    import gguf

    if not m.dense:
        raise MerError(f"{m.root}: no dense.gguf, so the router weights are unknown; use another --workload")
    check_regular_file(m.root / m.dense["path"])  # a FIFO there would block the reader's open forever
    reader = gguf.GGUFReader(m.root / m.dense["path"])
    tensors = {t.name: t for t in reader.tensors}
    d = m.model["d_model"]
    weights = []
    for layer in m.layers:
        names = router_names(m, layer)
        name = names["weight"]
        if name not in tensors:
            raise MerError(f"{m.root / m.dense['path']}: no router tensor {name}; use another --workload")
        t = tensors[name]
        w = dequantize_tensor(t.tensor_type.name, (m.model["n_experts"], d), np.asarray(t.data).view(np.uint8))
        bname = names.get("bias", "")
        b = tensors[bname].data.astype(np.float64) if bname in tensors else np.zeros(m.model["n_experts"])
        weights.append((w, b))
    h = rng.standard_normal(d)
    out = np.zeros((tokens, len(m.layers), k), np.int64)
    for t in range(tokens):
        h = 0.8 * h + 0.6 * rng.standard_normal(d)  # a random walk: consecutive tokens resemble each other
        for li, (w, b) in enumerate(weights):
            logits = w @ (h + 0.3 * rng.standard_normal(d)) + b
            out[t, li] = np.argsort(-logits)[:k]
    return out


# bytes in one token's record, its newline not counted; far above any model's layers x top-k (an endless line:
# not a trace)
MAX_TRACE_LINE = 1 << 24


def _replay_routes(m: Manifest, path: Path, k: int) -> np.ndarray:
    rows = []
    n_exp = m.model["n_experts"]
    want = f"expected {len(m.layers)} layers of {k} experts in 0..{n_exp - 1}"
    try:
        with open(path, "rb") as fh:
            # MAX_TRACE_LINE counts the line's bytes without its newline: read one past the limit plus the
            # newline, so a line of exactly MAX_TRACE_LINE bytes and its newline come back whole
            for i, raw in enumerate(iter(lambda: fh.readline(MAX_TRACE_LINE + 2), b""), 1):
                if len(raw) - raw.endswith(b"\n") > MAX_TRACE_LINE:
                    raise MerError(f"{path}:{i}: a line longer than {MAX_TRACE_LINE} bytes; not a routing trace")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise MerError(f"{path}:{i}: not UTF-8 text; expected JSONL routing records") from None
                if line.strip():
                    rows.append(_route_record(m, line, k, f"{path}:{i}: ", want))
    except OSError as exc:
        raise MerError(f"{path}: cannot read the trace ({exc.strerror})") from None
    if not rows:
        raise MerError(f"{path}: the trace is empty")
    return np.array(rows, np.int64)


def _route_record(m: Manifest, line: str, k: int, where: str, want: str) -> list[list[int]]:
    """One token's experts per MoE layer from a trace line: integers (not 1.7, true or "1", which int() would take
    as another expert), k distinct ones a layer, as a top-k step chooses them."""
    try:
        rec = json.loads(line)
        if "experts" in rec:
            per = [list(x) for x in rec["experts"]]
        else:
            per = [list(rec["layers"][str(layer)]) for layer in m.layers]
    except (ValueError, KeyError, TypeError) as exc:
        raise MerError(f"{where}not a routing record ({exc}); expected "
                       '{"experts": [[e, ...] per MoE layer]}') from None
    n_exp = m.model["n_experts"]
    for x in per:
        bad = next((e for e in x if type(e) is not int), None)
        if bad is not None:
            raise MerError(f"{where}expert ids must be integers, got {json.dumps(bad)[:40]}; {want}")
    if len(per) != len(m.layers) or any(len(x) != k or not all(0 <= e < n_exp for e in x) for x in per):
        raise MerError(f"{where}{want}")
    for layer, x in zip(m.layers, per):
        if len(set(x)) != len(x):
            twice = next(e for e in x if x.count(e) > 1)
            raise MerError(f"{where}names expert {twice} twice in layer {layer}; a top-k step chooses {k} different "
                           "experts")
    return per


def routing_profile(routes: np.ndarray, layers: list[int]) -> dict[tuple[int, int], int]:
    """How often each (layer, expert) is chosen in a trace: what `--pin-top` pins from."""
    prof: dict[tuple[int, int], int] = {}
    for li, layer in enumerate(layers):
        ids, counts = np.unique(routes[:, li, :], return_counts=True)
        prof.update({(layer, int(e)): int(c) for e, c in zip(ids, counts)})
    return prof


# -- hit-rate comparison without I/O ------------------------------------------------------------------------
def _drive(cache: ExpertCache, routes: np.ndarray, layers: list[int], policy: str, pf: MarkovPrefetcher | None,
           max_inflight: int, on_access: Callable[[int, int, Callable[[], None] | None], None] | None = None,
           cost: CostModel | None = None, ahead: str = "step", odds: bool = True, duel: OddsDuel | None = None
           ) -> None:
    """Run a trace [tokens, layers, k] through the cache, one layer step at a time (`StepDriver.step`: its
    docstring says what a step does; `on_access` as there). Policy "oracle" also prefetches the next step's experts
    after each step (it knows them); "none" neither feeds nor asks the prefetcher."""
    drv = StepDriver(cache, layers, pf, cost, policy=policy, max_inflight=max_inflight, ahead=ahead, odds=odds,
                     duel=duel)
    try:
        T, L, _ = routes.shape
        for t in range(T):
            for li in range(L):
                drv.step(li, routes[t, li], on_access)
                if policy == "oracle":
                    nt, nl = (t, li + 1) if li + 1 < L else (t + 1, 0)
                    if nt < T:
                        for e in routes[nt, nl]:
                            cache.prefetch((layers[nl], int(e)))
    finally:
        drv.close()


def compare_policies(m: Manifest, routes: np.ndarray, slots: int, cfg: SmokeConfig, window_frac: float = 1.0,
                     chunk_frac: float | None = None, read_frac: float = 0.0) -> dict[str, dict[str, Any]]:
    """Hit rates of no prefetch, the Markov prefetcher and an oracle (knows the next step), same trace and slots.

    "markov" is the prefetcher behind the same gate as a real run (`CostModel`, the victim's odds included), with
    I/O priced in misses: every miss stalls one unit. `window_frac` is where the gate's landed and waste fractions
    start (pass the real run's, `queue_depth x block_size / expert size`, so that both gates start alike); from
    there they move to what the replay measures: its reads complete at once, so a right guess lands whole and a
    wrong one costs a whole read (nothing is withdrawn part-way), and nothing is pinned.
    "markov_ungated" takes every candidate above the threshold that finds a spare slot (the hit rate the tables
    alone would give). `chunk_frac` given: the guesses are made a token ahead (`_drive(ahead="token")`) behind the
    idle-time gate, as a real run on io_uring makes them (no speculative chunk is ever in a read's way here), each
    read priced at `read_frac` of a miss (what it costs the computation it overlaps; smoke passes 0, so that the
    replay depends on the trace alone: the hit rate where reading is free for the CPUs).

    >>> r = compare_policies(manifest, routes, 16, SmokeConfig(), window_frac=0.25)  # doctest: +SKIP
    >>> r["markov"]["hit_rate"] >= r["none"]["hit_rate"]                             # doctest: +SKIP
    True"""
    out = {}
    for policy in ("none", "markov", "markov_ungated", "oracle"):
        pool = BufferPool(4096, slots)
        cache = ExpertCache(pool, NullLoader(pool), lambda key: ("", 4096),
                            layers=m.layers if cfg.evict == "layer" else None)
        pf = MarkovPrefetcher(m.layers, m.model["n_experts"], threshold_scale=cfg.threshold_scale)
        cost = CostModel(unit_stall=1.0, window_frac=window_frac, window=cfg.spec_window if chunk_frac else 32,
                         chunk_frac=chunk_frac, read_frac=read_frac) if policy == "markov" else None
        _drive(cache, routes, m.layers, policy.split("_")[0], pf, cfg.max_inflight, cost=cost,
               ahead="token" if chunk_frac is not None else "step")
        out[policy] = {**cache.stats.as_dict(), "eviction": cache.eviction}
        pool.close()
    return out


# -- the smoke run ------------------------------------------------------------------------------------------
def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    a = np.asarray(values) * 1e3
    return {f"p{q}": round(float(np.percentile(a, q)), 4) for q in (50, 95, 99)}


def run_smoke(path: str | Path, cfg: SmokeConfig, progress: Callable[[int, int], Callable[[int], None]] | None = None
              ) -> dict[str, Any]:
    if cfg.evict not in ("layer", "lru"):
        raise MerError(f"evict {cfg.evict!r}: expected layer or lru")
    if cfg.prefetch_ahead not in ("token", "step"):
        raise MerError(f"prefetch_ahead {cfg.prefetch_ahead!r}: expected token or step")
    # prefetching as the ShardSet drives it for moe(): the same driver, gate and loader window (one path)
    prefetch = PrefetchConfig(ahead=cfg.prefetch_ahead, max_inflight=cfg.max_inflight,
                              threshold_scale=cfg.threshold_scale, spec_window=cfg.spec_window,
                              dormant=cfg.prefetch_dormant) if cfg.prefetch else False
    with open_shards(path, io=cfg.io, cache_slots=cfg.cache_slots, checksums="first", block_size=cfg.block_size,
                     queue_depth=cfg.queue_depth, evict=cfg.evict, prefetch=prefetch) as s:
        m = s.manifest
        routes = make_routes(m, cfg.workload, cfg.tokens, cfg.seed, cfg.replay)
        T, L, k = routes.shape
        tick = progress(T, T) if progress else (lambda n: None)
        compute_times: list[float] = []
        x_bank = np.random.default_rng(cfg.seed + 1).standard_normal((8, m.model["d_model"])).astype(np.float32)
        token_index = [0]
        # what the replay's gate starts from: a guess reads (and, if right, lands) what its window allows
        biggest = max(e.size for e in m.experts)
        frac = min(1.0, s.loader.queue_depth * s.loader.block_size / biggest)
        # a token ahead only where speculative reads can be kept to the disk's idle time (io_uring's window)
        ahead = "token" if cfg.prefetch_ahead == "token" and s.loader.name == "io_uring" else "step"
        chunk_frac = chunk_share(s.loader.block_size, biggest) if ahead == "token" else None
        # prefetch off: a driver that only fetches each step's experts together (hits first), as before
        drv = s.step_driver() or StepDriver(s.cache, m.layers, policy="none")
        pf, cost = drv.pf or MarkovPrefetcher(m.layers, m.model["n_experts"]), drv.cost
        pinned = s.cache.pin_top(routing_profile(routes, m.layers), cfg.pin_top) if cfg.pin_top else []

        def access(layer: int, e: int, before_compute: Callable[[], None] | None) -> None:
            with s.load(layer, e) as ex:  # blocks on I/O if needed; counted in the cache's io_wait
                if before_compute:
                    before_compute()
                if cfg.compute:
                    # a guess under way now streams through this computation (none is issued during it): what
                    # its landing costs the kernel is the price of a read (token ahead: CostModel.observe_compute)
                    compute_times.append(drv.compute(lambda: s.compute(ex, x_bank[token_index[0] % len(x_bank)]))[1])

        t_warm = time.perf_counter()
        s.warm_up()  # the cache's memory is faulted in (and registered) before the clock starts, as it was at open
        warm_up = time.perf_counter() - t_warm
        t_start = time.perf_counter()
        for t in range(T):
            token_index[0] = t
            for li in range(L):
                drv.step(li, routes[t, li], access)
            tick(1)
        wall = time.perf_counter() - t_start
        drv.catch_up()  # a dormant stream's last steps, so that what is read below is the whole run's
        odds_used = drv.duel is not None and drv.duel.odds  # the ShardSet closes its driver (and duel) on exit
        dormant = drv.dormant_steps
        own_ms = drv.own_s / max(1, drv.steps_done) * 1e3  # prefetch off too: its driver only fetches
        st = s.cache.stats
        io_desc, backend, bytes_read = s.describe_io(), s.loader.name, s.loader.bytes_read
        eviction = s.cache.eviction
        # compute time excludes the wait for the shard: ffn() blocks on I/O inside, so subtract it
        io_wait = st.io_wait
        compute_total = sum(compute_times)
    expert_calls = T * L * k
    result = {
        "folder": str(path),
        "workload": cfg.workload,
        "seed": cfg.seed,
        "tokens": T,
        "token_definition": "one token = one top-k step through every MoE layer; layer_steps counts one layer's "
                            "top-k step as the seed engine does",
        "moe_layers": L,
        "experts_per_layer": m.model["n_experts"],
        "top_k": k,
        "layer_steps": T * L,
        "expert_calls": expert_calls,
        "wall_s": round(wall, 4),
        "warm_up_s": round(warm_up, 4),  # before wall: the cache faulted in and registered (ShardSet.warm_up)
        "tokens_per_s": round(T / wall, 3) if wall else 0.0,
        "layer_steps_per_s": round(T * L / wall, 3) if wall else 0.0,
        "cache_slots": cfg.cache_slots,
        **st.as_dict(),
        "prefetch_refused": cost.refused if cost else 0,
        # what the gate had learned by the end: the figures it weighs (docs/runtime.md, "Prefetcher")
        "prefetch_gate": {"stall_ms": round(cost.stall_s * 1e3, 3), "miss_step": round(cost.miss_step, 4),
                          "landed_frac": round(cost.landed_frac, 4), "waste_frac": round(cost.waste_frac, 4),
                          "window": cost.window, "calibration": round(pf.calibration, 4), "ahead": ahead,
                          # a chunk's share of an expert (at most 1), as this run's gate and the replay's weigh it
                          "chunk_frac": chunk_frac,
                          "in_way_chunks_per_guess": round(cost.in_way, 3) if chunk_frac else None,
                          "read_ms": round(cost.read_s * 1e3, 3) if chunk_frac else None,  # a guess's read's price
                          "compute_base_ms": round(cost.compute_base * 1e3, 3) if chunk_frac else None,
                          # ms of compute a MiB landing beside a guess cost, from read_samples computations (the
                          # price is a whole miss until `warmup` of them); guesses admitted only to measure it
                          "read_ms_per_mib": round(cost.read_ms_per_mib, 4) if chunk_frac else None,
                          "read_samples": cost.read_seen if chunk_frac else None,
                          "explored": cost.explored if chunk_frac else None,
                          "explore_spent_ms": round(cost.explore_spent_s * 1e3, 3) if chunk_frac else None,
                          "admitted": cost.admitted, "right": cost.right, "wrong": cost.wrong} if cost else None,
        "prefetch": cfg.prefetch,
        # the cache's victims: "lru", "layer" (by distance to the layer's next step) or "layer+odds" (the predictor's
        # odds per step of that distance); docs/runtime.md, "Eviction"
        "eviction": eviction,
        # steps whose prefetcher bookkeeping waited for a batch: it had changed nothing for a while (docs/runtime.md,
        # "Dormant streams")
        "prefetch_dormant_steps": dormant,
        # the step driver's own time per layer step, all of a step's work but its reads and kernels (prefetch off:
        # the same driver without a predictor): what prefetching adds on the CPU, apart from the disk's drift
        "driver_ms_per_step": round(own_ms, 4),
        "eviction_odds_at_end": odds_used,  # the duel's choice at the end: the odds ranked the victims (or distance)
        "pinned": [list(k) for k in pinned],
        "bytes_read": bytes_read,
        "read_mib_per_s": round(bytes_read / wall / 2**20, 2) if wall else 0.0,
        "io_latency_ms_misses": _pct(list(st.load_latency)),
        "compute_ms_per_expert": _pct(compute_times) if cfg.compute else None,
        "io_wait_s": round(io_wait, 4),
        "compute_s": round(compute_total, 4),
        "io_share": round(io_wait / wall, 4) if wall else 0.0,
        "io": io_desc,
        "backend": backend,
        # the replay stays a function of the trace alone (seeded, whatever the disk did): its reads cost the
        # computation nothing (read_frac 0), where this run's gate prices them as measured (`read_ms`)
        "hit_rate_by_policy": compare_policies(m, routes, cfg.cache_slots, cfg, window_frac=frac,
                                               chunk_frac=chunk_frac, read_frac=0.0),
    }
    return result


def emit_golden(path: str | Path, out_file: str | Path, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """For every expert: a seeded input and the float64 reference output (gguf dequantization, NumPy float64).

    Written to ``out_file`` exactly as named (np.savez given a name would add ``.npz`` to one without it). It is
    opened only once every output is computed, but written in place: a caller that must never leave a half-written
    or replaced file (the ``mertools smoke --emit-golden`` command) passes a temporary and renames it."""
    m = load_manifest(path)
    rng = np.random.default_rng(seed)
    act = m.model.get("activation", {"kind": "swiglu"})
    xs, ys, ids = [], [], []
    for e in m.experts:
        w = reference_weights(np.frombuffer(read_regular(m.path_of(e), e.size), np.uint8), e)  # never a FIFO
        x = rng.standard_normal(m.model["d_model"]).astype(np.float32)
        xs.append(x)
        ys.append(reference_ffn(w, x, act))
        ids.append((e.layer, e.expert))
    meta = {"folder": str(path), "seed": seed, "activation": act, "formula": "y = down @ act(gate @ x (+b), up @ x (+b)) "
            "(+b_down), float64, weights = gguf.quants.dequantize(shard bytes)", "format_version": m.format_version}
    with open(out_file, "wb") as fh:
        np.savez(fh, layer_expert=np.array(ids, np.int32), x=np.stack(xs), y=np.stack(ys), meta=json.dumps(meta))
    return {"experts": len(ids), "file": str(out_file), **meta}


def render(r: dict[str, Any]) -> str:
    lat, comp = r["io_latency_ms_misses"], r["compute_ms_per_expert"] or {"p50": 0, "p95": 0, "p99": 0}
    pol = r["hit_rate_by_policy"]
    return "\n".join([
        f"smoke {r['folder']}: workload {r['workload']} (seed {r['seed']}), backend {r['backend']}",
        f"  tokens {r['tokens']} ({r['moe_layers']} MoE layers x top-{r['top_k']} of {r['experts_per_layer']}), "
        f"wall {r['wall_s']:.2f} s: {r['tokens_per_s']:.2f} tokens/s (whole model), "
        f"{r['layer_steps_per_s']:.2f} layer-steps/s (seed engine's 'token')",
        f"  cache {r['cache_slots']} slots (faulted in and registered before the clock: {r['warm_up_s']:.2f} s): "
        f"hits {r['hits']}, misses {r['misses']}, hit rate {r['hit_rate']:.1%}, "
        f"evictions {r['evictions']}",
        f"  eviction {r['eviction']}; pinned {len(r['pinned'])} experts; prefetch {'on' if r['prefetch'] else 'off'}: issued {r['prefetch_issued']}, used {r['prefetch_used']}, "
        f"wasted {r['prefetch_wasted']}, cancelled {r['prefetch_cancelled']}, refused by the cost model "
        f"{r['prefetch_refused']}; dormant steps {r['prefetch_dormant_steps']}; step driver "
        f"{r['driver_ms_per_step']:.3f} ms a layer step (its own work, reads and kernels apart)",
        f"  hit rate, same trace and slots: no prefetch {pol['none']['hit_rate']:.1%}, markov "
        f"{pol['markov']['hit_rate']:.1%}, oracle {pol['oracle']['hit_rate']:.1%}",
        f"  read {r['bytes_read'] / 2**20:.1f} MiB at {r['read_mib_per_s']:.1f} MiB/s; I/O latency (misses) ms "
        f"p50 {lat['p50']:.3f} p95 {lat['p95']:.3f} p99 {lat['p99']:.3f}",
        f"  compute ms/expert p50 {comp['p50']:.3f} p95 {comp['p95']:.3f} p99 {comp['p99']:.3f}; "
        f"I/O share of the cycle {r['io_share']:.1%}",
        f"  io: {r['io']}",
    ])
