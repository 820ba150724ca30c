"""Expert FFN kernels working on the raw projection bytes: y = down(act(gate x, up x)).

- Q4_0 and Q8_0: numba kernels that walk the raw 18- or 34-byte blocks row by row, never building a float32 matrix;
  activations stay float32 (no activation quantization, so results are exact up to float32 rounding).
- F16, BF16, F32: NumPy on the stored values (F16/BF16 widened to float32 a band of rows at a time).
- Every other type the gguf package can dequantize: `gguf.quants.dequantize` on bands of rows (correct, slower;
  `mertools inspect` says which path each type takes).

`reference_ffn` is the float64 NumPy oracle used by tests and `verify --deep`; it shares nothing with the fast path
but the gguf package's dequantization.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the module importable without it
    numba = None

NATIVE = {"Q4_0": "q4_0 block kernel (numba)", "Q8_0": "q8_0 block kernel (numba)",
          "F16": "numpy (f16 widened per band)", "BF16": "numpy (bf16 widened per band)", "F32": "numpy"}
BAND_BYTES = 4 << 20  # rows widened or dequantized at a time for the non-block paths
_F16 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)  # f16 bits -> f32, 256 KiB, stays in L2


def kernel_for(dtype: str) -> str:
    if dtype in NATIVE and (numba is not None or dtype not in ("Q4_0", "Q8_0")):
        return NATIVE[dtype]
    try:
        GGMLQuantizationType[dtype]
    except KeyError:
        return "unsupported"
    return "gguf dequantize per band (slower)"


if numba is not None:
    _CACHE = os.environ.get("MER_NUMBA_CACHE", "1") != "0"

    @njit(parallel=True, fastmath=True, cache=_CACHE)
    def _q4_0_matvec(raw, xl, xh, xs, lut, out, rows, cols):  # pragma: no cover - compiled
        # Block: f16 d, 16 bytes; element j is the low nibble of byte j, element j+16 the high nibble; x = d*(q-8).
        # The row's nibbles are copied to a contiguous scratch first so the dot product is one long loop.
        nblk = cols // 32
        rowbytes = nblk * 18
        nq = nblk * 16
        chunk = 32
        for c in prange((rows + chunk - 1) // chunk):
            q = np.empty(nq, np.uint8)
            de = np.empty(nq, np.float32)
            for r in range(c * chunk, min(rows, (c + 1) * chunk)):
                base = r * rowbytes
                corr = np.float32(0.0)
                for b in range(nblk):
                    o = base + b * 18
                    d = lut[np.int32(raw[o]) | (np.int32(raw[o + 1]) << np.int32(8))]
                    corr += d * xs[b]
                    q[b * 16:b * 16 + 16] = raw[o + 2:o + 18]
                    de[b * 16:b * 16 + 16] = d
                acc = np.float32(0.0)
                for i in range(nq):
                    v = np.int32(q[i])
                    acc += de[i] * (np.float32(v & np.int32(15)) * xl[i] + np.float32(v >> np.int32(4)) * xh[i])
                out[r] = acc - np.float32(8.0) * corr
        return out

    @njit(parallel=True, fastmath=True, cache=_CACHE)
    def _q8_0_matvec(raw, x, lut, out, rows, cols):  # pragma: no cover - compiled
        # Block: f16 d, 32 int8; x = d*q.
        nblk = cols // 32
        rowbytes = nblk * 34
        for r in prange(rows):
            base = r * rowbytes
            acc = np.float32(0.0)
            for b in range(nblk):
                o = base + b * 34
                d = lut[np.int32(raw[o]) | (np.int32(raw[o + 1]) << np.int32(8))]
                s = np.float32(0.0)
                for j in range(32):
                    s += np.float32(np.int8(raw[o + 2 + j])) * x[b * 32 + j]
                acc += d * s
            out[r] = acc
        return out


def _rows_per_band(row_bytes: int) -> int:
    return max(1, BAND_BYTES // max(row_bytes, 1))


def matvec(dtype: str, raw: np.ndarray, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """W @ x for W given as raw bytes of type `dtype` and shape [rows, cols]; x float32 [cols] or [n, cols]."""
    rows, cols = shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 2:
        return np.stack([matvec(dtype, raw, shape, xi) for xi in x]) if len(x) else np.zeros((0, rows), np.float32)
    if x.shape != (cols,):
        raise ValueError(f"input has {x.shape[0]} features, the projection takes {cols}")
    out = np.empty(rows, np.float32)
    if dtype == "Q4_0" and numba is not None:
        xb = x.reshape(-1, 32)
        xl = np.ascontiguousarray(xb[:, :16]).reshape(-1)
        xh = np.ascontiguousarray(xb[:, 16:]).reshape(-1)
        return _q4_0_matvec(raw, xl, xh, xb.sum(1, dtype=np.float32), _F16, out, rows, cols)
    if dtype == "Q8_0" and numba is not None:
        return _q8_0_matvec(raw, x, _F16, out, rows, cols)
    if dtype == "F32":
        return raw.view(np.float32).reshape(rows, cols) @ x
    block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
    row_bytes = cols // block * tsize
    mat = raw.reshape(rows, row_bytes)
    step = _rows_per_band(cols * 4)
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
        if f"{role}_bias" in tensors:
            bd, bs, braw = tensors[f"{role}_bias"]
            y = y + matvec_bias(bd, bs, braw)
        return y

    g, u = proj("gate", x), proj("up", x)
    h = activate(g, u, activation).astype(np.float32, copy=False)
    return proj("down", h).astype(np.float32, copy=False)


def matvec_bias(dtype: str, shape: tuple[int, ...], raw: np.ndarray) -> np.ndarray:
    return dequantize(raw.reshape(1, -1), GGMLQuantizationType[dtype]).reshape(shape).astype(np.float32)


def reference_ffn(weights: dict[str, np.ndarray], x: np.ndarray, activation: dict[str, Any]) -> np.ndarray:
    """float64 oracle: weights are role -> float64 arrays ([out, in] matrices, [n] biases)."""
    x = np.asarray(x, dtype=np.float64)
    xt = x.T

    def proj(role: str, v: np.ndarray) -> np.ndarray:
        y = (weights[role] @ v).T
        return y + weights[f"{role}_bias"] if f"{role}_bias" in weights else y

    g, u = proj("gate", xt), proj("up", xt)
    h = activate(g, u, activation)
    return proj("down", h.T)


def dequantize_tensor(dtype: str, shape: tuple[int, ...], raw: np.ndarray) -> np.ndarray:
    """float64 values of a projection from its raw bytes, by the gguf package (the oracle's only shared piece)."""
    qt = GGMLQuantizationType[dtype]
    rows = shape[0] if len(shape) == 2 else 1
    return dequantize(np.asarray(raw, np.uint8).reshape(rows, -1), qt).astype(np.float64).reshape(shape)
