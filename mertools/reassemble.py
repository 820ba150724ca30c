"""``reassemble``: rebuild the source model from a shard folder (shards + dense.gguf), streaming and verified.

At extract time :func:`record_for_reassembly` keeps what the shards and dense.gguf do not hold: each source part's
header bytes (magic, KV section, tensor infos, padding up to the data section), every tensor's place, type, shape and
xxh3, any non-zero padding bytes, and the xxh3 of each whole source part. The header bytes go to ``reassembly.dat``;
the rest is the manifest's ``reassembly`` field. With the record a single-file source (and, with ``--split``, every
part of a split set) comes back byte for byte; the output's xxh3 is compared with the source's at the end.

Without the record (folders extracted before it existed), or a split set joined into one file, the header is made
anew by the gguf package's writer from dense.gguf's metadata: every tensor's bytes are identical, the file loads in
gguf's reader, but the header bytes may differ from the source's.

A folder extracted from a SafeTensors checkpoint, or pulled from the Hub, comes back as that checkpoint's own shards
(``st_reassemble``); a folder whose experts were converted (``--dtype``) is refused, since it can never give the
source back.

Memory stays flat: bytes go from the shard files to the output through one reused segment buffer (``os.preadv`` /
``os.write``); every projection's xxh3 is checked against the manifest as it is read, every tensor's against the
record, and the output goes to a hidden temporary name that is renamed only once it is complete and checked.
Calls share no state and may run in parallel on different outputs.
"""

from __future__ import annotations

import mmap
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import xxhash
from gguf.constants import GGMLQuantizationType

from mer_runtime.checksum import hash_file
from mer_runtime.errors import ManifestError
from mer_runtime.guard import guard_array, guard_mapping
from mer_runtime.manifest import (MANIFEST_NAME, ROLES, Manifest, load_manifest, plain_name,  # noqa: F401
                                  same_file_key)  # (the one name rules)
from mer_runtime.safeopen import kind_of

from .commit import (check_file_target, check_space, drop_temp, flush_files, interruptible, left_behind, place_all,
                     refuse_folder_file, signals_held, sweep_temps, temp_name, test_point)
from .errors import MertoolsError, OutputError
from .gguf_header import MAX_ALIGNMENT

RECORD_NAME = "reassembly.dat"
SEGMENT = 4 << 20  # bytes per read/write: large and sequential, memory flat
_REMOVED_KEY = "mertools.experts_removed_from"  # added by dense.gguf, not in the source
_SPLIT_PREFIX = "split."
_SOURCE_RE = re.compile(r"^(?P<base>.+)\[(?P<e>\d+)\]$")
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")
_FUSED_RE = re.compile(r"\.ffn_gate_up_exps\.")


class ReassemblyError(MertoolsError):
    """The folder cannot be turned back into its source (incomplete, damaged, or the output cannot be written)."""


# -- the record, written at extract time ------------------------------------------------------------------------------


def _zero_hash(n: int, cache: dict[int, str] = {}) -> str:  # noqa: B006 - a deliberate memo
    if n not in cache:
        h = xxhash.xxh3_64()
        z = bytes(min(n, SEGMENT))
        left = n
        while left:
            k = min(left, len(z))
            h.update(z[:k])
            left -= k
        cache[n] = h.hexdigest()
    return cache[n]


def _scan(path: Path, spans: list[tuple[int, int, str]]) -> tuple[str, dict[str, str]]:
    """One sequential pass: xxh3 of the whole file and of each (start, end, key) span (sorted, not overlapping)."""
    whole = xxhash.xxh3_64()
    hs = {k: xxhash.xxh3_64() for _, _, k in spans}
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m, memoryview(m) as mv:
        size = len(m)
        guard = guard_mapping(m, size, path)  # the source shrinking meanwhile: FileChangedError, not SIGBUS
        try:
            _scan_mapped(mv, size, spans, whole, hs, guard)
            guard.finish()
        finally:
            guard.close()
    return whole.hexdigest(), {k: h.hexdigest() for k, h in hs.items()}


def _scan_mapped(mv: memoryview, size: int, spans: list[tuple[int, int, str]], whole: Any, hs: dict[str, Any],
                 guard: Any) -> None:
    """The hashing pass of `_scan` over its mapping, a SEGMENT at a time, checking the guard after each."""
    i = 0
    for pos, end, seg in guard.pieces(mv, size, SEGMENT):
        whole.update(seg)
        while i < len(spans) and spans[i][1] <= pos:
            i += 1
        j = i
        while j < len(spans) and spans[j][0] < end:
            lo, hi = max(spans[j][0], pos), min(spans[j][1], end)
            if lo < hi:
                with seg[lo - pos:hi - pos] as part:
                    hs[spans[j][2]].update(part)
            j += 1


