"""Conversion in steps: plan -> write_experts(subset) -> write_dense -> manifest.

``extract()`` runs them in one go. ``pull`` runs them shard by shard: plan from the headers, then, as each source
file arrives, write the experts whose files are all present (``Conversion.ready``), and delete a source file once
``Conversion.pending_files`` no longer lists it.

    conv = plan(src, dtype="q4_0")
    dense = open_dense(conv, staging)                            # header now; tensors as files arrive
    present = {0, 1}
    entries = write_experts(conv, staging, conv.ready(present))  # shards whose bytes lie in files 0 and 1
    dense.write_ready(present)
    for i in present - conv.pending_files(dense):                # nothing left needs them
        src.release(i); os.unlink(src.files[i])
    ...
    write_manifest(staging, build_manifest(conv, entries, dense.finish()))

Nothing here creates, commits or removes OUT or the staging folder: that is ``extract``'s (and ``pull``'s) job.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from mer_runtime.manifest import MANIFEST_NAME, manifest_bytes, parse_manifest

from .commit import flush_files, test_point
from .errors import MertoolsError
from .layout import ALIGNMENT, DENSE_NAME, ShardLayout, format_version_for, place
from .ranges import Ranges, as_ranges
from .sources import ExpertPlan, Source, with_dtype
from .writer import ShardWriter

WRITERS = 2


@dataclass
class Conversion:
    """What will be written: the chosen experts (after --dtype) and where each goes. Read-only once built."""

    src: Source
    plans: list[ExpertPlan]
    shards: list[ShardLayout]
    dtype: str | None = None
    complete: bool = True
    written: set[tuple[int, int]] = field(default_factory=set)

    @property
    def expert_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def payload_bytes(self) -> int:
        return sum(p.nbytes for p in self.plans)

    def files_of(self, shard: ShardLayout) -> set[int]:
        """Indices (into ``src.files``) of the source files a shard's bytes come from."""
        return {i for pl in shard.placed for i in getattr(pl.projection, "file_indices", (pl.projection.file_index,))}

    def ready(self, present: Iterable[int]) -> list[ShardLayout]:
        """Shards not yet written whose source files are all in `present`."""
        have = set(present)
        return [s for s in self.shards if (s.layer, s.expert) not in self.written and self.files_of(s) <= have]

    def pending_files(self, dense: Any = None) -> set[int]:
        """Source files still needed by shards not yet written, or by the dense part (`dense`: the writer from
        ``open_dense``, which knows which dense tensors are written; without it every dense file counts)."""
        need = set(dense.pending_files() if dense is not None else self.src.dense_file_indices())
        for s in self.shards:
            if (s.layer, s.expert) not in self.written:
                need |= self.files_of(s)
        return need


def plan(src: Source, layers: Iterable[int] | Ranges | None = None, experts: Iterable[int] | Ranges | None = None,
         dtype: str | None = None) -> Conversion:
    """Choose experts (None: all) and the output type (None: the source's; ``q4_0``/``q8_0``/``f16``/``bf16``).

    Selections are kept as intervals (``Ranges``), so ``--layers 0-99999999999`` costs two integers; numbers the
    model lacks are refused, named as ranges.

    >>> conv = plan(open_source("mixtral-bf16-sharded/"), layers={0}, dtype="q4_0")   # doctest: +SKIP
    """
    layers, experts = as_ranges(layers), as_ranges(experts)
    chosen = [p for p in src.experts if (layers is None or p.layer in layers) and (experts is None or p.expert in experts)]
    for name, want, have in (
        ("layers", layers, {p.layer for p in src.experts}),
        ("experts", experts, {p.expert for p in src.experts}),
    ):
        if want is not None and (gone := want.missing(have)):
            raise MertoolsError(f"--{name}: [{gone}] not in the model (it has {name} {min(have)}-{max(have)})")
    chosen = with_dtype(chosen, dtype, f"{src.path}: ")
    return Conversion(src, chosen, [place(p) for p in chosen], dtype.lower() if dtype else None,
                      len(chosen) == len(src.experts))


