"""The one reader of ``manifest.json``, shared by the converter, ``verify`` and the runtime. It trusts nothing.

Reading: the file is opened only if it is a regular file (``O_NONBLOCK`` + fstat, so a FIFO cannot hang and
``/dev/zero`` cannot stream forever), at most ``MAX_MANIFEST_BYTES``, strict UTF-8, JSON without NaN/Infinity,
without duplicate keys, with integers of at most ``MAX_INT_DIGITS`` digits and a nesting depth Python can parse.
Every failure is a ``ManifestError`` that names the file and what to do.

Meaning: the version, required fields and their types, bounded model dimensions, every expert's shapes against
``d_model``/``d_ff`` role by role, known activation kinds with finite, sane parameters, every path relative and in
normal form, every tensor aligned, inside its file, of the byte size its type and shape imply (gguf's
``quant_shape_to_byte_shape``: one formula, the gguf package's), every file exactly as long as its layout, sizes
within ``MAX_FILE_BYTES``/``MAX_TOTAL_BYTES``, at least one expert, layer and expert numbers inside ``n_layers`` and
``n_experts``; the optional ``companions`` (a SafeTensors source's tokenizer and other files) each ``hf/NAME`` with
NAME a ``plain_name``, within the writer's bounds.

Integrity: ``manifest_xxh3`` (see `manifest_bytes`) is the XXH3-64 of the file's own bytes with that hash's 16 hex
digits written as zeros; any changed byte of the file changes it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

from .errors import ManifestError
from .safeopen import read_regular

FORMAT_VERSION = 1
# Version 2 = version 1 plus per-expert output scales (*_scale roles) that a reader must apply; written only for
# folders that carry them, so that a version-1 reader refuses such a folder instead of ignoring the scales.
SCALES_FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (FORMAT_VERSION, SCALES_FORMAT_VERSION)
MANIFEST_NAME = "manifest.json"
# Roles a shard may hold, in the order they are written; *_bias only where the model has expert biases, *_scale
# (one float per expert multiplying the projection's output before its bias) only in format_version 2.
ROLES = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias", "gate_scale", "up_scale", "down_scale")
SCALE_ROLES = ("gate_scale", "up_scale", "down_scale")
WEIGHT_ROLES = ("gate", "up", "down")
ACTIVATIONS = ("swiglu", "swiglu_oai")

# Limits. A DeepSeek-V3-sized manifest (58 MoE layers x 256 experts = 14,848 experts, indent 1) is about 15 MiB:
# measured by tests/test_manifest_hostile.py::test_deepseek_sized_manifest_fits; 64 MiB leaves room for 4x that.
MAX_MANIFEST_BYTES = 64 << 20
MAX_INT_DIGITS = 24  # every integer a manifest holds fits in 2^64; longer ones are refused before conversion
MAX_DIM = 1 << 20  # d_model, d_ff and every tensor dimension (the largest models today: d_model 16384, d_ff 32768)
MAX_LAYERS = 1 << 12
MAX_EXPERTS = 1 << 12  # per MoE layer (today's largest: 512); the prefetcher keeps n_experts^2 floats per layer
MAX_FILE_BYTES = 1 << 40  # one expert file or dense.gguf
MAX_TOTAL_BYTES = 1 << 50  # the whole folder
MAX_ALIGNMENT = 1 << 24
MAX_ACT_PARAM = 1e6  # |alpha|, limit of swiglu_oai
# nesting of the fields consumers pass on whole (model, source, ...): printing them as JSON must not recurse out
MAX_DEPTH = 32

# Companion files of a SafeTensors checkpoint (tokenizer, generation config, chat template, remote code), copied
# byte for byte into OUT/hf/ and listed in the manifest's ``companions``. The bounds are the writer's selection rule
# (mertools.companions): an entry past them was not written by it.
COMPANION_DIR = "hf"
MAX_COMPANION_BYTES = 64 << 20  # one file: tokenizer.json of a 256k vocabulary is ~30 MB
MAX_COMPANIONS = 128
MAX_COMPANION_TOTAL = 256 << 20

HASH_FIELD = "manifest_xxh3"
_ZERO_HASH = "0" * 16
# The writer puts manifest_xxh3 first, so its digits are found at the head of the file without any search.
_HASH_HEAD = re.compile(rb'\A\{\s*"manifest_xxh3"\s*:\s*"([0-9a-f]{16})"')
# Manifests written before manifest_xxh3 existed (json.dump of a dict that starts with format_version).
LEGACY_FIRST_KEY = "format_version"


def dtype_block(dtype: str) -> tuple[int, int]:
    """(elements per block, bytes per block) for a type name as the gguf package spells it."""
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
    except KeyError:
        raise ManifestError(f"unknown tensor type {dtype!r}: the installed gguf package does not know it") from None


def nbytes_for(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this type and shape takes: gguf's own formula (`quant_shape_to_byte_shape`).

    >>> nbytes_for("Q4_0", (96, 64))
    3456
    """
    return _nbytes(dtype, tuple(shape))


