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


class DenseWriter:
    """dense.gguf written piece by piece as source files arrive: the header (every KV and tensor info, known from
    the shard headers) at once, then each tensor's bytes at its place (``write_ready``), so that a source file can
    be deleted as soon as its experts and its dense tensors are written. Not thread-safe: one caller at a time.

    >>> dw = DenseWriter(src, staging / "dense.gguf", fsync=True)   # doctest: +SKIP
    >>> dw.write_ready({0})                  # the dense tensors in file 0  # doctest: +SKIP
    >>> entry = dw.finish()                  # once pending_files() is empty  # doctest: +SKIP
    """

    def __init__(self, src: "SafeTensorsSource", path: Path, *, fsync: bool):
        self.src, self.path, self.fsync = src, path, fsync
        self.tensors = src.dense_tensors()
        w = gguf.GGUFWriter(path, src.arch)
        w.add_string("general.name", str(src.model.get("name") or src.model_type))
        w.add_string("mertools.experts_removed_from", src.files[0].name if src.files else "")
        w.add_string("mertools.source_format", "safetensors")
        w.add_string("mertools.hf_model_type", src.model_type)
        w.add_string("mertools.hf_config", json.dumps(src.config, sort_keys=True))
        w.add_string("mertools.created_by", f"mertools {__version__}")
        self.n_kv = 6
        sizes = []
        for t in self.tensors:
            g = _gguf_type(t)
            shape = t.shape or (1,)
            nb = int(np.prod(shape)) * int(np.dtype(_np_of(g)).itemsize)
            w.add_tensor_info(t.name, shape, np.dtype(_np_of(g)), nb, raw_dtype=g)
            sizes.append(nb)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        align = w.data_alignment
        pos = gguf.GGUFWriter.ggml_pad(w.fout[0].tell(), align)
        w.close()
        self.offsets = []
        for nb in sizes:
            self.offsets.append(pos)
            pos += gguf.GGUFWriter.ggml_pad(nb, align)
        self.sizes = sizes
        self.fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(self.fd, pos)  # padding and gaps read as zeros, as the gguf writer leaves them
        except OSError as exc:  # (a file-size limit): the error names the file, which ftruncate's does not
            os.close(self.fd)
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        self.done: set[int] = set()

    def _files_of(self, t: "STTensor") -> set[int]:
        s = self.src.tensors.get(t.name + "_scale_inv") if t.dtype == "F8_E4M3" else None
        return {t.file_index} | ({s.file_index} if s is not None else set())

    def pending_files(self) -> set[int]:
        """Source files holding dense tensors not yet written."""
        return {i for k, t in enumerate(self.tensors) if k not in self.done for i in self._files_of(t)}

    def write_ready(self, present: set[int] | None = None, tick: Callable[[int], None] = lambda n: None) -> int:
        """Write every dense tensor whose source files are all in `present` (None: all); returns how many."""
        n = 0
        for k, t in enumerate(self.tensors):
            if k in self.done or (present is not None and not self._files_of(t) <= present):
                continue
            data = np.ascontiguousarray(self._data(t)).view(np.uint8).reshape(-1)
            if len(data) != self.sizes[k]:
                raise RuntimeError(f"{t.name}: {len(data)} bytes, planned {self.sizes[k]}")
            mv, pos = memoryview(data), self.offsets[k]
            try:
                while len(mv):
                    w = os.pwrite(self.fd, mv, pos)
                    mv, pos = mv[w:], pos + w
            except OSError as exc:  # EFAULT when the mapped source pages are gone: say which file shrank
                self.src.check()
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None  # else the disk: name the file
            self.src.check()  # the bytes written were really read (a shrunk source reads zeros: mer_runtime.guard)
            self.done.add(k)
            tick(t.nbytes)
            n += 1
        return n

    def _data(self, t: "STTensor") -> np.ndarray:
        from .safetensors import FP8_BLOCK, to_float32

        raw = self.src._array(self.src.view, t)
        if t.dtype != "F8_E4M3":
            return raw.view(_np_of(_gguf_type(t)))
        vals = to_float32(raw, t.dtype)
        s_t = self.src.tensors.get(t.name + "_scale_inv")
        if s_t is not None:
            s = to_float32(self.src._array(self.src.view, s_t), s_t.dtype)
            # 2-D: one 128 x 128 grid; 3-D: one grid per leading index (a fused tensor's per-expert grids); else one value
            idx = [np.arange(n) // FP8_BLOCK for n in vals.shape[-2:]]
            idx = [np.arange(vals.shape[0])] + idx if vals.ndim == 3 else idx
            vals = vals * s[np.ix_(*idx)] if vals.ndim in (2, 3) else vals * s.reshape(-1)[0]
        return quantize(vals.astype(np.float32), T.BF16)

    def finish(self) -> dict[str, Any]:
        """Check every tensor is written, flush, and return the manifest's `dense` object."""
        missing = [self.tensors[k].name for k in range(len(self.tensors)) if k not in self.done]
        if missing:
            raise RuntimeError(f"dense.gguf: {len(missing)} tensors not written yet, e.g. {missing[0]}")
        if self.fsync:
            os.fsync(self.fd)
        self.close()
        digest, _, _ = hash_file(self.path)
        return {
            "path": self.path.name,
            "format": "gguf",
            "size": self.path.stat().st_size,
            "xxh3_64": digest,
            "n_tensors": len(self.tensors),
            "n_kv": self.n_kv,
            "tensor_names": "huggingface",
        }

    def adopt(self, path: Path, done: "set[int]") -> None:
        """Carry on in the dense.gguf an earlier run of the same plan began at `path`, whose tensors `done` (indices
        into ``tensors``) are written and flushed; this writer's own file (header only, sparse) is removed. Used by a
        resumed ``pull``: no byte written before is copied or written again. Raises ValueError if `path` does not
        start with the header this writer wrote (another plan, or a file cut short).

        >>> dw = DenseWriter(src, scratch / "dense.gguf", fsync=True)   # doctest: +SKIP
        >>> dw.adopt(work / "dense.gguf", {0, 1})                       # doctest: +SKIP
        """
        head = self.offsets[0] if self.offsets else os.fstat(self.fd).st_size
        with open(self.path, "rb") as a, open(path, "rb") as b:
            same = a.read(head) == b.read(head) and os.fstat(b.fileno()).st_size == os.fstat(self.fd).st_size
        if not same:
            raise ValueError("not the dense.gguf this plan writes (another plan, or cut short)")
        if not set(done) <= set(range(len(self.tensors))):
            raise ValueError("the progress log names dense tensors this plan does not have")
        os.close(self.fd)
        self.fd = -1
        os.unlink(self.path)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY)
        self.done = set(done)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_dense(src: "SafeTensorsSource", path: Path, *, fsync: bool, tick: Callable[[int], None]) -> dict[str, Any]:
    """Write dense.gguf for `src` at `path` in one go; returns the manifest's `dense` entry."""
    dw = DenseWriter(src, path, fsync=fsync)
    try:
        dw.write_ready(None, tick)
        return dw.finish()
    finally:
        dw.close()


def _np_of(g: T) -> Any:
    return {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16, T.F64: np.float64, T.I8: np.int8,
            T.I16: np.int16, T.I32: np.int32, T.I64: np.int64}[g]
