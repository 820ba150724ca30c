"""``extract``: write every expert of a model (GGUF, or SafeTensors checkpoint) into its own aligned shard, plus
dense.gguf and manifest.json. The steps (plan, write experts, dense, manifest) are in ``convert.py``.

Everything is written into a hidden staging folder beside OUT and renamed into place only once the manifest,
the last file, is on disk; an interrupted or failed run never leaves an OUT that looks complete.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .convert import Conversion, build_manifest, plan, write_dense, write_experts, write_manifest
from .errors import MertoolsError, OutputError
from .sources import ExpertPlan, Source, open_source
from .writer import PIECE, SEGMENT, ShardWriter  # noqa: F401  (SEGMENT/PIECE: re-exported for callers and tests)
from .units import human_bytes

WRITERS = 2
STAGING_MARK = ".mertools-staging-"


@dataclass
class ExtractResult:
    out: Path
    experts: int
    layers: int
    bytes_written: int
    expert_bytes: int
    dense_bytes: int
    seconds: float

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
        }


def parse_ranges(spec: str | None, what: str) -> set[int] | None:
    """'0-3,7' -> {0,1,2,3,7}; None stays None (everything)."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise MertoolsError(f"--{what} {spec!r}: expected numbers and ranges such as 0-3,7") from None
    return out


def select(src: Source, layers: set[int] | None, experts: set[int] | None) -> list[ExpertPlan]:
    return plan(src, layers, experts).plans


_Writer = ShardWriter  # the writer lives in writer.py (byte ranges or transformed bands, hashed as written)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_stale_staging(out: Path) -> None:
    """Remove staging folders that runs killed before they could clean up left beside OUT."""
    prefix = f".{out.name}{STAGING_MARK}"
    for p in out.parent.glob(prefix + "*"):
        try:
            pid = int(p.name[len(prefix):].split("-")[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            continue  # that run is still going
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: folder is not empty; pass --overwrite to replace it, or choose an empty folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out.parent}: cannot create the parent folder ({exc.strerror})") from None


def _check_space(where: Path, need: int) -> None:
    free = shutil.disk_usage(where).free
    if free < need:
        raise OutputError(
            f"{where}: needs {human_bytes(need)} free but only {human_bytes(free)} is; free some space or choose "
            "another OUT (use --layers/--experts to extract part of the model)"
        )


def extract(
    src_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layers: set[int] | None = None,
    experts: set[int] | None = None,
    overwrite: bool = False,
    fsync: bool = True,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    dtype: str | None = None,
) -> ExtractResult:
    """Extract experts from a model (GGUF file, or SafeTensors checkpoint folder) into OUT.

    `dtype` (``q4_0``, ``q8_0``, ``f16``, ``bf16``) converts the expert weights during extraction with the gguf
    package's quantizer; None keeps the source type. Returns a summary; raises MertoolsError on bad input.

    >>> extract("mixtral-q4_0.gguf", "out/")                        # doctest: +SKIP
    >>> extract("model-00001-of-00003.gguf", "out/", layers={0, 1})  # doctest: +SKIP
    >>> extract("mixtral-bf16/", "out/", dtype="q4_0")               # doctest: +SKIP
    """
    t0 = time.perf_counter()
    src = open_source(src_path)
    try:
        return _extract(src, out, layers, experts, overwrite, fsync, progress, dtype, t0)
    finally:
        src.close()


def _extract(src: Source, out: str | os.PathLike[str], layers: set[int] | None, experts: set[int] | None,
             overwrite: bool, fsync: bool, progress: Callable[[int, int], Callable[[int], None]] | None,
             dtype: str | None, t0: float) -> ExtractResult:
    out = Path(out).absolute()
    _check_out(out, overwrite)
    conv: Conversion = plan(src, layers, experts, dtype)
    shards = conv.shards
    dense_tensors = src.dense_tensors()
    expert_bytes = conv.expert_bytes
    _clean_stale_staging(out)
    _check_space(out.parent, expert_bytes + src.dense_estimate())

    staging = out.parent / f".{out.name}{STAGING_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    total = conv.payload_bytes + sum(t.nbytes for t in dense_tensors)
    tick = progress(total, len(shards)) if progress else (lambda n: None)
    try:
        entries = write_experts(conv, staging, fsync=fsync, tick=tick, workers=WRITERS)
        dense = write_dense(conv, staging, fsync=fsync, tick=tick)
        write_manifest(staging, build_manifest(conv, entries, dense), fsync=fsync)
        if fsync:
            for d in {(staging / s.path).parent for s in shards} | {staging / "experts", staging}:
                _fsync_dir(d)
        _commit(staging, out)
        if fsync:
            _fsync_dir(out.parent)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"{out}: the disk filled up while writing ({exc.strerror}); nothing was left behind. Free space or "
                "choose another OUT"
            ) from None
        if isinstance(exc, OSError) and not isinstance(exc, MertoolsError):
            raise OutputError(f"{exc.filename or out}: {exc.strerror or exc}; nothing was left behind") from None
        raise
    return ExtractResult(
        out, len(shards), len({s.layer for s in shards}), expert_bytes + dense["size"], expert_bytes, dense["size"],
        time.perf_counter() - t0,
    )


def _commit(staging: Path, out: Path) -> None:
    """Put the finished staging folder at OUT; an old OUT (only with --overwrite) goes only after that."""
    trash = None
    if out.exists():
        if any(out.iterdir()):
            trash = out.parent / f".{out.name}.mertools-old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
        else:
            out.rmdir()
    try:
        staging.rename(out)
    except BaseException:
        if trash is not None:
            trash.rename(out)  # put the old output back: a failed replace must not lose it
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
