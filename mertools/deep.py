"""``verify --deep``: run every expert through the runtime and compare with an independent float64 reference.

With `--against SRC` the expert's tensors are found in the source by name with the gguf package's reader (not
through the converter's plan) and every projection's bytes are compared with the shard's, exactly, in bands (this
alone catches any changed byte, checksums rewritten or not); the float64 reference is the gguf package's
dequantization of the source bytes. Without `--against` the reference is the dequantization of the shard bytes as a
plain read of the file sees them: it still checks the runtime's loaders and kernels.

Numbers, with memory bounded: references are dequantized in bands of rows (`BAND_BYTES` of float64 at a time), never
a whole matrix. The whole output is compared for the first `FULL_EXPERTS` experts and for every expert whose
projections are small (`FULL_BELOW` bytes); for the others, `SAMPLE_ROWS` seeded rows of gate and up (the runtime's
kernel against the reference's rows) and of the expert's output (the runtime's whole path against the reference's
down rows applied to the runtime's activations) are compared, so every kernel is still checked on every expert
while the reference costs a few rows.

Tolerance: max|y - y_ref| / max|y_ref| <= 1e-4. The runtime computes in float32 (weights exact, activations not
quantized), whose rounding over a few thousand-term dot products stays near 1e-6; one changed weight byte moves
the output by far more on the seeded inputs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import mmap

import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from mer_runtime.errors import MerError
from mer_runtime.kernels import matvec
from mer_runtime.manifest import ExpertEntry, Manifest
from mer_runtime.safeopen import open_regular
from mer_runtime.shards import open_shards

from .errors import SourceError
from .gguf_source import _open_reader, split_parts
from .report import Problem, VerifyReport

TOLERANCE = 1e-4
SEED = 12648430
N_INPUTS = 2
BAND_BYTES = 16 << 20  # float64 weights dequantized at a time for a reference, and bytes compared at a time
SAMPLE_ROWS = 32
FULL_EXPERTS = 2
FULL_BELOW = 8 << 20
NUMERIC_ROLES = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias", "gate_scale", "up_scale", "down_scale")


def seeded_inputs(d_model: int, seed: int = SEED, n: int = N_INPUTS) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d_model)).astype(np.float32)


class SourceReference:
    """Expert tensors of the source model, for ``--against``.

    A GGUF is read by tensor name with the gguf package's reader (not through the converter's plan). Any other
    source (a SafeTensors checkpoint, or what a registered ``scheme://`` opener returns) goes through the
    ``Source`` protocol: the projection's bytes are the source slice after its documented transform, converted to
    the type the manifest records (``--dtype``) with the same quantizer; the transforms themselves are checked
    against independent NumPy slicing in the tests.
    """

    def __init__(self, path: str | os.PathLike[str], manifest: Manifest | None = None):
        self.path = Path(path)
        self.source = None
        dtype = (manifest.source or {}).get("dtype") if manifest is not None else None
        # a GGUF is read by name, independently of the converter's plan, unless the folder was converted with
        # --dtype: then the reference bytes are the source's after the same quantizer, as for any other source
        if "://" not in os.fspath(path) and not self.path.is_dir() and not dtype:
            try:
                self.tensors = {t.name: t for p in split_parts(self.path) for t in _open_reader(p).tensors}
            except (ValueError, OSError) as exc:
                raise SourceError(f"{self.path}: cannot read the reference model ({exc})") from None
            return
        from .sources import open_source, with_dtype

        self.source = open_source(path)
        self._plans = {(p.layer, p.expert): p for p in with_dtype(self.source.experts, dtype)}

    def close(self) -> None:
        if self.source is not None:
            self.source.close()

    def tensor(self, layer: int, expert: int, role: str) -> tuple[str, np.ndarray]:
        """(type name, the expert's slice as the reader holds it) for role gate/up/down[_bias|_scale]."""
        if self.source is not None:
            return self._from_source(layer, expert, role)
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

    def _from_source(self, layer: int, expert: int, role: str) -> tuple[str, np.ndarray]:
        plan = self._plans.get((layer, expert))
        proj = next((q for q in plan.projections if q.role == role), None) if plan else None
        if proj is None:
            raise SourceError(f"{self.path}: no tensor for layer {layer} expert {expert} {role}; is this the model "
                              "the folder was extracted from?")
        view_of = self.source.view
        if proj.produce is None:
            raw = np.frombuffer(view_of(proj.file_index), np.uint8, count=proj.nbytes, offset=proj.offset)
        else:
            raw = np.concatenate([np.asarray(b, np.uint8).reshape(-1) for b in proj.produce(view_of)])
        return proj.dtype, raw


def _act64(g: np.ndarray, u: np.ndarray, activation: dict[str, Any]) -> np.ndarray:
    kind = activation.get("kind", "swiglu")
    with np.errstate(over="ignore"):
        if kind == "swiglu":
            return g / (1.0 + np.exp(-g)) * u
        if kind == "swiglu_oai":
            limit, alpha = float(activation.get("limit", 7.0)), float(activation.get("alpha", 1.702))
            g = np.minimum(g, limit)
            u = np.clip(u, -limit, limit)
            return (u + 1.0) * g / (1.0 + np.exp(-alpha * g))
    raise MerError(f"activation {kind!r} has no float64 reference here")


def reference_ffn64(w: dict[str, np.ndarray], x: np.ndarray, activation: dict[str, Any]) -> np.ndarray:
    """float64 expert output written from the model definitions, sharing no code with the runtime's kernels.

    swiglu (Mixtral, Qwen, DeepSeek): down @ (silu(gate @ x) * (up @ x)), silu(v) = v / (1 + e^-v).
    swiglu_oai (GPT-OSS): g = min(gate @ x + b_g, limit), u = clip(up @ x + b_u, -limit, limit),
    down @ ((u + 1) * g * sigmoid(alpha * g)) + b_d, alpha 1.702 and limit 7.0 unless the manifest says otherwise.

    >>> eye = np.eye(2)
    >>> reference_ffn64({"gate": eye, "up": eye, "down": eye}, np.array([[0.0, 1.0]]), {"kind": "swiglu"})
    array([[0.        , 0.73105858]])
    """
    x = np.asarray(x, np.float64)
    g = x @ w["gate"].T + w.get("gate_bias", 0.0)
    u = x @ w["up"].T + w.get("up_bias", 0.0)
    return _act64(g, u, activation) @ w["down"].T + w.get("down_bias", 0.0)


class _Tensor:
    """A projection's raw bytes as rows ([rows, row_bytes] uint8, no copy), its type and shape."""

    def __init__(self, dtype: str, shape: tuple[int, ...], raw: np.ndarray):
        self.dtype, self.shape = dtype, tuple(shape)
        self.qt = GGMLQuantizationType[dtype]
        rows = shape[0] if len(shape) == 2 else 1
        self.raw = np.asarray(raw).view(np.uint8).reshape(rows, -1)

    def values(self) -> np.ndarray:
        """All values in float64 (for biases and small matrices)."""
        return dequantize(np.ascontiguousarray(self.raw), self.qt).astype(np.float64).reshape(self.shape)

    def rows_times(self, v: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """float64 W[rows] @ v for v [n, cols] -> [n, len(rows)], dequantizing BAND_BYTES of float64 at a time."""
        idx = np.arange(self.raw.shape[0]) if rows is None else rows
        step = max(1, BAND_BYTES // (self.shape[-1] * 8))
        out = np.empty((v.shape[0], len(idx)))
        for i in range(0, len(idx), step):
            band = self.raw[i:i + step] if rows is None else self.raw[idx[i:i + step]]
            w = dequantize(np.ascontiguousarray(band), self.qt).astype(np.float64)
            out[:, i:i + step] = v @ w.T
        return out


def _shard_tensors(blob: np.ndarray, e: ExpertEntry) -> dict[str, _Tensor]:
    return {r: _Tensor(t.dtype, t.shape, blob[t.offset:t.offset + t.nbytes]) for r, t in e.tensors.items()
            if r in NUMERIC_ROLES}


def _source_tensors(src: SourceReference, e: ExpertEntry, shard: np.ndarray,
                    problems: list[Problem]) -> dict[str, _Tensor]:
    """The source's tensors for this expert; every projection's bytes compared with the shard's, band by band."""
    out = {}
    for role, t in e.tensors.items():
        if role not in NUMERIC_ROLES:
            continue
        dtype, data = src.tensor(e.layer, e.expert, role)
        if dtype != t.dtype:
            problems.append(Problem(e.path, f"{role} is {t.dtype} but the source has {dtype}"))
            continue
        ref = _Tensor(dtype, t.shape, data)
        flat, mine = ref.raw.reshape(-1), shard[t.offset:t.offset + t.nbytes]
        if flat.size != mine.size:
            problems.append(Problem(e.path, f"{role}: {mine.size} bytes but the source has {flat.size}"))
            continue
        for i in range(0, flat.size, BAND_BYTES):
            diff = np.flatnonzero(flat[i:i + BAND_BYTES] != mine[i:i + BAND_BYTES])
            if diff.size:
                problems.append(Problem(e.path, f"{role}: byte {i + int(diff[0])} of {flat.size} does not match the "
                                                "source bytes"))
                break
        out[role] = ref
    return out


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    scale = float(np.abs(want).max()) or 1.0
    return float(np.abs(np.asarray(got, np.float64) - want).max() / scale)


def _bias(w: dict[str, _Tensor], role: str, rows: np.ndarray | None = None) -> np.ndarray | float:
    if f"{role}_bias" not in w:
        return 0.0
    b = w[f"{role}_bias"].values()
    return b if rows is None else b[rows]


def _scale(w: dict[str, _Tensor], role: str) -> float:
    """The per-expert output scale of a projection (format_version 2; 1 without one), applied before the bias."""
    return float(w[f"{role}_scale"].values().reshape(-1)[0]) if f"{role}_scale" in w else 1.0


def check_numbers(w: dict[str, _Tensor], ex: Any, x: np.ndarray, activation: dict[str, Any], y: np.ndarray,
                  full: bool, rng: np.random.Generator) -> float:
    """Max relative error of the runtime against the float64 reference for one expert (see the module docstring).

    `ex` is the runtime's loaded expert (its kernels run on the bytes the runtime read), `y` its output for x.
    """
    x64 = x.astype(np.float64)
    if full:
        g = w["gate"].rows_times(x64) * _scale(w, "gate") + _bias(w, "gate")
        u = w["up"].rows_times(x64) * _scale(w, "up") + _bias(w, "up")
        ref = w["down"].rows_times(_act64(g, u, activation)) * _scale(w, "down") + _bias(w, "down")
        return _rel(y, ref)
    width, d_model = w["gate"].shape[0], w["down"].shape[0]

    def sample(n: int) -> np.ndarray:
        return np.unique(np.concatenate([[0, n - 1], rng.choice(n, min(n, SAMPLE_ROWS), replace=False)]))

    rows_ff, rows_d = sample(width), sample(d_model)
    errs, act = [], {}
    for role in ("gate", "up"):
        p = ex.tensors[role]
        got = matvec(p.dtype, p.raw, p.shape, x).astype(np.float64) * _scale(w, role) + _bias(w, role)  # runtime's
        errs.append(_rel(got[:, rows_ff], w[role].rows_times(x64, rows_ff) * _scale(w, role) + _bias(w, role, rows_ff)))
        act[role] = got
    h = _act64(act["gate"], act["up"], activation)
    errs.append(_rel(y[:, rows_d], w["down"].rows_times(h, rows_d) * _scale(w, "down") + _bias(w, "down", rows_d)))
    return max(errs)


def _map_shard(m: Manifest, e: ExpertEntry) -> np.ndarray:
    """The shard file as a plain read-only mapping (not through the runtime's loaders), safely opened."""
    fd, st = open_regular(m.path_of(e))
    try:
        if st.st_size != e.size:
            raise MerError(f"{m.path_of(e)}: {st.st_size} bytes, manifest says {e.size}")
        mm = mmap.mmap(fd, e.size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return np.frombuffer(mm, np.uint8)


def deep_verify(report: VerifyReport, m: Manifest, *, against: str | os.PathLike[str] | None = None,
                io: str = "auto", seed: int = SEED, tolerance: float = TOLERANCE, full_experts: int = FULL_EXPERTS,
                full_below: int = FULL_BELOW,
                progress: Callable[[int, int], Callable[[int], None]] | None = None) -> None:
    """Add per-expert numeric results (and any problems) to a shallow verify report.

    Experts the shallow pass found damaged are not run. `full_experts` / `full_below`: which experts get their whole
    output compared (the rest: sampled rows), see the module docstring.

    >>> deep_verify(report, m, against="model.gguf")                   # doctest: +SKIP
    """
    t0 = time.perf_counter()
    src = SourceReference(against, m) if against else None
    x = seeded_inputs(m.model["d_model"], seed)
    activation = m.model.get("activation", {"kind": "swiglu"})
    tick = progress(len(m.experts), len(m.experts)) if progress else (lambda n: None)
    broken = {p.path for p in report.problems}
    results: list[dict[str, Any]] = []
    healthy = [e for e in m.experts if e.path not in broken]  # a damaged expert is reported, never run
    io_desc = "not opened"
    try:
        shards = open_shards(m.root, io=io, cache_slots=2, checksums="never") if healthy else None
    except MerError as exc:
        report.problems.append(Problem(".", f"the runtime cannot open the folder: {exc}"))
        shards = None
    rng = np.random.default_rng(seed)
    n_full = 0
    try:
        for e in healthy if shards else []:
            tick(1)
            probs: list[Problem] = []
            full = n_full < full_experts or sum(t.nbytes for t in e.tensors.values()) <= full_below
            try:
                # the mapping is unmapped when its last view goes, at the end of this iteration (no copy is held)
                blob = _map_shard(m, e)
                w = _source_tensors(src, e, blob, probs) if src else _shard_tensors(blob, e)
                report.problems.extend(probs)
                if any(r not in w for r in e.tensors if r in NUMERIC_ROLES):
                    continue  # a type or size differs from the source's: reported, and there is nothing to compare
                with shards.load(e.layer, e.expert) as ex:
                    y = shards.compute(ex, x)
                    err = check_numbers(w, ex, x, activation, y, full, rng)
            except SourceError:
                raise
            except MerError as exc:
                report.problems.append(Problem(e.path, f"runtime could not load it: {exc}"))
                continue
            n_full += full
            results.append({"layer": e.layer, "expert": e.expert, "max_rel_err": err,
                            "checked": "whole output" if full else f"{SAMPLE_ROWS} sampled rows"})
            if not err <= tolerance:
                report.problems.append(Problem(
                    e.path, f"output differs from the {'source' if src else 'shard'} reference: max relative error "
                            f"{err:.3g} > {tolerance:g}"))
    finally:
        w = blob = None  # views into the source's maps: gone before the maps are closed
        if shards is not None:
            io_desc = shards.describe_io()
            shards.close()
        if src is not None:
            src.close()
    report.deep = {
        "reference": f"source {against}" if src else "shard bytes (gguf dequantize)",
        "tolerance": tolerance,
        "seed": seed,
        "inputs": int(x.shape[0]),
        "io": io_desc,
        "experts_run": len(results),
        "experts_whole_output": n_full,
        "worst_rel_err": max((r["max_rel_err"] for r in results), default=0.0),
        "seconds": round(time.perf_counter() - t0, 3),
        "per_expert": results,
    }