@functools.lru_cache(maxsize=256)  # a model has a handful of (type, shape) pairs; a manifest repeats them per expert
def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    dtype_block(dtype)  # our error for an unknown type name
    try:
        return math.prod(quant_shape_to_byte_shape(shape, GGMLQuantizationType[dtype]))
    except ValueError as exc:
        raise ManifestError(f"{dtype} shape {list(shape)}: {exc}") from None


@dataclass(frozen=True)
class TensorEntry:
    role: str
    dtype: str
    shape: tuple[int, ...]  # [out_features, in_features] for weights, [n] for biases
    offset: int
    nbytes: int
    xxh3_64: str


@dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    path: str  # relative to the folder, POSIX separators
    size: int
    xxh3_64: str
    tensors: dict[str, TensorEntry]


@dataclass(frozen=True)
class CompanionEntry:
    path: str  # "hf/NAME", relative to the folder
    size: int
    xxh3_64: str

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


@dataclass
class Manifest:
    root: Path
    format_version: int
    alignment: int
    model: dict[str, Any]
    source: dict[str, Any]
    dense: dict[str, Any] | None
    experts: list[ExpertEntry]
    raw: dict[str, Any] = field(repr=False)
    # "ok", "absent" (a folder written before manifest_xxh3 existed) or "unchecked" (parsed from a dict, not a file)
    integrity: str = "unchecked"
    companions: list[CompanionEntry] = field(default_factory=list)
    _index: dict[tuple[int, int], ExpertEntry] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {(e.layer, e.expert): e for e in self.experts}

    def expert(self, layer: int, expert: int) -> ExpertEntry:
        try:
            return self._index[(layer, expert)]
        except KeyError:
            raise ManifestError(f"{self.root}: no shard for layer {layer} expert {expert}") from None

    @property
    def layers(self) -> list[int]:
        return sorted({e.layer for e in self.experts})

    def experts_of(self, layer: int) -> list[int]:
        return sorted(e.expert for e in self.experts if e.layer == layer)

    def path_of(self, entry: ExpertEntry) -> Path:
        """The shard's path; ManifestError if it resolves (through links) outside the folder.

        Checked here, when a file is about to be opened, rather than once at load time: a link planted later is
        caught too, and verify can report one bad expert without giving up on the rest of the folder.
        """
        return self.resolve(entry.path, f"layer {entry.layer} expert {entry.expert}")

    @functools.cached_property
    def _real_root(self) -> str:
        return os.path.realpath(self.root) + os.sep

    def resolve(self, rel: str, what: str) -> Path:
        """root / rel, if it resolves (links followed) inside the folder; else ManifestError."""
        p = self.root / rel
        if not os.path.realpath(p).startswith(self._real_root):
            raise ManifestError(f"{p}: {what}: path {rel!r} resolves outside the output folder (a symlink?); "
                                "re-extract the model")
        return p

    @property
    def max_expert_size(self) -> int:
        return max((e.size for e in self.experts), default=0)


