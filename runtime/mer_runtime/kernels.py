"""Expert FFN kernels working on the raw projection bytes: y = down(act(gate x, up x)).

One registry (`DTYPES`: name -> `DType` with block size, bytes per block and kernel path) decides how each type is
computed; `kernel_for` and `matvec` both read it.

- C (`_kernels.c`): F32, F16, BF16, Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4 on the raw blocks (AVX2/FMA/F16C chosen at
  run time, AVX-512 for Q4_0, MXFP4, Q8_0 and the K-quants where the CPU has it, portable C otherwise), on a
  persistent pthread pool inside the library. Activations stay float32 by default (exact up to float32 rounding);
  `act="q8"` quantizes them to 8-bit blocks (Q8_0; Q8_K for K-quants) and multiplies in integers for
  Q4_0/Q8_0/MXFP4/Q4_K/Q5_K/Q6_K weights (faster, error documented in docs/runtime.md).
- `moe()` runs a whole routed layer step (k experts, gate+up+activation, then down summed with the routing weights)
  in ONE call into C; `expert_ffn` is the same call with k=1.
- `strided_copy`: a contiguous copy of a transposed or every-other-element 2-D view (the converter's SafeTensors
  transforms) in C, cache-blocked and on the pool, instead of NumPy's element-by-element walk; bytes unchanged.
- Every other type the gguf package can dequantize (and every type when the C kernel was not built, or with
  MER_KERNELS=numpy): NumPy on bands of rows, gguf's dequantization for block types (correct, slower).

Thread-safe: the C pool runs one job at a time; a caller that finds it busy computes on its own thread.
MER_THREADS (a whole number >= 1) overrides the thread count, which is otherwise the CPUs this process may run on.

`reference_ffn` is the float64 NumPy oracle used by tests and `verify --deep`; it shares nothing with the fast path
but the gguf package's dequantization.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from .errors import MerError
from .native import load_library

BAND_BYTES = 4 << 20  # rows widened or dequantized at a time for the NumPy paths
MAX_EXPERTS_PER_CALL = 8  # the C call's limit on k; moe() splits larger k into several calls
C_TYPES = frozenset({"F32", "F16", "BF16", "Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4"})
Q8_ACT_TYPES = frozenset({"Q4_0", "Q8_0", "MXFP4", "Q4_K", "Q5_K", "Q6_K"})  # act="q8" applies to these

FLAG_PORTABLE, FLAG_ACT_Q8, FLAG_NO_VNNI, FLAG_SERIAL, FLAG_NO_PERM, FLAG_NO_AVX512 = 1, 2, 4, 8, 16, 32
AVX512_TYPES = frozenset({"Q4_0", "MXFP4", "Q8_0", "Q4_K", "Q5_K", "Q6_K"})  # AVX-512 kernels where the CPU has it
# (Q8_0 and the K-quants: exact only)
_ERRORS = {-1: "has no C kernel", -2: "has a shape the kernel cannot take (columns not a whole number of blocks, "
           "or projections that disagree)", -3: "buffer is shorter than its shape needs", -4: "out of memory",
           -5: "bad argument"}


class KernelError(MerError, ValueError):
    """A kernel was called with data it cannot take (short buffer, wrong shape, bad MER_THREADS, ...)."""


def _load_native() -> ctypes.CDLL | None:
    if os.environ.get("MER_KERNELS") == "numpy":
        return None
    lib = load_library("_kernels")
    if lib is None or not hasattr(lib, "mer_moe"):  # an old build without the MoE entry point is as good as none
        return None
    i64, vp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.mer_matvec.argtypes = [ci, vp, i64, i64, i64, vp, i64, i64, vp, i64, ci]
    lib.mer_matvec.restype = ci
    lib.mer_moe.argtypes = [ci, vp, vp, vp, i64, i64, i64, i64, vp, i64, ci, ctypes.c_float,
                            ctypes.c_float, ci, ctypes.POINTER(ci)]
    lib.mer_moe.restype = ci
    lib.mer_dequantize.argtypes = [ci, vp, i64, i64, vp, i64]
    lib.mer_dequantize.restype = ci
    lib.mer_set_prefetch.argtypes = [i64]
    lib.mer_get_prefetch.restype = i64
    lib.mer_set_chunk.argtypes = [i64]
    lib.mer_set_rows.argtypes = [ci]
    for f in ("mer_has_avx2", "mer_has_vnni", "mer_threads"):
        getattr(lib, f).restype = ci
    if hasattr(lib, "mer_has_avx512"):  # a build from before the AVX-512 kernels runs its AVX2 ones
        lib.mer_has_avx512.restype = ci
    lib.mer_set_threads.argtypes = [ci]
    if hasattr(lib, "mer_strided_copy"):  # a build from before it copies strided views with NumPy
        lib.mer_strided_copy.argtypes = [vp, i64, i64, i64, i64, i64, i64, i64, vp, i64, ci]
        lib.mer_strided_copy.restype = ci
    atexit.register(lib.mer_shutdown)  # join the pool's threads before the interpreter goes
    return lib


_LIB = _load_native()
SIMD = bool(_LIB and _LIB.mer_has_avx2())
VNNI = bool(_LIB and _LIB.mer_has_vnni())
AVX512 = bool(_LIB and hasattr(_LIB, "mer_has_avx512") and _LIB.mer_has_avx512())
_threads: int | None = None
_threads_lock = threading.Lock()


def threads() -> int:
    """Threads the C kernels use: MER_THREADS if set (validated), else the CPUs this process may run on.

    >>> threads() >= 1
    True
    """
    global _threads
    with _threads_lock:
        if _threads is None:
            raw = os.environ.get("MER_THREADS", "").strip()
            if raw:
                try:
                    n = int(raw)
                except ValueError:
                    n = 0
                if n < 1 or n > 4096:
                    raise KernelError(f"MER_THREADS={raw!r}: must be a whole number from 1 to 4096 "
                                      "(unset it to use every CPU this process may run on)")
            else:
                n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            if _LIB is not None:
                _LIB.mer_set_threads(n)
            _threads = n
        return _threads


@dataclass(frozen=True)
class DType:
    """What the runtime knows of a ggml type: block geometry and the path that computes with it."""

    name: str
    block: int  # elements per block (1 for F32/F16/BF16)
    block_bytes: int
    path: str  # "c", "numpy" (F32), "widen" (F16/BF16 in NumPy), "gguf" (gguf's dequantize), "unsupported"

    @property
    def ggml_id(self) -> int:
        return int(GGMLQuantizationType[self.name])

    def nbytes(self, rows: int, cols: int) -> int:
        if cols % self.block:
            raise KernelError(f"{self.name}: {cols} columns is not a whole number of {self.block}-element blocks")
        return rows * (cols // self.block) * self.block_bytes

    def describe(self) -> str:
        if self.path == "c":
            simd = "AVX2" if SIMD else "portable"
            if AVX512 and self.name in AVX512_TYPES:
                simd = ("AVX-512" if self.name in ("Q4_0", "MXFP4") else
                        "AVX-512, AVX2 for rows over 8192 columns; AVX-VNNI or AVX2 with act=q8" if self.name == "Q8_0" else "AVX-512; AVX2 with act=q8")
            return f"{self.name.lower()} C kernel ({simd}, {threads()} threads)"
        return {"numpy": "numpy", "widen": f"numpy ({self.name.lower()} widened per band)",
                "gguf": "gguf dequantize per band (slower)", "unsupported": "unsupported"}[self.path]


def _gguf_can_dequantize(qt: GGMLQuantizationType) -> bool:
    from gguf import quants

    traits = getattr(quants, "_type_traits", None)  # gguf's own table of the types it can dequantize
    return qt in traits if traits is not None else True


def _build_registry() -> dict[str, DType]:
    reg = {}
    for qt, (block, tsize) in GGML_QUANT_SIZES.items():
        if qt.name in C_TYPES and _LIB is not None:
            path = "c"
        elif qt.name == "F32":
            path = "numpy"
        elif qt.name in ("F16", "BF16"):
            path = "widen"
        elif _gguf_can_dequantize(qt):
            path = "gguf"
        else:
            path = "unsupported"
        reg[qt.name] = DType(qt.name, block, tsize, path)
    return reg


DTYPES: dict[str, DType] = _build_registry()


def dtype_info(dtype: str) -> DType:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise KernelError(f"type {dtype!r} is not a ggml type this runtime knows") from None


def kernel_for(dtype: str) -> str:
    """How the runtime computes with `dtype`, in words (for `mertools inspect`).

    >>> kernel_for("NOPE")
    'unsupported'
    """
    return DTYPES[dtype].describe() if dtype in DTYPES else "unsupported"


def _as_bytes(raw: Any) -> np.ndarray:
    a = np.asarray(raw)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8)


def _check_len(what: str, raw: np.ndarray, need: int) -> None:
    if raw.nbytes < need:
        raise KernelError(f"{what}: {raw.nbytes} bytes given, its shape needs {need}; the shard or the call is "
                          "wrong (run `mertools verify`)")


def _flags(simd: int, act: str) -> int:
    if act not in ("f32", "q8"):
        raise KernelError(f"act must be 'f32' (exact) or 'q8', not {act!r}")
    return (FLAG_PORTABLE if simd == 0 else 0) | (FLAG_ACT_Q8 if act == "q8" else 0)


def matvec(dtype: str, raw: np.ndarray, shape: tuple[int, int], x: np.ndarray, *, simd: int = -1,
           act: str = "f32", flags: int = 0) -> np.ndarray:
    """W @ x for W given as raw bytes of type `dtype` and shape [rows, cols]; x float32 [cols] or [n, cols].

    simd=0 forces the portable C path (tests check both); act="q8" quantizes x to 8-bit blocks where it applies
    (Q8_0 blocks of 32; Q8_K blocks of 256 for K-quant weights);
    flags: extra FLAG_* bits for the C call (tests force the other SIMD variants with them).

    >>> w = np.eye(2, dtype=np.float32)
    >>> matvec("F32", w.view(np.uint8).reshape(-1), (2, 2), np.array([3, 4], np.float32)).tolist()
    [3.0, 4.0]
    """
    info = dtype_info(dtype)
    rows, cols = int(shape[0]), int(shape[1])
    raw = _as_bytes(raw)
    _check_len(f"{dtype} projection {rows} x {cols}", raw, info.nbytes(rows, cols))
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim not in (1, 2) or x.shape[-1] != cols:
        raise KernelError(f"input has shape {list(x.shape)}, the projection takes [{cols}] or [n, {cols}]")
    flags |= _flags(simd, act)
    if info.path == "c":
        threads()
        xs = x.reshape(-1, cols)
        out = np.empty((len(xs), rows), np.float32)
        rc = _LIB.mer_matvec(info.ggml_id, raw.ctypes.data, raw.nbytes, rows, cols, xs.ctypes.data, xs.size,
                             len(xs), out.ctypes.data, out.size, flags)
        if rc:
            raise KernelError(f"{dtype} projection {rows} x {cols}: {_ERRORS.get(rc, rc)}")
        return out.reshape(-1) if x.ndim == 1 else out
    if info.path == "unsupported":
        raise KernelError(f"type {dtype}: the gguf package cannot dequantize it, so this runtime cannot compute it")
    mat = raw[:info.nbytes(rows, cols)].reshape(rows, -1)
    out = np.empty((rows,) + x.shape[:-1], np.float32)
    xt = x.T
    step = max(1, BAND_BYTES // (cols * 4))
    for r0 in range(0, rows, step):
        band = mat[r0:r0 + step]
        if dtype == "F32":
            w = band.view(np.float32)
        elif dtype == "F16":
            w = band.view(np.float16).astype(np.float32)
        elif dtype == "BF16":
            w = (band.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            w = dequantize(band, GGMLQuantizationType[dtype]).astype(np.float32, copy=False)
        out[r0:r0 + step] = w @ xt
    return np.ascontiguousarray(out.T)


class _Proj(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("nbytes", ctypes.c_int64), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("bias", ctypes.c_void_p), ("bias_len", ctypes.c_int64),
                ("type", ctypes.c_int32), ("pad", ctypes.c_int32)]


class _Expert(ctypes.Structure):
    _fields_ = [("gate", _Proj), ("up", _Proj), ("down", _Proj)]


ROLES = ("gate", "up", "down")
_ACT_KIND = {"swiglu": 0, "swiglu_oai": 1}

Tensors = dict[str, tuple[str, tuple[int, ...], np.ndarray]]


def _activation_args(activation: dict[str, Any]) -> tuple[int, float, float]:
    kind = activation.get("kind", "swiglu")
    if kind not in _ACT_KIND:
        raise KernelError(f"activation {kind!r} is not supported by this runtime")
    return _ACT_KIND[kind], float(activation.get("alpha", 1.702)), float(activation.get("limit", 7.0))


def _bias_f32(t: tuple[str, tuple[int, ...], np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(dequantize_tensor(*t).reshape(-1), dtype=np.float32)


def _native_ok(experts: Sequence[Tensors]) -> bool:
    # per-expert output scales (format_version 2) are applied by the per-projection path, not the C step
    return _LIB is not None and all(DTYPES.get(t[r][0], None) is not None and DTYPES[t[r][0]].path == "c"
                                    and f"{r}_scale" not in t for t in experts for r in ROLES)


def moe(experts: Sequence[Tensors], weights: Sequence[float] | np.ndarray, x: np.ndarray,
        activation: dict[str, Any], *, act: str = "f32", simd: int = -1, flags: int = 0) -> np.ndarray:
    """sum_k weights[k] * ffn(experts[k], x): one routed layer step, in ONE call into C when every projection has a
    C kernel (else per projection through `matvec`). experts: role -> (dtype, shape, raw bytes), biases as
    `{role}_bias`. x float32 [d_model] or [n, d_model]; returns float32 of the same shape. flags: as `matvec`'s.

    >>> e = {r: ("F32", (2, 2), np.eye(2, dtype=np.float32).view(np.uint8).reshape(-1)) for r in ROLES}
    >>> [round(float(v), 4) for v in moe([e, e], [0.5, 0.5], np.array([1, 0], np.float32), {"kind": "swiglu"})]
    [0.7311, 0.0]
    """
    wk = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1)
    if len(wk) != len(experts) or not len(experts):
        raise KernelError(f"{len(experts)} experts and {len(wk)} routing weights: give one weight per expert")
    kind, alpha, limit = _activation_args(activation)
    flags |= _flags(simd, act)
    x = np.ascontiguousarray(x, dtype=np.float32)
    gate_shape = tuple(experts[0]["gate"][1])
    d_ff, d_model = int(gate_shape[0]), int(gate_shape[1])
    if x.ndim not in (1, 2) or x.shape[-1] != d_model:
        raise KernelError(f"x must have shape [{d_model}] or [n, {d_model}], got {list(x.shape)}")
    want = {"gate": (d_ff, d_model), "up": (d_ff, d_model), "down": (d_model, d_ff)}
    raws: list[dict[str, np.ndarray]] = []
    for i, t in enumerate(experts):
        raws.append({})
        for role in ROLES:
            dtype, shape, raw = t[role]
            if tuple(int(v) for v in shape) != want[role]:
                raise KernelError(f"expert {i} {role} has shape {list(shape)}, expected {list(want[role])} "
                                  "(gate and up [d_ff, d_model], down [d_model, d_ff])")
            raws[i][role] = _as_bytes(raw)
            _check_len(f"expert {i} {role} ({dtype} {shape[0]} x {shape[1]})", raws[i][role],
                       dtype_info(dtype).nbytes(*want[role]))
    if not _native_ok(experts):
        y = np.zeros(x.shape, np.float32)
        for w, t in zip(wk, experts):
            y += w * _ffn_by_projection(t, x, activation, flags)
        return y
    if len(experts) > MAX_EXPERTS_PER_CALL:
        parts = [moe(experts[i:i + MAX_EXPERTS_PER_CALL], wk[i:i + MAX_EXPERTS_PER_CALL], x, activation, act=act,
                     simd=simd, flags=flags) for i in range(0, len(experts), MAX_EXPERTS_PER_CALL)]
        return np.sum(parts, axis=0, dtype=np.float32)
    threads()
    keep: list[np.ndarray] = []  # every buffer the C call points at stays alive until it returns
    arr = (_Expert * len(experts))()
    for i, t in enumerate(experts):
        for role in ROLES:
            raw, (rows, cols) = raws[i][role], want[role]
            p = getattr(arr[i], role)
            p.data, p.nbytes, p.rows, p.cols = raw.ctypes.data, raw.nbytes, rows, cols
            p.type = DTYPES[t[role][0]].ggml_id
            keep.append(raw)
            if f"{role}_bias" in t:
                b = _bias_f32(t[f"{role}_bias"])
                if len(b) != rows:
                    raise KernelError(f"expert {i} {role} bias has {len(b)} values, the projection has {rows} rows")
                p.bias, p.bias_len = b.ctypes.data, len(b)
                keep.append(b)
    xs = x.reshape(-1, d_model)
    out = np.empty_like(xs)
    bad = ctypes.c_int(-1)
    rc = _LIB.mer_moe(len(experts), ctypes.addressof(arr), wk.ctypes.data, xs.ctypes.data, xs.size, len(xs),
                      d_model, d_ff, out.ctypes.data, out.size, kind, alpha, limit, flags, ctypes.byref(bad))
    if rc:
        where = f"expert {bad.value // 3} {ROLES[bad.value % 3]}" if bad.value >= 0 else "moe call"
        raise KernelError(f"{where}: {_ERRORS.get(rc, rc)} (d_model {d_model}, d_ff {d_ff})")
    return out.reshape(x.shape)


def _ffn_by_projection(tensors: Tensors, x: np.ndarray, activation: dict[str, Any], flags: int) -> np.ndarray:
    def proj(role: str, v: np.ndarray) -> np.ndarray:
        dtype, shape, raw = tensors[role]
        y = matvec(dtype, raw, shape, v, flags=flags)  # flags carry simd=0 and act="q8" as FLAG_* bits
        if f"{role}_scale" in tensors:  # per-expert output scale (format_version 2), applied before the bias
            y = y * np.float32(dequantize_tensor(*tensors[f"{role}_scale"]).reshape(-1)[0])
        if f"{role}_bias" in tensors:
            y = y + _bias_f32(tensors[f"{role}_bias"])
        return y

    g, u = proj("gate", x), proj("up", x)
    h = activate(g, u, activation).astype(np.float32, copy=False)
    return proj("down", h).astype(np.float32, copy=False)


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


def expert_ffn(tensors: Tensors, x: np.ndarray, activation: dict[str, Any], *, act: str = "f32",
               simd: int = -1) -> np.ndarray:
    """tensors: role -> (dtype, shape, raw bytes). x float32 [d_model] or [n, d_model]; returns float32 alike.

    The same single C call as `moe` (k = 1) when every projection has a C kernel."""
    return moe([tensors], [1.0], x, activation, act=act, simd=simd)


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


COPY_TILE = 64  # the NumPy path's source rows per tile: each tile is read sequentially, written in cache


def _copy_numpy(v: np.ndarray) -> np.ndarray:
    """A C-order copy of a 1- or 2-D view by NumPy. A transposed view is copied in column tiles, which read the
    source a few rows at a time instead of striding across all of it (about twice as fast as one big copy)."""
    out = np.empty(v.shape, v.dtype)
    if v.ndim != 2 or abs(v.strides[0]) >= abs(v.strides[1]):
        out[...] = v
        return out
    for c in range(0, v.shape[1], COPY_TILE):
        out[:, c:c + COPY_TILE] = v[:, c:c + COPY_TILE]
    return out


def _extent(a: np.ndarray) -> tuple[int, int]:
    """[first byte, one past the last byte] of the memory an array's elements occupy."""
    lo = hi = a.__array_interface__["data"][0]
    for n, st in zip(a.shape, a.strides):
        if n == 0:
            return lo, lo
        lo, hi = lo + min(0, (n - 1) * st), hi + max(0, (n - 1) * st)
    return lo, hi + a.itemsize


