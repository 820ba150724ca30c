"""``pack`` / ``unpack``: a shard folder as one zstd-compressed tar, and back, checked at both ends.

The archive is a plain POSIX tar (PAX), ``manifest.json`` first, then ``dense.gguf``, the reassembly record, the
checkpoint's companion files (``hf/``) and the expert files in manifest order, compressed as one zstd frame (multi-threaded, long-distance matching with a 128 MiB
window, which every zstd decoder accepts by default, and zstd's own content checksum). ``tar --zstd -xf`` reads it.

``pack`` checks every file's xxh3 against the manifest as it reads it (a damaged folder is not packed silently).
``unpack`` trusts nothing in the archive: it reads the manifest first, then accepts only regular-file members whose
name is a path the manifest lists, each once, of exactly the listed size, and checks every xxh3 (whole file and each
projection) before the folder is renamed into place; anything else removes the staging folder and says why.

Thread safety: calls share no state; two calls writing the same output race as two extracts would (the later rename
wins), so give each its own output.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import xxhash
import zstandard

from mer_runtime.errors import ManifestError
from mer_runtime.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, manifest_from_bytes,
                                  read_manifest_bytes)
from mer_runtime.safeopen import open_regular

from .commit import (check_file_target, drop_temp, fsync_dir, interruptible, left_behind, place, refuse_folder_file,
                     sweep_temps, temp_name, test_point)
from .errors import MertoolsError, OutputError

CHUNK = 1 << 20
# What the tar stream may hold between one member's data and the next one's (its header, a PAX or GNU long-name
# record for a path of up to 4096 bytes, tarfile's 10 KiB read-ahead, the end-of-archive blocks): tarfile reads a
# PAX or long-name record whole into memory, so without a bound a few KiB of zstd can ask for gigabytes.
HEADER_ROOM = 1 << 20
LEVEL = 10  # measured on the fixtures: levels above gain < 1% on quantized blocks at several times the time
WINDOW_LOG = 27  # 128 MiB: the largest window zstd decoders accept without being told (--long=27)


class ArchiveError(MertoolsError):
    """An archive that is damaged, truncated, or holds something a shard folder never does."""


@contextmanager
def staged_folder(out: Path, *, overwrite: bool, fsync: bool, sources: Iterable[str | os.PathLike[str]] = (),
                  marker: str = MANIFEST_NAME) -> Iterator[Path]:
    """A hidden staging folder beside OUT, renamed to OUT when the block ends cleanly, removed when it does not.

    The one place transport commands use the output protocol of :func:`mertools.commit.staged_output` (lock,
    overwrite rules, crash recovery, signals, and with `fsync` one flush of the whole folder before the commit).

    >>> with staged_folder(Path("out"), overwrite=False, fsync=True) as staging:   # doctest: +SKIP
    ...     (staging / "manifest.json").write_text("{}")
    """
    from .commit import staged_output

    # sources: what the command reads (refused with --overwrite when it lies inside OUT); marker: the file an
    # earlier output of the same command holds, the only kind of folder --overwrite may replace
    with staged_output(Path(out), overwrite=overwrite, fsync=fsync, sources=sources, marker=marker) as staging:
        yield staging


@dataclass
class _Expect:
    size: int
    xxh3_64: str | None
    ranges: list[tuple[int, int, str, str]]  # (start, end, role, xxh3)


def _expected(m: Manifest) -> dict[str, _Expect]:
    """Every file of the folder other than the manifest, with what it must hash to, in archive order."""
    out: dict[str, _Expect] = {}

    def add(path: str, exp: _Expect) -> None:
        # one name, one file: a second entry would replace the first one's checksums (dense.gguf checked as the
        # reassembly record says), or the manifest itself would be a member twice
        if path in out or path == MANIFEST_NAME:
            raise ArchiveError(f"{m.root / MANIFEST_NAME}: {path} is listed twice")
        out[path] = exp

    if m.dense:
        add(m.dense["path"], _Expect(int(m.dense["size"]), m.dense["xxh3_64"], []))
    rec = m.raw.get("reassembly")
    if isinstance(rec, dict):
        from mer_runtime.manifest import safe_relpath

        try:
            path = safe_relpath(rec.get("path"), "reassembly")
        except ManifestError as exc:
            raise ArchiveError(str(exc)) from None
        if not isinstance(rec.get("size"), int) or not isinstance(rec.get("xxh3_64"), str):
            raise ArchiveError(f"{m.root / MANIFEST_NAME}: reassembly: size and xxh3_64 are required")
        add(path, _Expect(rec["size"], rec["xxh3_64"], []))
    for c in m.companions:  # the reader has checked their paths (hf/NAME), sizes and hashes
        add(c.path, _Expect(c.size, c.xxh3_64, []))
    for e in m.experts:
        add(e.path, _Expect(e.size, e.xxh3_64, [(t.offset, t.offset + t.nbytes, role, t.xxh3_64)
                                                for role, t in e.tensors.items()]))
    return out


class _Hasher:
    """Feeds a file's bytes, in order, to its whole-file hash and to the hash of each range they fall in."""

    def __init__(self, exp: _Expect):
        self.exp, self.pos = exp, 0
        self.whole = xxhash.xxh3_64()
        self.parts = {r[2]: xxhash.xxh3_64() for r in exp.ranges}

    def update(self, data: bytes | memoryview) -> None:
        self.whole.update(data)
        end = self.pos + len(data)
        for a, b, role, _ in self.exp.ranges:
            lo, hi = max(a, self.pos), min(b, end)
            if lo < hi:
                self.parts[role].update(data[lo - self.pos:hi - self.pos])
        self.pos = end

    def problems(self) -> list[str]:
        bad = [f"{role} (xxh3 {self.parts[role].hexdigest()}, manifest {h})"
               for _, _, role, h in self.exp.ranges if self.parts[role].hexdigest() != h]
        if self.exp.xxh3_64 is not None and self.whole.hexdigest() != self.exp.xxh3_64:
            bad.append(f"whole file (xxh3 {self.whole.hexdigest()}, manifest {self.exp.xxh3_64})")
        return bad