def write_experts(conv: Conversion, staging: Path, shards: list[ShardLayout] | None = None, *, fsync: bool = False,
                  tick: Callable[[int], None] = lambda n: None, workers: int = WRITERS,
                  writeback: bool = False) -> list[dict[str, Any]]:
    """Write `shards` (default: all of the conversion) under `staging`; returns their manifest entries.

    `fsync`: make this call's shards (and their folders' entries) durable before returning, all at once
    (mertools.commit.flush_files). Writing into :func:`mertools.commit.staged_output` needs none: it flushes the
    whole output before the commit. ``pull`` uses it to make each step durable before journalling it.
    `writeback`: start writing each shard to disk as soon as it is complete (for an output that will be flushed:
    the disk then works while the next shards are copied).

    Only the source files those shards need are opened. Call it again with further disjoint subsets as more
    source files arrive; each shard written is recorded in ``conv.written``. Not thread-safe across calls on one
    ``Conversion`` (one caller at a time); within a call, `workers` threads write shards in parallel.
    """
    shards = conv.shards if shards is None else shards
    writer = ShardWriter(conv.src, tick, writeback=writeback or fsync)
    for shard in shards:
        (staging / shard.path).parent.mkdir(parents=True, exist_ok=True)
    def write(sh: ShardLayout) -> tuple[str, dict[str, str]]:
        r = writer.write_shard(sh, staging / sh.path)
        test_point("writing")
        return r

    # Shards are independent; two writers keep both cores busy hashing while the other copies.
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1)))
    try:
        written = list(pool.map(write, shards))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error or a signal, stop at once
    if fsync:
        # every folder from the shards up to staging itself: a new layer folder's name is an entry of its parent
        dirs = {staging}
        for s in shards:
            dirs.update(p for p in (staging / s.path).parents if p.is_relative_to(staging))
        flush_files([staging / s.path for s in shards], sorted(dirs))
    conv.written.update((s.layer, s.expert) for s in shards)
    return [shard_entry(shard, whole, hashes) for shard, (whole, hashes) in zip(shards, written)]


def write_dense(conv: Conversion, staging: Path, *, fsync: bool = False,
                tick: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Write dense.gguf under `staging`; returns the manifest's ``dense`` object."""
    return conv.src.write_dense(staging / DENSE_NAME, fsync=fsync, tick=tick)


class _WholeDense:
    """For sources that write dense.gguf in one go (GGUF): written once every file it reads is present."""

    def __init__(self, src: Source, path: Path, fsync: bool):
        self.src, self.path, self.fsync = src, path, fsync
        self.entry: dict[str, Any] | None = None

    def pending_files(self) -> set[int]:
        return set() if self.entry is not None else set(self.src.dense_file_indices())

    def write_ready(self, present: Iterable[int] | None = None, tick: Callable[[int], None] = lambda n: None) -> int:
        if self.entry is None and (present is None or set(self.src.dense_file_indices()) <= set(present)):
            self.entry = self.src.write_dense(self.path, fsync=self.fsync, tick=tick)
            return len(self.src.dense_tensors())
        return 0

    def finish(self) -> dict[str, Any]:
        self.write_ready(None)
        assert self.entry is not None
        return self.entry

    def close(self) -> None:
        pass


def open_dense(conv: Conversion, staging: Path, *, fsync: bool = False) -> Any:
    """A dense.gguf writer for piecewise conversion, with ``write_ready(present, tick)``, ``pending_files()``,
    ``finish() -> manifest dense object`` and ``close()``. SafeTensors sources write the header at once and each
    tensor as its file arrives; other sources write everything when all their files are present."""
    path = staging / DENSE_NAME
    opener = getattr(conv.src, "open_dense", None)
    return opener(path, fsync=fsync) if opener is not None else _WholeDense(conv.src, path, fsync)


def shard_entry(shard: ShardLayout, whole: str, hashes: dict[str, str]) -> dict[str, Any]:
    def tensor(p: Any, offset: int) -> dict[str, Any]:
        d = {"dtype": p.dtype, "shape": list(p.shape), "offset": offset, "nbytes": p.nbytes,
             "xxh3_64": hashes[p.role], "source": p.tensor}
        if getattr(p, "transform", "none") != "none":
            d["transform"] = p.transform
        return d

    return {
        "layer": shard.layer,
        "expert": shard.expert,
        "path": shard.path,
        "size": shard.size,
        "xxh3_64": whole,
        "tensors": {pl.projection.role: tensor(pl.projection, pl.offset) for pl in shard.placed},
    }


def build_manifest(conv: Conversion, entries: list[dict[str, Any]], dense: dict[str, Any],
                   extra_source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest (checked by the reader every consumer uses is left to ``write_manifest``).

    `extra_source` adds fields to ``source`` (``pull`` records repo, revision and sha256 there).
    """
    from . import __version__  # read here: inspect imports this module for plan() and needs no importlib.metadata

    source = dict(conv.src.source_info())
    if conv.dtype:
        source["dtype"] = conv.dtype
    if extra_source:
        source.update(extra_source)
    return {
        "format_version": format_version_for(conv.plans),  # 2 only where scales are carried
        "alignment": ALIGNMENT,
        "created_by": f"mertools {__version__}",
        "model": conv.src.model,
        "source": source,
        "selection": {
            "complete": conv.complete,
            "layers": sorted({p.layer for p in conv.plans}),
            "experts": sorted({p.expert for p in conv.plans}),
        },
        "dense": dense,
        "experts": sorted(entries, key=lambda e: (e["layer"], e["expert"])),
    }


def write_manifest(staging: Path, manifest: dict[str, Any]) -> Path:
    """Check `manifest` with the runtime's reader against the files in `staging`, then write it (last). Not flushed
    here: ``staged_output`` flushes the whole output before naming it."""
    parse_manifest(manifest, staging)  # the writer must satisfy the reader every consumer uses
    mpath = staging / MANIFEST_NAME
    mpath.write_bytes(manifest_bytes(manifest))  # with manifest_xxh3, so that verify notices any later edit
    return mpath
