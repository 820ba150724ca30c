"""Scales checked by value before anything is written: a NaN or infinite one is refused up front.

Two kinds of scale multiply whole stretches of a model's weights, and one non-finite value there makes every output
it touches NaN or infinite (a folder made from it fails ``verify --deep``, `deep.scale_problems`):

- per-expert output scales, carried as ``*_scale`` roles (GGUF's ``blk.N.ffn_{gate,up,down}_exps.scale``, one F32/
  F16/BF16 value per expert);
- block scales a source applies while converting (SafeTensors FP8's ``weight_scale_inv``, one value per 128 x 128
  block), which the source lists with ``scale_tensors()``.

Both are small (one value per expert; 1/16384 of an FP8 weight's values), so all are read. Quantized blocks' own
scales (GGUF's Q4_0/Q8_0/K-quant ``d``/``dmin``, MXFP4's E8M0 exponents) are not: they are the weights themselves,
copied byte for byte, and checking them would cost a read of the whole model.

>>> check_scales(open_source("scaled.gguf"), plan(src).plans)     # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from mer_runtime.manifest import SCALE_ROLES

from ..errors import SourceError
from .safetensors import DTYPES, to_float32

_ADVICE = ("the model itself is damaged there: download the file again or fix that tensor at its origin; nothing "
           "was written")


def _floats(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian F32/F16/BF16 bytes as float32 (the SafeTensors reader's conversion; GGUF names these alike)."""
    if dtype not in ("F32", "F16", "BF16"):
        raise SourceError(f"a scale of type {dtype}; only F32, F16 and BF16 are known")
    return to_float32(raw.view(np.dtype(DTYPES[dtype][1]).newbyteorder("<")), dtype)


def _first_bad(values: np.ndarray) -> int | None:
    bad = np.flatnonzero(~np.isfinite(values))
    return int(bad[0]) if bad.size else None


def _raw(src: Any, file_index: int, offset: int, nbytes: int) -> np.ndarray:
    return np.frombuffer(src.view(file_index), np.uint8, count=nbytes, offset=offset)


def check_scales(src: Any, plans: Iterable[Any], files: set[int] | None = None) -> None:
    """Raise one SourceError (file, tensor, value, what to do) for the first NaN or infinite scale: the per-expert
    ``*_scale`` projections of `plans` (the experts to be written) and every block scale `src.scale_tensors()`
    lists (all of them: they also cover the dense part, which is always written). `files`: only the scales held by
    those source files (a pull checks each shard as it arrives, before anything is converted from it)."""
    for plan in plans:
        for p in plan.projections:
            if p.role not in SCALE_ROLES or files is not None and p.file_index not in files:
                continue
            values = _floats(_raw(src, p.file_index, p.offset, p.nbytes), p.dtype)
            i = _first_bad(values)
            if i is not None:
                base = p.role.removesuffix("_scale")
                raise SourceError(f"{src.files[p.file_index]}: tensor {p.tensor} (layer {plan.layer}, expert "
                                  f"{plan.expert}) is {values[i]}, a per-expert scale of the {base} projection "
                                  f"({p.dtype}): every output of that projection would be NaN or infinite (and `mertools verify --deep` "
                                  f"would fail the folder); {_ADVICE}")
    lister = getattr(src, "scale_tensors", None)
    for s, weight in (lister() if lister is not None else ()):
        if files is not None and s.file_index not in files:
            continue
        values = _floats(_raw(src, s.file_index, s.offset, s.nbytes), s.dtype)
        i = _first_bad(values)
        if i is not None:
            where = list(np.unravel_index(i, s.shape)) if s.shape else [i]
            raise SourceError(f"{src.files[s.file_index]}: tensor {s.name!r} ({s.dtype} {list(s.shape)}) holds "
                              f"{values[i]} at {[int(w) for w in where]}, the block scale of {weight!r}: the weights "
                              f"it scales would be NaN or infinite; {_ADVICE}")