def record_for_reassembly(src: Any, folder: Path) -> dict[str, Any] | None:
    """Write ``folder/reassembly.dat`` and return the manifest's ``reassembly`` field (None: nothing to record).

    Called by extract once per run; costs one xxh3 pass over the source (usually from the page cache) and the
    size of the source's headers on disk. Not flushed here: extract's commit flushes the whole folder.

    >>> from mertools.gguf_source import open_source                       # doctest: +SKIP
    >>> record_for_reassembly(open_source("m.gguf"), Path("staging"))      # doctest: +SKIP
    {'path': 'reassembly.dat', 'size': ..., 'xxh3_64': ..., 'files': [...]}
    """
    if getattr(src, "kind", "gguf") == "safetensors":
        from .st_reassemble import record_st

        return record_st(src, folder)
    blob = bytearray()
    files = []
    for fi, (path, reader) in enumerate(zip(src.files, src.readers)):
        size = path.stat().st_size
        start = int(reader.data_offset)
        tensors = [t for t in src.tensors.values() if t.file_index == fi]
        by_off = sorted(tensors, key=lambda t: t.offset)
        spans: list[tuple[int, int, str]] = []
        pos = start
        for t in by_off:
            if t.offset < pos:
                return None  # overlapping or out-of-order data: nothing sane to rebuild, say so at reassemble time
            if t.offset > pos:
                spans.append((pos, t.offset, f"gap:{pos}"))
            spans.append((t.offset, t.offset + t.nbytes, "t:" + t.name))
            pos = t.offset + t.nbytes
        if size > pos:
            spans.append((pos, size, f"gap:{pos}"))
        whole, hs = _scan(path, spans)
        gap_data = []
        with open(path, "rb") as fh:
            header = fh.read(start)
            for a, b, k in spans:
                if k.startswith("gap:") and hs[k] != _zero_hash(b - a):
                    if b - a > 1 << 20:
                        return None  # megabytes hidden between tensors: not worth keeping, said at reassemble time
                    fh.seek(a)
                    gap_data.append((a, fh.read(b - a)))
        hoff = len(blob)
        blob += header
        gap_rows = []  # [absolute offset, length, offset in reassembly.dat] of each non-zero padding run
        for a, data in gap_data:
            gap_rows.append([a, len(data), len(blob)])
            blob += data
        files.append({
            "name": path.name,
            "size": size,
            "xxh3_64": whole,
            "alignment": int(reader.alignment),
            "data_offset": start,
            "header": [hoff, start],
            "gaps": gap_rows,
            # info order (the header's), each [name, type, ne, absolute offset, nbytes, xxh3]
            "tensors": [[t.name, t.dtype, list(t.ne), t.offset, t.nbytes, hs["t:" + t.name]] for t in tensors],
        })
    rec = folder / RECORD_NAME
    with open(rec, "wb") as fh:
        fh.write(blob)
    return {"path": RECORD_NAME, "size": len(blob), "xxh3_64": xxhash.xxh3_64_hexdigest(bytes(blob)), "files": files}


# -- reading the folder ---------------------------------------------------------------------------------------------


@dataclass
class Piece:
    """A byte range of a file in the folder, with the xxh3 the manifest promises for it."""

    path: Path
    offset: int
    nbytes: int
    xxh3_64: str | None  # None: checked through the whole tensor's hash only


@dataclass
class OutTensor:
    name: str
    dtype: str
    ne: list[int]
    nbytes: int
    pieces: list[Piece]
    xxh3_64: str | None = None  # the source tensor's, from the record
    offset: int | None = None  # absolute, in the source part (record only)


@dataclass
class ReassembleResult:
    out: list[Path]
    exact: bool  # True: byte-identical to the source (checked by the source's xxh3)
    how: str
    tensors: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": [str(p) for p in self.out],
            "exact": self.exact,
            "how": self.how,
            "tensors": self.tensors,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 4),
            "notes": self.notes,
        }


def _expert_pieces(m: Manifest) -> dict[str, tuple[list[Piece], str, tuple[int, ...]]]:
    """Source tensor name -> (its pieces in source byte order, type, first piece's shape), from each projection's
    ``source`` in the manifest (``blk.1.ffn_down_exps.weight[3]``, or a per-expert tensor's own name)."""
    raw = {(x["layer"], x["expert"]): x for x in m.raw["experts"]}
    found: dict[str, list[tuple[int, int, Piece, str, tuple[int, ...]]]] = {}
    for e in m.experts:
        for role, t in e.tensors.items():
            src = raw[(e.layer, e.expert)]["tensors"][role].get("source")
            if not isinstance(src, str) or not src:
                raise ReassemblyError(
                    f"{m.root}: layer {e.layer} expert {e.expert} {role} does not name its source tensor; "
                    "re-extract the model"
                )
            mm = _SOURCE_RE.match(src)
            base, idx = (mm["base"], int(mm["e"])) if mm else (src, 0)
            found.setdefault(base, []).append(
                (idx, ROLES.index(role), Piece(m.path_of(e), t.offset, t.nbytes, t.xxh3_64), t.dtype, t.shape))
    out = {}
    for k, v in found.items():
        v.sort(key=lambda x: (x[0], x[1]))
        out[k] = ([x[2] for x in v], v[0][3], v[0][4])
    return out