class _HashingReader:
    """A file object for tarfile.addfile that hashes what tarfile reads from it."""

    def __init__(self, fh: BinaryIO, hasher: _Hasher, tick: Callable[[int], None]):
        self.fh, self.hasher, self.tick = fh, hasher, tick

    def read(self, n: int = -1) -> bytes:
        b = self.fh.read(n)
        self.hasher.update(b)
        self.tick(len(b))
        return b


class _Counting:
    """Counts the compressed bytes written (the archive size, for the ratio)."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.n = fh, 0

    def write(self, b: bytes) -> int:
        self.n += len(b)
        return self.fh.write(b)

    def flush(self) -> None:
        self.fh.flush()


@dataclass
class PackResult:
    archive: Path
    files: int
    bytes_in: int
    bytes_out: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.bytes_in / self.bytes_out if self.bytes_out else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"archive": str(self.archive), "files": self.files, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "ratio": round(self.ratio, 4), "seconds": round(self.seconds, 4)}


def compressor(level: int = LEVEL, threads: int = -1, long: bool = True) -> zstandard.ZstdCompressor:
    """The compressor pack uses: all cores (threads=-1), long-distance matching, content checksum."""
    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=threads, write_checksum=1, enable_ldm=1 if long else 0,
        window_log=WINDOW_LOG if long else 0,
    )
    return zstandard.ZstdCompressor(compression_params=params)


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime, ti.type = size, 0o644, int(mtime), tarfile.REGTYPE
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def pack(
    folder: str | os.PathLike[str],
    archive: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    level: int = LEVEL,
    threads: int = -1,
    long: bool = True,
    fsync: bool = True,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> PackResult:
    """Write the shard folder as one ``.tar.zst``; every file's checksum is checked as it is read.

    >>> r = pack("out/", "mixtral.tar.zst")       # doctest: +SKIP
    >>> r.ratio                                   # bytes in / bytes out  # doctest: +SKIP
    1.07
    """
    t0 = time.perf_counter()
    folder, archive = Path(folder), Path(archive)
    try:
        mbytes = read_manifest_bytes(folder)  # checked and archived: the same bytes, read once
        m = manifest_from_bytes(mbytes, folder)
    except ManifestError as exc:
        raise ArchiveError(str(exc)) from None
    check_file_target(archive, overwrite)
    if not archive.parent.is_dir():
        raise OutputError(f"{archive.parent}: no such folder")
    expect = _expected(m)
    refuse_folder_file(archive, folder, [MANIFEST_NAME, *expect])
    total = len(mbytes) + sum(e.size for e in expect.values())
    tick = progress(total, len(expect) + 1) if progress else (lambda n: None)
    sweep_temps(archive)
    tmp = temp_name(archive)
    with interruptible():  # SIGTERM and SIGHUP too remove the temporary, as Ctrl-C does
        try:
            with open(tmp, "xb") as raw:
                counted = _Counting(raw)
                with compressor(level, threads, long).stream_writer(counted, closefd=False) as zw:
                    with tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT, copybufsize=CHUNK) as tar:
                        mtime = (folder / MANIFEST_NAME).stat().st_mtime
                        import io

                        tar.addfile(_tarinfo(MANIFEST_NAME, len(mbytes), mtime), io.BytesIO(mbytes))
                        tick(len(mbytes))
                        test_point("writing")
                        for rel, exp in expect.items():
                            # as the runtime opens them: inside the folder, a regular file, never blocking on a FIFO
                            try:
                                path = m.resolve(rel, "folder file")
                            except ManifestError as exc:
                                raise ArchiveError(str(exc)) from None
                            fd, st = open_regular(path, error=ArchiveError, hint="the folder is damaged (run "
                                                  "`mertools verify`)")
                            with os.fdopen(fd, "rb") as fh:
                                if st.st_size != exp.size:
                                    raise ArchiveError(f"{path}: {st.st_size} bytes, manifest says {exp.size}; the "
                                                       "folder is damaged (run `mertools verify`)")
                                h = _Hasher(exp)
                                tar.addfile(_tarinfo(rel, exp.size, st.st_mtime), _HashingReader(fh, h, tick))
                            if bad := h.problems():
                                raise ArchiveError(f"{path}: checksum mismatch in {', '.join(bad)}; the folder is "
                                                   "damaged (run `mertools verify`); no archive was written")
                raw.flush()
                if fsync:
                    os.fsync(raw.fileno())
            place(tmp, archive, overwrite)  # a file that appeared meanwhile is kept without --overwrite
            if fsync:
                fsync_dir(archive.parent)  # the archive's name, not only its bytes
        except BaseException as exc:
            gone = drop_temp(tmp)
            if isinstance(exc, OSError) and not isinstance(exc, MertoolsError):
                raise OutputError(f"{exc.filename or archive}: {exc.strerror or exc}; "
                                  f"{left_behind([] if gone else [tmp])}") from None
            raise
    return PackResult(archive, len(expect) + 1, total, counted.n, time.perf_counter() - t0)


@dataclass
class UnpackResult:
    out: Path
    files: int
    bytes_written: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "files": self.files, "bytes_written": self.bytes_written,
                "seconds": round(self.seconds, 4)}


def _kind(ti: tarfile.TarInfo) -> str | None:
    """Why a member is not a plain file (None when it is one)."""
    if ti.issym():
        return f"a symbolic link (to {ti.linkname!r})"
    if ti.islnk():
        return f"a hard link (to {ti.linkname!r})"
    if ti.ischr() or ti.isblk():
        return "a device"
    if ti.isfifo():
        return "a FIFO"
    if ti.isdir():
        return "a folder entry"
    if not ti.isreg():
        return f"of tar type {ti.type!r}"
    return None


def _check_name(name: str, archive: Path) -> None:
    p = PurePosixPath(name)
    if name.startswith("/") or p.is_absolute():
        raise ArchiveError(f"{archive}: member {name!r} is an absolute path; refused, nothing was written")
    if ".." in p.parts:
        raise ArchiveError(f"{archive}: member {name!r} climbs out with '..'; refused, nothing was written")


def unpack(
    archive: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    fsync: bool = True,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> UnpackResult:
    """Restore a folder written by :func:`pack` into OUT, every checksum checked before OUT appears.

    >>> unpack("mixtral.tar.zst", "out/")         # doctest: +SKIP
    """
    t0 = time.perf_counter()
    archive = Path(archive)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: no such file")
    files = written = 0
    with staged_folder(Path(out), overwrite=overwrite, fsync=fsync, sources=[archive]) as staging:
        try:
            with open(archive, "rb") as fh:
                reader = _Bounded(zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True), archive)
                with tarfile.open(fileobj=reader, mode="r|") as tar:
                    files, written = _unpack_members(tar, archive, staging, progress, reader)
                    # a truncated stream can end exactly between members: the manifest's list is the authority,
                    # and zstd's content checksum comes only once the frame's end is read
                    while reader.read(CHUNK):
                        pass
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
            raise ArchiveError(f"{archive}: the archive is damaged or truncated ({exc}); nothing was written") from None
    return UnpackResult(Path(out), files, written, time.perf_counter() - t0)


class _Bounded:
    """The decompressed stream, readable only up to ``limit``: past it the archive holds more than its manifest
    lists (an oversized header record, data after the end), and reading on would cost memory or time unbounded."""

    def __init__(self, raw: BinaryIO, archive: Path):
        self.raw, self.archive, self.pos, self.limit = raw, archive, 0, HEADER_ROOM

    def allow(self, end: int) -> None:
        """Let reads go up to ``end`` (a position in the tar stream) plus the room for the next header."""
        self.limit = end + HEADER_ROOM

    def read(self, n: int = -1) -> bytes:
        room = self.limit - self.pos
        if room <= 0:
            raise ArchiveError(f"{self.archive}: holds more than its manifest lists (an oversized tar header, or data "
                               "after the last member); not an archive written by `mertools pack`; nothing was "
                               "written")
        b = self.raw.read(room if n < 0 else min(n, room))
        self.pos += len(b)
        return b


def _unpack_members(tar: tarfile.TarFile, archive: Path, staging: Path,
                    progress: Callable[[int, int], Callable[[int], None]] | None,
                    reader: _Bounded) -> tuple[int, int]:
    first = tar.next()
    if first is None or first.name != MANIFEST_NAME or _kind(first) is not None:
        got = "nothing" if first is None else repr(first.name)
        raise ArchiveError(f"{archive}: the first member must be {MANIFEST_NAME}, found {got}; not an archive "
                           "written by `mertools pack`")
    if first.size > MAX_MANIFEST_BYTES:
        raise ArchiveError(f"{archive}: {MANIFEST_NAME} is {first.size} bytes, more than any manifest; refused")
    reader.allow(tar.offset)
    f = tar.extractfile(first)
    assert f is not None
    mbytes = f.read()
    if len(mbytes) != first.size:
        raise ArchiveError(f"{archive}: {MANIFEST_NAME} is truncated")
    try:
        # the runtime's own checks, integrity included: a manifest it would refuse must not become OUT. Errors name
        # it as ARCHIVE/manifest.json (the staging folder they would otherwise name is gone when they are read)
        m = manifest_from_bytes(mbytes, archive)
    except ManifestError as exc:
        raise ArchiveError(f"{exc} (in the archive; nothing was written)") from None
    expect = _expected(m)
    need = sum(e.size for e in expect.values())
    free = shutil.disk_usage(staging).free
    if need > free:
        raise ArchiveError(f"{archive}: unpacks to {need} bytes but {staging.parent} has {free} free; free some "
                           "space or choose another DIR")
    tick = progress(need, len(expect)) if progress else (lambda n: None)
    seen: set[str] = set()
    written = len(mbytes)
    while (ti := tar.next()) is not None:
        _check_name(ti.name, archive)
        if (why := _kind(ti)) is not None:
            raise ArchiveError(f"{archive}: member {ti.name!r} is {why}; a shard folder holds only plain files")
        if ti.name in seen or ti.name == MANIFEST_NAME:
            raise ArchiveError(f"{archive}: member {ti.name!r} appears twice; refused")
        exp = expect.get(ti.name)
        if exp is None:
            raise ArchiveError(f"{archive}: member {ti.name!r} is not listed in the manifest; refused")
        if ti.size != exp.size:
            raise ArchiveError(f"{archive}: member {ti.name!r} is {ti.size} bytes, the manifest says {exp.size}; "
                               "refused")
        reader.allow(tar.offset)
        seen.add(ti.name)
        dst = staging / ti.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(ti)
        assert src is not None
        h = _Hasher(exp)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            left = ti.size
            while left:
                b = src.read(min(CHUNK, left))
                if not b:
                    raise ArchiveError(f"{archive}: member {ti.name!r} ends early; the archive is truncated")
                h.update(b)
                view = memoryview(b)
                while len(view):
                    view = view[os.write(fd, view):]
                left -= len(b)
                tick(len(b))
        finally:
            os.close(fd)
        if bad := h.problems():
            raise ArchiveError(f"{archive}: {ti.name}: checksum mismatch in {', '.join(bad)}; the archive is damaged, "
                               "nothing was written")
        written += ti.size
    missing = [p for p in expect if p not in seen]
    if missing:
        raise ArchiveError(f"{archive}: {len(missing)} file(s) the manifest lists are not in the archive (first: "
                           f"{missing[0]}); it is truncated; nothing was written")
    with open(staging / MANIFEST_NAME, "xb") as out:
        out.write(mbytes)
    return len(seen) + 1, written