def _copy_what(shape: tuple[int, int], dt: np.dtype, strides: tuple[int, int], offset: int) -> str:
    """The copy a KernelError names."""
    return f"strided copy {list(shape)} of {dt} (byte strides {strides[0]}, {strides[1]}, offset {offset})"


def _has_copy() -> bool:
    return _LIB is not None and hasattr(_LIB, "mer_strided_copy")


def _c_copy(base: int, nbytes: int, offset: int, dt: np.dtype, shape: tuple[int, int], strides: tuple[int, int],
            simd: int, flags: int) -> np.ndarray:
    (r, c), (sr, sc) = shape, strides
    rc = 0
    if r > 0 and c > 0:  # a view outside the buffer is refused before its output is allocated (a bogus shape of
        # terabytes would otherwise be a MemoryError, not this refusal); the C routine checks the same again
        dr, dc = (r - 1) * sr, (c - 1) * sc
        if offset + min(0, dr) + min(0, dc) < 0 or offset + max(0, dr) + max(0, dc) + dt.itemsize > nbytes:
            rc = -5
    if not rc:
        out = np.empty((max(r, 0), max(c, 0)), dt)  # a negative one is the C routine's to refuse
        threads()
        rc = _LIB.mer_strided_copy(base, nbytes, offset, dt.itemsize, shape[0], shape[1], strides[0], strides[1],
                                   out.ctypes.data, out.nbytes, flags | (FLAG_PORTABLE if simd == 0 else 0))
    if rc:
        raise KernelError(f"{_copy_what(shape, dt, strides, offset)} from {nbytes} bytes: " +
                          ("the view reaches outside the buffer, or an element is not 1, 2, 4 or 8 bytes"
                           if rc == -5 else _ERRORS.get(rc, str(rc))))
    return out