def folder_files(m: Manifest) -> list[str]:
    """Every file of the folder the manifest names: what no output may be written over."""
    rec = m.raw.get("reassembly")
    rec_path = rec.get("path", RECORD_NAME) if isinstance(rec, dict) else None
    return [MANIFEST_NAME, *([m.dense["path"]] if m.dense else []), *([rec_path] if isinstance(rec_path, str) else []),
            *(e.path for e in m.experts), *(c.path for c in m.companions)]


def _open_folder(folder: Path) -> Manifest:
    try:
        m = load_manifest(folder)
    except ManifestError as exc:
        raise ReassemblyError(str(exc)) from None
    sel = m.raw.get("selection", {})
    if isinstance(sel, dict) and sel.get("complete") is False:
        raise ReassemblyError(
            f"{folder}: was extracted with --layers/--experts (layers {sel.get('layers')}, experts "
            f"{sel.get('experts')}), so it does not hold the whole model; extract the model again without them"
        )
    if m.dense is None:
        raise ReassemblyError(f"{folder}: the manifest names no dense.gguf; re-extract the model")
    return m


def _source_name(src: dict[str, Any]) -> str:
    """The source as the manifest records it: the hub repo and commit where pulled, else its file names."""
    hub = src.get("hub")
    if isinstance(hub, dict) and isinstance(hub.get("repo"), str):
        at = hub.get("commit") or hub.get("revision")
        return f"{hub['repo']}" + (f" at {str(at)[:12]}" if isinstance(at, str) else "")
    names = [f["name"] for f in src.get("files", []) if isinstance(f, dict) and isinstance(f.get("name"), str)]
    if not names:
        return "(no file names recorded)"
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _lossy(m: Manifest) -> str | None:
    """What made this folder's experts differ from the source's bytes, or None when each is a source slice."""
    dtype = m.source.get("dtype")
    if dtype:
        return f"its experts were converted to {str(dtype).upper()} (--dtype)"
    for x in m.raw.get("experts", []):
        for role, t in (x.get("tensors") or {}).items() if isinstance(x, dict) else ():
            tr = t.get("transform") if isinstance(t, dict) else None
            if isinstance(tr, str) and "quantize" in tr.split("+"):
                return f"layer {x.get('layer')} expert {x.get('expert')} {role} was quantized ({tr})"
    return None


def _refuse_other_sources(m: Manifest, folder: Path) -> None:
    """Only an unconverted source can be rebuilt: a folder whose experts were converted (--dtype) cannot give the
    source back, and one from a SafeTensors checkpoint without its record (extracted or pulled) is refused in one
    line (before anything is written) rather than turned into a GGUF under Hugging Face names that no tool runs."""
    fmt = m.source.get("format", "gguf")
    what = {"gguf": "a GGUF source", "safetensors": "a SafeTensors checkpoint"}.get(fmt, f"a {fmt} source")
    name = _source_name(m.source)
    mt = m.source.get("model_type")
    kind = f" (model_type {mt})" if isinstance(mt, str) else ""
    if (why := _lossy(m)) is not None:
        raise ReassemblyError(f"{folder}: was converted from {what}, {name}{kind}, and {why}: a lossy conversion "
                              "that can never give the source back; use the original model")
    if fmt == "gguf":
        return
    rec = m.raw.get("reassembly")
    if fmt == "safetensors" and isinstance(rec, dict) and rec.get("format") == "safetensors":
        return  # written back as the checkpoint's own shards (st_reassemble)
    if fmt == "safetensors" and isinstance(m.source.get("hub"), dict):
        raise ReassemblyError(f"{folder}: was pulled from {what}, {name}{kind}, without a reassembly record (an "
                              "older mertools, FP8 tensors, or a resumed pull whose earlier run's shard hashes were "
                              "lost); pull it again with --overwrite to get one, or use that checkpoint itself")
    if fmt == "safetensors":
        raise ReassemblyError(f"{folder}: was extracted from {what}, {name}{kind}, without a reassembly record (an "
                              "older mertools, or FP8 tensors, which extract widens: lossy); use the original "
                              "checkpoint, or extract it again with this version if it holds no FP8 tensors")
    raise ReassemblyError(f"{folder}: was extracted from {what}, {name}{kind}; reassemble rebuilds GGUF sources "
                          "only, so use the original checkpoint (or `mertools pull` it again)")


