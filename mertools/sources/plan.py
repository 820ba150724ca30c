"""What every source hands the writer: per expert, per projection, where the bytes come from.

A projection is either a plain byte range of a source file (``produce is None``: the writer copies
``nbytes`` bytes at ``offset`` of ``files[file_index]``), or a transform that yields the projection's bytes in row
bands (``produce(view_of)``, where ``view_of(i)`` is a read-only memoryview of source file ``i``). ``decode``, where
the source type is a float one, gives the float32 values of rows ``[r0, r1)`` of the ``[out, in]`` matrix, which
``with_dtype`` quantizes for ``--dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape, quantize

from mer_runtime.kernels import DTYPES as _KERNEL_TYPES

from ..errors import SourceError

ViewOf = Callable[[int], memoryview]
Produce = Callable[[ViewOf], Iterator[np.ndarray]]
Decode = Callable[[ViewOf, int, int], np.ndarray]

# Output types the runtime computes with (kernels.py): anything else must be converted with --dtype. Asked of the
# runtime itself: ggml's integer types, F64, Q8_1, Q8_K and Q1_0 are ggml types it knows but cannot compute with
# (an I32 expert used to be extracted, and then refused by every load).
RUNTIME_TYPES = {t for t, info in _KERNEL_TYPES.items() if info.path != "unsupported"}
DTYPE_CHOICES = ("q4_0", "q8_0", "f16", "bf16")
NOT_EXTRACTABLE = ("a type the runtime cannot compute with and --dtype cannot convert (only float sources, "
                   "BF16/F16/F32/FP8, and MXFP4 can be converted): the experts of this model cannot be extracted, "
                   "with or without --dtype")
BAND_BYTES = 16 << 20  # float32 bytes per quantization band: memory stays flat whatever the matrix size


@dataclass(frozen=True)
class Projection:
    """One role of one expert. ``shape`` is ``[out, in]`` (``[n]`` for a bias), in the output type ``dtype``."""

    role: str
    dtype: str
    shape: tuple[int, ...]
    file_index: int
    offset: int  # absolute offset in files[file_index] (the first byte the projection reads)
    nbytes: int  # bytes written to the shard
    tensor: str  # the source tensor and slice, for the manifest's `source`
    transform: str = "none"
    files: tuple[int, ...] = ()  # every source file the bytes come from (file_index included)
    # (file index, start, stop): the source bytes a transform reads, when not offset..offset+nbytes of file_index
    # (deep verify drops them from its mappings once the transform has run)
    spans: tuple[tuple[int, int, int], ...] = field(default=(), compare=False, repr=False)
    produce: Produce | None = field(default=None, compare=False, repr=False)
    decode: Decode | None = field(default=None, compare=False, repr=False)

    @property
    def file_indices(self) -> tuple[int, ...]:
        return self.files or (self.file_index,)

    @property
    def source_spans(self) -> tuple[tuple[int, int, int], ...]:
        """(file index, start, stop) of every source byte the projection's bytes are made from."""
        return self.spans or ((self.file_index, self.offset, self.offset + self.nbytes),)


@dataclass
class ExpertPlan:
    layer: int
    expert: int
    projections: list[Projection]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.projections)

    @property
    def file_indices(self) -> set[int]:
        """Source files this expert's bytes come from (for converting a subset while others are absent)."""
        return {i for p in self.projections for i in p.file_indices}


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    return int(np.prod(quant_shape_to_byte_shape(tuple(shape), GGMLQuantizationType[dtype])))