def strided_copy_from(raw: Any, offset: int, shape: tuple[int, int], strides: tuple[int, int], dtype: Any, *,
                      simd: int = -1, flags: int = 0) -> np.ndarray:
    """out[i, j] = the element of `dtype` at byte offset + i*strides[0] + j*strides[1] of the buffer `raw`, as a new
    C-order [rows, cols] array. Any byte strides (negative too); elements of 1, 2, 4 or 8 bytes. A view reaching
    outside `raw` is refused (KernelError) by the C routine or, without it, by NumPy. simd=0 forces the C routine's
    element-by-element path (tests check both); flags: FLAG_SERIAL for one thread.

    >>> a = np.arange(6, dtype=np.uint16).reshape(2, 3)
    >>> strided_copy_from(a, 0, (3, 2), (2, 6), np.uint16).tolist()
    [[0, 3], [1, 4], [2, 5]]
    """
    dt = np.dtype(dtype)
    shape, strides = (int(shape[0]), int(shape[1])), (int(strides[0]), int(strides[1]))
    offset = int(offset)
    try:
        buf = _as_bytes(raw)  # an array of references (object dtype) has no bytes to copy: refused
        if not all(-(1 << 63) <= n < 1 << 63 for n in (offset, *shape, *strides)):
            raise ValueError("a number outside int64")  # ctypes would wrap it to another, valid-looking one
    except (ValueError, TypeError) as e:
        raise KernelError(f"{_copy_what(shape, dt, strides, offset)}: {e}") from None
    if _has_copy() and not dt.hasobject:
        return _c_copy(buf.ctypes.data, buf.nbytes, offset, dt, shape, strides, simd, flags)
    try:
        if dt.itemsize not in (1, 2, 4, 8) or dt.hasobject:
            raise ValueError("an element is not 1, 2, 4 or 8 bytes")
        v = np.ndarray(shape, dt, buf, offset, strides)  # NumPy checks the view against the buffer
    except (ValueError, TypeError, OverflowError) as e:
        raise KernelError(f"{_copy_what(shape, dt, strides, offset)} from {buf.nbytes} bytes: {e}") from None
    return _copy_numpy(v)