def router_names(m: Manifest, layer: int) -> dict[str, str]:
    """The names in dense.gguf of block `layer`'s router tensors: "weight", and "bias" / "selection_bias" where the
    manifest has them. A block of a separate MTP block (Qwen3.5's `mtp.layers.{i}`, `n_mtp_layers` at the end)
    names its router by its own index i through the `mtp_` templates (docs/format.md, `model.router`); every other
    block by its block number. Without a `weight` template: GGUF's `blk.{layer}.ffn_gate_inp.weight`.

    >>> router_names(m, 3)                                   # doctest: +SKIP
    {'weight': 'blk.3.ffn_gate_inp.weight'}
    """
    router = m.model.get("router", {})
    n_mtp = m.model.get("n_mtp_layers")  # optional and not checked by the parser: a number or nothing
    first_mtp = m.model["n_layers"] - (n_mtp if isinstance(n_mtp, int) and not isinstance(n_mtp, bool) else 0)
    pre, idx = ("mtp_", layer - first_mtp) if layer >= first_mtp and "mtp_weight" in router else ("", layer)
    out = {"weight": router.get(pre + "weight", "blk.{layer}.ffn_gate_inp.weight").replace("{layer}", str(idx))}
    for k in ("bias", "selection_bias"):
        if pre + k in router:
            out[k] = router[pre + k].replace("{layer}", str(idx))
    return out


def plain_name(name: Any) -> bool:
    """A file name a manifest may give for a file that sits directly in a folder (the reassembly record, a source
    file, a companion file): one name, neither hidden (our temporaries are) nor a path out of it, no control
    character, no lone surrogate (not a name a disk or the hub takes), at most 255 bytes. The one rule: verify,
    reassemble, the SafeTensors record and extract's choice of companion files all use it.

    >>> [plain_name(n) for n in ("tokenizer.json", "../x", ".hidden", "a\\\\b", "a\\nb", "")]
    [True, False, False, False, False, False]
    """
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        return False
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) < 0xE000 for c in name):
        return False
    return len(name.encode("utf-8")) <= 255


SAME_FILE = "differ only in case or Unicode normalization, so they are one file on macOS and Windows"


def same_file_key(name: str) -> str:
    """The key under which two names are one file on a case-insensitive or normalization-insensitive file system
    (macOS's APFS and HFS+ are both, Windows' NTFS is case-insensitive): names with equal keys may not both be
    written into one folder, or one overwrites the other. Unicode's canonical caseless match (NFD of the case fold of
    the NFD), so that "é" as U+00E9 and as "e" + U+0301, or "É" and "é", are one name. The one rule: the manifest
    reader, extract's choice of companion files (mertools.companions), pull's and reassemble's output names use it.

    >>> same_file_key("Config.json") == same_file_key("config.json")
    True
    >>> same_file_key("caf\\u00e9.txt") == same_file_key("cafe\\u0301.txt") == same_file_key("CAF\\u00c9.txt")
    True
    """
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def safe_relpath(rel: Any, what: str) -> str:
    """A manifest path must be relative, POSIX, in normal form, free of '..' (links are checked at open time)."""
    if not isinstance(rel, str) or not rel or len(rel) > 4096 or "\\" in rel or "\x00" in rel:
        raise ManifestError(f"{what}: bad path {rel!r}")
    # normal form by string rules (PurePosixPath is slow over 15,000 experts): no leading /, no empty, . or .. part
    if rel[0] == "/" or any(part in ("", ".", "..") for part in rel.split("/")):
        raise ManifestError(f"{what}: path {rel!r} escapes the output folder or is not in normal form")
    return rel


