"""``verify --deep``: the shard bytes against the source, exactly, and the runtime's kernels against an independent
float64 reference, at about the speed of reading the shards and the source once.

Bytes (with ``--against SRC``). The expert's tensors are found in the source by name with the gguf package's reader
(not through the converter's plan); every projection's bytes are compared with the shard's exactly (both read with
pread, a piece at a time, and compared with libc ``memcmp``, in the same pass that computes the shard's checksums:
each shard byte is read once, see ``scan_shard``). This alone catches any changed byte, checksums rewritten or
not. Other sources go through the ``Source`` protocol (the bytes after the documented transform and ``--dtype``).

The source is read once per expert: an expert whose bytes verify's checksum pass found equal to the source's takes
its float64 reference (below) from the shard's bytes, which are then the source's own, so a fused or transposed
SafeTensors layout is transformed once. Every mapping here is guarded (``mer_runtime.guard``): a shard or source that
shrinks meanwhile raises FileChangedError naming it, never SIGBUS (a mapping the handler does not cover, its slot
table being full, is size-checked before each piece is touched: ``Region.guarded``).

Numbers. Every expert: ``SAMPLE_ROWS`` seeded rows of each projection (plus its first and last) run through the
runtime's kernel (``mer_runtime.kernels.matvec`` on those rows' shard bytes) and compared with gguf's float64
dequantization of only those rows' blocks in the source (or the shard without ``--against``): a bounded cost per
projection, and a kernel that misreads a type misreads every row. The first ``RUNTIME_EXPERTS`` experts, and one of each type
signature not yet covered, also go through the runtime's loader and its fused expert call (``ShardSet.load`` +
``compute``); their output is compared
on sampled rows (float64 down rows applied to the runtime's activations). Whole outputs are compared (float64
gate, up and down, every row) for the experts that fit the whole-output budget: every expert of a small model, and
for a big one as many as fit in 1/``WHOLE_SHARE`` of its projection bytes (at least ``WHOLE_MIN`` bytes), because
gguf's NumPy dequantization runs about 100x slower than a read (a Mixtral-shaped expert costs ~1 s).

Memory stays bounded whatever an expert's size: the byte scan reads into two buffers of a ``PIECE``, mappings are
dropped (``MADV_DONTNEED``) every ``RELEASE_BYTES``, a transform's output is never held whole (``_Bands``: its own
bands are made as the reads go forward and let go behind them), references are dequantized ``BAND_BYTES`` of
float64 at a time, and only the runtime's cache (2 slots) holds whole experts.

Tolerance: max|y - y_ref| / max|y_ref| <= 1e-4. The runtime computes in float32 (weights exact, activations not
quantized), whose rounding over a few thousand-term dot products stays near 1e-6; one changed weight byte moves
the output by far more on the seeded inputs. NaN and inf weights (a source may hold them) must come out where the
reference has them, the finite rest is compared; where they leave no finite output, rows are checked one by one.
A per-expert scale is different: one NaN or inf scale makes the whole expert's output non-finite on both sides, so
each is checked by value (``scale_problems``) and reported, and that expert is not run.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, NamedTuple, Sequence

import numpy as np
import xxhash
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from mer_runtime.checksum import pread_full, read_pieces
from mer_runtime.errors import MerError
from mer_runtime.guard import GUARDED, FileChangedError, Guard, map_file
from mer_runtime.kernels import matvec
from mer_runtime.manifest import SCALE_ROLES, ExpertEntry, Manifest
from mer_runtime.safeopen import open_regular
from mer_runtime.shards import ShardSet, open_shards

from .commit import test_point
from .errors import SourceError
from .gguf_source import _open_reader, split_parts
from .report import Problem, VerifyReport
from .sources.files import MappedFiles

TOLERANCE = 1e-4
SEED = 12648430
N_INPUTS = 2
BAND_BYTES = 16 << 20  # float64 weights dequantized at a time for a reference
PIECE = 1 << 20  # bytes hashed and compared at a time: small enough that the second touch finds them in cache
RELEASE_BYTES = 16 << 20  # mapped source bytes dropped (MADV_DONTNEED) after each this many: RSS stays bounded
SAMPLE_ROWS = 16  # seeded rows a projection (plus its first and last); each costs ~0.2 ms on big rows
RUNTIME_EXPERTS = 1  # experts also loaded through the runtime's loader and computed by its fused call
WHOLE_MIN = 16 << 20  # projection bytes whose whole output gets a float64 reference, at least ...
WHOLE_SHARE = 1024  # ... or 1/WHOLE_SHARE of the folder's projection bytes (gguf's dequantization is ~100x a read)
NUMERIC_ROLES = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias", "gate_scale", "up_scale", "down_scale")
WEIGHT_ROLES = ("gate", "up", "down")
_PAGE = mmap.PAGESIZE


def _find_libc() -> str | None:
    import ctypes.util  # only here: it imports subprocess (1-1.5 ms of every deep verify's start)

    return ctypes.util.find_library("c")


def _libc_memcmp() -> Callable[[int, int, int], int] | None:
    # libc's memcmp (vectorised, no temporary, and ctypes releases the GIL so threads compare in parallel)
    names = (None, "libc.so.6", _find_libc)  # None: this process's own symbols;
    for name in names:  # find_library last, and only if needed: it runs ldconfig
        try:
            f = ctypes.CDLL(name() if callable(name) else name).memcmp
            break
        except (OSError, AttributeError, TypeError):
            continue
    else:
        return None
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
    return f


_MEMCMP = _libc_memcmp()


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """Index of the first byte where two equally long uint8 arrays differ, or None when they are equal.

    >>> first_difference(np.frombuffer(b"abcd", np.uint8), np.frombuffer(b"abXd", np.uint8))
    2
    """
    if a.size != b.size:
        raise ValueError(f"{a.size} bytes against {b.size}")
    if a.size == 0:
        return None
    if _MEMCMP is not None and a.flags.c_contiguous and b.flags.c_contiguous:
        if _MEMCMP(a.ctypes.data, b.ctypes.data, a.size) == 0:
            return None
    elif np.array_equal(a, b):
        return None
    return int(np.flatnonzero(a != b)[0])


def seeded_inputs(d_model: int, seed: int = SEED, n: int = N_INPUTS) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d_model)).astype(np.float32)


def _no_check() -> None:
    return None


class Region(NamedTuple):
    """One projection of one expert in the source, read forward a piece at a time (not thread-safe: one reader).

    `dtype` and `name` (for messages); `size`, its bytes after the documented transform; `read(lo, hi)`, bytes
    lo..hi as a uint8 array (a view of the source's mapping for a plain byte range; for a transform, the bands its
    transform made that cover them, made as the reads go forward: see `_Bands`); `release(lo, hi)`, drop bytes
    lo..hi from this process once compared (mapped pages; for a transform, once released to its end, its bands and
    the source pages it read); `check()` raises FileChangedError when the source file shrank under its mapping (the
    pages gone read as zeros, mer_runtime.guard); `guarded`, whether the SIGBUS handler covers every mapping the
    bytes are read from: when not (no compiled handler, or its slot table was full), `read()` runs `check()` before
    it touches the mapping, so the byte scan and the numeric reference are both covered. Until a transformed
    projection is released to its end, the source slice its transform reads stays mapped (clean file pages, about
    the projection's source size: a fused gate_up holds both halves). `into(lo, out)`, where the bytes are a plain
    range of a file: reads bytes lo..lo + out.size into the uint8 array `out` with pread (what the byte scan uses:
    faster than the mapping, and a source that shrank is FileChangedError naming it); None otherwise."""

    dtype: str
    name: str
    size: int
    read: Callable[[int, int], np.ndarray]
    release: Callable[[int, int], None]
    check: Callable[[], None] = _no_check
    guarded: bool = False
    into: Callable[[int, np.ndarray], None] | None = None


def _slicer(data: np.ndarray, before: Callable[[], None] | None = None) -> Callable[[int, int], np.ndarray]:
    """Reads of a plain byte range; `before` (an unguarded mapping's size check) runs before each: the numeric
    reference touches these bytes too, not only the byte scan."""
    def read(lo: int, hi: int) -> np.ndarray:
        if before is not None:
            before()
        return data[lo:hi]

    return read


class _Bands:
    """The bytes of a transformed projection, made by its transform a band at a time as forward reads need them.

    `start()` gives a fresh iterator over the transform's bands (any dtype: their bytes are used); `read(lo, hi)`
    runs it as far as `hi` and lets go of the bands wholly before `lo` (and of all once read to the end), so what is
    held is about the bands one read spans: memory is bounded by the transform's band (a few MiB), not by the
    projection's size. A read before the held bands starts the transform again (forward readers, as here, never do).
    `before()`, when given, runs before each band is made (the size check an unguarded mapping needs before it is
    touched). Not thread-safe: one reader at a time.

    >>> b = _Bands(lambda: iter([np.arange(4, dtype=np.uint8), np.arange(4, 8, dtype=np.uint8)]), 8, "t")
    >>> b.read(2, 6).tolist(), b.read(6, 8).tolist()
    ([2, 3, 4, 5], [6, 7])
    """

    def __init__(self, start: Callable[[], Iterator[Any]], size: int, name: str,
                 before: Callable[[], None] | None = None):
        self._start, self.size, self.name, self._before = start, size, name, before
        self._it: Iterator[Any] | None = None
        self._held: deque[tuple[int, np.ndarray]] = deque()  # (offset, band bytes), consecutive
        self._end = 0  # offset after the last band made

    def close(self) -> None:
        """Let go of the bands and the transform (its frame holds views of the source's mapping)."""
        it, self._it = self._it, None
        self._held.clear()
        self._end = 0
        if it is not None and hasattr(it, "close"):
            it.close()

    def _next_band(self) -> np.ndarray:
        band = next(self._it, None)
        if band is None:
            raise SourceError(f"{self.name}: its transform gave {self._end} bytes where {self.size} were planned; "
                              "report this as a bug")
        return np.ascontiguousarray(band).view(np.uint8).reshape(-1)  # an F16 band's bytes, not its values

    def read(self, lo: int, hi: int) -> np.ndarray:
        if not 0 <= lo <= hi <= self.size:
            raise ValueError(f"{self.name}: bytes {lo}..{hi} of {self.size}")
        if lo == hi:
            return np.empty(0, np.uint8)
        held = self._held
        if self._it is None or lo < (held[0][0] if held else self._end):
            self.close()
            self._it = iter(self._start())
        while held and held[0][0] + held[0][1].size <= lo:
            held.popleft()
        while self._end < hi:
            if self._before is not None:
                self._before()
            start, b = self._end, self._next_band()
            self._end += b.size
            if self._end > self.size:
                raise SourceError(f"{self.name}: its transform gave more than the {self.size} bytes planned; report "
                                  "this as a bug")
            if self._end > lo:
                held.append((start, b))
            del b  # a band skipped over is not kept alive while the next one is made
        s0, b0 = held[0]
        if hi <= s0 + b0.size:  # inside one band: a view, no copy
            out = b0[lo - s0:hi - s0]
        else:
            out = np.empty(hi - lo, np.uint8)  # across bands: a copy of just these bytes
            for s, b in held:
                a, z = max(lo, s), min(hi, s + b.size)
                if a < z:
                    out[a - lo:z - lo] = b[a - s:z - s]
        if hi == self.size:  # read to its end: nothing more is held (a view returned keeps its band while used)
            held.clear()
        return out


def _preader(fd: int, base: int, path: Path, size: int) -> Callable[[int, np.ndarray], None]:
    """into(lo, out) for a region at byte `base` of open file `fd` of `size` bytes when mapped (see `Region.into`)."""

    def into(lo: int, out: np.ndarray) -> None:
        try:
            pread_full(fd, out, base + lo, size, path)
        except OSError as exc:  # the source's, not the shard's: verify must not FAIL the shard it compares for it
            raise SourceError(f"{path}: cannot read the reference model ({exc.strerror or exc}); check the file (or "
                              "its disk) and re-run") from None

    return into


def _no_release(lo: int, hi: int) -> None:
    return None


def _dropper(mm: mmap.mmap, base: int) -> Callable[[int, int], None]:
    """release(lo, hi) for a region at byte `base` of mapping `mm`: whole pages inside it only (a neighbour's pages
    are left alone, though dropping them would be harmless: a page dropped is faulted back from the page cache)."""

    def release(lo: int, hi: int) -> None:
        start = -(-(base + lo) // _PAGE) * _PAGE
        stop = min((base + hi) // _PAGE * _PAGE, len(mm))
        if stop > start:
            mm.madvise(mmap.MADV_DONTNEED, start, stop - start)

    return release


class SourceReference:
    """Expert tensors of the source model, for ``--against``. Thread-safe once built (read-only lookups).

    A GGUF is read by tensor name with the gguf package's reader (not through the converter's plan); its bytes are
    then taken from a mapping of our own (the same file offsets), so that compared bytes can be dropped and memory
    stays bounded. Any other source (a SafeTensors checkpoint, or what a registered ``scheme://`` opener returns)
    goes through the ``Source`` protocol: the projection's bytes are the source slice after its documented
    transform, converted to the type the manifest records (``--dtype``) with the same quantizer; the transforms
    themselves are checked against independent NumPy slicing in the tests.

    >>> src = SourceReference("model.gguf")                                # doctest: +SKIP
    >>> src.region(0, 3, "gate").name                                       # doctest: +SKIP
    'blk.0.ffn_gate_exps.weight[3]'
    """

    def __init__(self, path: str | os.PathLike[str], manifest: Manifest | None = None):
        self.path = Path(path)
        self.source = None
        # (mapping, its bytes, the reader's address, the mapping's guard, the open file: the byte scan preads it)
        self._maps: list[tuple[mmap.mmap, np.ndarray, int, Guard, int]] = []
        self._fds: dict[int, tuple[int, int]] = {}  # a checkpoint's files opened for the byte scan: (fd, size)
        self._fds_lock = threading.Lock()
        dtype = (manifest.source or {}).get("dtype") if manifest is not None else None
        # a GGUF is read by name, independently of the converter's plan, unless the folder was converted with
        # --dtype: then the reference bytes are the source's after the same quantizer, as for any other source
        if "://" not in os.fspath(path) and not self.path.is_dir() and not dtype:
            self.tensors, self._part_of, self._readers = {}, {}, []
            try:
                self._parts = split_parts(self.path)
                for part in self._parts:
                    reader = _open_reader(part)
                    self._readers.append(reader)
                    for t in reader.tensors:
                        self.tensors[t.name] = t
                        self._part_of[t.name] = len(self._maps)
                    self._maps.append(self._map(part, reader))
            except (ValueError, OSError, MerError) as exc:
                self.close()
                if isinstance(exc, FileChangedError):
                    raise
                raise SourceError(f"{self.path}: cannot read the reference model ({getattr(exc, 'reason', exc)}); "
                                  "--against takes the model the folder was extracted from (a GGUF file, the first "
                                  "part of a split one, or a SafeTensors checkpoint folder)") from None
            test_point("reference-mapped")
            return
        from .sources import open_source, with_dtype

        self.source = open_source(path)
        self._plans = {(p.layer, p.expert): p for p in with_dtype(self.source.experts, dtype)}
        test_point("reference-mapped")

    @staticmethod
    def _map(part: Path, reader: Any) -> tuple[mmap.mmap, np.ndarray, int, Guard, int]:
        fd, st = open_regular(part)
        try:
            mm, guard = map_file(fd, st.st_size, part)
        except BaseException:
            os.close(fd)
            raise
        return mm, np.frombuffer(mm, np.uint8), int(reader.data.ctypes.data), guard, fd

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        with self._fds_lock:
            fds, self._fds = self._fds, {}
        for fd, _ in fds.values():
            os.close(fd)
        for reader in getattr(self, "_readers", ()):
            reader.guard.close()  # before its memmap can go (mer_runtime.guard.Guard)
        maps, self._maps = self._maps, []
        for mm, arr, _, guard, fd in maps:
            del arr
            guard.close()
            os.close(fd)
            try:
                mm.close()
            except BufferError:  # a caller still holds a view: the mapping goes with the last one
                pass

    def _check_expert(self, name: str, t: Any, expert: int) -> None:
        if not 0 <= expert < t.data.shape[0]:
            raise SourceError(f"{self.path}: {name} has {t.data.shape[0]} experts, the folder has expert {expert}; "
                              "is this the model the folder was extracted from?")

    def _lookup(self, layer: int, expert: int, role: str) -> tuple[str, str, str, np.ndarray]:
        """(tensor name, the slice's description for messages, type name, the slice as the reader holds it)."""
        kind = role.rpartition("_")[2] if role.endswith(("_bias", "_scale")) else "weight"
        base = role.removesuffix("_bias").removesuffix("_scale")
        name = f"blk.{layer}.ffn_{base}_exps.{kind}"
        if (t := self.tensors.get(name)) is not None:
            self._check_expert(name, t, expert)
            view = t.data[expert:expert + 1] if kind == "scale" else t.data[expert]
            return name, f"{name}[{expert}]", t.tensor_type.name, view
        name = f"blk.{layer}.ffn_gate_up_exps.{kind}"
        if (t := self.tensors.get(name)) is not None:
            self._check_expert(name, t, expert)
            d = t.data[expert]
            half = d.shape[0] // 2
            rows = f":{half}" if base == "gate" else f"{half}:"
            return name, f"{name}[{expert}][{rows}]", t.tensor_type.name, d[:half] if base == "gate" else d[half:]
        name = f"blk.{layer}.ffn_{base}.{expert}.{kind}"
        if (t := self.tensors.get(name)) is not None:
            return name, name, t.tensor_type.name, t.data
        raise SourceError(f"{self.path}: no tensor for layer {layer} expert {expert} {role}; is this the model the "
                          "folder was extracted from?")

    def region(self, layer: int, expert: int, role: str) -> Region:
        """The projection's source bytes (see `Region`); raises SourceError when the source has no such tensor.
        A transform's bytes are made as they are read (`_Bands`), so nothing the size of a matrix is held."""
        if self.source is not None:
            return self._source_region(layer, expert, role)
        name, desc, dtype, view = self._lookup(layer, expert, role)
        part = self._part_of[name]
        desc = f"{desc} in {self._parts[part].name}"
        mm, arr, addr, guard, fd = self._maps[part]
        if not view.flags.c_contiguous:  # never for an expert's slice of a tensor; a copy is still right
            data = np.ascontiguousarray(view).view(np.uint8).reshape(-1)
            self._readers[part].guard.check()  # copied from the reader's own mapping
            return Region(dtype, desc, data.size, _slicer(data), _no_release, guarded=True)
        off = int(view.ctypes.data) - addr  # the same offset in our own mapping of the same file
        before = None if guard.guarded else guard.check
        return Region(dtype, desc, view.nbytes, _slicer(arr[off:off + view.nbytes], before), _dropper(mm, off),
                      guard.check, guard.guarded, _preader(fd, off, self._parts[part], guard.size))

    def _projection(self, layer: int, expert: int, role: str) -> Any:
        plan = self._plans.get((layer, expert))
        proj = next((q for q in plan.projections if q.role == role), None) if plan else None
        if proj is None:
            raise SourceError(f"{self.path}: no tensor for layer {layer} expert {expert} {role}; is this the model "
                              "the folder was extracted from?")
        return proj

    def _source_region(self, layer: int, expert: int, role: str) -> Region:
        proj = self._projection(layer, expert, role)
        src = self.source
        check = getattr(src, "check", None) or _no_check  # MappedFiles' (any scheme:// opener's)
        if isinstance(src, MappedFiles):  # only the files this projection reads: an unguarded region is checked
            def check(fis: tuple[int, ...] = proj.file_indices) -> None:  # before each piece, and a sharded
                for i in fis:  # checkpoint may have hundreds of files
                    src.check(i)
        drop = getattr(src, "drop", None)
        files = getattr(src, "files", None)
        # every file the bytes come from (an MXFP4 projection's scales may lie in another shard than its blocks)
        name = proj.tensor + (" in " + ", ".join(dict.fromkeys(Path(files[i]).name for i in proj.file_indices))
                              if files else "")
        guarded = self._guarded(proj)
        if proj.produce is None:  # a view of the mapping: dropped band by band
            data = self._read_source(layer, expert, role)
            release = _no_release
            if drop is not None:
                def release(lo: int, hi: int, fi: int = proj.file_index, base: int = proj.offset) -> None:
                    drop(fi, base + lo, base + hi)
            into = None
            if isinstance(src, MappedFiles):  # local files: the byte scan preads them
                fd, size = self._open_file(proj.file_index, Path(files[proj.file_index]))
                into = _preader(fd, proj.offset, Path(files[proj.file_index]), size)
            return Region(proj.dtype, name, proj.nbytes, _slicer(data, None if guarded else check), release, check,
                          guarded, into)
        bands = _Bands(lambda: self._read_source(layer, expert, role), proj.nbytes, name,
                       None if guarded else check)

        def release_bands(lo: int, hi: int) -> None:
            if hi >= proj.nbytes:  # read to its end: the bands, and the source pages the transform read, go
                bands.close()
                for fi, a, b in proj.source_spans if drop is not None else ():
                    drop(fi, a, b)

        return Region(proj.dtype, name, proj.nbytes, bands.read, release_bands, check, guarded)

    def _open_file(self, i: int, path: Path) -> tuple[int, int]:
        """(fd, size when opened) of source file `i`, opened once (the byte scan's threads share it: pread)."""
        with self._fds_lock:
            if i not in self._fds:
                fd, st = open_regular(path)
                self._fds[i] = fd, st.st_size
            return self._fds[i]

    def _guarded(self, proj: Any) -> bool:
        """Whether every source file the projection is read from is mapped under the SIGBUS handler (MappedFiles;
        an opener without `guarded` counts as unguarded: its regions are checked before each touch)."""
        guarded = getattr(self.source, "guarded", None)
        if not GUARDED or guarded is None:
            return False
        for fi in proj.file_indices:
            self.source.view(fi)  # mapped (and its guard registered) before it is asked
            if not guarded(fi):
                return False
        return True

    def _read_source(self, layer: int, expert: int, role: str) -> Any:
        """The one place the source's bytes are read: a plain byte range as a view of its mapping, or a transform's
        band iterator (made lazily, so each call is one run of the transform: tests count them)."""
        proj = self._projection(layer, expert, role)
        if proj.produce is None:
            return np.frombuffer(self.source.view(proj.file_index), np.uint8, count=proj.nbytes, offset=proj.offset)
        return proj.produce(self.source.view)


def source_regions(src: SourceReference, e: ExpertEntry, problems: list[Problem]) -> dict[str, Region]:
    """The source's region for each of the expert's projections whose type and size match the shard's; a type or
    size that differs is a problem (and that projection has nothing to compare)."""
    out = {}
    for role, t in e.tensors.items():
        if role not in NUMERIC_ROLES:
            continue
        try:
            reg = src.region(e.layer, e.expert, role)
        except SourceError as exc:  # the source lacks this expert: a difference between folder and source
            problems.append(Problem(e.path, f"{role}: {exc}"))
            continue
        if reg.dtype != t.dtype:
            problems.append(Problem(e.path, f"{role} is {t.dtype} but the source has {reg.dtype} ({reg.name})"))
        elif reg.size != t.nbytes:
            problems.append(Problem(e.path, f"{role}: {t.nbytes} bytes but the source has {reg.size} "
                                            f"({reg.name})"))
        else:
            out[role] = reg
    return out


def _mismatch(e: ExpertEntry, role: str, reg: Region, at: int) -> Problem:
    return Problem(e.path, f"{role}: byte {at} of {reg.size} does not match the source bytes ({reg.name}, "
                           f"file offset {e.tensors[role].offset + at}); re-extract this expert from the source")


def scan_shard(fd: int, e: ExpertEntry, regions: dict[str, Region], tick: Callable[[int], None] = lambda n: None,
               differ: set[str] | None = None) -> tuple[str, dict[str, str], int, list[Problem]]:
    """(whole-file xxh3, {role: projection xxh3}, bytes read, byte mismatches) of an open shard file of e.size bytes.

    One sequential pass of positioned reads into a buffer (mer_runtime.checksum.read_pieces: faster than a mapping,
    see there), a `PIECE` at a time: each piece is hashed into the file's and its projection's XXH3-64 and compared,
    exactly, with the same bytes of the source `regions` (`source_regions`): read into a second buffer where the
    region is a plain byte range of a file (`Region.into`), else taken from its `read` (a mapping or a transform's
    bands, dropped every `RELEASE_BYTES`). So what this holds is two pieces and a transform's bands, whatever the
    expert's size, on any number of threads (pread, memcmp and the transforms release the GIL).
    """
    size = e.size
    whole = xxhash.xxh3_64()
    spans = [(t.offset, t.offset + t.nbytes, role) for role, t in e.tensors.items()]
    parts = {role: xxhash.xxh3_64() for _, _, role in spans}
    problems: list[Problem] = []
    if size == 0:
        return whole.hexdigest(), {k: h.hexdigest() for k, h in parts.items()}, 0, problems
    differ = set() if differ is None else differ  # roles found different (the caller's set, when given)
    released = dict.fromkeys(regions, 0)  # bytes of each source region already dropped
    buf = bytearray(min(PIECE, size))
    mine = np.frombuffer(buf, np.uint8)  # a view of the buffer each piece is read into
    theirs = np.empty(mine.size, np.uint8) if any(r.into is not None for r in regions.values()) else None
    for pos, end, piece in read_pieces(fd, size, PIECE, buf=buf):
        whole.update(piece)
        for start, stop, role in spans:
            lo, hi = max(start, pos), min(stop, end)
            if lo >= hi:
                continue
            with piece[lo - pos:hi - pos] as part:
                parts[role].update(part)
            reg = regions.get(role)
            if reg is None:
                continue
            if role not in differ:
                if reg.into is not None:
                    src = theirs[:hi - lo]
                    reg.into(lo - start, src)
                else:  # an unguarded region's read() size-checks before it touches its mapping
                    src = reg.read(lo - start, hi - start)
                at = first_difference(mine[lo - pos:hi - pos], src)
                if at is not None or hi == stop:
                    # before a difference is believed, and once the region is done (one fstat: a source cut
                    # mid-page reads zeros with no fault, only its size tells)
                    reg.check()
                if at is not None:
                    differ.add(role)
                    problems.append(_mismatch(e, role, reg, lo - start + at))
            if hi == stop or hi - start - released[role] >= RELEASE_BYTES:
                reg.release(released[role], hi - start)
                released[role] = hi - start
        tick(end - pos)
    return whole.hexdigest(), {k: h.hexdigest() for k, h in parts.items()}, size, problems


def _compare_regions(m: Manifest, e: ExpertEntry, regions: dict[str, Region]) -> tuple[list[Problem], set[str]]:
    """(problems, roles not found equal) of the expert's projections against their source regions, exactly
    (`scan_shard`, its checksums unused): for callers of `deep_verify` whose checksum pass did not compare bytes."""
    fd, st = open_regular(m.path_of(e))
    try:
        if st.st_size != e.size:
            return [Problem(e.path, f"{st.st_size} bytes, manifest says {e.size}: the file changed or was cut; "
                                    "re-run verify, and re-extract this expert if it persists")], set(regions)
        differ: set[str] = set()
        return scan_shard(fd, e, regions, differ=differ)[3], differ
    finally:
        os.close(fd)


def _act64(g: np.ndarray, u: np.ndarray, activation: dict[str, Any]) -> np.ndarray:
    kind = activation.get("kind", "swiglu")
    with np.errstate(over="ignore"):
        if kind == "swiglu":
            return g / (1.0 + np.exp(-g)) * u
        if kind == "swiglu_oai":
            limit, alpha = float(activation.get("limit", 7.0)), float(activation.get("alpha", 1.702))
            g = np.minimum(g, limit)
            u = np.clip(u, -limit, limit)
            return (u + 1.0) * g / (1.0 + np.exp(-alpha * g))
    raise MerError(f"activation {kind!r} has no float64 reference here")


def reference_ffn64(w: dict[str, np.ndarray], x: np.ndarray, activation: dict[str, Any]) -> np.ndarray:
    """float64 expert output written from the model definitions, sharing no code with the runtime's kernels.

    swiglu (Mixtral, Qwen, DeepSeek): down @ (silu(gate @ x) * (up @ x)), silu(v) = v / (1 + e^-v).
    swiglu_oai (GPT-OSS): g = min(gate @ x + b_g, limit), u = clip(up @ x + b_u, -limit, limit),
    down @ ((u + 1) * g * sigmoid(alpha * g)) + b_d, alpha 1.702 and limit 7.0 unless the manifest says otherwise.

    >>> eye = np.eye(2)
    >>> reference_ffn64({"gate": eye, "up": eye, "down": eye}, np.array([[0.0, 1.0]]), {"kind": "swiglu"})
    array([[0.        , 0.73105858]])
    """
    x = np.asarray(x, np.float64)
    g = x @ w["gate"].T + w.get("gate_bias", 0.0)
    u = x @ w["up"].T + w.get("up_bias", 0.0)
    return _act64(g, u, activation) @ w["down"].T + w.get("down_bias", 0.0)


class _Tensor:
    """A projection's raw bytes as rows, its type and shape: `raw` ([rows, row_bytes] uint8, no copy) for bytes in
    memory (a shard's mapping), or `read(lo, hi)` for a source region read forward (`Region.read`: a transform's
    bytes are made as its rows are asked for, in order, so a reference never holds the whole matrix)."""

    def __init__(self, dtype: str, shape: tuple[int, ...], raw: np.ndarray | None = None,
                 read: Callable[[int, int], np.ndarray] | None = None, nbytes: int = 0):
        self.dtype, self.shape = dtype, tuple(shape)
        self.qt = GGMLQuantizationType[dtype]
        self.n_rows = shape[0] if len(shape) == 2 else 1
        self.raw = None if raw is None else np.asarray(raw).view(np.uint8).reshape(self.n_rows, -1)
        self._read, self._row_bytes = read, nbytes // self.n_rows
        self._values: np.ndarray | None = None

    @classmethod
    def of(cls, region: Region, shape: tuple[int, ...]) -> "_Tensor":
        return cls(region.dtype, shape, read=region.read, nbytes=region.size)

    def _rows(self, rows: np.ndarray | slice) -> np.ndarray:
        """[len(rows), row_bytes] uint8 of rows (a sorted index array, or a slice)."""
        if self.raw is not None:
            return self.raw[rows]
        rb = self._row_bytes
        if isinstance(rows, slice):
            r0, r1, _ = rows.indices(self.n_rows)
            return self._read(r0 * rb, r1 * rb).reshape(r1 - r0, rb)
        out = np.empty((len(rows), rb), np.uint8)
        for i, r in enumerate(rows):  # copied at once: a view would keep its whole band alive
            out[i] = self._read(int(r) * rb, (int(r) + 1) * rb)
        return out

    def values(self) -> np.ndarray:
        """All values in float64 (for biases and scales: small; read once and kept)."""
        if self._values is None:
            raw = self._rows(slice(None))
            self._values = dequantize(np.ascontiguousarray(raw), self.qt).astype(np.float64).reshape(self.shape)
        return self._values

    def rows_times(self, v: np.ndarray, rows: np.ndarray | None = None, absolute: bool = False) -> np.ndarray:
        """float64 W[rows] @ v for v [n, cols] -> [n, len(rows)], dequantizing BAND_BYTES of float64 at a time
        (only the blocks of those rows are read; `rows` sorted, as `_sample` gives them, so a source region is
        read forward, once)."""
        n = self.n_rows if rows is None else len(rows)
        step = max(1, BAND_BYTES // (self.shape[-1] * 8))
        out = np.empty((v.shape[0], n))
        for i in range(0, n, step):
            band = self._rows(slice(i, i + step) if rows is None else rows[i:i + step])
            w = dequantize(np.ascontiguousarray(band), self.qt).astype(np.float64)
            out[:, i:i + step] = v @ (np.abs(w) if absolute else w).T
        return out


def _shard_tensors(blob: np.ndarray, e: ExpertEntry) -> dict[str, _Tensor]:
    return {r: _Tensor(t.dtype, t.shape, blob[t.offset:t.offset + t.nbytes]) for r, t in e.tensors.items()
            if r in NUMERIC_ROLES}


def _source_tensors(src: SourceReference, e: ExpertEntry, shard: np.ndarray | None,
                    problems: list[Problem]) -> dict[str, _Tensor]:
    """The source's tensors for this expert (those of the shard's type and size); with `shard` (the shard file's
    bytes) every projection's bytes are also compared with it, each read whole (for tests and small models: verify
    compares in `scan_shard`, a piece at a time)."""
    regions = source_regions(src, e, problems)
    if shard is not None:
        for role, reg in regions.items():
            t = e.tensors[role]
            at = first_difference(shard[t.offset:t.offset + t.nbytes], reg.read(0, reg.size))
            reg.check()
            if at is not None:
                problems.append(_mismatch(e, role, reg, at))
    return {role: _Tensor.of(reg, e.tensors[role].shape) for role, reg in regions.items()}


F32_MAX = float(np.finfo(np.float32).max)


class Float32Overflow(Exception):
    """The float64 reference reaches values a float32 runtime cannot hold (`peak`): huge weights or scales, finite in
    the source, whose products overflow float32. Not a kernel error: `verify_deep` reports it as its own problem."""

    def __init__(self, peak: float):
        super().__init__(peak)
        self.peak = peak


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    """max|got - want| / max|want| over the finite reference values; inf where the two disagree on a non-finite one.

    A source may hold NaN or inf weights (they are passed through, or quantized, as they are): where the float64
    reference is NaN or +-inf, the runtime must give the same (it computes from the same bytes), and the finite rest
    is compared as usual. A runtime value that is not finite where the reference is counts as an error (inf), unless
    the reference itself is beyond float32's range there: Float32Overflow.
    """
    got = np.asarray(got, np.float64)
    want = np.broadcast_to(want, got.shape)
    with np.errstate(invalid="ignore"):
        beyond = np.abs(want) > F32_MAX  # (NaN compares False)
    if beyond.any() and np.isfinite(want[beyond]).any():
        raise Float32Overflow(float(np.abs(want[beyond & np.isfinite(want)]).max()))
    fin = np.isfinite(want)
    if not fin.all():
        nf = ~fin
        if not (np.array_equal(np.isnan(got[nf]), np.isnan(want[nf]))
                and np.array_equal(got[nf & ~np.isnan(want)], want[nf & ~np.isnan(want)])):
            return float("inf")
        got, want = got[fin], want[fin]
    if got.size == 0:
        return 0.0
    if not np.isfinite(got).all():
        return float("inf")
    scale = float(np.abs(want).max()) or 1.0
    return float(np.abs(got - want).max() / scale)


def _bias(w: dict[str, _Tensor], role: str, rows: np.ndarray | None = None) -> np.ndarray | float:
    if f"{role}_bias" not in w:
        return 0.0
    b = w[f"{role}_bias"].values()
    return b if rows is None else b[rows]


def _scale(w: dict[str, _Tensor], role: str) -> float:
    """The per-expert output scale of a projection (format_version 2; 1 without one), applied before the bias."""
    return float(w[f"{role}_scale"].values().reshape(-1)[0]) if f"{role}_scale" in w else 1.0


def check_numbers(w: dict[str, _Tensor], ex: Any, x: np.ndarray, activation: dict[str, Any], y: np.ndarray,
                  full: bool, rng: np.random.Generator) -> float:
    """Max relative error of the runtime against the float64 reference for one expert (see the module docstring).

    `ex` is the runtime's loaded expert (its kernels run on the bytes the runtime read), `y` its output for x.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # a source's NaN/inf weights: compared by _rel, not warned of
        err = _check_numbers(w, ex, x, activation, y, full, rng)
        if err == float("inf"):  # a non-finite runtime value: the model's own if float32 overflows on the way
            peak = _f32_peak(w, ex, x.astype(np.float64), activation)
            if peak > F32_MAX:
                raise Float32Overflow(peak)
        return err


def _f32_peak(w: dict[str, _Tensor], ex: Any, x64: np.ndarray, activation: dict[str, Any]) -> float:
    """The largest magnitude the runtime's float32 computation of this expert on x may meet on its way, from the
    runtime's own bytes: a projection's partial sums, in whatever order the kernel adds, are bounded by the sum of
    |weight| x |input|, the activation's products by |g| (|u| + 1), and h is the down projection's input. The output
    alone can be within float32's range while h is not (huge gate and up weights, tiny down ones). Non-finite values
    are left out: a NaN or inf weight is _rel's to compare."""
    own = {role: _Tensor(p.dtype, p.shape, raw=p.raw) for role, p in ex.tensors.items() if role in WEIGHT_ROLES}

    def proj(role: str, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, b = _scale(w, role), _bias(w, role)
        return (own[role].rows_times(v) * s + b,
                own[role].rows_times(np.abs(v), absolute=True) * abs(s) + np.abs(b))

    g, g_sums = proj("gate", x64)
    u, u_sums = proj("up", x64)
    h = _act64(g, u, activation)
    _, d_sums = proj("down", h)
    peaks = [g_sums, u_sums, np.abs(g) * (np.abs(u) + 1), np.abs(h), d_sums]
    return max(float(np.max(p[np.isfinite(p)], initial=0.0)) for p in peaks)


def _check_numbers(w: dict[str, _Tensor], ex: Any, x: np.ndarray, activation: dict[str, Any], y: np.ndarray,
                   full: bool, rng: np.random.Generator) -> float:
    x64 = x.astype(np.float64)
    if full:
        g = w["gate"].rows_times(x64) * _scale(w, "gate") + _bias(w, "gate")
        u = w["up"].rows_times(x64) * _scale(w, "up") + _bias(w, "up")
        ref = w["down"].rows_times(_act64(g, u, activation)) * _scale(w, "down") + _bias(w, "down")
        return _or_rows_alone(_rel(y, ref), [ref], ex, rng)
    width, d_model = w["gate"].shape[0], w["down"].shape[0]

    rows_ff, rows_d = _sample(width, rng), _sample(d_model, rng)
    errs, refs, act = [], [], {}
    for role in ("gate", "up"):
        p = ex.tensors[role]
        got = matvec(p.dtype, p.raw, p.shape, x).astype(np.float64) * _scale(w, role) + _bias(w, role)  # runtime's
        refs.append(w[role].rows_times(x64, rows_ff) * _scale(w, role) + _bias(w, role, rows_ff))
        errs.append(_rel(got[:, rows_ff], refs[-1]))
        act[role] = got
    h = _act64(act["gate"], act["up"], activation)
    refs.append(w["down"].rows_times(h, rows_d) * _scale(w, "down") + _bias(w, "down", rows_d))
    errs.append(_rel(y[:, rows_d], refs[-1]))
    return _or_rows_alone(max(errs), refs, ex, rng)


def _or_rows_alone(err: float, refs: list[np.ndarray], ex: Any, rng: np.random.Generator) -> float:
    """`err`, and where a reference holds NaN or inf, also the kernel's sampled rows one by one on seeded inputs.

    One NaN weight in gate or up makes every value of the expert's output NaN (each output sums all of h), and _rel
    compares only the finite values: the expert would pass having compared nothing. Rows on their own keep the
    non-finite ones to themselves. Their reference is the runtime's own bytes (gguf's dequantization), which the
    checksum pass, or with --against the byte comparison, has already tied to the folder or the source; a source
    region was read forward once and cannot be read again.
    """
    if all(np.isfinite(r).all() for r in refs):
        return err
    own = {role: _Tensor(p.dtype, p.shape, raw=p.raw) for role, p in ex.tensors.items() if role in WEIGHT_ROLES}
    return max(err, check_rows(own, own, lambda cols: seeded_inputs(cols, cols), rng))


def check_rows(mine: dict[str, _Tensor], ref: dict[str, _Tensor], inputs: Callable[[int], np.ndarray],
               rng: np.random.Generator) -> float:
    """Max relative error of the runtime's kernel on sampled rows of each projection against the float64 reference.

    `mine`: the shard's projections (what the kernel reads), `ref`: the reference's (gguf's dequantization of only
    the sampled rows' blocks), `inputs(cols)`: seeded float32 inputs [n, cols]. The cost is SAMPLE_ROWS + 2 rows a
    projection, whatever its size. (One dequantize call for the rows of all three projections was measured 2.5x
    slower: gguf's code then works on one long row, out of cache.)
    """
    with np.errstate(invalid="ignore", over="ignore"):  # rows holding a source's NaN/inf: compared by _rel
        return _check_rows(mine, ref, inputs, rng)


def _check_rows(mine: dict[str, _Tensor], ref: dict[str, _Tensor], inputs: Callable[[int], np.ndarray],
                rng: np.random.Generator) -> float:
    errs = []
    for role in WEIGHT_ROLES:
        t = mine[role]
        rows = _sample(t.shape[0], rng)
        v = inputs(t.shape[1])
        got = matvec(t.dtype, np.ascontiguousarray(t.raw[rows]), (len(rows), t.shape[1]), v)  # the runtime's
        errs.append(_rel(got, ref[role].rows_times(v.astype(np.float64), rows)))
    return max(errs)


def _sample(n: int, rng: np.random.Generator) -> np.ndarray:
    """The first and last rows and up to SAMPLE_ROWS seeded others, sorted, without repeats. (integers, not
    choice(replace=False): that one costs a permutation of all n rows.)"""
    rows = np.sort(np.concatenate([[0, n - 1], rng.integers(0, n, min(n, SAMPLE_ROWS))]))
    return rows[np.concatenate([[True], rows[1:] != rows[:-1]])]  # np.unique's, without its import of numpy.ma


def _map_shard(m: Manifest, e: ExpertEntry) -> tuple[np.ndarray, Guard]:
    """The shard file as a plain read-only mapping (not through the runtime's loaders), safely opened, and its
    guard (check it once the bytes are used: a shard that shrank meanwhile reads zeros, see mer_runtime.guard).
    The mapping goes with the array's last view: close the guard before dropping it (mer_runtime.guard.Guard)."""
    path = m.path_of(e)
    fd, st = open_regular(path)
    try:
        if st.st_size != e.size:
            raise MerError(f"{path}: {st.st_size} bytes, manifest says {e.size} (it changed since the checksum pass); "
                           "re-run verify")
        mm, guard = map_file(fd, e.size, path)
    finally:
        os.close(fd)
    return np.frombuffer(mm, np.uint8), guard


def scale_problems(m: Manifest, e: ExpertEntry) -> list[Problem]:
    """A problem for each per-expert scale of the shard that is NaN or infinite (none for an expert without scales).

    The numeric checks cannot see one: the float64 reference applies the same shard value, so a whole output is NaN
    (or inf) on both sides and compares as equal (`_rel`), and the sampled rows never read the scale. Such a value
    makes every output of its projection, and so of the expert, NaN or infinite: never a usable model, whether the
    shard was changed (checksums rewritten) or the source held it.
    """
    roles = [r for r in SCALE_ROLES if r in e.tensors]
    if not roles:
        return []
    blob, guard = _map_shard(m, e)
    try:
        mine = _shard_tensors(blob, e)
        with np.errstate(invalid="ignore", over="ignore"):
            values = {r: float(mine[r].values().reshape(-1)[0]) for r in roles}
        guard.check()
    finally:
        mine = None
        guard.close()  # while `blob` still holds the mapping (unregistered before the unmap)
    out = []
    for role, v in values.items():
        if not np.isfinite(v):
            t = e.tensors[role]
            base = role.removesuffix("_scale")
            out.append(Problem(e.path, f"{role} is {v} ({t.dtype} at file offset {t.offset}): every output of its "
                                       f"{base} projection, and so of the expert, would be NaN or infinite; "
                                       "re-extract this expert from the source (if the source's per-expert scale "
                                       "holds it too, the model itself is damaged there)"))
    return out


def _check_all(guard: Guard | None, regions: dict[str, Region]) -> None:
    """Raise FileChangedError if the shard (`guard`) or a source region shrank while its bytes were used."""
    if guard is not None:
        guard.check()
    for r in regions.values():
        r.check()


def plan_experts(experts: Sequence[ExpertEntry], whole_budget: int, runtime_experts: int) -> dict[str, str]:
    """{path: "whole" | "loaded" | "rows"} in order: whole output while the budget lasts, then `runtime_experts` (whole
    ones included) through the loader, and (unless `runtime_experts` is 0: sampled rows only) one more for each
    signature (types and shapes of its tensors) not yet run whole or loaded; the rest sampled rows only (see the
    module docstring)."""
    plan, spent, loaded = {}, 0, 0
    covered: set[tuple] = set()
    for e in experts:
        nbytes = sum(t.nbytes for t in e.tensors.values())
        # an expert whose types and shapes no fused run has covered yet is loaded too: a Q4_K_M model puts Q6_K on
        # some layers' down and Q4_K on others, and the sampled rows alone never reach the fused, parallel path
        sig = tuple(sorted((role, t.dtype, tuple(t.shape)) for role, t in e.tensors.items()))
        if spent + nbytes <= whole_budget:
            plan[e.path], spent, loaded = "whole", spent + nbytes, loaded + 1
        elif loaded < runtime_experts or (runtime_experts and sig not in covered):
            plan[e.path], loaded = "loaded", loaded + 1
        else:
            plan[e.path] = "rows"
        covered.add(sig)
    return plan


class NumericCheck:
    """What every expert's numeric check shares: the seeded inputs and the reference. Read-only once built, and each
    expert gets its own generator seeded by (seed, layer, expert), so a result does not depend on which experts
    were checked before it. (Running these checks in the checksum pass's threads was measured slower: they hold
    the GIL in short NumPy calls, and a scanning thread then waits out the interpreter's switch interval.)"""

    def __init__(self, m: Manifest, src: SourceReference | None, seed: int = SEED):
        self.m, self.src, self.seed = m, src, seed
        self.x = seeded_inputs(m.model["d_model"], seed)
        cols = {t.shape[1] for e in m.experts for r, t in e.tensors.items() if r in WEIGHT_ROLES and len(t.shape) == 2}
        self._inputs = {c: self.x if c == self.x.shape[1] else seeded_inputs(c, seed + c) for c in cols}

    def inputs(self, cols: int) -> np.ndarray:
        return self._inputs[cols] if cols in self._inputs else seeded_inputs(cols, self.seed + cols)

    def rng(self, e: ExpertEntry) -> np.random.Generator:
        return np.random.default_rng([self.seed, e.layer, e.expert])

    def rows(self, e: ExpertEntry, regions: dict[str, Region] | None = None) -> float:
        """`check_rows` of one expert against `regions` (`source_regions`) where given, and against its own shard
        bytes for the roles without one (without a source, or bytes already found equal to the source's). Raises
        MerError when the shard cannot be mapped. The caller releases the regions."""
        blob, guard = _map_shard(self.m, e)
        try:
            mine = _shard_tensors(blob, e)
            ref = {**mine, **{role: _Tensor.of(r, e.tensors[role].shape) for role, r in (regions or {}).items()}}
            err = check_rows(mine, ref, self.inputs, self.rng(e))
            _check_all(guard, regions or {})
            return err
        finally:
            guard.close()  # while `blob` still holds the mapping: unregistered before it is unmapped


def open_runtime(m: Manifest, io: str = "auto", start: Sequence[ExpertEntry] = ()) -> ShardSet | MerError:
    """The runtime's ShardSet for deep verify (2 cache slots, checksums left to verify), with the reads of `start`
    begun in the background; or the MerError that refused it. verify opens it while its checksum pass runs, so the
    ring's set-up and the first experts' reads overlap that pass."""
    try:
        shards = open_shards(m.root, io=io, cache_slots=2, checksums="never")
    except MerError as exc:
        return exc
    try:
        for e in start:
            # a whole load, not prefetch(): the ring's completions are reaped only by a caller that waits, so a
            # prefetch left alone gets no further than its first queue of reads
            with shards.load(e.layer, e.expert):
                pass
    except MerError:
        pass  # deep_verify loads it again and reports the error against the expert
    return shards


def whole_budget_for(m: Manifest) -> int:
    """Projection bytes whose whole output gets a float64 reference by default (see the module docstring)."""
    return max(WHOLE_MIN, sum(t.nbytes for e in m.experts for t in e.tensors.values()) // WHOLE_SHARE)


def deep_verify(report: VerifyReport, m: Manifest, *, against: str | os.PathLike[str] | SourceReference | None = None,
                io: str = "auto", seed: int = SEED, tolerance: float = TOLERANCE, whole_budget: int | None = None,
                runtime_experts: int = RUNTIME_EXPERTS, compared: Collection[str] = (),
                known: Sequence[Problem] = (), shards: ShardSet | MerError | None = None,
                progress: Callable[[int, int], Callable[[int], None]] | None = None) -> None:
    """Add per-expert numeric results (and any problems) to a shallow verify report.

    Experts the shallow pass found damaged are not run. `whole_budget`: projection bytes whose experts get their
    whole output compared (default `whole_budget_for(m)`); `runtime_experts`: how many experts go through the
    runtime's loader and fused call (whole ones included); the rest get sampled rows (`plan_experts`, and the
    module docstring). `against`: a path, or a `SourceReference` the caller opened (and closes).

    What verify's checksum pass already did, so that nothing is done twice: `compared`, the paths of experts whose
    bytes it compared with the source (`scan_shard`), with the mismatches it found in `known` (added to the report;
    those experts still run, so their numbers are reported too); `shards`, what `open_runtime` returned (deep_verify
    closes it).

    >>> deep_verify(report, m, against="model.gguf")                   # doctest: +SKIP
    """
    t0 = time.perf_counter()
    own_src = against is not None and not isinstance(against, SourceReference)
    src = SourceReference(against, m) if own_src else against
    numbers = NumericCheck(m, src, seed)
    x = numbers.x
    activation = m.model.get("activation", {"kind": "swiglu"})
    tick = progress(len(m.experts), len(m.experts)) if progress else (lambda n: None)
    broken = {p.path for p in report.problems}
    report.problems.extend(known)
    results: list[dict[str, Any]] = []
    healthy = [e for e in m.experts if e.path not in broken]  # a damaged expert is reported, never run
    plan = plan_experts(healthy, whole_budget_for(m) if whole_budget is None else whole_budget, runtime_experts)
    io_desc = "not opened"
    if not healthy:  # nothing to run: the runtime is not needed, and whether it opened does not matter
        if isinstance(shards, ShardSet):
            shards.close()
        shards = None
    elif shards is None:
        shards = open_runtime(m, io)
    if isinstance(shards, MerError):
        report.problems.append(Problem(".", f"the runtime cannot open the folder: {shards}"))
        shards = None
    n_whole = n_loaded = bytes_compared = 0
    # experts whose every projection the checksum pass found equal, byte for byte, to the source's (after its
    # transform): their reference is computed from the shard's bytes, which are those very bytes, so each expert's
    # source is read (and transformed) once, in that pass
    same = set(compared) - {p.path for p in known}
    w = mine = blob = None
    try:
        for e in healthy if shards else []:
            tick(1)
            probs: list[Problem] = []
            mode = plan[e.path]
            regions: dict[str, Region] = {}
            try:
                from_source = src is not None and e.path not in same
                if from_source:
                    regions = source_regions(src, e, [] if e.path in compared else probs)
                    bytes_compared += sum(r.size for r in regions.values())
                    differ = set(regions)
                    if e.path not in compared:
                        found, differ = _compare_regions(m, e, regions)
                        probs += found
                    report.problems.extend(probs)
                    if any(r not in regions for r in e.tensors if r in NUMERIC_ROLES):
                        continue  # a type or size differs from the source's: reported, nothing to compare
                    # a projection found equal is the source's own bytes: its reference comes from the shard's, as
                    # for the experts verify's checksum pass compared (so a transform runs once)
                    for role in set(regions) - differ:
                        regions.pop(role).release(0, e.tensors[role].nbytes)
                elif src is not None:
                    bytes_compared += sum(t.nbytes for r, t in e.tensors.items() if r in NUMERIC_ROLES)
                if bad := scale_problems(m, e):  # no comparison could see it (scale_problems): reported, not run
                    report.problems.extend(bad)
                    continue
                if mode == "rows":
                    err = numbers.rows(e, regions)
                else:
                    # the mapping is unmapped when its last view goes, at the end of this iteration (no copy is held)
                    blob, guard = _map_shard(m, e)
                    try:
                        mine = _shard_tensors(blob, e)
                        w = {**mine, **{role: _Tensor.of(r, e.tensors[role].shape) for role, r in regions.items()}}
                        with shards.load(e.layer, e.expert) as ex:
                            y = shards.compute(ex, x)
                            err = check_numbers(w, ex, x, activation, y, mode == "whole", numbers.rng(e))
                        _check_all(guard, regions)
                    finally:
                        guard.close()  # while `blob` still holds the mapping (unregistered before the unmap)
            except (SourceError, FileChangedError):
                raise
            except Float32Overflow as ov:
                if src is not None and not regions:
                    hint = "its bytes equal the source's: the model's own weights or scales are that large"
                else:
                    hint = "verify it --against the source model to tell a changed byte from the model's own values"
                report.problems.append(Problem(
                    e.path, f"its float64 reference reaches {ov.peak:.3g}, beyond float32's range ({F32_MAX:.3g}) "
                            f"in which the runtime computes, so it cannot run this expert; {hint}"))
                continue
            except MerError as exc:
                report.problems.append(Problem(e.path, f"runtime could not load it: {exc}"))
                continue
            finally:
                for r in regions.values():  # references touch (and the kernel's faults map) more than they use
                    r.release(0, r.size)
            n_whole += mode == "whole"
            n_loaded += mode != "rows"
            checked = {"whole": "whole output", "loaded": f"{SAMPLE_ROWS} sampled rows, loader and fused call",
                       "rows": f"{SAMPLE_ROWS} sampled rows"}[mode]
            results.append({"layer": e.layer, "expert": e.expert, "max_rel_err": err, "checked": checked})
            if not err <= tolerance:
                if src is None:
                    hint = "re-extract it, or verify it --against the source model to tell a changed byte from a " \
                           "kernel error"
                elif regions:  # what is left of them: the projections whose bytes differ from the source's
                    which = "" if e.path in compared else f" {', '.join(regions)}"  # verify's pass: listed above
                    hint = f"its{which} bytes differ from the source's: re-extract it"
                else:
                    types = ", ".join(sorted({t.dtype for r, t in e.tensors.items() if r in WEIGHT_ROLES}))
                    hint = f"its bytes equal the source's, so the runtime computes {types} wrongly: report this bug"
                report.problems.append(Problem(
                    e.path, f"output differs from the {'source' if src else 'shard'} reference: max relative error "
                            f"{err:.3g} > {tolerance:g}; {hint}"))
    finally:
        w = mine = blob = None  # views into the maps: gone before the maps are closed
        if shards is not None:
            io_desc = shards.describe_io()
            shards.close()
        if own_src:
            src.close()
    report.deep = {
        "reference": f"source {src.path}" if src else "shard bytes (gguf dequantize)",
        "tolerance": tolerance,
        "seed": seed,
        "inputs": int(x.shape[0]),
        "io": io_desc,
        "experts_run": len(results),
        "experts_whole_output": n_whole,
        "experts_through_loader": n_loaded,
        "sample_rows": SAMPLE_ROWS,
        "bytes_compared": bytes_compared,
        "worst_rel_err": max((r["max_rel_err"] for r in results), default=0.0),
        "seconds": round(time.perf_counter() - t0, 3),
        "per_expert": results,
    }
