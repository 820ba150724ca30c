"""dense.gguf for a SafeTensors source: every non-expert tensor under its Hugging Face name, plus the config.

Hugging Face names are kept (no mapping table to keep in step with llama.cpp's); they can exceed the 64 bytes
llama.cpp allows in a tensor name, which does not matter: dense.gguf is read by the gguf package, not run by
llama.cpp. Types: F32/F16/BF16/F64/I8/I16/I32/I64 as stored; unsigned and bool tensors as the signed integer type
of the same width (bits unchanged); FP8 weights widened to BF16 with their weight_scale_inv applied.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import quantize

from mer_runtime.checksum import hash_file

from .. import __version__

if TYPE_CHECKING:
    from .safetensors import SafeTensorsSource, STTensor

_SAME_WIDTH = {"U8": "I8", "BOOL": "I8", "U16": "I16", "U32": "I32", "U64": "I64", "F8_E5M2": "I8",
               "F8_E8M0": "I8"}


def _gguf_type(t: "STTensor") -> T:
    from .safetensors import DTYPES

    g = DTYPES[t.dtype][2] or _SAME_WIDTH.get(t.dtype)
    return T.BF16 if t.dtype == "F8_E4M3" else T[g]


def write_dense(src: "SafeTensorsSource", path: Path, *, fsync: bool, tick: Callable[[int], None]) -> dict[str, Any]:
    """Write dense.gguf for `src` at `path`; returns the manifest's `dense` entry."""
    from .safetensors import FP8_BLOCK, to_float32

    w = gguf.GGUFWriter(path, src.arch)
    w.add_string("general.name", str(src.model.get("name") or src.model_type))
    w.add_string("mertools.experts_removed_from", src.files[0].name if src.files else "")
    w.add_string("mertools.source_format", "safetensors")
    w.add_string("mertools.hf_model_type", src.model_type)
    w.add_string("mertools.hf_config", json.dumps(src.config, sort_keys=True))
    w.add_string("mertools.created_by", f"mertools {__version__}")
    tensors = src.dense_tensors()
    for t in tensors:
        g = _gguf_type(t)
        shape = t.shape or (1,)
        nb = int(np.prod(shape)) * (2 if g == T.BF16 else int(np.dtype(_np_of(g)).itemsize))
        w.add_tensor_info(t.name, shape, np.dtype(_np_of(g)), nb, raw_dtype=g)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in tensors:
        raw = src._array(src.view, t)
        if t.dtype == "F8_E4M3":
            vals = to_float32(raw, t.dtype)
            s_t = src.tensors.get(t.name + "_scale_inv")
            if s_t is not None:
                s = to_float32(src._array(src.view, s_t), s_t.dtype)
                idx = [np.arange(n) // FP8_BLOCK for n in vals.shape]
                vals = vals * s[np.ix_(*idx)] if vals.ndim == 2 else vals * s.reshape(-1)[0]
            data = quantize(vals.astype(np.float32), T.BF16).view(np.uint16)
        else:
            data = raw.view(_np_of(_gguf_type(t)))
        w.write_tensor_data(np.ascontiguousarray(data).reshape(t.shape or (1,)))
        tick(t.nbytes)
    assert w.fout is not None
    for fout in w.fout:
        fout.flush()
        if fsync:
            os.fsync(fout.fileno())
    w.close()
    digest, _, _ = hash_file(path)
    return {
        "path": path.name,
        "format": "gguf",
        "size": path.stat().st_size,
        "xxh3_64": digest,
        "n_tensors": len(tensors),
        "n_kv": 6,
        "tensor_names": "huggingface",
    }


def _np_of(g: T) -> Any:
    return {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16, T.F64: np.float64, T.I8: np.int8,
            T.I16: np.int16, T.I32: np.int32, T.I64: np.int64}[g]