def _dense_reader(m: Manifest) -> gguf.GGUFReader:
    path = m.resolve(m.dense["path"], "dense")
    if not path.is_file():
        what = f"is {kind_of(path.stat().st_mode)}, not a regular file" if path.exists() else "missing"
        raise ReassemblyError(f"{path}: {what}; the folder is damaged (run `mertools verify`)")
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError, IndexError) as exc:
        raise ReassemblyError(f"{path}: unreadable GGUF ({exc}); the folder is damaged (run `mertools verify`)") from None
    # its fields are views of the reader's mapping, read again for the generated header: a dense.gguf that shrinks
    # meanwhile is FileChangedError (checked after that), not SIGBUS
    reader.guard = guard_array(reader.data, int(reader.data.nbytes), path)  # type: ignore[attr-defined]
    return reader


def _record(m: Manifest) -> tuple[dict[str, Any], bytes] | None:
    rec = m.raw.get("reassembly")
    if not isinstance(rec, dict):
        return None
    path, blob = read_record(m, rec)
    if not _record_well_formed(rec, len(blob)):
        raise ReassemblyError(f"{m.root}: the manifest's reassembly field is malformed; re-extract the model, or "
                              "remove the field to get a tensor-identical rebuild")
    return rec, blob


RECORD_LIMIT = 1 << 30  # shard headers, config and index: megabytes for the largest checkpoints; never a GiB


def read_record(m: Manifest, rec: dict[str, Any]) -> tuple[Path, bytes]:
    """(path, bytes) of the reassembly record ``rec`` names, checked by its size and xxh3 before anything trusts it.

    The path is a plain name in the folder (`plain_name`), the size a bounded int, and
    the file is read as a regular file of exactly that size: an absolute path (``/dev/zero``), ``..``, a FIFO or a
    file longer than the manifest says is refused with one line instead of a read without end or a hang.

    >>> read_record(load_manifest("out/"), load_manifest("out/").raw["reassembly"])[0].name  # doctest: +SKIP
    'reassembly.dat'
    """
    from mer_runtime.safeopen import read_regular

    rel, size = rec.get("path", RECORD_NAME), rec.get("size")
    if not plain_name(rel):
        raise ReassemblyError(f"{m.root}: the reassembly record's path {rel!r} is not a file name in the folder; "
                              "the manifest is damaged (run `mertools verify`, or extract the model again)")
    if type(size) is not int or not 0 <= size <= RECORD_LIMIT:
        raise ReassemblyError(f"{m.root}: the reassembly record's size {size!r} is not a byte count up to "
                              f"{RECORD_LIMIT}; the manifest is damaged (run `mertools verify`, or extract the model "
                              "again)")
    path = m.resolve(rel, "reassembly record")  # inside the folder, as verify and the runtime read every file
    blob = read_regular(path, size, error=ReassemblyError,
                        hint="the reassembly record is damaged (run `mertools verify`, or extract the model again)")
    if len(blob) != size or xxhash.xxh3_64_hexdigest(blob) != rec.get("xxh3_64"):
        raise ReassemblyError(f"{path}: checksum mismatch; the reassembly record is damaged (run `mertools verify`)")
    return path, blob


def _record_well_formed(rec: dict[str, Any], blob_len: int) -> bool:
    """Types and ranges of the record's fields, so that a hand-edited manifest gives our error, not a traceback."""
    def ints(xs: Any, n: int) -> bool:
        return isinstance(xs, list) and len(xs) == n and all(type(x) is int and x >= 0 for x in xs)

    files = rec.get("files")
    if not isinstance(files, list) or not files:
        return False
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("xxh3_64"), str):
            return False
        if not ints([f.get("size"), f.get("alignment"), f.get("data_offset")], 3) or f["alignment"] == 0:
            return False
        if f["alignment"] & (f["alignment"] - 1) or f["alignment"] > MAX_ALIGNMENT:  # as extract takes a source
            return False
        if not ints(f.get("header"), 2) or f["header"][0] + f["header"][1] > blob_len or f["header"][1] > f["size"]:
            return False
        # everything inside the part: padding is written up to each tensor's offset, so an offset past the part's
        # end would be zeros without bound before any check could see them
        gaps, tensors = f.get("gaps"), f.get("tensors")
        if not isinstance(gaps, list) or not all(ints(g, 3) and g[2] + g[1] <= blob_len and g[0] + g[1] <= f["size"]
                                                 for g in gaps):
            return False
        if not isinstance(tensors, list):
            return False
        for t in tensors:
            if not (isinstance(t, list) and len(t) == 6 and isinstance(t[0], str) and isinstance(t[1], str)
                    and ints(t[2], len(t[2]) if isinstance(t[2], list) else -1) and ints(t[3:5], 2)
                    and isinstance(t[5], str) and t[3] + t[4] <= f["size"]):
                return False
    return True


