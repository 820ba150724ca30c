"""Expert FFN kernels working on the raw projection bytes: y = down(act(gate x, up x)).

- Q4_0 and Q8_0: a small C kernel (`_kernels.c`, AVX2/FMA/F16C when the CPU has it) that walks the raw 18- or
  34-byte blocks row by row, never building a float32 matrix; activations stay float32 (not quantized), so results
  are exact up to float32 rounding. Rows are split across threads (ctypes releases the GIL).
- F16, BF16, F32: NumPy on the stored values (F16/BF16 widened to float32 a band of rows at a time).
- Every other type the gguf package can dequantize, and Q4_0/Q8_0 when the C kernel was not built: gguf's
  dequantization on bands of rows (correct, slower; `mertools inspect` says which path each type takes).

`reference_ffn` is the float64 NumPy oracle used by tests and `verify --deep`; it shares nothing with the fast path
but the gguf package's dequantization.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

BAND_BYTES = 4 << 20  # rows widened or dequantized at a time for the non-block paths
PARALLEL_MIN_WEIGHTS = 1 << 20  # below this a matrix is done on one thread: handing out work costs more


def _load_native() -> ctypes.CDLL | None:
    if os.environ.get("MER_KERNELS") == "numpy":
        return None
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        lib_path = here / f"_kernels{suffix}"
        if lib_path.exists():
            lib = ctypes.CDLL(str(lib_path))
            args = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                    ctypes.c_int64, ctypes.c_int]
            for fn in (lib.mer_q4_0_rows, lib.mer_q8_0_rows):
                fn.argtypes, fn.restype = args, None
            lib.mer_has_avx2.restype = ctypes.c_int
            return lib
    return None


_LIB = _load_native()
SIMD = bool(_LIB and _LIB.mer_has_avx2())
THREADS = max(1, int(os.environ.get("MER_THREADS", 0)) or os.cpu_count() or 1)
_POOL: ThreadPoolExecutor | None = None


def _native_name(dtype: str) -> str:
    return f"{dtype.lower()} block kernel (C, {'AVX2' if SIMD else 'portable'}, {THREADS} threads)"


def kernel_for(dtype: str) -> str:
    if dtype in ("Q4_0", "Q8_0") and _LIB is not None:
        return _native_name(dtype)
    if dtype in ("F16", "BF16"):
        return f"numpy ({dtype.lower()} widened per band)"
    if dtype == "F32":
        return "numpy"
    try:
        GGMLQuantizationType[dtype]
    except KeyError:
        return "unsupported"
    return "gguf dequantize per band (slower)"


def _native_matvec(fn: Any, raw: np.ndarray, x: np.ndarray, out: np.ndarray, rows: int, cols: int,
                   simd: int = -1) -> np.ndarray:
    global _POOL
    raw = np.ascontiguousarray(raw)
    args = (raw.ctypes.data, x.ctypes.data, out.ctypes.data, cols)
    n = THREADS if rows * cols >= PARALLEL_MIN_WEIGHTS else 1
    if n == 1:
        fn(*args, 0, rows, simd)
        return out
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="mer-kernel")
    bounds = np.linspace(0, rows, n + 1).astype(np.int64)
    list(_POOL.map(lambda i: fn(*args, int(bounds[i]), int(bounds[i + 1]), simd), range(n)))
    return out


def matvec(dtype: str, raw: np.ndarray, shape: tuple[int, int], x: np.ndarray, *, simd: int = -1) -> np.ndarray:
    """W @ x for W given as raw bytes of type `dtype` and shape [rows, cols]; x float32 [cols] or [n, cols].

    simd=0 forces the portable C path of the block kernels (for tests); -1 takes the best the CPU has.
    """
    rows, cols = shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 2:
        if not len(x):
            return np.zeros((0, rows), np.float32)
        return np.stack([matvec(dtype, raw, shape, xi, simd=simd) for xi in x])
    if x.shape != (cols,):
        raise ValueError(f"input has {x.shape[0]} features, the projection takes {cols}")
    out = np.empty(rows, np.float32)
    if dtype == "Q4_0" and _LIB is not None:
        return _native_matvec(_LIB.mer_q4_0_rows, raw, x, out, rows, cols, simd)
    if dtype == "Q8_0" and _LIB is not None:
        return _native_matvec(_LIB.mer_q8_0_rows, raw, x, out, rows, cols, simd)
    if dtype == "F32":
        return raw.view(np.float32).reshape(rows, cols) @ x
    block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
    row_bytes = cols // block * tsize
    mat = raw.reshape(rows, row_bytes)
    step = max(1, BAND_BYTES // (cols * 4))
    for r0 in range(0, rows, step):
        band = mat[r0:r0 + step]
        if dtype == "F16":
            w = band.view(np.float16).astype(np.float32)
        elif dtype == "BF16":
            w = (band.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            w = dequantize(band, GGMLQuantizationType[dtype]).astype(np.float32, copy=False)
        out[r0:r0 + step] = w @ x
    return out


def _silu(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return v / (1.0 + np.exp(-v))


def _sigmoid(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-v))


def activate(g: np.ndarray, u: np.ndarray, activation: dict[str, Any]) -> np.ndarray:
    kind = activation.get("kind", "swiglu")
    if kind == "swiglu":
        return _silu(g) * u
    if kind == "swiglu_oai":  # GPT-OSS: clamp, then (u + 1) * g * sigmoid(alpha g)
        limit, alpha = activation.get("limit", 7.0), activation.get("alpha", 1.702)
        g = np.minimum(g, limit)
        u = np.clip(u, -limit, limit)
        return (u + 1) * g * _sigmoid(alpha * g)
    raise ValueError(f"activation {kind!r} is not supported by this runtime")


def expert_ffn(tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]], x: np.ndarray,
               activation: dict[str, Any]) -> np.ndarray:
    """tensors: role -> (dtype, shape, raw bytes). x float32 [d_model] or [n, d_model]; returns float32 alike."""
    def proj(role: str, v: np.ndarray) -> np.ndarray:
        dtype, shape, raw = tensors[role]
        y = matvec(dtype, raw, shape, v)
        if f"{role}_scale" in tensors:  # per-expert output scale (format_version 2), applied before the bias
            y = y * np.float32(dequantize_tensor(*tensors[f"{role}_scale"]).reshape(-1)[0])
        if f"{role}_bias" in tensors:
            y = y + dequantize_tensor(*tensors[f"{role}_bias"]).astype(np.float32)
        return y

    g, u = proj("gate", x), proj("up", x)
    h = activate(g, u, activation).astype(np.float32, copy=False)
    return proj("down", h).astype(np.float32, copy=False)


def reference_ffn(weights: dict[str, np.ndarray], x: np.ndarray, activation: dict[str, Any]) -> np.ndarray:
    """float64 oracle: weights are role -> float64 arrays ([out, in] matrices, [n] biases, [1] scales)."""
    x = np.asarray(x, dtype=np.float64)
    xt = x.T

    def proj(role: str, v: np.ndarray) -> np.ndarray:
        y = (weights[role] @ v).T
        if f"{role}_scale" in weights:
            y = y * weights[f"{role}_scale"].reshape(-1)[0]
        return y + weights[f"{role}_bias"] if f"{role}_bias" in weights else y

    g, u = proj("gate", xt), proj("up", xt)
    h = activate(g, u, activation)
    return proj("down", h.T)


def dequantize_tensor(dtype: str, shape: tuple[int, ...], raw: np.ndarray) -> np.ndarray:
    """float64 values of a projection from its raw bytes, by the gguf package (the oracle's only shared piece)."""
    qt = GGMLQuantizationType[dtype]
    rows = shape[0] if len(shape) == 2 else 1
    return dequantize(np.asarray(raw, np.uint8).reshape(rows, -1), qt).astype(np.float64).reshape(shape)


def reference_weights(blob: np.ndarray, entry: Any) -> dict[str, np.ndarray]:
    """float64 weights of every projection of a shard (its bytes `blob`, its manifest `entry`), by gguf."""
    return {r: dequantize_tensor(t.dtype, t.shape, blob[t.offset:t.offset + t.nbytes]) for r, t in entry.tensors.items()}