def _need(d: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ManifestError(f"{where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ManifestError(f"{where}: field {key!r} has the wrong type ({type(v).__name__})")
    return v


def _need_int(d: Any, key: str, where: str, lo: int, hi: int) -> int:
    v = _need(d, key, int, where)
    if not lo <= v <= hi:
        raise ManifestError(f"{where}: {key} {v} is outside {lo}..{hi}")
    return v


_HEX16 = re.compile(r"[0-9a-f]{16}")


def _is_hex64(s: Any) -> bool:
    return isinstance(s, str) and _HEX16.fullmatch(s) is not None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_model(model: dict[str, Any], where: str) -> None:
    _need(model, "architecture", str, where)
    _need_int(model, "n_layers", where, 1, MAX_LAYERS)
    n_experts = _need_int(model, "n_experts", where, 1, MAX_EXPERTS)
    _need_int(model, "n_experts_used", where, 0, n_experts)
    _need_int(model, "d_model", where, 1, MAX_DIM)
    _need_int(model, "d_ff", where, 1, MAX_DIM)
    act = _need(model, "activation", dict, where)
    if act.get("kind") not in ACTIVATIONS:
        raise ManifestError(f"{where}: activation {act.get('kind')!r} is not one this reader knows ({', '.join(ACTIVATIONS)}); "
                            "upgrade mer_runtime or re-extract the model")
    if act["kind"] == "swiglu_oai":
        for k in ("alpha", "limit"):
            if k in act and not (_number(act[k]) and 0 < act[k] <= MAX_ACT_PARAM):
                raise ManifestError(f"{where}: activation {k} {act[k]!r} must be a finite number in "
                                    f"(0, {MAX_ACT_PARAM:g}]")
    router = model.get("router", {})
    if not isinstance(router, dict) or not all(
            isinstance(v, str) and "{" not in v.replace("{layer}", "") and "}" not in v.replace("{layer}", "")
            for v in router.values()):
        raise ManifestError(f"{where}: router must map names to tensor-name templates with only {{layer}} to fill in")
    moe_layers = _need(model, "moe_layers", list, where)
    if not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < model["n_layers"] for x in moe_layers):
        raise ManifestError(f"{where}: moe_layers must list block numbers below n_layers {model['n_layers']}")


def _check_source(source: dict[str, Any], where: str) -> None:
    files = source.get("files", [])
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("size", 0), int)
            for f in files):
        raise ManifestError(f"{where}: files must be a list of {{name, size}}")


def _claim(keys: dict[str, tuple[Any, str]], path: str, who: Any, where: str) -> None:
    """Refuse a file path of the manifest that another entry (``keys``: same_file_key -> (who, path)) already gives
    as the same file: exactly (listed twice) or but for case or Unicode normalization (one file on macOS; unpack,
    pull and reassemble would write one over the other). ``who`` names the entry; formatted only on an error."""
    other, twin = keys.setdefault(same_file_key(path), (who, path))
    if other is who:
        return
    other, who = (f"layer {x[0]} expert {x[1]}" if isinstance(x, tuple) else x for x in (other, who))
    if twin == path:
        raise ManifestError(f"{where}: {other} and {who} both give the path {path!r}; re-extract the model")
    raise ManifestError(f"{where}: {other} {twin!r} and {who} {path!r} {SAME_FILE}; re-extract the model")


