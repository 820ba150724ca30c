"""``reassemble`` for a folder extracted (or pulled) from a SafeTensors checkpoint: the checkpoint's own shards, byte
for byte.

At extract time :func:`record_st` keeps what the shards and dense.gguf do not hold (``pull`` builds the same record
shard by shard from the same parts, ``mertools.hub.stream_record``): each shard's header bytes (the 8-byte length
and the JSON exactly as stored, so key order and padding come back too), the xxh3 of every tensor and of every whole
shard, and the bytes of ``config.json`` and ``model.safetensors.index.json``. They go to ``reassembly.dat`` and the
manifest's ``reassembly`` field (``"format": "safetensors"``).

:func:`reassemble_st` writes each shard as the header bytes, then every tensor in data order: a dense tensor from
dense.gguf (its bits; dense.gguf only renames unsigned types to signed ones of the same width), an expert tensor put
back together from the projections that name it as their ``source``, each transform undone (a per-expert tensor is
its projection; a stacked ``[E, ...]`` one is filled expert by expert, gate/up halves or even/odd positions put back
in their place and transposes undone; MXFP4 ggml blocks are split back into ``*_blocks`` and ``*_scales``). Every
projection is checked against its manifest xxh3 as read, every tensor against the record, every file against the
source's xxh3, under a hidden temporary name renamed only when all of it matches. A new output folder is written
as a hidden sibling (``.DIR.mertools-tmp-*``) renamed to DIR in one step, so an interrupt leaves no DIR or the
whole set; into an existing folder (``--overwrite``) the files are renamed one by one at the end, and an interrupt
in that loop can leave a mix of old and new files, each of them complete (a kill before it leaves only hidden
``.NAME.mertools-tmp-*`` files or the hidden sibling folder, safe to delete). Memory holds one expert's slice of
one tensor at a time. Our own writer, not ``safetensors.save_file``: that one needs every tensor of a shard in memory
at once and writes its own header, which would lose the source's bytes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xxhash

from mer_runtime.errors import ManifestError
from mer_runtime.manifest import Manifest, same_file_key

from .commit import (check_file_target, flush_files, left_behind, place_all, refuse_folder_file, sweep_temps,
                     temp_name, test_point)
from .errors import MertoolsError, OutputError, SourceError
from .sources.safetensors import DTYPES

EXTRA_NAMES = ("config.json", "model.safetensors.index.json")
_ITEM = {k: v[0] for k, v in DTYPES.items()}  # bytes per element: the source reader's own table
# "name", "name[e]", "name[e][:32]", "name[e][:, 1::2].T", "blocks+scales_suffix[e][0::2]"
_SRC_RE = re.compile(r"^(?P<base>[^\[+]+)(?:\+(?P<scales>[^\[+.]+))?(?:\[(?P<e>\d+)\])?(?P<sel>\[[^\]]*\])?"
                     r"(?P<T>\.T)?$")
_SEL_RE = re.compile(r"^\[(?P<ax>:, )?(?:(?P<a>\d*):(?P<b>\d*)|(?P<p>[01])::2)\]$")


def _reassembly_error(msg: str) -> Exception:
    from .reassemble import ReassemblyError

    return ReassemblyError(msg)


# -- the record, written at extract time ------------------------------------------------------------------------------


def record_st(src: Any, folder: Path) -> dict[str, Any] | None:
    """Write ``folder/reassembly.dat`` for a SafeTensors source and return the manifest's ``reassembly`` field.

    One extra sequential xxh3 pass over the shards (usually from the page cache); the record's size is that of the
    shard headers plus config.json and the index. None when the shards do not tile their data (never for a file the
    source accepted), a file vanished meanwhile, or the checkpoint holds FP8 tensors (converted at extract).
    ``pull`` builds the same record shard by shard from the same two parts, :func:`shard_entry` and
    :func:`write_record` (``mertools.hub.stream_record``).

    >>> from mertools.sources import open_source                         # doctest: +SKIP
    >>> record_st(open_source("mixtral-bf16/"), Path("staging"))["format"]   # doctest: +SKIP
    'safetensors'
    """
    if not recordable(src):
        return None
    shards = []
    by_file = tensors_by_file(src)
    try:
        for i, path in enumerate(src.files):
            got = shard_entry(path, src.header_lengths[i], by_file[i])
            if got is None:
                return None
            shards.append(got)
        extra = record_extras(lambda name: p.read_bytes() if (p := Path(src.path) / name).is_file() else None)
    except OSError:
        return None
    return write_record(folder, shards, extra)


def record_extras(read: Callable[[str], bytes | None]) -> list[tuple[str, bytes]]:
    """(name, bytes) of the files besides the shards that come back (config.json, the index), as ``read(name)``
    gives them (None: the checkpoint has no such file)."""
    return [(name, data) for name in EXTRA_NAMES if (data := read(name)) is not None]


def recordable(src: Any) -> bool:
    """Whether the source's own bytes can come back: not when it holds FP8 tensors, which are widened to BF16 in
    dense.gguf (experts need --dtype), never the source again."""
    return not any(t.dtype.startswith("F8") for t in src.tensors.values())


def tensors_by_file(src: Any) -> dict[int, list[Any]]:
    """The source's tensors grouped by the index of the shard that holds them."""
    by_file: dict[int, list[Any]] = defaultdict(list)
    for t in src.tensors.values():
        by_file[t.file_index].append(t)
    return by_file


