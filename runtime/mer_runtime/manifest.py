"""The one reader of ``manifest.json``, shared by the converter, ``verify`` and the runtime.

It checks everything that can be checked without reading shard bytes: the version, required fields, that every
path stays inside the folder, that every tensor is aligned, inside its file and of the byte size its type and
shape imply (type sizes come from the ``gguf`` package's table, the single source of truth).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ManifestError

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


def dtype_block(dtype: str) -> tuple[int, int]:
    """(elements per block, bytes per block) for a type name as the gguf package spells it."""
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
    except KeyError:
        raise ManifestError(f"unknown tensor type {dtype!r}: the installed gguf package does not know it") from None


def nbytes_for(dtype: str, shape: tuple[int, ...]) -> int:
    block, size = dtype_block(dtype)
    n = 1
    for d in shape:
        n *= d
    if shape and shape[-1] % block:
        raise ManifestError(f"{dtype} rows must be a multiple of {block} elements, got shape {list(shape)}")
    return n // block * size


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
        return self.root / entry.path

    @property
    def max_expert_size(self) -> int:
        return max((e.size for e in self.experts), default=0)


def safe_relpath(root: Path, rel: Any, what: str) -> str:
    """A manifest path must be relative, POSIX, free of '..' and stay inside root once links are resolved."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise ManifestError(f"{what}: bad path {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or p.as_posix() != rel:
        raise ManifestError(f"{what}: path {rel!r} escapes the output folder or is not in normal form")
    resolved = os.path.realpath(root / rel)
    if not resolved.startswith(os.path.realpath(root) + os.sep):
        raise ManifestError(f"{what}: path {rel!r} resolves outside the output folder")
    return rel


def _need(d: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ManifestError(f"{where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ManifestError(f"{where}: field {key!r} has the wrong type ({type(v).__name__})")
    return v


def _is_hex64(s: Any) -> bool:
    return isinstance(s, str) and len(s) == 16 and all(c in "0123456789abcdef" for c in s)


def parse_manifest(raw: dict[str, Any], root: Path) -> Manifest:
    where = str(root / MANIFEST_NAME)
    version = _need(raw, "format_version", int, where)
    if version not in SUPPORTED_VERSIONS:
        raise ManifestError(
            f"{where}: format_version {version} is not supported (this reader knows {SUPPORTED_VERSIONS}); "
            "upgrade mertools or re-extract the model"
        )
    alignment = _need(raw, "alignment", int, where)
    if alignment <= 0 or alignment & (alignment - 1):
        raise ManifestError(f"{where}: alignment {alignment} is not a power of two")
    model = _need(raw, "model", dict, where)
    for k in ("architecture", "n_layers", "n_experts", "n_experts_used", "d_model", "d_ff"):
        _need(model, k, str if k == "architecture" else int, f"{where} model")
    source = _need(raw, "source", dict, where)
    dense = raw.get("dense")
    if dense is not None:
        _need(dense, "path", str, f"{where} dense")
        safe_relpath(root, dense["path"], f"{where} dense")
        _need(dense, "size", int, f"{where} dense")
        if not _is_hex64(dense.get("xxh3_64")):
            raise ManifestError(f"{where} dense: xxh3_64 must be 16 lowercase hex digits")

    experts: list[ExpertEntry] = []
    seen: set[tuple[int, int]] = set()
    paths: set[str] = set()
    for i, e in enumerate(_need(raw, "experts", list, where)):
        w = f"{where} experts[{i}]"
        layer, expert = _need(e, "layer", int, w), _need(e, "expert", int, w)
        w = f"{where} layer {layer} expert {expert}"
        if (layer, expert) in seen:
            raise ManifestError(f"{w}: listed twice")
        seen.add((layer, expert))
        path = safe_relpath(root, _need(e, "path", str, w), w)
        if path in paths:
            raise ManifestError(f"{w}: path {path!r} is shared with another expert")
        paths.add(path)
        size = _need(e, "size", int, w)
        if size % alignment:
            raise ManifestError(f"{w}: size {size} is not a multiple of the alignment {alignment}")
        if not _is_hex64(e.get("xxh3_64")):
            raise ManifestError(f"{w}: xxh3_64 must be 16 lowercase hex digits")
        tensors: dict[str, TensorEntry] = {}
        spans = []
        for role, t in _need(e, "tensors", dict, w).items():
            if role not in ROLES:
                raise ManifestError(f"{w}: unknown tensor role {role!r} (expected one of {', '.join(ROLES)})")
            if role in SCALE_ROLES and version < SCALES_FORMAT_VERSION:
                raise ManifestError(f"{w}: role {role!r} needs format_version {SCALES_FORMAT_VERSION}, not {version}")
            tw = f"{w} {role}"
            dtype = _need(t, "dtype", str, tw)
            shape = tuple(_need(t, "shape", list, tw))
            if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
                raise ManifestError(f"{tw}: bad shape {list(shape)}")
            offset, nbytes = _need(t, "offset", int, tw), _need(t, "nbytes", int, tw)
            if offset % alignment:
                raise ManifestError(f"{tw}: offset {offset} is not a multiple of the alignment {alignment}")
            expected = nbytes_for(dtype, shape)
            if nbytes != expected:
                raise ManifestError(f"{tw}: nbytes {nbytes} but {dtype} {list(shape)} takes {expected}")
            if offset < 0 or offset + nbytes > size:
                raise ManifestError(f"{tw}: bytes {offset}..{offset + nbytes} lie outside the {size}-byte file")
            if not _is_hex64(t.get("xxh3_64")):
                raise ManifestError(f"{tw}: xxh3_64 must be 16 lowercase hex digits")
            spans.append((offset, offset + nbytes, role))
            tensors[role] = TensorEntry(role, dtype, shape, offset, nbytes, t["xxh3_64"])
        missing = [r for r in WEIGHT_ROLES if r not in tensors]
        if missing:
            raise ManifestError(f"{w}: missing projections {', '.join(missing)}")
        spans.sort()
        for (_, end, r1), (start, _, r2) in zip(spans, spans[1:]):
            if start < end:
                raise ManifestError(f"{w}: {r1} and {r2} overlap")
        experts.append(ExpertEntry(layer, expert, path, size, e["xxh3_64"], tensors))
    experts.sort(key=lambda x: (x.layer, x.expert))
    return Manifest(root, version, alignment, model, source, dense, experts, raw)


def load_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and check ``folder/manifest.json``. Raises ManifestError with a message that names what is wrong."""
    root = Path(folder)
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder (expected an extracted shard folder with {MANIFEST_NAME})")
    try:
        text = mpath.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(
            f"{mpath}: missing; this is not a complete shard folder (an interrupted extract leaves none). "
            "Run `mertools extract` again"
        ) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{mpath}: not valid JSON ({exc}); re-extract the model") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{mpath}: top level must be an object")
    return parse_manifest(raw, root)