def _check_companions(value: Any, where: str, keys: dict[str, tuple[Any, str]]) -> list[CompanionEntry]:
    """The optional ``companions`` list: ``{path, size, xxh3_64}`` each, path ``hf/NAME`` with NAME a plain name,
    no path given by another entry (:func:`_claim`), within the writer's bounds."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_COMPANIONS:
        raise ManifestError(f"{where}: companions must be a list of at most {MAX_COMPANIONS} {{path, size, xxh3_64}}")
    out, total = [], 0
    for i, c in enumerate(value):
        w = f"{where} companions[{i}]"
        path = _need(c, "path", str, w)
        folder, _, name = path.partition("/")
        if folder != COMPANION_DIR or not plain_name(name):
            raise ManifestError(f"{w}: path {path!r} is not {COMPANION_DIR}/NAME with a plain file name; re-extract "
                                "the model")
        _claim(keys, path, f"companions[{i}]", where)
        size = _need_int(c, "size", w, 0, MAX_COMPANION_BYTES)
        total += size
        if total > MAX_COMPANION_TOTAL:
            raise ManifestError(f"{where}: companions add up to more than {MAX_COMPANION_TOTAL} bytes")
        if not _is_hex64(c.get("xxh3_64")):
            raise ManifestError(f"{w}: xxh3_64 must be 16 lowercase hex digits")
        out.append(CompanionEntry(path, size, c["xxh3_64"]))
    return out


class _Where:
    """The "file layer L expert E role" prefix of an error, formatted only when there is an error to report."""

    __slots__ = ("parts",)

    def __init__(self, *parts: Any):
        self.parts = parts

    def __str__(self) -> str:
        if len(self.parts) == 2:
            return f"{self.parts[0]} {self.parts[1]}"
        where, layer, expert, *role = self.parts
        return " ".join([f"{where} layer {layer} expert {expert}", *role])

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion (stops counting past MAX_DEPTH)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            break
        children = v.values() if isinstance(v, dict) else v
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def _expected_shapes(role: str, d_model: int, width: int) -> tuple[int, ...] | None:
    """The shape a role must have for an expert of this width; None for a role whose shape this reader leaves free."""
    return {"gate": (width, d_model), "up": (width, d_model), "down": (d_model, width),
            "gate_bias": (width,), "up_bias": (width,), "down_bias": (d_model,),
            "gate_scale": (1,), "up_scale": (1,), "down_scale": (1,)}.get(role)


def parse_manifest(raw: dict[str, Any], root: Path) -> Manifest:
    """Check a decoded manifest for meaning (see the module docstring); ManifestError names the first problem.

    Expert width: gate/up/down must agree on one width inside an expert, and all experts of a layer on one width;
    a width other than the model's `d_ff` is accepted (models whose expert width varies by layer) only under that
    rule. `d_model` is exact everywhere.

    >>> m = parse_manifest(json.loads(Path("out/manifest.json").read_bytes()), Path("out"))   # doctest: +SKIP
    """
    where = str(root / MANIFEST_NAME)
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: top level must be an object")
    version = _need(raw, "format_version", int, where)
    if version not in SUPPORTED_VERSIONS:
        raise ManifestError(
            f"{where}: format_version {version} is not supported (this reader knows {SUPPORTED_VERSIONS}); "
            "upgrade mertools or re-extract the model"
        )
    for key, value in raw.items():
        # experts are checked field by field below; the rest is handed on whole (inspect prints it as JSON)
        if key != "experts" and isinstance(value, (dict, list)) and _depth(value) > MAX_DEPTH:
            raise ManifestError(f"{where}: field {key!r} is nested more than {MAX_DEPTH} deep; re-extract the model")
    if HASH_FIELD in raw and not _is_hex64(raw[HASH_FIELD]):
        raise ManifestError(f"{where}: {HASH_FIELD} must be 16 lowercase hex digits")
    alignment = _need_int(raw, "alignment", where, 1, MAX_ALIGNMENT)
    if alignment & (alignment - 1):
        raise ManifestError(f"{where}: alignment {alignment} is not a power of two")
    model = _need(raw, "model", dict, where)
    _check_model(model, f"{where} model")
    n_layers, n_experts, d_model = model["n_layers"], model["n_experts"], model["d_model"]
    source = _need(raw, "source", dict, where)
    _check_source(source, f"{where} source")
    total = 0
    dense = raw.get("dense")
    if dense is not None:
        w = f"{where} dense"
        safe_relpath(_need(dense, "path", str, w), w)
        total += _need_int(dense, "size", w, 0, MAX_FILE_BYTES)
        if not _is_hex64(dense.get("xxh3_64")):
            raise ManifestError(f"{w}: xxh3_64 must be 16 lowercase hex digits")

    experts: list[ExpertEntry] = []
    seen: set[tuple[int, int]] = set()
    keys: dict[str, tuple[Any, str]] = {}  # every file path of the manifest, by same_file_key (see _claim)
    _claim(keys, MANIFEST_NAME, "the manifest itself", where)
    widths: dict[int, int] = {}
    entries = _need(raw, "experts", list, where)
    if not entries:
        raise ManifestError(f"{where}: the manifest lists no experts; re-extract the model")
    for i, e in enumerate(entries):
        w: Any = _Where(where, f"experts[{i}]")
        layer = _need_int(e, "layer", w, 0, n_layers - 1)
        expert = _need_int(e, "expert", w, 0, n_experts - 1)
        w = _Where(where, layer, expert)
        if (layer, expert) in seen:
            raise ManifestError(f"{w}: listed twice")
        seen.add((layer, expert))
        path = safe_relpath(_need(e, "path", str, w), w)
        _claim(keys, path, (layer, expert), where)
        size = _need_int(e, "size", w, 1, MAX_FILE_BYTES)
        total += size
        if total > MAX_TOTAL_BYTES:
            raise ManifestError(f"{where}: the files add up to more than {MAX_TOTAL_BYTES} bytes")
        if size % alignment:
            raise ManifestError(f"{w}: size {size} is not a multiple of the alignment {alignment}")
        if not _is_hex64(e.get("xxh3_64")):
            raise ManifestError(f"{w}: xxh3_64 must be 16 lowercase hex digits")
        ts = _need(e, "tensors", dict, w)
        missing = [r for r in WEIGHT_ROLES if r not in ts]
        if missing:
            raise ManifestError(f"{w}: missing projections {', '.join(missing)}")
        gshape = _need(ts["gate"], "shape", list, _Where(where, layer, expert, "gate"))
        width = gshape[0] if gshape else None
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= MAX_DIM:
            raise ManifestError(f"{w} gate: bad shape {gshape!r}")
        if widths.setdefault(layer, width) != width:
            raise ManifestError(f"{w}: expert width {width} differs from the other experts of layer {layer} "
                                f"({widths[layer]})")
        tensors: dict[str, TensorEntry] = {}
        spans = []
        for role, t in ts.items():
            if role not in ROLES:
                raise ManifestError(f"{w}: unknown tensor role {role!r} (expected one of {', '.join(ROLES)})")
            if role in SCALE_ROLES and version < SCALES_FORMAT_VERSION:
                raise ManifestError(f"{w}: role {role!r} needs format_version {SCALES_FORMAT_VERSION}, not {version}")
            tw = _Where(where, layer, expert, role)
            dtype = _need(t, "dtype", str, tw)
            shape = tuple(_need(t, "shape", list, tw))
            if not shape or len(shape) > 4 or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM for d in shape):
                raise ManifestError(f"{tw}: bad shape {list(shape)}")
            want = _expected_shapes(role, d_model, width)
            if want is not None and shape != want:
                raise ManifestError(f"{tw}: shape {list(shape)} but d_model {d_model} and expert width {width} "
                                    f"make it {list(want)}")
            offset = _need_int(t, "offset", tw, 0, MAX_FILE_BYTES)
            nbytes = _need_int(t, "nbytes", tw, 1, MAX_FILE_BYTES)
            if offset % alignment:
                raise ManifestError(f"{tw}: offset {offset} is not a multiple of the alignment {alignment}")
            expected = nbytes_for(dtype, shape)
            if nbytes != expected:
                raise ManifestError(f"{tw}: nbytes {nbytes} but {dtype} {list(shape)} takes {expected}")
            if offset + nbytes > size:
                raise ManifestError(f"{tw}: bytes {offset}..{offset + nbytes} lie outside the {size}-byte file")
            if not _is_hex64(t.get("xxh3_64")):
                raise ManifestError(f"{tw}: xxh3_64 must be 16 lowercase hex digits")
            spans.append((offset, offset + nbytes, role))
            tensors[role] = TensorEntry(role, dtype, shape, offset, nbytes, t["xxh3_64"])
        spans.sort()
        for (_, end, r1), (start, _, r2) in zip(spans, spans[1:]):
            if start < end:
                raise ManifestError(f"{w}: {r1} and {r2} overlap")
        # the writer pads the file to the next alignment boundary, no further: a larger size is a forged one
        # (a runtime would size every cache slot by it)
        tail = -(-spans[-1][1] // alignment) * alignment
        if size != tail:
            raise ManifestError(f"{w}: size {size} but its tensors end at {spans[-1][1]}, so the file is {tail} bytes")
        experts.append(ExpertEntry(layer, expert, path, size, e["xxh3_64"], tensors))
    experts.sort(key=lambda x: (x.layer, x.expert))
    if dense is not None:
        _claim(keys, dense["path"], "dense", where)
    record = raw.get("reassembly")  # its own checks are reassemble's; its file is one of the folder's all the same
    if isinstance(record, dict) and isinstance(record.get("path"), str):
        _claim(keys, record["path"], "the reassembly record", where)
    companions = _check_companions(raw.get("companions"), where, keys)
    return Manifest(root, version, alignment, model, source, dense, experts, raw, companions=companions)


# -- reading the file ---------------------------------------------------------------------------------------
def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a manifest may hold")


def _bounded_int(s: str) -> int:
    if len(s) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(s)} digits")
    return int(s)


def _finite_float(s: str) -> float:
    if len(s) > 64:
        raise ValueError(f"a number of {len(s)} characters")
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"{s} overflows")
    return v


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {dup!r} appears twice in one object")
    return d


def decode_manifest(data: bytes, where: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in `data`, strictly: UTF-8, no NaN/Infinity, no duplicate keys, bounded integers and depth."""
    hint = "the file is damaged: re-extract the model"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{where}: not UTF-8 (byte {exc.start}); {hint}") from None
    try:
        raw = json.loads(text, parse_constant=_no_constant, parse_int=_bounded_int, parse_float=_finite_float,
                         object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: not valid JSON ({exc}); {hint}") from None
    except RecursionError:
        raise ManifestError(f"{where}: JSON nested too deeply; {hint}") from None
    except (ValueError, MemoryError) as exc:
        raise ManifestError(f"{where}: not a valid manifest ({exc}); {hint}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: top level must be an object; {hint}")
    return raw


def read_manifest_bytes(folder: str | os.PathLike[str]) -> bytes:
    """The bytes of folder/manifest.json, read safely (a regular file, at most MAX_MANIFEST_BYTES)."""
    root = Path(folder)
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder (expected an extracted shard folder with {MANIFEST_NAME})")
    if not os.path.lexists(mpath):
        raise ManifestError(
            f"{mpath}: missing; this is not a complete shard folder (an interrupted extract leaves none). "
            "Run `mertools extract` again"
        )
    return read_regular(mpath, MAX_MANIFEST_BYTES, error=ManifestError, hint="re-extract the model")


def manifest_bytes(raw: dict[str, Any]) -> bytes:
    """The bytes to write as manifest.json for `raw`, with manifest_xxh3 first and filled in.

    manifest_xxh3 is the XXH3-64 of exactly these bytes with its own 16 digits written as "0"s. Hashing the bytes
    (not a re-serialisation of the parsed JSON) means a change the JSON parser would not see (a space turned into a
    tab, 1e5 into 1E5, a \\u escape in other case) is still a change.

    >>> json.loads(manifest_bytes({"format_version": 1}))
    {'manifest_xxh3': 'd8b6119b300ac503', 'format_version': 1}
    """
    body = {HASH_FIELD: _ZERO_HASH, **{k: v for k, v in raw.items() if k != HASH_FIELD}}
    data = (json.dumps(body, indent=1, allow_nan=False) + "\n").encode("ascii")
    m = _HASH_HEAD.match(data)
    assert m is not None
    digest = xxhash.xxh3_64_hexdigest(data).encode()
    return data[:m.start(1)] + digest + data[m.end(1):]


def manifest_integrity(data: bytes, raw: dict[str, Any], where: str | os.PathLike[str]) -> str:
    """"ok", "absent" (written before manifest_xxh3 existed), or raise ManifestError saying what does not match.

    "absent" only for the old writer's layout, whose first field is format_version: any single changed byte of a
    new manifest (the field's name included) leaves a first field that is neither, and is refused.
    """
    m = _HASH_HEAD.match(data)
    if m is None:
        first = next(iter(raw), None)
        if HASH_FIELD not in raw and first == LEGACY_FIRST_KEY:
            return "absent"
        raise ManifestError(f"{where}: {HASH_FIELD} is not the first field (the first is {first!r}): the file was "
                            "edited or damaged; re-extract the model")
    digits = m.group(1)
    got = xxhash.xxh3_64_hexdigest(data[:m.start(1)] + _ZERO_HASH.encode() + data[m.end(1):])
    if got.encode() != digits:
        raise ManifestError(f"{where}: the file was changed after it was written ({HASH_FIELD} {digits.decode()}, "
                            f"content {got}); re-extract the model")
    return "ok"


def load_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and check ``folder/manifest.json``. Raises ManifestError with a message that names what is wrong.

    Meaning is checked before integrity, so a damaged field is named as such; a manifest without manifest_xxh3
    (written by an older mertools) is accepted here, and verify warns about it.

    >>> m = load_manifest("out/")                                     # doctest: +SKIP
    >>> m.expert(1, 3).tensors["gate"].dtype                          # doctest: +SKIP
    'Q4_0'
    """
    return manifest_from_bytes(read_manifest_bytes(folder), folder)


def manifest_from_bytes(data: bytes, folder: str | os.PathLike[str]) -> Manifest:
    """`load_manifest`'s checks on bytes already read from folder/manifest.json (so that a caller that keeps the
    bytes, like `mertools pack`, keeps the very bytes that were checked)."""
    root = Path(folder)
    where = root / MANIFEST_NAME
    raw = decode_manifest(data, where)
    m = parse_manifest(raw, root)
    m.integrity = manifest_integrity(data, raw, where)
    return m
