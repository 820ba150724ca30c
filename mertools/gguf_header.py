"""A bounded walk over a GGUF header, done before the ``gguf`` package's reader is allowed to see the file.

The gguf reader trusts every count it reads: an array count past the end of the file makes it loop (and allocate)
for as long as the count says, arrays nested thousands deep exhaust Python's recursion, and a tensor's element
count is a NumPy product that can wrap. This walk reads the same header with every count checked against the bytes
that remain and against sane limits first, iteratively (no recursion), and also checks what the reader does not:
tensor data ranges inside the data section, aligned to the file's ``general.alignment`` and not overlapping.
Only a header that passes is handed to the gguf reader, which then cannot loop or recurse further than the
walk did.

Limits follow llama.cpp's own loader where it has one (``GGML_MAX_DIMS`` = 4 dimensions) and are otherwise far
above any real model (a tokenizer of 262,144 tokens, 1,000 blocks, 4,096 experts).

>>> import mmap, pathlib
>>> p = pathlib.Path(__file__).parent.parent / "fixtures/generated/moe-merged-q4_0.gguf"
>>> with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m:
...     h = scan_header(p, m)
>>> (h.version, h.alignment, len(h.tensors) > 0)
(3, 32, True)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from .errors import SourceError

MAX_KV = 1 << 20  # metadata pairs
MAX_TENSORS = 1 << 22
MAX_ARRAY = 1 << 26  # elements of one metadata array (real tokenizers: < 2^19)
MAX_DEPTH = 8  # arrays inside arrays; llama.cpp reads none, the gguf package recurses once per level
MAX_KEY = 1 << 16  # GGUF spec: keys are at most 65535 bytes
MAX_NAME = 1 << 12  # tensor names (llama.cpp: 64)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 24
SUPPORTED_VERSIONS = (2, 3)

SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
# The fewest bytes one element of each type can take: what a count is checked against.
MIN_SIZE = {**SCALAR_SIZES, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
_TYPE_IDS = {int(t): t for t in GGUFValueType}


def show(text: str | bytes, limit: int = 80) -> str:
    """A name from the file, safe for a one-line message: quoted, escaped, and cut when long."""
    r = repr(text if isinstance(text, str) else bytes(text))
    return r if len(r) <= limit else f"{r[:limit]}...' ({len(text)} bytes)"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int
    ne: tuple[int, ...]  # ggml order
    offset: int  # relative to the data section
    start: int  # absolute
    nbytes: int


@dataclass
class Header:
    version: int
    byte_order: str  # "<" or ">"
    alignment: int
    data_offset: int
    kv_types: dict[str, list[GGUFValueType]]  # key -> value type, then element types of arrays
    tensors: list[TensorInfo]


class _Walk:
    def __init__(self, path: Path, buf: Any):
        self.path, self.buf, self.size, self.pos, self.bo = path, buf, len(buf), 0, "<"

    def fail(self, msg: str) -> SourceError:
        return SourceError(
            f"{self.path}: {msg}; the file ({self.size} bytes) is truncated or corrupt inside its header: "
            "download or copy it again"
        )

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos} but the file ends at {self.size}")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(self.bo + fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self, what: str, limit: int) -> bytes:
        n = self.unpack("Q", f"the length of {what}")
        if n > limit:
            raise self.fail(f"{what} claims {n} bytes (limit {limit})")
        self.need(n, what)
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def text(self, what: str, limit: int) -> str:
        b = self.string(what, limit)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} {show(b)} is not valid UTF-8") from None

    def value_type(self, what: str) -> GGUFValueType:
        tid = self.unpack("I", f"the type of {what}")
        t = _TYPE_IDS.get(tid)
        if t is None:
            raise self.fail(f"{what} has value type id {tid}, which GGUF does not define")
        return t

    def array_head(self, what: str) -> tuple[GGUFValueType, int]:
        et = self.value_type(f"the elements of {what}")
        n = self.unpack("Q", f"the element count of {what}")
        left = self.size - self.pos
        if n > MAX_ARRAY or n * MIN_SIZE[et] > left:
            raise self.fail(f"{what} claims {n} elements of {et.name} but only {left} bytes remain")
        return et, n

    def skip_value(self, vt: GGUFValueType, what: str) -> list[GGUFValueType]:
        """Step over one value; returns its type list as the gguf reader builds it (outer first)."""
        types = [vt]
        if vt in SCALAR_SIZES:
            self.need(SCALAR_SIZES[vt], what)
            self.pos += SCALAR_SIZES[vt]
            return types
        if vt == GGUFValueType.STRING:
            self.string(what, self.size)
            return types
        et, n = self.array_head(what)
        if n:
            types.append(et)
        # An explicit stack of [element type, elements left, element count, whether this array lies on the path
        # of first elements that the gguf reader takes its type list from]: nesting never becomes recursion.
        stack = [[et, n, n, True]]
        while stack:
            top = stack[-1]
            et, n, count, on_path = top
            if n == 0:
                stack.pop()
                continue
            if et in SCALAR_SIZES:
                self.need(n * SCALAR_SIZES[et], what)
                self.pos += n * SCALAR_SIZES[et]
                top[1] = 0
            elif et == GGUFValueType.STRING:
                for _ in range(n):
                    self.string(f"an element of {what}", self.size)
                top[1] = 0
            else:
                first = on_path and n == count
                top[1] = n - 1
                if len(stack) >= MAX_DEPTH:
                    raise self.fail(f"{what} nests arrays more than {MAX_DEPTH} deep")
                cet, cn = self.array_head(what)
                if first and cn:
                    types.append(cet)
                stack.append([cet, cn, cn, first])
        return types


def scan_header(path: Path, buf: Any) -> Header:
    """Walk the header of the GGUF in `buf` (bytes or a read-only mmap), bounded; SourceError on anything wrong."""
    w = _Walk(path, buf)
    magic = bytes(buf[:4])
    if magic != b"GGUF":
        raise SourceError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    w.pos = 4
    version = w.unpack("I", "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order, as the gguf reader detects it
        w.bo = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in SUPPORTED_VERSIONS:
        raise SourceError(f"{path}: GGUF version {version} is not supported (this reader knows 2 and 3)")
    n_tensors = w.unpack("Q", "the tensor count")
    n_kv = w.unpack("Q", "the metadata count")
    left = w.size - w.pos
    if n_kv > MAX_KV or n_kv * 13 > left:
        raise w.fail(f"the header claims {n_kv} metadata pairs but only {left} bytes remain")
    if n_tensors > MAX_TENSORS or n_tensors * 32 > left:
        raise w.fail(f"the header claims {n_tensors} tensors but only {left} bytes remain")

    kv_types: dict[str, list[GGUFValueType]] = {}
    alignment = GGUF_DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = w.text(f"metadata key #{i}", MAX_KEY)
        if key in kv_types:
            raise w.fail(f"metadata key {show(key)} appears twice")
        what = f"metadata {show(key)}"
        vt = w.value_type(what)
        at = w.pos
        kv_types[key] = w.skip_value(vt, what)
        if key == "general.alignment":
            if vt != GGUFValueType.UINT32:
                raise SourceError(f"{path}: metadata general.alignment must be a UINT32, found {vt.name}")
            alignment = struct.unpack_from(w.bo + "I", buf, at)[0]
            if alignment == 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
                raise SourceError(
                    f"{path}: metadata general.alignment is {alignment}, not a power of two up to {MAX_ALIGNMENT}"
                )

    infos: list[tuple[str, int, tuple[int, ...], int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = w.text(f"the name of tensor #{i}", MAX_NAME)
        what = f"tensor {show(name)}"
        if name in names:
            raise w.fail(f"{what} appears twice")
        names.add(name)
        n_dims = w.unpack("I", f"the dimension count of {what}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise w.fail(f"{what} claims {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = tuple(w.unpack("Q", f"dimension {d} of {what}") for d in range(n_dims))
        tid = w.unpack("I", f"the type of {what}")
        off = w.unpack("Q", f"the data offset of {what}")
        infos.append((name, tid, ne, off))

    data_offset = -(-w.pos // alignment) * alignment
    tensors = []
    for name, tid, ne, off in infos:
        what = f"tensor {show(name)}"
        try:
            qt = GGMLQuantizationType(tid)
            block, tsize = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise SourceError(
                f"{path}: {what} has type id {tid}, which gguf {gguf_version()} does not know; upgrade the gguf "
                "package (pip install -U gguf) or re-quantize the model to a known type"
            ) from None
        if 0 in ne:
            raise SourceError(f"{path}: {what} has a zero-sized dimension {list(ne)}; the file is corrupt")
        if ne[0] % block:
            raise SourceError(
                f"{path}: {what} is {qt.name} with rows of {ne[0]} elements, not a multiple of its block size "
                f"{block}; the file is corrupt"
            )
        n = 1
        for d in ne:
            n *= d
            if n > w.size * block:  # more elements than the file could hold: stop before the number grows
                break
        nbytes = n // block * tsize
        start = data_offset + off
        if off % alignment:
            raise SourceError(
                f"{path}: {what} starts at data offset {off}, not a multiple of the file's alignment {alignment}; "
                "the file is corrupt"
            )
        if nbytes > w.size or start + nbytes > w.size:
            raise SourceError(
                f"{path}: {what} ({qt.name} {list(ne)}, {nbytes if nbytes <= w.size else 'more than ' + str(w.size)}"
                f" bytes at offset {start}) runs past the end of the file ({w.size} bytes); the file is truncated: "
                "download or copy it again"
            )
        tensors.append(TensorInfo(name, tid, ne, off, start, nbytes))
    ordered = sorted(tensors, key=lambda t: (t.start, t.nbytes))
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.start + a.nbytes:
            raise SourceError(
                f"{path}: tensors {show(a.name)} (bytes {a.start}..{a.start + a.nbytes}) and {show(b.name)} (from "
                f"{b.start}) overlap; the file is corrupt"
            )
    return Header(version, w.bo, alignment, data_offset, kv_types, tensors)


def gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "?"