# -- writing --------------------------------------------------------------------------------------------------------


class _Out:
    """One output file under a temporary name: every byte written goes through the whole-file hash."""

    def __init__(self, final: Path):
        self.final = final
        sweep_temps(final)
        self.tmp = temp_name(final)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.hash = xxhash.xxh3_64()
        self.pos = 0

    def write(self, data: bytes | memoryview, *hashers: Any) -> None:
        self.hash.update(data)
        for h in hashers:
            h.update(data)
        view = memoryview(data)
        while len(view):
            n = os.write(self.fd, view)
            view = view[n:]
        self.pos += len(data)

    def zeros(self, n: int) -> None:
        z = bytes(min(n, SEGMENT))
        while n:
            k = min(n, len(z))
            self.write(z[:k] if k < len(z) else z)
            n -= k

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> bool:
        """Close and remove the temporary; False where the folder keeps it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        return drop_temp(self.tmp)


def copy_piece(piece: Piece, write: Callable[..., None], buf: memoryview, tick: Callable[[int], None],
               *hashers: Any) -> None:
    """Stream ``piece`` into ``write`` through ``buf``; raise if its bytes do not hash to what the manifest says."""
    h = xxhash.xxh3_64()
    try:
        fd = os.open(piece.path, os.O_RDONLY)
    except OSError as exc:
        raise ReassemblyError(f"{piece.path}: cannot be read ({exc.strerror}); run `mertools verify`") from None
    try:
        left, off = piece.nbytes, piece.offset
        while left:
            k = min(left, len(buf))
            got = os.preadv(fd, [buf[:k]], off)
            if got != k:
                raise ReassemblyError(f"{piece.path}: shorter than the manifest says; the folder is damaged "
                                      "(run `mertools verify`)")
            chunk = buf[:k]
            h.update(chunk)
            write(chunk, *hashers)
            tick(k)
            left -= k
            off += k
    finally:
        os.close(fd)
    if piece.xxh3_64 is not None and h.hexdigest() != piece.xxh3_64:
        raise ReassemblyError(
            f"{piece.path}: bytes {piece.offset}..{piece.offset + piece.nbytes} do not match their manifest checksum; "
            "the folder is damaged (run `mertools verify`); nothing was written"
        )


def _write_tensor(out: _Out, t: OutTensor, buf: memoryview, tick: Callable[[int], None]) -> None:
    th = xxhash.xxh3_64()
    for p in t.pieces:
        copy_piece(p, out.write, buf, tick, th)
    if t.xxh3_64 is not None and th.hexdigest() != t.xxh3_64:
        raise ReassemblyError(f"tensor {t.name!r}: the bytes read from the folder differ from the source's (xxh3 "
                              f"{th.hexdigest()}, recorded {t.xxh3_64}); the folder is damaged")


def _tensor_list(m: Manifest, dense: gguf.GGUFReader, experts: dict[str, Any],
                 rec_tensors: list[list[Any]] | None) -> list[OutTensor]:
    """Every tensor of the output, in header order, with where its bytes come from (``experts`` is consumed)."""
    dpath = m.root / m.dense["path"]
    dense_t = {t.name: t for t in dense.tensors}
    out: list[OutTensor] = []
    if rec_tensors is not None:
        for name, dtype, ne, off, nbytes, xh in rec_tensors:
            if name in dense_t:
                dt = dense_t[name]
                pieces = [Piece(dpath, int(dt.data_offset), int(dt.n_bytes), None)]
            elif name in experts:
                pieces = experts.pop(name)[0]
            else:
                raise ReassemblyError(f"{m.root}: tensor {name!r} is neither in dense.gguf nor in the shards; the "
                                      "folder is damaged or incomplete")
            if sum(p.nbytes for p in pieces) != nbytes:
                raise ReassemblyError(f"{m.root}: tensor {name!r}: the folder holds "
                                      f"{sum(p.nbytes for p in pieces)} bytes, the source had {nbytes}")
            out.append(OutTensor(name, dtype, list(ne), nbytes, pieces, xh, off))
        return out
    # No record: dense tensors in their order, each layer's expert tensors after that block's last dense tensor.
    made: dict[int, list[OutTensor]] = {}
    for base, (pieces, dtype, shape) in list(experts.items()):
        del experts[base]
        out_t = _expert_tensor(base, pieces, dtype, shape)
        b = _BLOCK_RE.match(base)
        made.setdefault(int(b[1]) if b else -1, []).append(out_t)
    last_of_block = {}
    for i, t in enumerate(dense.tensors):
        if b := _BLOCK_RE.match(t.name):
            last_of_block[int(b[1])] = i
    inserts: dict[int, list[OutTensor]] = {}
    for blk, ts in made.items():
        ts.sort(key=_expert_sort_key)
        inserts.setdefault(last_of_block.get(blk, len(dense.tensors) - 1), []).extend(ts)
    for i, t in enumerate(dense.tensors):
        out.append(OutTensor(t.name, t.tensor_type.name, [int(d) for d in t.shape], int(t.n_bytes),
                             [Piece(dpath, int(t.data_offset), int(t.n_bytes), None)]))
        out.extend(inserts.pop(i, []))
    for ts in inserts.values():
        out.extend(ts)
    return out


def _expert_sort_key(t: OutTensor) -> tuple[int, int, int]:
    kind = 1 if t.name.endswith(".bias") else 0
    for i, r in enumerate(("gate_up", "gate", "up", "down")):
        if f".ffn_{r}_exps." in t.name or f".ffn_{r}." in t.name:
            m = re.search(r"\.ffn_\w+?\.(\d+)\.", t.name)
            return (kind, int(m[1]) if m else 0, i)
    return (kind, 0, 9)


def _expert_tensor(base: str, pieces: list[Piece], dtype: str, shape: tuple[int, ...]) -> OutTensor:
    """A source expert tensor's ggml shape, from one expert's projection shape ([out, in], or [n] for a bias)."""
    full = list(shape)
    if _FUSED_RE.search(base):
        full[0] *= 2  # gate rows then up rows
    ne = list(reversed(full))
    if "_exps." in base:
        ne.append(len({p.path for p in pieces}))
    return OutTensor(base, dtype, ne, sum(p.nbytes for p in pieces), pieces)


def _generated_header(dense: gguf.GGUFReader, tensors: list[OutTensor], alignment: int) -> bytes:
    """A new GGUF header from dense.gguf's metadata (minus mertools' own key and split.*), for ``tensors``."""
    import io
    from types import SimpleNamespace

    from gguf.gguf_writer import WriterState

    from .dense import _raw_value

    arch = dense.fields.get("general.architecture")
    w = gguf.GGUFWriter(None, bytes(arch.parts[-1]).decode("utf-8") if arch else "unknown")
    if "general.alignment" in dense.fields or alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
        w.add_custom_alignment(alignment)
    for name, f in dense.fields.items():
        if name.startswith(("GGUF.", _SPLIT_PREFIX)) or name in ("general.architecture", "general.alignment",
                                                                   _REMOVED_KEY):
            continue
        val, vtype, sub = _raw_value(SimpleNamespace(files=[dense.data.filename]), f)  # names dense.gguf in errors
        w.add_key_value(name, val, vtype, sub)
    for t in tensors:
        try:
            qt = GGMLQuantizationType[t.dtype]
        except KeyError:
            raise ReassemblyError(f"tensor {t.name!r}: type {t.dtype} unknown to the installed gguf package") from None
        w.add_tensor_info(t.name, list(reversed(t.ne)), np.dtype(np.float32), t.nbytes, raw_dtype=qt)
    buf = io.BytesIO()
    w.fout = [buf]  # the header only, in memory: the tensor bytes are streamed by us
    w.state = WriterState.EMPTY
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return buf.getvalue()


def _targets(out: Path, names: list[str]) -> list[Path]:
    """Output paths: inside OUT when it is a folder; else OUT itself (one file) or OUT's stem + -0000i-of-0000n."""
    if out.is_dir():
        return [out / n for n in names]
    if len(names) == 1:
        return [out]
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    if mm := re.match(r"^(.*)-\d{5}-of-\d{5}$", stem):
        stem = mm[1]
    return [out.with_name(f"{stem}-{i:05d}-of-{len(names):05d}.gguf") for i in range(1, len(names) + 1)]


