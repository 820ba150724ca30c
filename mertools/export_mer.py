"""``export --to mer``: a shard folder in the layout of the MER engine (``expert_{g}.bin`` + ``metadata.json``).

The layout is the one in ``docs/mer-export.md`` (from the MER repository's loader): per (layer, expert) one file of
``expert_size`` bytes, a 4096-byte header page (``UTH1`` when every projection of the folder has one type, ``UTH2``
with a per-projection table otherwise), then gate || up || down exactly as the shards hold them, then zeros.

Nothing is converted: a type the layout has no name for, expert biases or a non-SwiGLU activation (GPT-OSS) are
refused with one line, never approximated. Every projection is checked against its manifest xxh3 as it is copied;
our own checksums of what was written go to ``mertools-checksums.json`` (MER ignores it). Calls share no state.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import xxhash

from mer_runtime.checksum import hash_file
from mer_runtime.errors import ManifestError
from mer_runtime.guard import guard_array
from mer_runtime.manifest import WEIGHT_ROLES, Manifest, load_manifest, router_names

from .errors import MertoolsError
from .pack import staged_folder
from .reassemble import SEGMENT, Piece, copy_piece

BLOCK_ALIGN = 4096
HEADER_PAGE = 4096
# MER's dtype ids (tensor_header.rs) and its metadata names, for the gguf types it reads.
MER_TYPES: dict[str, tuple[int, str]] = {
    "F32": (0, "f32"),
    "F16": (1, "f16"),
    "Q4_K": (3, "q4k"),
    "Q4_0": (4, "q4_0"),
    "Q8_0": (5, "q8_0"),
    "BF16": (6, "bf16"),
    "Q5_K": (8, "q5k"),
    "Q6_K": (9, "q6k"),
}
ROLE_IDS = {"gate": 0, "up": 1, "down": 2}
WEIGHT_LAYOUT = "gate_proj || up_proj || down_proj (row-major)"
Q4_0_LAYOUT = "ggml-standard-v1"
CHECKSUMS_NAME = "mertools-checksums.json"


class ExportError(MertoolsError):
    """The folder cannot be written in the target layout without changing what it means."""


def align_up(n: int, a: int = BLOCK_ALIGN) -> int:
    return (n + a - 1) // a * a


def uth1(dtype: str, d_ff: int, d_model: int) -> bytes:
    """The 4096-byte header page of an expert whose three projections share one type.

    >>> h = uth1("Q4_0", 256, 128); h[:4], len(h)
    (b'UTH1', 4096)
    """
    head = b"UTH1" + struct.pack("<HBB4I", 1, MER_TYPES[dtype][0], 3, d_ff, d_model, 3, 0)
    head += struct.pack("<2I", 0, 0)  # scale offset, scale count (3 only for MER's Int8, which gguf has not)
    head += struct.pack("<3I", 16, 16, 64)  # tile hints
    head += struct.pack("<I", 1)  # flags: payload page-aligned
    return head.ljust(HEADER_PAGE, b"\0")


def uth2(projs: list[tuple[str, str, int, int]], d_model: int, d_ff: int) -> bytes:
    """The header page for mixed types: ``projs`` is [(role, dtype, nbytes, weight count)] in payload order.

    >>> h = uth2([("gate", "Q4_K", 144, 256), ("up", "Q4_K", 144, 256), ("down", "Q6_K", 210, 256)], 16, 16)
    >>> h[:4], struct.unpack_from("<HH", h, 4)
    (b'UTH2', (2, 3))
    """
    head = bytearray(b"UTH2" + struct.pack("<HHIII", 2, len(projs), d_model, d_ff, 1))
    head = head.ljust(24, b"\0")
    off = 0
    for role, dtype, nbytes, count in projs:
        head += struct.pack("<BB2xQQI", MER_TYPES[dtype][0], ROLE_IDS[role], off, nbytes, count)
        off += nbytes
    return bytes(head).ljust(HEADER_PAGE, b"\0")


@dataclass
class ExportResult:
    out: Path
    experts: int
    expert_size: int
    dtype: str
    routers: int
    bytes_written: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "experts": self.experts, "expert_size": self.expert_size, "dtype": self.dtype,
                "router_files": self.routers, "bytes_written": self.bytes_written,
                "seconds": round(self.seconds, 4)}


def _check(m: Manifest) -> tuple[list[int], int, int, int]:
    """(MoE layers, experts per layer, d_model, d_ff), or one line saying why MER cannot take the folder."""
    where = m.root
    sel = m.raw.get("selection", {})
    if isinstance(sel, dict) and sel.get("complete") is False:
        raise ExportError(f"{where}: was extracted with --layers/--experts; MER needs every expert of every layer "
                          "(global ids 0..N-1). Extract the whole model")
    act = m.model.get("activation", {"kind": "swiglu"})
    if not isinstance(act, dict) or act.get("kind") != "swiglu":
        raise ExportError(f"{where}: activation {act} is not plain SwiGLU; MER computes only SwiGLU experts, so the "
                          "export would compute something else. Not exported")
    layers = m.layers
    n_exp = len(m.experts_of(layers[0]))
    dims = set()
    for layer in layers:
        if m.experts_of(layer) != list(range(n_exp)):
            raise ExportError(f"{where}: layer {layer} has experts {m.experts_of(layer)}, expected 0..{n_exp - 1}")
    for e in m.experts:
        extra = sorted(set(e.tensors) - set(WEIGHT_ROLES))
        if extra:
            raise ExportError(f"{where}: layer {e.layer} expert {e.expert} has {', '.join(extra)}; the MER layout "
                              "has no place for expert biases. Not exported")
        for role in WEIGHT_ROLES:
            dt = e.tensors[role].dtype
            if dt == "MXFP4":
                raise ExportError(
                    f"{where}: layer {e.layer} expert {e.expert} {role} is MXFP4: MER's header has an id for it (7) "
                    "but its metadata has no dtype name for it, so its loader would refuse or misread the folder; "
                    "mertools does not convert types. Not exported"
                )
            if dt not in MER_TYPES:
                raise ExportError(
                    f"{where}: layer {e.layer} expert {e.expert} {role} is {dt}, a type the MER layout does not "
                    f"know (it reads {', '.join(MER_TYPES)}); mertools does not convert types. Not exported"
                )
        dims.add(e.tensors["gate"].shape)
    if len(dims) != 1:
        raise ExportError(f"{where}: experts differ in shape {sorted(dims)}; MER needs one d_ff and d_model")
    ((d_ff, d_model),) = dims
    return layers, n_exp, d_model, d_ff


def _router(m: Manifest, block: int, n_exp: int, d_model: int) -> bytes:
    """Router weights of one layer as little-endian f32 [E x d_model]; F16/BF16 widen exactly, others refused."""
    import gguf
    import numpy as np

    name = router_names(m, block)["weight"]
    path = m.resolve(m.dense["path"], "dense")
    r = gguf.GGUFReader(path, "r")
    # the router is read from the mapping after dense.gguf's checksum was checked: one cut meanwhile is
    # FileChangedError naming it, not SIGBUS ending the process
    guard = guard_array(r.data, int(r.data.nbytes), path)
    t = next((t for t in r.tensors if t.name == name), None)
    shape = [int(d) for d in t.shape] if t is not None else None
    guard.check()  # (the tensor infos are views of the mapping too: zeros if it was cut)
    if t is None:
        raise ExportError(f"{m.root}: dense.gguf has no router tensor {name!r}; export without --router")
    kind = t.tensor_type.name
    if shape != [d_model, n_exp]:
        raise ExportError(f"{m.root}: router {name!r} has shape {list(t.shape)}, expected [{d_model}, {n_exp}]")
    raw = np.asarray(t.data)
    if kind == "F32":
        out = raw.astype("<f4", copy=False)
    elif kind == "F16":
        out = raw.astype("<f4")
    elif kind == "BF16":
        out = (raw.view("<u2").astype("<u4") << 16).view("<f4")
    else:
        raise ExportError(f"{m.root}: router {name!r} is {kind}; MER's gate files are f32 and mertools does not "
                          "dequantize. Export without --router")
    data = np.ascontiguousarray(out.reshape(n_exp, d_model)).tobytes()
    guard.finish()  # (on the paths that raise earlier, the guard goes with the reader's mapping)
    guard.close()
    return data


def export_mer(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    router: bool = False,
    overwrite: bool = False,
    fsync: bool = True,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> ExportResult:
    """Write the shard folder in MER's layout into ``out`` (staged, renamed into place when complete).

    >>> r = export_mer("out/", "mer/", router=True)     # doctest: +SKIP
    >>> r.dtype, r.expert_size                          # doctest: +SKIP
    ('q4_0', 1056768)
    """
    t0 = time.perf_counter()
    try:
        m = load_manifest(folder)
    except ManifestError as exc:
        raise ExportError(str(exc)) from None
    layers, n_exp, d_model, d_ff = _check(m)
    types = {e.tensors[r].dtype for e in m.experts for r in WEIGHT_ROLES}
    mixed = len(types) > 1
    payload = max(sum(e.tensors[r].nbytes for r in WEIGHT_ROLES) for e in m.experts)
    expert_size = align_up(payload) + HEADER_PAGE
    total = sum(e.tensors[r].nbytes for e in m.experts for r in WEIGHT_ROLES)
    if router and m.dense is None:  # the manifest may list no dense.gguf (the reader allows it)
        raise ExportError(f"{m.root}: the manifest lists no dense.gguf, so there are no routers to write; export "
                          "without --router")
    if router:
        whole, _, _ = hash_file(m.resolve(m.dense["path"], "dense"))  # inside the folder, as verify reads it
        if whole != m.dense["xxh3_64"]:
            raise ExportError(f"{m.root / m.dense['path']}: checksum mismatch; the folder is damaged (run verify)")
    sums: dict[str, dict[str, Any]] = {}
    hist: Counter[str] = Counter()
    routers = 0
    buf = memoryview(bytearray(SEGMENT))
    with staged_folder(Path(out), overwrite=overwrite, fsync=fsync, sources=[m.root],
                       marker="metadata.json") as staging:
        tick = progress(total, len(m.experts)) if progress else (lambda n: None)
        for li, layer in enumerate(layers):
            for e in range(n_exp):
                ent = m.expert(layer, e)
                g = li * n_exp + e
                ts = [ent.tensors[r] for r in WEIGHT_ROLES]
                if mixed:
                    hist["/".join(t.dtype.lower() for t in ts)] += 1
                    head = uth2([(r, t.dtype, t.nbytes, t.shape[0] * t.shape[1]) for r, t in zip(WEIGHT_ROLES, ts)],
                                d_model, d_ff)
                else:
                    head = uth1(ts[0].dtype, d_ff, d_model)
                name = f"expert_{g}.bin"
                h = xxhash.xxh3_64()
                fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    def write(data: Any, *hs: Any) -> None:
                        h.update(data)
                        view = memoryview(data)
                        while len(view):
                            view = view[os.write(fd, view):]

                    write(head)
                    n = len(head)
                    for t in ts:
                        copy_piece(Piece(m.path_of(ent), t.offset, t.nbytes, t.xxh3_64), write, buf, tick)
                        n += t.nbytes
                    pad = bytes(min(expert_size - n, SEGMENT))
                    while n < expert_size:
                        k = min(expert_size - n, len(pad))
                        write(pad[:k])
                        n += k
                finally:
                    os.close(fd)
                sums[name] = {"size": expert_size, "xxh3_64": h.hexdigest(), "layer": layer, "expert": e}
        if router:
            for li, layer in enumerate(layers):
                data = _router(m, layer, n_exp, d_model)
                name = f"gate_{li}.bin"
                (staging / name).write_bytes(data)
                sums[name] = {"size": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data), "layer": layer}
                routers += 1
        meta = _metadata(m, layers, n_exp, d_model, d_ff, expert_size, payload, types, mixed, hist, routers)
        (staging / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
        (staging / CHECKSUMS_NAME).write_text(json.dumps({
            "created_by": m.raw.get("created_by", "mertools"),
            "from": {"source": m.source.get("files"), "manifest_experts": len(m.experts)},
            "files": sums,
        }, indent=1) + "\n")
    return ExportResult(Path(out), len(m.experts), expert_size, meta["dtype"], routers,
                        len(m.experts) * expert_size, time.perf_counter() - t0)


def _metadata(m: Manifest, layers: list[int], n_exp: int, d_model: int, d_ff: int, expert_size: int, payload: int,
              types: set[str], mixed: bool, hist: Counter[str], routers: int) -> dict[str, Any]:
    """metadata.json: the keys in the order MER's documentation gives them (MER finds them by substring)."""
    meta: dict[str, Any] = {
        "format_version": 2,
        "conversion_mode": "experts_only",
        "model": m.model.get("name") or m.model["architecture"],
        "architecture": m.model["architecture"],
        "layer": -1 if len(layers) > 1 else layers[0],
        "num_experts": len(layers) * n_exp,
        "top_k": m.model["n_experts_used"],
        "d_model": d_model,
        "d_ff": d_ff,
        "expert_size": expert_size,
        "maximum_payload_bytes": payload,
        "block_align": BLOCK_ALIGN,
        "dtype": "mixed" if mixed else MER_TYPES[next(iter(types))][1],
        "weight_layout": WEIGHT_LAYOUT,
        "num_layers": len(layers),
        "num_experts_per_layer": n_exp,
    }
    if "Q4_0" in types:
        meta["q4_0_layout"] = Q4_0_LAYOUT
    if mixed:
        meta["expert_layout_version"] = 2
        meta["projection_dtype_histogram"] = dict(sorted(hist.items()))
    meta["experts_written"] = len(m.experts)
    meta["dense_tensors_written"] = routers
    return meta