def shard_entry(path: Path, header_len: int, tensors: list[Any]) -> tuple[dict[str, Any], bytes] | None:
    """The shard at ``path`` (header of ``header_len`` JSON bytes, holding ``tensors``): its entry in the record
    (``name``, ``size``, ``xxh3_64`` of the whole file, ``tensors`` in data order with each one's xxh3; its place in
    reassembly.dat is ``write_record``'s) and its header bytes as stored, from one sequential pass. None when the
    tensors do not tile its data."""
    from .reassemble import _scan

    hlen = 8 + int(header_len)
    ts = sorted(tensors, key=lambda t: t.offset)
    pos, spans = hlen, []
    for t in ts:
        if t.offset != pos:
            return None
        spans.append((t.offset, t.offset + t.nbytes, t.name))
        pos += t.nbytes
    # the header's tensors end the file (the source checked it at open): a file that grew since (written to while
    # extract ran) would be recorded as a shard no reassembly can give back
    def changed(size: int) -> SourceError:
        return SourceError(f"{path}: changed while it was read (its header's tensors end at byte {pos}, the file now "
                           f"has {size}); extract again once nothing writes to it")

    if (size := path.stat().st_size) != pos:
        raise changed(size)
    whole, hs = _scan(path, [s for s in spans if s[1] > s[0]])
    with open(path, "rb") as fh:
        header = fh.read(hlen)
    if len(header) != hlen:
        return None
    if (now := path.stat().st_size) != size:
        raise changed(now)
    return ({"name": path.name, "size": size, "xxh3_64": whole,
             "tensors": [[t.name, hs.get(t.name, xxhash.xxh3_64_hexdigest(b""))] for t in ts]}, header)