def quantized(p: Projection, dtype: str, where: str = "") -> Projection:
    """The projection converted to `dtype` (a gguf type name) by gguf's quantizer, a band of rows at a time."""
    qt = GGMLQuantizationType[dtype]
    if p.decode is None:
        if p.dtype not in RUNTIME_TYPES:  # no way out: advising to drop --dtype would send the user in a circle
            raise SourceError(f"{where}{p.tensor}: is {p.dtype}, {NOT_EXTRACTABLE}")
        raise SourceError(
            f"{where}{p.tensor}: is {p.dtype}, which --dtype cannot convert (only float sources, BF16/F16/F32/FP8, and "
            "MXFP4 can be converted); drop --dtype to copy it as it is"
        )
    rows, cols = p.shape
    try:
        nbytes = nbytes_of(dtype, p.shape)
    except Exception:
        raise SourceError(
            f"{where}{p.tensor}: rows of {cols} elements cannot be stored as {dtype} (its block is "
            f"{GGML_QUANT_SIZES[qt][0]} elements); choose "
            "--dtype f16 or bf16"
        ) from None
    step = max(1, BAND_BYTES // (cols * 4))
    decode = p.decode

    def produce(view_of: ViewOf) -> Iterator[np.ndarray]:
        for r0 in range(0, rows, step):
            band = np.ascontiguousarray(decode(view_of, r0, min(rows, r0 + step)), dtype=np.float32)
            with np.errstate(invalid="ignore", over="ignore"):  # a source's NaN/inf: quantized as gguf does, quietly
                q = quantize(band, qt)
            _check_range(band, q, qt, r0, f"{where}{p.tensor}", dtype)
            yield q.reshape(-1)

    steps = "quantize" if p.transform == "none" else f"{p.transform}+quantize"
    return replace(p, dtype=dtype, nbytes=nbytes, transform=steps, produce=produce, spans=p.source_spans)


def _check_range(band: np.ndarray, q: np.ndarray, qt: GGMLQuantizationType, r0: int, what: str, dtype: str) -> None:
    """Refuse a block of finite values that came out non-finite: a value beyond F16 (65504), or a block whose F16
    scale (Q8_0: its largest value / 127, Q4_0: / 8) is, becomes inf, and a Q4_0/Q8_0 block's other values NaN.
    Every type --dtype writes starts each block with its 2-byte scale (or value): F16, BF16 or the blocks' d."""
    elems, size = GGML_QUANT_SIZES[qt]
    first = np.ascontiguousarray(q.reshape(-1, size)[:, :2]).view(np.uint16).reshape(-1)
    d = (first.astype(np.uint32) << 16).view(np.float32) if qt == GGMLQuantizationType.BF16 else first.view(np.float16)
    bad = ~np.isfinite(d) & np.isfinite(band.reshape(-1, elems)).all(axis=1)
    if bad.any():
        block = int(np.argmax(bad))
        row = r0 + block * elems // band.shape[1]
        peak = float(np.abs(band.reshape(-1, elems)[block]).max())
        raise SourceError(f"{what}: row {row} holds {peak:.4g}, more than {dtype.upper()} can store (its 16-bit "
                          "float scale or value overflows: the block would come out inf/NaN); "
                          + ("drop --dtype to keep the source's type" if qt == GGMLQuantizationType.BF16
                             else "choose --dtype bf16"))


def with_dtype(plans: list[ExpertPlan], dtype: str | None, where: str = "") -> list[ExpertPlan]:
    """Plans whose weights come out as `dtype` (``q4_0``, ``q8_0``, ``f16``, ``bf16``; None keeps the source type).

    Biases keep their source type. A source type the runtime cannot compute with (FP8) needs a `dtype`. `where`
    prefixes error messages (the source's path and ": ").

    >>> with_dtype(src.experts, "q4_0")   # doctest: +SKIP
    """
    if dtype is not None and dtype.lower() not in DTYPE_CHOICES:
        raise SourceError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    target = dtype.upper() if dtype else None
    out = []
    for plan in plans:
        projs = []
        for p in plan.projections:
            if p.role.endswith(("_bias", "_scale")) or target is None or (p.dtype == target and p.produce is None):
                if p.dtype not in RUNTIME_TYPES and p.decode is None:
                    raise SourceError(f"{where}{p.tensor}: is {p.dtype}, {NOT_EXTRACTABLE}")
                if p.dtype not in RUNTIME_TYPES:
                    raise SourceError(
                        f"{where}{p.tensor}: is {p.dtype}, a type the runtime cannot compute with; convert it during "
                        "extraction: --dtype bf16 (the FP8 values times their block scales, rounded to BF16) or "
                        "--dtype q8_0 / q4_0"
                    )
                projs.append(p)
            elif p.dtype == target and p.transform != "none":
                projs.append(p)  # already produced in the asked type by its own transform
            else:
                projs.append(quantized(p, target, where))
        out.append(ExpertPlan(plan.layer, plan.expert, projs))
    return out


def check_gated_shapes(path: Any, layer: int, plans: list[ExpertPlan]) -> None:
    """Every expert of a layer is a gated FFN: gate/up [d_ff, d_model], down [d_model, d_ff], biases to match,
    output scales one value each. The one shape rule of every source (GGUF and SafeTensors)."""
    for p in plans:
        s = {q.role: q.shape for q in p.projections}
        f_, h = s["gate"]
        ok = s["up"] == (f_, h) and s["down"] == (h, f_)
        ok = ok and s.get("gate_bias", (f_,)) == (f_,) and s.get("up_bias", (f_,)) == (f_,)
        ok = ok and s.get("down_bias", (h,)) == (h,)
        ok = ok and all(s.get(f"{r}_scale", (1,)) == (1,) for r in ("gate", "up", "down"))
        if not ok:
            shapes = ", ".join(f"{r} {list(v)}" for r, v in s.items())
            raise SourceError(f"{path}: layer {layer} expert {p.expert}: projection shapes do not fit a gated FFN "
                              f"({shapes}); expected gate/up [d_ff, d_model] and down [d_model, d_ff]")