def _check_dense(m: Manifest) -> None:
    path = m.resolve(m.dense["path"], "dense")
    whole, _, _ = hash_file(path)
    if whole != m.dense["xxh3_64"]:
        raise ReassemblyError(f"{path}: checksum mismatch (xxh3 {whole}, manifest {m.dense['xxh3_64']}); the folder "
                              "is damaged (run `mertools verify`)")


def reassemble(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split: bool = False,
    overwrite: bool = False,
    fsync: bool = True,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> ReassembleResult:
    """Rebuild the source GGUF of an extracted folder; byte-identical where the folder holds a reassembly record.

    ``out`` is a file name, or an existing folder (the source's own file names are used inside it). With
    ``split=True`` a split source comes back as its parts (``OUT-0000i-of-0000n.gguf``); without it, as one file.

    >>> r = reassemble("out/", "model.gguf")              # doctest: +SKIP
    >>> r.exact                                           # byte-identical: the source's xxh3  # doctest: +SKIP
    True
    >>> reassemble("out/", "parts/", split=True)          # doctest: +SKIP
    """
    with interruptible():  # SIGTERM and SIGHUP too remove the temporaries, as Ctrl-C does
        return _reassemble(Path(folder), out, split, overwrite, fsync, progress)


def _reassemble(folder: Path, out: str | os.PathLike[str], split: bool, overwrite: bool, fsync: bool,
                progress: Callable[[int, int], Callable[[int], None]] | None) -> ReassembleResult:
    t0 = time.perf_counter()
    m = _open_folder(folder)
    _refuse_other_sources(m, folder)
    if m.source.get("format") == "safetensors":
        if split:
            raise ReassemblyError(f"{folder}: --split is for GGUF sources; a SafeTensors checkpoint comes back as its "
                                  "own shards without it")
        from .st_reassemble import reassemble_st

        return reassemble_st(m, folder, Path(out), overwrite=overwrite, fsync=fsync, progress=progress, t0=t0)
    rec = _record(m)
    dense = _dense_reader(m)
    try:
        src_files = [f["name"] for f in m.source.get("files", []) if isinstance(f, dict) and "name" in f]
        notes: list[str] = []
        bad = [n for n in src_files if not plain_name(n)]
        if bad or not src_files:
            raise ReassemblyError(f"{folder}: the manifest's source file names {bad or src_files!r} are not plain file "
                                  "names; the manifest is damaged, re-extract the model")
        # each part is written under its source name: a name twice (or twice but for case or Unicode normalization:
        # one file on macOS) would rename one part over another, and a record with other parts than the source list
        # would write some of them as if they were the whole source
        rec_files = [f["name"] for f in rec[0]["files"]] if rec is not None else src_files
        if len({same_file_key(n) for n in src_files}) != len(src_files) or rec_files != src_files:
            raise ReassemblyError(f"{folder}: the manifest's source files {src_files!r} and the parts its reassembly "
                                  f"record holds {rec_files!r} differ or repeat a name (exactly, or but for case or "
                                  "Unicode normalization); the manifest is damaged, re-extract the model")
        if split and len(src_files) < 2:
            raise ReassemblyError(f"{folder}: --split: the source was one file ({', '.join(src_files)}); drop --split")
        if split and rec is None:
            raise ReassemblyError(f"{folder}: --split needs the reassembly record, which this folder (extracted by an "
                                  "older mertools) lacks; drop --split to get one tensor-identical file")
        if rec is not None and rec[0].get("incomplete"):
            notes.append(rec[0]["incomplete"])
        exact = rec is not None and (len(src_files) == 1 or split)
        out_names = src_files if exact else [src_files[0] if len(src_files) == 1 else _joined_name(src_files[0])]
        if os.fspath(out).endswith(os.sep) and not Path(out).is_dir():  # Path() drops the slash that asks for a folder
            raise OutputError(f"{out}: no such folder; create it first, or give a file name")
        targets = _targets(Path(out), out_names)
        own = folder_files(m)
        for t in targets:
            refuse_folder_file(t, folder, own)
            check_file_target(t, overwrite)
            if not t.parent.is_dir():
                raise OutputError(f"{t.parent}: no such folder")
        experts = _expert_pieces(m)
        if rec is not None:
            plan = [_tensor_list(m, dense, experts, f["tensors"]) for f in rec[0]["files"]]
        else:
            plan = [_tensor_list(m, dense, experts, None)]
        if experts:
            raise ReassemblyError(f"{folder}: the shards hold {', '.join(sorted(experts)[:3])} which the source's "
                                  "header does not list; the reassembly record does not belong to this folder")
        total = sum(t.nbytes for part in plan for t in part)
        tick = progress(total, sum(len(p) for p in plan)) if progress else (lambda n: None)
        buf = memoryview(bytearray(SEGMENT))
        outs: list[_Out] = []
        try:
            if exact:
                assert rec is not None
                info, blob = rec
                _check_space(targets[0], sum(int(f["size"]) for f in info["files"]))
                for f, tensors, target in zip(info["files"], plan, targets):
                    outs.append(_write_exact(target, f, blob, tensors, buf, tick))
                    test_point("writing")
                how = "byte-identical to the source (the reassembly record), checked by the source's xxh3"
            else:
                if rec is None:
                    notes.append("this folder has no reassembly record (extracted by an older mertools): every "
                                 "tensor's bytes are the source's, the header is made anew from dense.gguf")
                else:
                    notes.append("a split source joined into one file: every tensor's bytes are the source's, the "
                                 "header is made anew (use --split for the source's own parts, byte for byte)")
                _check_dense(m)
                tensors = [t for part in plan for t in part]
                align = int(rec[0]["files"][0]["alignment"]) if rec else int(dense.alignment)
                header = _generated_header(dense, tensors, align)
                size = len(header)
                for t in tensors:
                    size += -size % align + t.nbytes
                _check_space(targets[0], size)
                dense.guard.check()  # type: ignore[attr-defined]
                o = _Out(targets[0])
                outs.append(o)
                o.write(header)
                for t in tensors:
                    o.zeros(-o.pos % align)
                    _write_tensor(o, t, buf, tick)
                o.close()
                _check_loads(o.tmp, tensors)
                how = "tensor-identical to the source; the file loads in gguf's reader"
            dense.guard.finish()  # type: ignore[attr-defined]  # the header came from its bytes: no zeros of a cut file
            if fsync:  # every part at once (a split set's parts in parallel), before any takes its name
                flush_files([o.tmp for o in outs])
            with signals_held():  # a split set's parts take their names together: never some old, some new
                place_all([(o.tmp, o.final) for o in outs], overwrite)
            if fsync:
                flush_files([], {o.final.parent for o in outs})
        except BaseException as exc:
            kept = [o.tmp for o in outs if not o.discard()]
            if isinstance(exc, OSError) and not isinstance(exc, MertoolsError):
                raise OutputError(f"{exc.filename or targets[0]}: {exc.strerror or exc}; {left_behind(kept)}"
                                  ) from None
            raise
        return ReassembleResult([o.final for o in outs], exact, how, sum(len(p) for p in plan),
                                sum(o.pos for o in outs), time.perf_counter() - t0, notes)
    finally:
        dense.guard.close()  # type: ignore[attr-defined]  # before the mapping goes (mer_runtime.guard.Guard)


def _check_space(target: Path, size: int) -> None:
    """The output's whole size (from the record, or header, padding and tensors), refused now, not at a full disk."""
    check_space(target.parent, size, "another MODEL")


def _joined_name(first_part: str) -> str:
    mm = re.match(r"^(.*)-\d{5}-of-\d{5}\.gguf$", first_part)
    return f"{mm[1]}.gguf" if mm else first_part


def _write_exact(target: Path, f: dict[str, Any], blob: bytes, tensors: list[OutTensor], buf: memoryview,
                 tick: Callable[[int], None]) -> _Out:
    o = _Out(target)
    try:
        h0, hn = f["header"]
        o.write(blob[h0:h0 + hn])
        gaps = {int(a): (int(n), int(r)) for a, n, r in f["gaps"]}
        for t in sorted(tensors, key=lambda t: t.offset):
            _fill(o, int(t.offset), gaps, blob)
            _write_tensor(o, t, buf, tick)
        _fill(o, int(f["size"]), gaps, blob)
        o.close()
    except BaseException:
        o.discard()
        raise
    if o.pos != f["size"] or o.hash.hexdigest() != f["xxh3_64"]:
        o.discard()
        raise ReassemblyError(f"{target}: the rebuilt file's xxh3 {o.hash.hexdigest()} is not the source's "
                              f"{f['xxh3_64']}; nothing was left behind (run `mertools verify` on the folder)")
    return o


def _fill(o: _Out, to: int, gaps: dict[int, tuple[int, int]], blob: bytes) -> None:
    """Padding up to ``to``: the recorded bytes where the source's were not zero, else zeros."""
    if to < o.pos:
        raise ReassemblyError(f"{o.final}: the reassembly record has overlapping tensors; it is damaged")
    if o.pos in gaps:
        n, r = gaps[o.pos]
        if o.pos + n != to:
            raise ReassemblyError(f"{o.final}: the reassembly record's padding does not fit; it is damaged")
        o.write(blob[r:r + n])
    else:
        o.zeros(to - o.pos)


def _check_loads(path: Path, tensors: list[OutTensor]) -> None:
    """The written file, read back by gguf's reader: every tensor with its name, type, shape and size."""
    try:
        r = gguf.GGUFReader(path, "r")
    except (ValueError, OSError, IndexError) as exc:
        raise ReassemblyError(f"{path}: gguf's reader refuses the rebuilt file ({exc}); nothing was kept") from None
    got = [(t.name, t.tensor_type.name, [int(d) for d in t.shape], int(t.n_bytes)) for t in r.tensors]
    want = [(t.name, t.dtype, list(t.ne), t.nbytes) for t in tensors]
    del r
    if got != want:
        bad = next((w for g, w in zip(got, want) if g != w), want[len(got)] if len(want) > len(got) else None)
        raise ReassemblyError(f"{path}: gguf's reader sees different tensors than were written (first: {bad}); "
                              "nothing was kept")