def write_record(folder: Path, shards: list[tuple[dict[str, Any], bytes]],
                 extra: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Write ``folder/reassembly.dat`` from each shard's (entry, header bytes), in shard order, and the (name, bytes)
    of config.json and the index; return the manifest's ``reassembly`` field."""
    from .reassemble import RECORD_NAME

    blob = bytearray()
    files = []
    for entry, header in shards:
        files.append({"name": entry["name"], "size": entry["size"], "xxh3_64": entry["xxh3_64"],
                      "header": [len(blob), len(header)], "tensors": entry["tensors"]})
        blob += header
    extras = []
    for name, data in extra:
        extras.append({"name": name, "at": [len(blob), len(data)], "xxh3_64": xxhash.xxh3_64_hexdigest(data)})
        blob += data
    with open(folder / RECORD_NAME, "wb") as fh:
        fh.write(blob)
    return {"path": RECORD_NAME, "size": len(blob), "xxh3_64": xxhash.xxh3_64_hexdigest(bytes(blob)),
            "format": "safetensors", "files": files, "extra": extras}


def _well_formed(rec: dict[str, Any], blob_len: int) -> bool:
    from .reassemble import plain_name

    def span(x: Any) -> bool:
        return (isinstance(x, list) and len(x) == 2 and all(type(v) is int and v >= 0 for v in x)
                and x[0] + x[1] <= blob_len)

    files, extra = rec.get("files"), rec.get("extra", [])
    if not isinstance(files, list) or not files or not isinstance(extra, list):
        return False
    for f in files:
        if not (isinstance(f, dict) and plain_name(f.get("name")) and type(f.get("size")) is int
                and isinstance(f.get("xxh3_64"), str) and span(f.get("header")) and isinstance(f.get("tensors"), list)
                and all(isinstance(t, list) and len(t) == 2 and all(isinstance(v, str) for v in t)
                        for t in f["tensors"])):
            return False
    if not all(isinstance(x, dict) and x.get("name") in EXTRA_NAMES and span(x.get("at"))
               and isinstance(x.get("xxh3_64"), str) for x in extra):
        return False
    # every output is its own file: two entries of one name would write one over the other and report success
    names = [f["name"] for f in files] + [x["name"] for x in extra]
    return len(set(names)) == len(names) and all(f["name"].endswith(".safetensors") for f in files)


SEGMENT = 64 << 20  # a dense tensor is copied in pieces of this size


def _pread_full(fd: int, n: int, off: int, path: Path) -> bytes:
    """Exactly ``n`` bytes at ``off``: one pread may return fewer (Linux caps one read at 0x7ffff000 bytes), so it is
    repeated; a read of 0 bytes means the file ended early (it shrank after it was checked)."""
    parts, got = [], 0
    while got < n:
        b = os.pread(fd, n - got, off + got)
        if not b:
            raise _reassembly_error(f"{path}: ended at byte {off + got}, {n - got} bytes short of what the manifest "
                                    "lists (changed while being read?); the folder is damaged (run `mertools "
                                    "verify`); nothing was written")
        parts.append(b)
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


# -- putting expert tensors back -------------------------------------------------------------------------------------


class _Proj:
    __slots__ = ("path", "offset", "nbytes", "xxh3_64", "shape", "e", "sel", "transposed", "role", "scales")

    def __init__(self, **kw: Any):
        for k, v in kw.items():
            setattr(self, k, v)

    def read(self) -> np.ndarray:
        with open(self.path, "rb") as fh:
            data = _pread_full(fh.fileno(), self.nbytes, self.offset, self.path)
        if xxhash.xxh3_64_hexdigest(data) != self.xxh3_64:
            raise _reassembly_error(
                f"{self.path}: bytes {self.offset}..{self.offset + self.nbytes} do not match their manifest checksum; "
                "the folder is damaged (run `mertools verify`); nothing was written")
        return np.frombuffer(data, np.uint8)


def _parse_sel(sel: str | None, role: str, whole: str) -> tuple[int, slice] | None:
    if not sel:
        return None
    mm = _SEL_RE.match(sel)
    if mm is None:
        raise _reassembly_error(f"projection source {whole!r}: a slice this version cannot undo; re-extract")
    ax = 1 if mm["ax"] else 0
    if mm["p"] is not None:
        return ax, slice(int(mm["p"]), None, 2)
    return ax, slice(int(mm["a"]) if mm["a"] else None, int(mm["b"]) if mm["b"] else None)


def _projections(m: Manifest) -> dict[str, list[_Proj]]:
    """Source tensor name -> the projections cut from it (for MXFP4 both ``*_blocks`` and ``*_scales`` name the
    same list)."""
    out: dict[str, list[_Proj]] = defaultdict(list)
    for x in m.raw["experts"]:
        path = m.root / x["path"]
        for role, t in x["tensors"].items():
            src = t.get("source")
            mm = _SRC_RE.match(src) if isinstance(src, str) else None
            if mm is None:
                raise _reassembly_error(f"{m.root}: layer {x['layer']} expert {x['expert']} {role}: source {src!r} "
                                        "is not a slice this version can undo; re-extract the model")
            scales = None
            if mm["scales"]:
                scales = mm["base"].rsplit(".", 1)[0] + "." + mm["scales"]
            p = _Proj(path=path, offset=int(t["offset"]), nbytes=int(t["nbytes"]), xxh3_64=t["xxh3_64"],
                      shape=tuple(int(d) for d in t["shape"]), e=None if mm["e"] is None else int(mm["e"]),
                      sel=_parse_sel(mm["sel"], role, src), transposed=bool(mm["T"]), role=role, scales=scales)
            out[mm["base"]].append(p)
            if scales:
                out[scales] = out[mm["base"]]
    return out


def _expert_chunks(name: str, dtype: str, shape: list[int], nbytes: int, projs: list[_Proj], where: Path) -> Any:
    """The tensor's bytes, one expert's slice at a time, each transform undone."""
    if projs[0].e is None:  # a per-expert tensor is its one projection, as stored
        if len(projs) != 1 or projs[0].nbytes != nbytes:
            raise _reassembly_error(f"tensor {name!r}: the shards hold {len(projs)} projection(s) of "
                                    f"{sum(p.nbytes for p in projs)} bytes for it, the source had {nbytes}")
        yield projs[0].read()
        return
    by_e: dict[int, list[_Proj]] = defaultdict(list)
    for p in projs:
        by_e[p.e].append(p)
    n_exp = max(by_e) + 1
    if sorted(by_e) != list(range(n_exp)) or nbytes % n_exp:
        raise _reassembly_error(f"tensor {name!r}: experts {sorted(by_e)} in the shards do not make up the source's "
                                f"{shape}; the folder is damaged")
    mxfp4 = projs[0].scales is not None
    # what the shards hold for each expert must be the header's size before anything of that size is allocated
    if mxfp4:
        # *_scales [E, rows, nblk] or *_blocks [E, rows, nblk, 16]
        fits = len(shape) >= 3 and shape[0] == n_exp and (len(shape) == 3 or (len(shape) == 4 and shape[3] == 16))
        per_e = int(shape[1]) * int(shape[2]) * 17 if fits else -1  # ggml: a scale byte + 16 code bytes per block
    else:
        per_e = nbytes // n_exp
    bad = [e for e in range(n_exp) if sum(p.nbytes for p in by_e[e]) != per_e]
    if bad:
        raise _reassembly_error(f"{where}: tensor {name!r}: expert {bad[0]}'s projections hold "
                                f"{sum(p.nbytes for p in by_e[bad[0]])} bytes, the recorded header's {dtype} "
                                f"{shape} needs {per_e}; the record or the folder is damaged (extract the model "
                                "again)")
    if mxfp4:
        is_scales = name == projs[0].scales
        for e in range(n_exp):
            yield _unpack_mxfp4(name, shape, by_e[e], is_scales)
        return
    item = _ITEM.get(dtype)
    if item is None:
        raise _reassembly_error(f"tensor {name!r}: source type {dtype} unknown to this version")
    per = nbytes // n_exp
    sub = [int(d) for d in shape[1:]] if shape and shape[0] == n_exp else None
    if sub is None and shape and shape[0] % n_exp == 0:  # DBRX's flat [E*F, H], viewed as [E, F, H]
        sub = [int(shape[0]) // n_exp, *[int(d) for d in shape[1:]]]
    if sub is None or int(np.prod(sub, dtype=object)) * item != per:
        raise _reassembly_error(f"{where}: tensor {name!r}: its recorded shape {shape} cannot hold {n_exp} experts; "
                                "the record is damaged (extract the model again)")
    udt = np.dtype(f"<u{item}")
    for e in range(n_exp):
        buf = np.zeros(per // item, udt).reshape(sub)
        filled = 0
        for p in by_e[e]:
            v = buf
            if p.sel is not None:
                ax, sl = p.sel
                v = v[sl] if ax == 0 else v[:, sl]
            if p.transposed:
                v = v.T
            src = p.read().view(udt)
            if tuple(v.shape) != p.shape or src.size != v.size:
                raise _reassembly_error(f"tensor {name!r}: expert {e} {p.role} of shape {list(p.shape)} does not fit "
                                        f"its place {list(v.shape)} in the source's {shape}; the folder is damaged")
            v[...] = src.reshape(v.shape)
            filled += v.size
        if filled != buf.size:
            raise _reassembly_error(f"tensor {name!r}: expert {e}'s projections cover {filled} of its {buf.size} "
                                    "values; the folder is damaged")
        yield buf.reshape(-1).view(np.uint8)


def _unpack_mxfp4(name: str, shape: list[int], projs: list[_Proj], is_scales: bool) -> np.ndarray:
    """ggml MXFP4 rows back into HF ``*_blocks [rows, nblk, 16]`` or ``*_scales [rows, nblk]`` (the inverse of
    ``repack_mxfp4``)."""
    rows, nblk = int(shape[1]), int(shape[2])
    blocks = np.zeros((rows, nblk, 16), np.uint8)
    scales = np.zeros((rows, nblk), np.uint8)
    halves = [p for p in projs if p.sel is None]
    for p in projs:
        sel = p.sel[1] if p.sel is not None else slice(None)
        if p.sel is None and len(halves) == 2:  # first/second halves: gate rows first
            r = p.shape[0]
            sel = slice(0, r) if p.role.startswith("gate") else slice(r, None)
        q = p.read().reshape(p.shape[0], nblk, 17)
        codes = np.empty((p.shape[0], nblk, 32), np.uint8)
        codes[..., :16] = q[..., 1:] & 0x0F
        codes[..., 16:] = q[..., 1:] >> 4
        blocks[sel] = codes[..., 0::2] | (codes[..., 1::2] << 4)
        scales[sel] = q[..., 0]
    return (scales if is_scales else blocks).reshape(-1)


# -- writing the checkpoint ----------------------------------------------------------------------------------------


def reassemble_st(m: Manifest, folder: Path, out: Path, *, overwrite: bool, fsync: bool,
                  progress: Callable[[int, int], Callable[[int], None]] | None, t0: float) -> Any:
    """Write the checkpoint a SafeTensors-sourced folder was extracted from into the folder ``out`` (made if
    absent): its shards under their own names, byte-identical (each checked by the source's xxh3), config.json and
    the index as they were, and the companion files kept in hf/ (tokenizer, ...), each checked by its xxh3.

    >>> from mertools.reassemble import reassemble
    >>> reassemble("out/", "mixtral-again/").exact           # doctest: +SKIP
    True
    """
    from .reassemble import ReassembleResult, _check_dense, _dense_reader, _Out, folder_files, read_record

    rec = m.raw["reassembly"]
    path, blob = read_record(m, rec)
    if not _well_formed(rec, len(blob)):
        raise _reassembly_error(f"{m.root}: the manifest's reassembly field is malformed; re-extract the model")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file; a SafeTensors checkpoint comes back as a folder of shards, give a "
                          "folder (new or existing)")
    if not out.exists() and not out.parent.is_dir():
        raise OutputError(f"{out.parent}: no such folder")
    recorded = {x["name"] for x in rec["extra"]}
    # config.json is both in the record and a companion: written once, from the record (both checked)
    companions = [c for c in m.companions if c.name not in recorded]
    names = [f["name"] for f in rec["files"]] + [x["name"] for x in rec["extra"]] + [c.name for c in companions]
    # one output file each: a companion named like a shard, exactly or but for case or Unicode normalization (one
    # file on macOS and Windows), would overwrite it
    if len({same_file_key(n) for n in names}) != len(names):
        raise _reassembly_error(f"{m.root}: the manifest's companion files and the reassembly record name the same "
                                "file twice (exactly, or two names that differ only in case or Unicode "
                                "normalization); the manifest is damaged (extract the model again)")
    own = folder_files(m)
    for n in names:
        t = out / n
        refuse_folder_file(t, folder, own)
        check_file_target(t, overwrite, "folder")
    projs = _projections(m)
    dense = _dense_reader(m)
    # a new folder is written as a hidden sibling and renamed into place once complete: one rename, all or nothing;
    # one that a SIGKILL'd run left (as large as the model) goes first
    sweep_temps(out, folders=True)
    made = not out.exists()
    dest = temp_name(out) if made else out
    outs: list[_Out] = []
    try:
        _check_dense(m)
        dpath = m.root / m.dense["path"]
        dense_t = {t.name: t for t in dense.tensors}
        total = sum(int(f["size"]) for f in rec["files"])
        tick = progress(total, sum(len(f["tensors"]) for f in rec["files"])) if progress else (lambda n: None)
        used: set[str] = set()
        if made:
            dest.mkdir()
        for f in rec["files"]:
            o = _Out(dest / f["name"])
            outs.append(o)
            h0, hn = f["header"]
            head = blob[h0:h0 + hn]
            header = _parse(head, f["name"], path)
            o.write(head)
            tick(hn)
            want = {n: x for n, x in f["tensors"]}
            order = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                           key=lambda kv: kv[1]["data_offsets"][0])
            if [k for k, _ in order] != [n for n, _ in f["tensors"]]:
                raise _reassembly_error(f"{path}: the recorded header of {f['name']} does not list the recorded "
                                        "tensors; the record is damaged")
            for name, info in order:
                b, e = info["data_offsets"]
                if b != o.pos - hn:  # tensors tile the data section, as extract recorded them
                    raise _reassembly_error(f"{path}: the recorded header of {f['name']} puts {name!r} at byte {b}, "
                                            f"the tensor before it ends at {o.pos - hn}; the record is damaged "
                                            "(extract the model again)")
                th = xxhash.xxh3_64()
                if name in projs:
                    used.add(name)
                    for chunk in _expert_chunks(name, info["dtype"], info["shape"], e - b, projs[name], path):
                        o.write(memoryview(chunk), th)
                        tick(chunk.nbytes)
                elif name in dense_t:
                    dt = dense_t[name]
                    if int(dt.n_bytes) != e - b:
                        raise _reassembly_error(
                            f"tensor {name!r}: dense.gguf holds it as {dt.tensor_type.name} of "
                            f"{int(dt.n_bytes)} bytes, the source had {info['dtype']} of {e - b} (converted at "
                            "extract); this folder cannot give the checkpoint back, use the original")
                    with open(dpath, "rb") as fh:
                        for off in range(0, e - b, SEGMENT):  # memory flat, and no single read over Linux's cap
                            data = _pread_full(fh.fileno(), min(SEGMENT, e - b - off), int(dt.data_offset) + off,
                                               dpath)
                            o.write(data, th)
                            tick(len(data))
                else:
                    raise _reassembly_error(f"{m.root}: tensor {name!r} of {f['name']} is neither in dense.gguf nor in "
                                            "the shards; this folder cannot give the checkpoint back")
                if o.pos - hn != e:
                    raise _reassembly_error(f"tensor {name!r}: {o.pos - hn - b} bytes made, the source had {e - b}")
                if th.hexdigest() != want[name]:
                    raise _reassembly_error(f"tensor {name!r}: the bytes made from the folder differ from the source's "
                                            f"(xxh3 {th.hexdigest()}, recorded {want[name]}); the folder is damaged")
            o.close()
            if o.pos != f["size"] or o.hash.hexdigest() != f["xxh3_64"]:
                raise _reassembly_error(f"{out / o.final.name}: the rebuilt shard's xxh3 {o.hash.hexdigest()} is "
                                        f"not the source's {f['xxh3_64']}; nothing was left behind")
            test_point("writing")
        left = set(projs) - used
        if left:
            raise _reassembly_error(f"{m.root}: the shards hold {', '.join(sorted(left)[:3])} which the source's "
                                    "headers do not list; the reassembly record does not belong to this folder")
        for x in rec["extra"]:
            a, n = x["at"]
            data = blob[a:a + n]
            if xxhash.xxh3_64_hexdigest(data) != x["xxh3_64"]:
                raise _reassembly_error(f"{path}: {x['name']}'s bytes do not match their checksum; the record is "
                                        "damaged")
            o = _Out(dest / x["name"])
            outs.append(o)
            o.write(data)
            o.close()
        for c in m.companions:
            data = _companion_bytes(m, c)
            if c.name in recorded:
                continue  # (its own bytes checked all the same)
            o = _Out(dest / c.name)
            outs.append(o)
            o.write(data)
            o.close()
        dense.guard.finish()  # type: ignore[attr-defined]
        if fsync:
            flush_files([o.tmp for o in outs])
        # into an existing folder an interrupt here leaves each file complete, old or new; without --overwrite a
        # file that appeared there meanwhile is kept
        place_all([(o.tmp, o.final) for o in outs], overwrite or made, "folder")
        if made:
            if fsync:
                flush_files([], {dest})
            try:
                os.rename(dest, out)  # fails (nothing lost) if a non-empty `out` appeared meanwhile
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
                raise OutputError(f"{out}: appeared while this run wrote it and was left as it is; run again with "
                                  "--overwrite to write into it, or choose another folder") from None
        if fsync:
            flush_files([], {out, out.parent} if made else {out})  # a folder made here: its own name too
    except BaseException as exc:
        kept = [o.tmp for o in outs if not o.discard()]
        if made and dest.exists():
            shutil.rmtree(dest, ignore_errors=True)  # made here, holding only our own files
            kept = [dest] if dest.exists() else []
        if isinstance(exc, OSError) and not isinstance(exc, MertoolsError):
            raise OutputError(f"{exc.filename or out}: {exc.strerror or exc}; {left_behind(kept)}") from None
        raise
    finally:
        dense.guard.close()  # type: ignore[attr-defined]
    notes = [] if "companions" in m.raw else [
        "this folder was extracted by an older mertools, which kept no companion files: only the shards, the index "
        "and config.json come back; copy the tokenizer and other files from the source"]
    return ReassembleResult([out / o.final.name for o in outs], True,
                            "byte-identical to the source's shards (the reassembly record), checked by each shard's "
                            "xxh3", sum(len(f["tensors"]) for f in rec["files"]),
                            sum(o.pos for o in outs), time.perf_counter() - t0, notes)


def _companion_bytes(m: Manifest, c: Any) -> bytes:
    """Companion file ``c``'s bytes (tokenizer, ...), from the folder's hf/, checked against its manifest size and
    xxh3 (a regular file inside the folder only, as verify reads it)."""
    from mer_runtime.safeopen import read_regular

    from .reassemble import ReassemblyError

    hint = "the folder is damaged (run `mertools verify`); nothing was written"
    try:
        path = m.resolve(c.path, "companion file")
    except ManifestError as exc:
        raise ReassemblyError(f"{exc}; nothing was written") from None
    data = read_regular(path, c.size, error=ReassemblyError, hint=hint)
    if len(data) != c.size or xxhash.xxh3_64_hexdigest(data) != c.xxh3_64:
        raise _reassembly_error(f"{path}: {len(data)} bytes, xxh3 {xxhash.xxh3_64_hexdigest(data)}; the manifest "
                                f"says {c.size}, {c.xxh3_64}: {hint}")
    return data


def _parse(head: bytes, name: str, where: Path) -> dict[str, Any]:
    """The recorded header of shard ``name``, every tensor's offsets, type and shape consistent with each other (a
    crafted record gives this one line, not a wrong message or an allocation of its made-up size)."""
    try:
        n = int.from_bytes(head[:8], "little")
        h = json.loads(head[8:8 + n].decode("utf-8"))
        assert isinstance(h, dict) and n + 8 == len(head)
        for k, v in h.items():
            if k != "__metadata__":
                assert isinstance(v["data_offsets"], list) and len(v["data_offsets"]) == 2
                b, e = v["data_offsets"]
                assert type(b) is int and type(e) is int and 0 <= b <= e
                assert v["dtype"] in _ITEM and isinstance(v["shape"], list)
                assert all(type(d) is int and d >= 0 for d in v["shape"])
                assert int(np.prod(v["shape"], dtype=object)) * _ITEM[v["dtype"]] == e - b
        return h
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError):  # RecursionError: nesting too deep
        raise _reassembly_error(f"{where}: the recorded header of {name} is not a safetensors header this version "
                                "reads, or its offsets do not match its types and shapes; the record is damaged "
                                "(extract the model again)") from None
