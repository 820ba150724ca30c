"""The GGUF reader (``mertools.gguf_source``) behind the ``Source`` protocol.

A thin adapter: planning stays in ``gguf_source.py`` (which builds ``plan.Projection`` byte ranges); this adds a
float decoder for ``--dtype`` where the stored type is F32/F16/BF16, and gives byte access and the dense writer
the protocol asks for. Every other attribute is the wrapped ``GGUFSource``'s.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from ..gguf_source import GGUFSource as _GGUFSource
from .files import MappedFiles
from .plan import ExpertPlan, ViewOf

_FLOAT = {"F32", "F16", "BF16"}


def _decoder(p: Any) -> Callable[[ViewOf, int, int], np.ndarray] | None:
    if p.dtype not in _FLOAT or len(p.shape) != 2:
        return None
    rows, cols = p.shape
    row_bytes = p.nbytes // rows
    qt = GGMLQuantizationType[p.dtype]

    def decode(view_of: ViewOf, r0: int, r1: int) -> np.ndarray:
        raw = np.frombuffer(view_of(p.file_index), np.uint8, count=(r1 - r0) * row_bytes,
                            offset=p.offset + r0 * row_bytes)
        return dequantize(raw.reshape(r1 - r0, row_bytes), qt).astype(np.float32, copy=False)

    return decode


class GGUFSource(MappedFiles):
    """A GGUF model (single file or split set) as a ``Source``. Thread-safe after construction.

    >>> src = GGUFSource("mixtral-q4_0.gguf")     # doctest: +SKIP
    >>> src.experts[0].projections[0].dtype        # doctest: +SKIP
    'Q4_0'
    """

    kind = "gguf"

    def __init__(self, path: str | os.PathLike[str]):
        self.inner = _GGUFSource(path)
        # the plan's projections are plain byte ranges already; float ones get a decoder for --dtype
        self.experts = [ExpertPlan(e.layer, e.expert, [replace(q, decode=_decoder(q)) for q in e.projections])
                        for e in self.inner.experts]
        self.files = self.inner.files
        self._init_maps()

    def __getattr__(self, name: str) -> Any:  # path, files, sizes, arch, model, tensors, kv, ...
        return getattr(self.inner, name)

    def source_info(self) -> dict[str, Any]:
        return self.inner.source_info()

    def dense_tensors(self) -> list[Any]:
        return self.inner.dense_tensors()

    def dense_file_indices(self) -> set[int]:
        return set(range(len(self.inner.files)))  # the metadata lives in the first part, tensors anywhere

    def dense_estimate(self) -> int:
        src = self.inner
        return sum(src.sizes) - sum(t.nbytes for t in src.tensors.values()) + sum(
            t.nbytes for t in src.dense_tensors())

    def close(self) -> None:
        super().close()
        self.inner.close()

    def check(self, i: int | None = None) -> None:
        """``MappedFiles.check``, and the gguf reader's own mapping of each file (dense.gguf is copied from it)."""
        super().check(i)
        for k, r in enumerate(self.inner.readers):
            if i is None or i == k:
                r.guard.check()

    def write_dense(self, path: Path, *, fsync: bool, tick: Callable[[int], None]) -> dict[str, Any]:
        from ..dense import write_dense

        try:
            entry = write_dense(self.inner, path, fsync=fsync, tick=tick)
        except OSError:  # write() of mapped pages that are gone fails with EFAULT: say which file shrank
            self.check()
            raise
        self.check()  # what was copied was really read (zeros from a shrunk file are never kept)
        return entry