def strided_copy(view: np.ndarray, *, simd: int = -1, flags: int = 0) -> np.ndarray:
    """A new C-order copy of a 1- or 2-D array, whatever its strides (a transposed projection, an even/odd take,
    reversed), byte for byte: the C routine where it is built, else NumPy (also for other shapes or element sizes).
    The C routine checks the view against the whole array it was taken from (its outermost NumPy base).

    >>> strided_copy(np.arange(6, dtype=np.float32).reshape(2, 3)[:, 0::2].T).tolist()
    [[0.0, 3.0], [2.0, 5.0]]
    """
    v = np.asarray(view)
    if v.ndim not in (1, 2) or v.dtype.itemsize not in (1, 2, 4, 8) or v.dtype.hasobject or not _has_copy():
        return _copy_numpy(v) if v.ndim in (1, 2) else np.array(v, order="C", copy=True)
    if v.size == 0:
        return np.empty(v.shape, v.dtype)
    root = v
    while isinstance(root.base, np.ndarray):
        root = root.base
    lo, hi = _extent(root)
    vlo, vhi = _extent(v)
    if not lo <= vlo <= vhi <= hi:  # a base that is not its memory (a WRITEBACKIFCOPY temporary's): the view's own
        lo, hi = vlo, vhi
    v2 = v if v.ndim == 2 else v[None, :]
    return _c_copy(lo, hi - lo, v.__array_interface__["data"][0] - lo, v.dtype, v2.shape, v2.strides, simd,
                   flags).reshape(v.shape)
