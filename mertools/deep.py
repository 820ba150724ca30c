"""``verify --deep``: run every expert through the runtime and compare with an independent float64 reference.

The reference comes from the source model when `--against SRC` is given: the expert's tensors are found by name
with the gguf package's reader (not through the converter's plan), their bytes hashed and compared with the
manifest, and dequantized by the gguf package to float64. Without `--against`, the reference is the gguf
package's dequantization of the shard bytes read back from disk with plain file reads: it still checks the runtime's
loaders and kernels, but only `--against` catches a changed byte whose checksums were rewritten to match.

Tolerance: max|y - y_ref| / max|y_ref| <= 1e-4. The runtime computes in float32 (weights exact, activations not
quantized), whose rounding over a few thousand-term dot products stays near 1e-6; one changed weight byte moves
the output by far more on the seeded inputs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xxhash

from mer_runtime.errors import MerError
from mer_runtime.kernels import dequantize_tensor, reference_ffn, reference_weights
from mer_runtime.manifest import ExpertEntry, Manifest
from mer_runtime.shards import open_shards

from .errors import SourceError
from .gguf_source import _open_reader, split_parts
from .verify import Problem, VerifyReport

TOLERANCE = 1e-4
SEED = 12648430
N_INPUTS = 2


def seeded_inputs(d_model: int, seed: int = SEED, n: int = N_INPUTS) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d_model)).astype(np.float32)


class SourceReference:
    """Expert tensors of a GGUF source, looked up by their GGUF names with the gguf package's reader."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            # The bounded reader: a hostile --against file is refused like a hostile extract source.
            self.tensors = {t.name: t for p in split_parts(self.path) for t in _open_reader(p).tensors}
        except (ValueError, OSError) as exc:
            raise SourceError(f"{self.path}: cannot read the reference model ({exc})") from None

    def tensor(self, layer: int, expert: int, role: str) -> tuple[str, np.ndarray]:
        """(type name, the expert's slice as the reader holds it) for role gate/up/down[_bias|_scale]."""
        kind = role.rpartition("_")[2] if role.endswith(("_bias", "_scale")) else "weight"
        base = role.removesuffix("_bias").removesuffix("_scale")
        t = self.tensors.get(f"blk.{layer}.ffn_{base}_exps.{kind}")
        if t is not None:
            return t.tensor_type.name, t.data[expert:expert + 1] if kind == "scale" else t.data[expert]
        t = self.tensors.get(f"blk.{layer}.ffn_gate_up_exps.{kind}")
        if t is not None:
            d = t.data[expert]
            half = d.shape[0] // 2
            return t.tensor_type.name, d[:half] if base == "gate" else d[half:]
        t = self.tensors.get(f"blk.{layer}.ffn_{base}.{expert}.{kind}")
        if t is not None:
            return t.tensor_type.name, t.data
        raise SourceError(f"{self.path}: no tensor for layer {layer} expert {expert} {role}; is this the model the "
                          "folder was extracted from?")


def _shard_reference(m: Manifest, e: ExpertEntry) -> dict[str, np.ndarray]:
    return reference_weights(np.frombuffer(m.path_of(e).read_bytes(), np.uint8), e)


def _source_reference(src: SourceReference, e: ExpertEntry, problems: list[Problem]) -> dict[str, np.ndarray]:
    w = {}
    for role, t in e.tensors.items():
        dtype, data = src.tensor(e.layer, e.expert, role)
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if dtype != t.dtype:
            problems.append(Problem(e.path, f"{role} is {t.dtype} but the source has {dtype}"))
        if xxhash.xxh3_64_hexdigest(raw) != t.xxh3_64:
            problems.append(Problem(e.path, f"{role}: the manifest's checksum does not match the source bytes"))
        w[role] = dequantize_tensor(dtype, t.shape, raw)
    return w


def deep_verify(report: VerifyReport, m: Manifest, *, against: str | os.PathLike[str] | None = None,
                io: str = "auto", seed: int = SEED, tolerance: float = TOLERANCE,
                progress: Callable[[int, int], Callable[[int], None]] | None = None) -> None:
    """Add per-expert numeric results (and any problems) to a shallow verify report."""
    t0 = time.perf_counter()
    src = SourceReference(against) if against else None
    x = seeded_inputs(m.model["d_model"], seed)
    activation = m.model.get("activation", {"kind": "swiglu"})
    tick = progress(len(m.experts), len(m.experts)) if progress else (lambda n: None)
    broken = {p.path for p in report.problems}
    results: list[dict[str, Any]] = []
    with open_shards(m.root, io=io, cache_slots=2, checksums="never") as shards:
        for e in m.experts:
            tick(1)
            if e.path in broken:
                continue  # missing or truncated: already reported, nothing to run
            try:
                y = shards.ffn(e.layer, e.expert, x)
            except MerError as exc:
                report.problems.append(Problem(e.path, f"runtime could not load it: {exc}"))
                continue
            probs: list[Problem] = []
            w = _source_reference(src, e, probs) if src else _shard_reference(m, e)
            report.problems.extend(probs)
            ref = reference_ffn(w, x, activation)
            scale = float(np.abs(ref).max()) or 1.0
            err = float(np.abs(y.astype(np.float64) - ref).max() / scale)
            results.append({"layer": e.layer, "expert": e.expert, "max_rel_err": err})
            if not err <= tolerance:
                report.problems.append(Problem(
                    e.path, f"output differs from the {'source' if src else 'shard'} reference: max relative error "
                            f"{err:.3g} > {tolerance:g}"))
        io_desc = shards.describe_io()
    report.deep = {
        "reference": f"source {against}" if src else "shard bytes (gguf dequantize)",
        "tolerance": tolerance,
        "seed": seed,
        "inputs": int(x.shape[0]),
        "io": io_desc,
        "experts_run": len(results),
        "worst_rel_err": max((r["max_rel_err"] for r in results), default=0.0),
        "seconds": round(time.perf_counter() - t0, 3),
        "per_expert": results,
    }
