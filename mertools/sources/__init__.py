"""Model sources behind one interface: a GGUF file (or split set), or a Hugging Face SafeTensors checkpoint.

``open_source(path)`` picks by content. Every source offers what planning, the aligned writer, the dense part,
``inspect`` and ``verify --deep --against`` need (the ``Source`` protocol below).

Hook for remote sources: ``REMOTE_OPENERS`` maps a URL scheme (``"hf"`` for ``hf://org/repo[@rev]``) to a function
``opener(url: str) -> Source``; ``open_source`` hands any ``scheme://...`` path to it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from ..errors import SourceError
from .plan import DTYPE_CHOICES, ExpertPlan, Projection, with_dtype

__all__ = ["Source", "open_source", "ExpertPlan", "Projection", "with_dtype", "DTYPE_CHOICES", "REMOTE_OPENERS",
           "is_safetensors_folder"]


@runtime_checkable
class Source(Protocol):
    """What a model source gives the converter. Implementations: ``sources.gguf.GGUFSource``,
    ``sources.safetensors.SafeTensorsSource``.

    Attributes:
        kind: ``"gguf"`` or ``"safetensors"``.
        path: what was opened (a file or a folder).
        files: every source file, indexed by ``Projection.file_index``; ``sizes`` their sizes in bytes.
        arch: GGUF architecture name (for SafeTensors, the one llama.cpp's converter would write).
        experts: one ``ExpertPlan`` per (MoE layer, expert), sorted.
        model: the manifest's ``model`` object.
    """

    kind: str
    path: Path
    files: list[Path]
    sizes: list[int]
    arch: str
    experts: list[ExpertPlan]
    model: dict[str, Any]

    def source_info(self) -> dict[str, Any]:
        """The manifest's ``source`` object."""

    def dense_tensors(self) -> list[Any]:
        """Non-expert tensors (each with ``name``, ``nbytes``, ``file_index``), in source order."""

    def dense_file_indices(self) -> set[int]:
        """Source files ``write_dense`` reads."""

    def dense_estimate(self) -> int:
        """Bytes dense.gguf will take, about (for the free-space check)."""

    def write_dense(self, path: Path, *, fsync: bool, tick: Callable[[int], None]) -> dict[str, Any]:
        """Write dense.gguf; return the manifest's ``dense`` object."""

    def view(self, i: int) -> memoryview:
        """Read-only bytes of source file ``i`` (opened on first use; thread-safe)."""

    def release(self, i: int) -> None:
        """Unmap source file ``i`` (call before deleting it)."""

    # Optional: ``open_dense(path, *, fsync)`` -> a writer with ``write_ready(present, tick)``,
    # ``pending_files()``, ``finish()`` and ``close()`` that writes dense.gguf piece by piece as files arrive
    # (SafeTensors sources have it; ``convert.open_dense`` falls back to ``write_dense`` in one go).

    def close(self) -> None:
        """Release memory maps."""


REMOTE_OPENERS: dict[str, Callable[[str], Source]] = {}


def is_safetensors_folder(p: Path) -> bool:
    """A folder with config.json and model.safetensors or its index, whatever kind of file each is (lexists): a
    FIFO or a folder in their place is then refused by the reader, naming it, rather than taken for a non-checkpoint."""
    return p.is_dir() and os.path.lexists(p / "config.json") and (
        os.path.lexists(p / "model.safetensors") or os.path.lexists(p / "model.safetensors.index.json"))


def open_source(path: str | os.PathLike[str]) -> Source:
    """Open a model by what it is: a ``.gguf`` file (first part of a split set), a folder as ``save_pretrained``
    writes it (``config.json`` + ``model.safetensors`` or ``model.safetensors.index.json`` and shards), or a
    ``scheme://`` URL a registered opener handles (``hf://org/repo[@rev]``).

    >>> open_source("mixtral-q4_0.gguf").kind                 # doctest: +SKIP
    'gguf'
    >>> open_source("mixtral-bf16-sharded/").kind              # doctest: +SKIP
    'safetensors'
    """
    s = os.fspath(path)
    if "://" in s:
        scheme = s.split("://", 1)[0]
        if scheme in REMOTE_OPENERS:
            return REMOTE_OPENERS[scheme](s)
        raise SourceError(f"{s}: no reader for {scheme}:// sources in this installation")
    p = Path(s)
    if p.is_dir():
        if is_safetensors_folder(p):
            from .safetensors import SafeTensorsSource

            return SafeTensorsSource(p)
        ggufs = sorted(p.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: give that file)" if ggufs else ""
        raise SourceError(f"{p}: is a folder but not a SafeTensors checkpoint (config.json with model.safetensors "
                          f"or model.safetensors.index.json){hint}")
    if not p.exists():
        raise SourceError(f"{p}: no such file or folder")
    if p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json"):
        raise SourceError(f"{p}: give the checkpoint folder ({p.parent}), not one of its files")
    from .gguf import GGUFSource

    return GGUFSource(p)
