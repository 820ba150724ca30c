"""``extract``: write every expert of a model (GGUF, or SafeTensors checkpoint) into its own aligned shard, plus
dense.gguf and manifest.json. The steps (plan, write experts, dense, manifest) are in ``convert.py``.

Everything is written into a hidden staging folder beside OUT and renamed into place only once the manifest,
the last file, is on disk (mertools.commit); an interrupted or failed run never leaves an OUT that looks complete.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .companions import (check_given as check_companions, local as local_companions, total_size as companions_size,
                         write as write_companions)
from .commit import MARKER, STAGING_MARK, fsync_dir, staged_output  # noqa: F401  (old import paths)
from .convert import build_manifest, plan, write_dense, write_experts, write_manifest
from .ranges import Ranges, parse_ranges  # noqa: F401  (parse_ranges: old import path)
from .reassemble import record_for_reassembly
from .sources import Source, open_source
from .sources.scales import check_scales


@dataclass
class ExtractResult:
    out: Path
    experts: int
    layers: int
    bytes_written: int
    expert_bytes: int
    dense_bytes: int
    seconds: float
    flushed: dict[str, Any] | None = None  # what the durable commit flushed (None: --no-fsync)
    companions: list[str] = field(default_factory=list)  # files kept in OUT/hf/ (mertools.companions)
    companions_skipped: list[dict[str, str]] = field(default_factory=list)  # [{name, why}] left out, with why

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "experts": self.experts,
            "layers": self.layers,
            "bytes_written": self.bytes_written,
            "expert_bytes": self.expert_bytes,
            "dense_bytes": self.dense_bytes,
            "seconds": round(self.seconds, 4),
            "gb_per_s": round(self.gb_per_s, 4),
            "flushed": self.flushed,
            "companions": self.companions,
            "companions_skipped": self.companions_skipped,
        }




def extract(
    src_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layers: Iterable[int] | Ranges | None = None,
    experts: Iterable[int] | Ranges | None = None,
    overwrite: bool = False,
    fsync: bool = True,
    wait: bool = False,
    marker: str | None = MARKER,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    dtype: str | None = None,
    source_extra: dict[str, Any] | None = None,
    companions: Iterable[str | os.PathLike[str]] | None = None,
) -> ExtractResult:
    """Extract experts from a model (GGUF file, or SafeTensors checkpoint folder) into OUT.

    `dtype` (``q4_0``, ``q8_0``, ``f16``, ``bf16``) converts the expert weights during extraction with the gguf
    package's quantizer; None keeps the source type. Returns a summary; raises MertoolsError on bad input.

    OUT appears complete or not at all; see :func:`mertools.commit.staged_output` for the rules (lock, overwrite,
    signals, crash recovery), ``wait`` and ``marker`` (the file a folder must hold for ``overwrite`` to replace it).

    ``source_extra`` adds fields to the manifest's ``source`` (``pull`` records the hub repo, commit and sha256s).

    A SafeTensors checkpoint's companion files (tokenizer, generation config, ...) are copied into ``OUT/hf/`` by
    the rule of :mod:`mertools.companions`; ``companions`` gives the files instead (``pull``: the ones it
    downloaded and checked). A GGUF source has none (its tokenizer is in dense.gguf).

    >>> extract("mixtral-q4_0.gguf", "out/")                        # doctest: +SKIP
    >>> extract("model-00001-of-00003.gguf", "out/", layers={0, 1})  # doctest: +SKIP
    >>> extract("mixtral-bf16/", "out/", dtype="q4_0")               # doctest: +SKIP
    """
    t0 = time.perf_counter()
    src = open_source(src_path)
    try:
        chosen: list[Path] = []
        skipped: list[dict[str, str]] = []
        if companions is not None:
            chosen = [Path(p) for p in companions]
            check_companions(chosen)
        elif src.kind == "safetensors":
            chosen, skipped = local_companions(Path(src.path))
        r = _extract(src, Path(os.path.abspath(out)), layers, experts, overwrite, fsync, wait, marker, progress,
                     dtype, source_extra, t0, chosen)
        r.companions_skipped = skipped
        return r
    finally:
        src.close()


def _extract(src: Source, out: Path, layers: Iterable[int] | Ranges | None, experts: Iterable[int] | Ranges | None,
             overwrite: bool, fsync: bool, wait: bool, marker: str | None,
             progress: Callable[[int, int], Callable[[int], None]] | None, dtype: str | None,
             source_extra: dict[str, Any] | None, t0: float, companions: list[Path]) -> ExtractResult:
    conv = plan(src, layers, experts, dtype)
    check_scales(src, conv.plans)  # before the staging folder exists: a NaN scale leaves nothing behind
    shards = conv.shards
    expert_bytes = conv.expert_bytes
    total = conv.payload_bytes + sum(t.nbytes for t in src.dense_tensors())
    report: dict[str, Any] = {}
    # nothing below flushes a file: staged_output makes the whole folder durable at once before the commit
    with staged_output(out, overwrite=overwrite, sources=src.files, fsync=fsync, wait=wait, marker=marker,
                       need_bytes=expert_bytes + src.dense_estimate() + companions_size(companions),
                       report=report) as staging:
        tick = progress(total, len(shards)) if progress else (lambda n: None)
        entries = write_experts(conv, staging, tick=tick, writeback=fsync)
        dense = write_dense(conv, staging, tick=tick)
        manifest = build_manifest(conv, entries, dense, extra_source=source_extra)
        if src.kind == "safetensors":  # an empty list too: reassemble then knows nothing was left behind
            manifest["companions"] = write_companions(companions, staging)
        # what `reassemble` needs beyond shards and dense.gguf (source headers, tensor places, xxh3s): whole
        # models extracted whole and unconverted, since only they give back the source bytes
        if src.kind in ("gguf", "safetensors") and conv.complete and conv.dtype is None:
            record = record_for_reassembly(src, staging)
            if record is not None:
                manifest["reassembly"] = record
        check = getattr(src, "check", None)
        if check is not None:  # every mapped source still whole (one fstat each) before anything becomes durable
            check()
        write_manifest(staging, manifest)
    kept = manifest.get("companions", [])
    return ExtractResult(
        out, len(shards), len({s.layer for s in shards}), expert_bytes + dense["size"], expert_bytes, dense["size"],
        time.perf_counter() - t0, report.get("flushed"), [c["path"] for c in kept],
    )
