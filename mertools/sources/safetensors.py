"""A Hugging Face checkpoint folder (``config.json`` + ``model.safetensors`` or an index and its shards) as a source.

The headers are parsed here (8-byte length, JSON, bounds checked) so that a source can be built from headers
alone (``SafeTensorsSource.from_headers``: what ``pull`` learns by range requests before any weight is
downloaded); tensor bytes are only touched when the writer asks, through memory maps of the files it needs.
Expert layouts come from the one table in ``layouts.py``, chosen by ``model_type``.

Non-expert tensors go to ``dense.gguf`` under their Hugging Face names, in their own type (BF16/F16/F32/F64 and the
integer types; FP8 weights are widened to BF16 with their ``weight_scale_inv`` applied and the scale tensors
dropped).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from mer_runtime.kernels import strided_copy
from mer_runtime.safeopen import open_regular, read_regular

from ..errors import NotMoEError, SourceError
from .layouts import (MODEL_TYPES, MTP_PREFIX, PREFIXES, Layout, Part, check_config, config_float, config_int,
                      config_key, model_type_of, moe_layers_from_config)
from .files import MappedFiles
from .plan import ExpertPlan, Projection, ViewOf, check_gated_shapes

MAX_HEADER = 100_000_000  # the safetensors library's own limit
MAX_RANK = 8  # dimensions of one tensor; models use up to 5 (conv3d), the product of a shape is quadratic in it
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FP8_BLOCK = 128  # weight_scale_inv covers 128 x 128 blocks (quantization_config.weight_block_size)
MAX_LAYERS = 1 << 16  # block numbers in tensor names (as for GGUF sources)
MAX_EXPERTS = 1 << 16  # experts per layer (the largest models today: 512)
SCALE_DTYPES = ("F32", "BF16", "F16")  # what a weight_scale_inv may be stored as

# safetensors dtype -> (bytes per element, numpy dtype used to read it, gguf type it is written as or None)
DTYPES: dict[str, tuple[int, Any, str | None]] = {
    "F32": (4, np.float32, "F32"), "F16": (2, np.float16, "F16"), "BF16": (2, np.uint16, "BF16"),
    "F64": (8, np.float64, "F64"), "I8": (1, np.int8, "I8"), "I16": (2, np.int16, "I16"),
    "I32": (4, np.int32, "I32"), "I64": (8, np.int64, "I64"), "U8": (1, np.uint8, None),
    "BOOL": (1, np.uint8, None), "U16": (2, np.uint16, None), "U32": (4, np.uint32, None),
    "U64": (8, np.uint64, None), "F8_E4M3": (1, np.uint8, None), "F8_E5M2": (1, np.uint8, None),
    "F8_E8M0": (1, np.uint8, None),
}
FLOAT_TYPES = {"F32", "F16", "BF16", "F8_E4M3"}


def _e4m3_table() -> np.ndarray:
    """float32 value of every F8_E4M3 (fn: no infinities, 0x7f/0xff NaN) byte."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = sign * val
    val[(b & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


E4M3 = _e4m3_table()


def fp8_scale_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The weight_scale_inv shape that covers an FP8 weight of `shape` in 128 x 128 blocks (a 3-D weight: one grid
    per expert); None where the scale is one value.

    >>> fp8_scale_shape((4, 256, 160))
    (4, 2, 2)
    """
    if len(shape) == 2:
        return tuple(-(-d // FP8_BLOCK) for d in shape)
    if len(shape) == 3:
        return (shape[0], *(-(-d // FP8_BLOCK) for d in shape[1:]))
    return None


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of an array read with DTYPES' numpy type."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F8_E4M3":
        return E4M3[raw]
    return raw.astype(np.float32)


@dataclass(frozen=True)
class STTensor:
    name: str
    file_index: int
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute offset in its file
    nbytes: int


def parse_header(blob: bytes, where: str, file_size: int | None = None) -> tuple[int, dict[str, Any]]:
    """(header length N, the header's JSON) from a file's first 8 + N bytes; tensor ranges checked.

    >>> n, h = parse_header(open("model.safetensors", "rb").read(1 << 20), "model.safetensors")   # doctest: +SKIP
    """
    if len(blob) < 8:
        raise SourceError(f"{where}: shorter than the 8-byte safetensors header length; the file is truncated")
    n = int.from_bytes(blob[:8], "little")
    if n > MAX_HEADER or (file_size is not None and 8 + n > file_size):
        raise SourceError(f"{where}: says its header is {n} bytes, more than the file holds; not a safetensors file "
                          "or truncated: download it again")
    if len(blob) < 8 + n:
        raise SourceError(f"{where}: header of {n} bytes but only {len(blob) - 8} given")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise SourceError(f"{where}: the safetensors header holds the key {str(exc)[:200]} twice; the file is "
                          "corrupt (or made to be read differently by different readers): download it again") from None
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, bad UTF-8, > 4300-digit integers
        raise SourceError(f"{where}: the safetensors header is not valid JSON ({str(exc)[:200]}); the file is "
                          "corrupt") from None
    check_header(header, where, None if file_size is None else file_size - 8 - n)
    return n, header


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice is refused (Python keeps the last, other readers the first)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _DuplicateKey(repr(dup))
    return d


def _cut(x: Any, n: int = 200) -> str:
    """At most `n` characters of a header value for a message (a hostile shape may hold 100000 numbers)."""
    r = reprlib.Repr()  # (keyword arguments only from Python 3.12)
    r.maxlist, r.maxdict, r.maxstring, r.maxother = 12, 8, 60, 60
    s = r.repr(x)
    return s if len(s) <= n else s[:n] + "..."


def check_header(header: Any, where: str, data_size: int | None) -> None:
    """Refuse a header whose entries are malformed, do not fit their shape or the file, overlap, or leave bytes of
    the data section to no tensor (the format forbids holes, as the safetensors library does).
    `data_size`: bytes after the header (None: unknown, the end is not checked)."""
    if not isinstance(header, dict):
        raise SourceError(f"{where}: the safetensors header is not a JSON object")
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise SourceError(f"{where}: tensor name {name!r} is not valid Unicode (a lone surrogate escape); the "
                              "file is corrupt") from None
        # the rank is bounded before anything walks the shape: the product below costs quadratic time in the rank
        # (a 3 MB header of 160000 dimensions of 2**47 hung it); no model has tensors of more than a few dimensions
        ok = isinstance(t, dict) and isinstance(t.get("dtype"), str) and t["dtype"] in DTYPES \
            and isinstance(t.get("shape"), list) and len(t["shape"]) <= MAX_RANK \
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in t["shape"]) \
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2 \
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in t["data_offsets"])
        if not ok:
            raise SourceError(f"{where}: tensor {name!r} has a malformed header entry {_cut(t)}; the file is "
                              f"corrupt or of a type this version does not read (F4/F6; rank above {MAX_RANK})")
        b, e = t["data_offsets"]
        want = int(np.prod(t["shape"], dtype=object)) * DTYPES[t["dtype"]][0]
        if e - b != want or (data_size is not None and e > data_size):
            raise SourceError(f"{where}: tensor {name!r} ({t['dtype']} {_cut(t['shape'])}) has bytes {b}..{e}, which do "
                              "not fit its shape or the file; the file is corrupt or truncated")
    spans = sorted((t["data_offsets"][0], t["data_offsets"][1], k) for k, t in header.items() if k != "__metadata__")
    # each start is compared with the furthest end so far, not only with its neighbour's: a zero-size tensor
    # between two overlapping ones must not hide the overlap
    end, holder = 0, ""
    for b, e, k in spans:
        if b < end and e > b:
            raise SourceError(f"{where}: tensors {holder!r} and {k!r} share bytes; the header is corrupt")
        if b > end:
            raise SourceError(f"{where}: data bytes {end}..{b} belong to no tensor (a hole before {k!r}); the "
                              "format forbids holes: the file is corrupt or not a safetensors file")
        if e > end:
            end, holder = e, k
    if data_size is not None and end != data_size:
        raise SourceError(f"{where}: {data_size - end} bytes after the last tensor belong to no tensor; the file is "
                          "corrupt or not a safetensors file: download it again")


def read_header(path: Path) -> tuple[int, dict[str, Any], int]:
    """(N, header, file size) of a .safetensors file on disk (the size its header was checked against)."""
    fd, st = open_regular(path, error=SourceError, hint="a shard of the checkpoint: put the downloaded file there")
    try:
        size = st.st_size
        with os.fdopen(fd, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            blob = head + fh.read(min(n, MAX_HEADER, max(0, size - 8)))
    except OSError as exc:
        raise SourceError(f"{path}: cannot be read ({exc.strerror})") from None
    return (*parse_header(blob, str(path), size), size)


def _compile(pattern: str, prefix: str) -> re.Pattern[str]:
    s = re.escape(pattern.replace("{p}", prefix))
    return re.compile("^" + s.replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
                      + "$")


class SafeTensorsSource(MappedFiles):
    """A checkpoint folder: config, tensors found in the shard headers, the expert plan and model summary.

    Thread-safety: planning happens in the constructor; afterwards the object is read-only except for the lazily
    opened memory maps, which a lock guards, so several writers may read from it at once.

    >>> src = SafeTensorsSource("mixtral-bf16-sharded/")        # doctest: +SKIP
    >>> src.experts[0].projections[0].tensor                     # doctest: +SKIP
    'model.layers.0.block_sparse_moe.experts.0.w1.weight'
    """

    kind = "safetensors"

    def __init__(self, path: str | os.PathLike[str]):
        root = Path(path)
        config = _read_json(root / "config.json", "config.json")
        indexed = os.path.lexists(root / INDEX_NAME)
        if indexed:
            index = _read_json(root / INDEX_NAME, INDEX_NAME, unique=True)
            names = _index_files(index, root / INDEX_NAME)
        elif os.path.lexists(root / SINGLE_NAME):
            names = [SINGLE_NAME]
        else:
            raise SourceError(f"{root}: has config.json but neither {SINGLE_NAME} nor {INDEX_NAME}; is this a "
                              "checkpoint saved with save_pretrained (safe_serialization)?")
        headers = {}
        for n in names:
            p = root / n
            if not os.path.lexists(p):
                raise SourceError(f"{p}: listed in {INDEX_NAME} but missing; download every shard")
            headers[n] = read_header(p)
        if indexed:
            check_index(index, headers, root / INDEX_NAME)
        self._build(root, config, headers)

    @classmethod
    def from_headers(cls, root: str | os.PathLike[str], config: dict[str, Any],
                     headers: dict[str, tuple[int, dict[str, Any], int]]) -> "SafeTensorsSource":
        """A source planned from headers alone, before (some of) the shard files exist under `root`.

        Args:
            root: the folder the shard files are (or will be) in, named as in `headers`.
            config: config.json, parsed.
            headers: shard file name -> (header length N, parsed header JSON, file size in bytes); N and the JSON
                come from the first 8 + N bytes of each file (two range requests, or `parse_header`).

        Returns the same object the folder constructor gives; its writer opens a shard file only when an expert
        (or dense tensor) that needs it is written (``ExpertPlan.file_indices``, ``dense_file_indices``).

        >>> SafeTensorsSource.from_headers("dl/", cfg, {"model.safetensors": (n, h, size)})   # doctest: +SKIP
        """
        self = cls.__new__(cls)
        self._build(Path(root), config, headers)
        return self

    # -- building --------------------------------------------------------------------------------------------
    def _build(self, root: Path, config: dict[str, Any], headers: dict[str, tuple[int, dict[str, Any], int]]) -> None:
        self.path = root
        if not isinstance(config, dict):
            raise SourceError(f"{root / 'config.json'}: is not a JSON object")
        check_config(config, root / "config.json")
        self.config = config
        self.files = [root / n for n in headers]
        self.sizes = [size for (_n, _h, size) in headers.values()]
        self.header_lengths = [n for (n, _h, _s) in headers.values()]
        self._init_maps()
        self.tensors: dict[str, STTensor] = {}
        self.tensor_order: list[str] = []
        for i, (fname, (n, h, size)) in enumerate(headers.items()):
            if not isinstance(n, int) or not isinstance(size, int) or not 0 <= n <= MAX_HEADER or size < 8 + n:
                raise SourceError(f"{root / fname}: header length {n} and size {size} do not fit; download it again")
            check_header(h, str(root / fname), size - 8 - n)
            for name, t in sorted(((k, v) for k, v in h.items() if k != "__metadata__"),
                                  key=lambda kv: kv[1]["data_offsets"][0]):
                if name in self.tensors:
                    raise SourceError(f"{root / fname}: tensor {name!r} is also in "
                                      f"{self.files[self.tensors[name].file_index].name}")
                b, e = t["data_offsets"]
                self.tensors[name] = STTensor(name, i, t["dtype"], tuple(t["shape"]), 8 + n + b, e - b)
                self.tensor_order.append(name)
        mt = model_type_of(config)
        if not isinstance(mt, str) or mt not in MODEL_TYPES:
            known = ", ".join(sorted(MODEL_TYPES))
            raise NotMoEError(f"{root / 'config.json'}: model_type {repr(mt)[:80]} is not a Mixture-of-Experts layout "
                              f"this version knows ({known}); nothing to extract")
        self.model_type = mt
        self.spec = MODEL_TYPES[mt]
        self.arch = self.spec.gguf_arch
        self._check_fp8_scales()
        self.prefix = self._find_prefix()
        self.mtp_block_layers: set[int] = set()  # blocks numbered from mtp.layers.{i} (filled in by _plan)
        self.experts, self.layer_layouts, self.expert_tensor_names = self._plan()
        self.model = self._model_info()

    def _find_prefix(self) -> str:
        counts = {p: 0 for p in PREFIXES}
        for p in PREFIXES:
            rx = re.compile("^" + re.escape(p).replace(r"\{layer\}", r"\d+"))
            counts[p] = sum(1 for n in self.tensor_order if rx.match(n))
        best = max(PREFIXES, key=lambda p: counts[p])
        if not counts[best]:
            raise SourceError(f"{self.path}: no tensor named like {', '.join(PREFIXES)}; not a {self.model_type} "
                              "checkpoint this version can read")
        return best

    def _err(self, t: STTensor, msg: str) -> SourceError:
        return SourceError(f"{self.files[t.file_index]}: tensor {t.name!r} {msg}")

    def _plan(self) -> tuple[list[ExpertPlan], dict[int, Layout], set[str]]:
        # role regexes of every candidate layout; a layer takes the first candidate whose weights it holds
        found: dict[tuple[int, int], dict[str, dict[int | None, list[STTensor]]]] = {}
        rxs = []
        for li, lay in enumerate(self.spec.layouts):
            for role, part in lay.roles.items():
                suffixes = ("_blocks", "_scales") if part.kind == "mxfp4" else ("",)
                for suf in suffixes:
                    for mtp, prefix in ((False, self.prefix), (True, MTP_PREFIX)):
                        rxs.append((li, role, suf, mtp, _compile(part.pattern + suf, prefix)))
        from_main: dict[int, str] = {}  # a tensor of each layer, by where its name put it (main / MTP block)
        from_mtp: dict[int, str] = {}
        for name in self.tensor_order:
            for li, role, suf, mtp, rx in rxs:
                if m := rx.match(name):
                    t = self.tensors[name]
                    # bounded before int(): a 5000-digit block number must not reach int() or a range()
                    if len(m["layer"]) > 6 or int(m["layer"]) >= MAX_LAYERS:
                        raise self._err(t, f"names block {m['layer'][:20]}, past the {MAX_LAYERS} this version "
                                           "reads; the checkpoint is corrupt")
                    layer = self._mtp_layer(t, int(m["layer"])) if mtp else int(m["layer"])
                    (from_mtp if mtp else from_main).setdefault(layer, name)
                    if layer in from_main and layer in from_mtp:
                        raise self._err(self.tensors[from_mtp[layer]], f"is of MTP layer {layer} (num_hidden_layers "
                                        f"+ its index), which {from_main[layer]!r} also claims; the checkpoint is "
                                        "merged from two saves, or config.json's num_hidden_layers is wrong")
                    e = None
                    if "expert" in rx.groupindex:
                        if len(m["expert"]) > 6 or int(m["expert"]) >= MAX_EXPERTS:
                            raise self._err(t, f"names expert {m['expert'][:20]}, past the {MAX_EXPERTS} experts "
                                               "per layer this version reads; the checkpoint is corrupt")
                        e = int(m["expert"])
                    bucket = found.setdefault((layer, li), {}).setdefault(role + suf, {}).setdefault(e, [])
                    if bucket:  # "experts.01." and "experts.1.": which one is expert 1 is anybody's guess
                        raise self._err(t, f"and {bucket[0].name!r} are both {role + suf} of layer {layer}"
                                           + (f" expert {e}" if e is not None else "")
                                           + "; the checkpoint is corrupt or merged from two saves")
                    bucket.append(t)
        self.mtp_block_layers = set(from_mtp)
        if not found:
            raise NotMoEError(f"{self.path}: model_type {self.model_type!r} but no routed-expert tensors found "
                              f"(looked for {self.spec.layouts[0].roles['gate'].pattern.replace('{p}', self.prefix)}"
                              " and the other layouts of the table); nothing to extract")
        plans: list[ExpertPlan] = []
        layouts: dict[int, Layout] = {}
        names: set[str] = set()
        for layer in sorted({lay for lay, _ in found}):
            chosen = None
            for li, lay in enumerate(self.spec.layouts):
                got = found.get((layer, li), {})
                weights = [r + ("_blocks" if lay.roles[r].kind == "mxfp4" else "") for r in ("gate", "up", "down")]
                if all(w in got for w in weights):
                    chosen = (lay, got)
                    break
            if chosen is None:
                have = sorted({r for (lay_, _), d in found.items() if lay_ == layer for r in d})
                raise SourceError(f"{self.path}: layer {layer} has expert tensors for {', '.join(have)} but not a "
                                  "complete gate/up/down set of any known layout; the checkpoint is incomplete")
            lay, got = chosen
            layouts[layer] = lay
            lp = self._plan_layer(layer, lay, got)
            plans.extend(lp)
            names.update(t.name for d in got.values() for ts in d.values() for t in ts)
        names |= {n + "_scale_inv" for n in names if n + "_scale_inv" in self.tensors}
        self._check_uncarried(names)
        self._check_moe_layers(set(layouts))
        self._check_mtp_numbering(set(layouts), {**from_main, **from_mtp})
        n_exp = config_int(self.config, "n_experts", self.path / "config.json", 1, MAX_EXPERTS)
        per_layer = {}
        for p in plans:
            per_layer[p.layer] = per_layer.get(p.layer, 0) + 1
        if n_exp is not None and set(per_layer.values()) != {int(n_exp)}:
            raise SourceError(f"{self.path}: config.json says {n_exp} experts per layer but the tensors hold "
                              f"{sorted(set(per_layer.values()))}; the checkpoint is inconsistent")
        return plans, layouts, names

    def _mtp_layer(self, t: STTensor, i: int) -> int:
        """The block number of layer `i` of a separate MTP block (``mtp.layers.{i}.``): num_hidden_layers + i."""
        n_layers = config_int(self.config, "n_layers", self.path / "config.json", 1, MAX_LAYERS)
        if n_layers is None:
            raise self._err(t, "holds experts of the MTP block, whose layers are numbered after the decoder's, but "
                               "config.json gives no num_hidden_layers; fix config.json (or download it again)")
        if n_layers + i >= MAX_LAYERS:
            raise self._err(t, f"is MTP layer {n_layers} + {i}, past the {MAX_LAYERS} blocks this version reads; "
                               "the checkpoint is corrupt")
        return n_layers + i

    def _check_mtp_numbering(self, layers: set[int], named_by: dict[int, str]) -> None:
        """The MTP layers (blocks at num_hidden_layers and beyond: DeepSeek's model.layers.{61}, Qwen3.5's
        mtp.layers.{i}) follow the decoder's without a gap, as the manifest counts them (`n_layers` = the decoder's
        + `n_mtp_layers`, docs/format.md): a gap would put a block past n_layers."""
        n_layers = config_int(self.config, "n_layers", self.path / "config.json", 1, MAX_LAYERS)
        mtp = sorted(layer for layer in layers if n_layers is not None and layer >= n_layers)
        for want, layer in zip(range(n_layers or 0, MAX_LAYERS), mtp):
            if layer != want:
                raise self._err(self.tensors[named_by[layer]], f"is of block {layer}, an MTP layer (config.json's "
                                f"num_hidden_layers is {n_layers}), but no expert tensors of block {want} come "
                                "before it: MTP layers are numbered from num_hidden_layers (mtp.layers.0) without a "
                                "gap; the checkpoint is incomplete, or config.json's num_hidden_layers is wrong")

    def _check_uncarried(self, carried: set[str]) -> None:
        """A routed-expert tensor the layout does not carry must not slip into dense.gguf unnoticed."""
        for n in self.tensor_order:
            if ".experts." in n and n not in carried:
                t = self.tensors[n]
                raise self._err(t, f"looks like a routed-expert tensor ({t.dtype} {list(t.shape)}) but is not part "
                                   f"of the {self.model_type} layouts this version knows; refusing rather than "
                                   "sending it to dense.gguf (report the model so its layout can be added)")

    def _check_moe_layers(self, found: set[int]) -> None:
        """Blocks the config says are MoE must all hold experts (a half-copied checkpoint must not pass)."""
        n_layers = config_int(self.config, "n_layers", self.path / "config.json", 1, MAX_LAYERS)
        if n_layers is None:
            return
        want = moe_layers_from_config(self.config, n_layers)
        missing = sorted(want - found)
        if missing:
            raise SourceError(f"{self.path}: config.json makes blocks {missing[:10]} Mixture-of-Experts layers but "
                              "the checkpoint holds no experts for them; shards are missing or the files are "
                              "incomplete")

    def _n_experts_of(self, layer: int, lay: Layout, got: dict[str, dict[int | None, list[STTensor]]]) -> int:
        if lay.kind == "per_expert":
            ids = set(got["gate"])
            for role, d in got.items():
                if set(d) != ids:
                    raise SourceError(f"{self.path}: layer {layer}: {role} exists for experts {sorted(d)[:8]}... but "
                                      f"gate for {sorted(ids)[:8]}...; the checkpoint is incomplete")
            n = max(ids) + 1  # type: ignore[type-var]
            if ids != set(range(n)):
                raise SourceError(f"{self.path}: layer {layer}: experts {sorted(set(range(n)) - ids)} are missing")
            return n
        part = lay.roles["gate"]
        t = got["gate" + ("_blocks" if part.kind == "mxfp4" else "")][None][0]
        if part.experts_flat:
            n = config_int(self.config, "n_experts", self.path / "config.json", 1, MAX_EXPERTS)
            if not n or not t.shape or t.shape[0] % n:
                raise self._err(t, f"is {list(t.shape)}, flat over experts, but config.json's expert count {n} does "
                                   "not divide it")
            return int(n)
        return t.shape[0]

    def _plan_layer(self, layer: int, lay: Layout, got: dict[str, dict[int | None, list[STTensor]]]
                    ) -> list[ExpertPlan]:
        n_exp = self._n_experts_of(layer, lay, got)
        plans = []
        for e in range(n_exp):
            projs = []
            for role, part in lay.roles.items():
                key = role + ("_blocks" if part.kind == "mxfp4" else "")
                if key not in got:
                    continue  # optional roles (biases) this checkpoint lacks
                if part.kind == "per_expert":
                    projs.append(self._per_expert(role, got[key][e][0]))
                elif part.kind == "stacked":
                    projs.append(self._stacked(role, part, got[key][None][0], e, n_exp))
                else:
                    blocks = got[key][None][0]
                    if role + "_scales" not in got:
                        raise self._err(blocks, f"has no {blocks.name.removesuffix('_blocks')}_scales beside it: "
                                                "MXFP4 blocks without their scales; the checkpoint is incomplete")
                    projs.append(self._mxfp4(role, part, blocks, got[role + "_scales"][None][0], e, n_exp))
            plans.append(ExpertPlan(layer, e, projs))
        check_gated_shapes(self.path, layer, plans)
        return plans

    # -- one projection per part kind --------------------------------------------------------------------------
    def _array(self, view_of: ViewOf, t: STTensor) -> np.ndarray:
        _size, npt, _g = DTYPES[t.dtype]
        return np.frombuffer(view_of(t.file_index), dtype=npt, count=t.nbytes // np.dtype(npt).itemsize,
                             offset=t.offset).reshape(t.shape)

    def _check_dims(self, t: STTensor) -> None:
        """An expert's weight (or bias) tensor: a float type the plan can carry, no zero dimension."""
        if t.dtype not in FLOAT_TYPES:
            raise self._err(t, f"is {t.dtype}; expert weights must be BF16, F16, F32 or F8_E4M3 (or GPT-OSS's MXFP4 "
                               "blocks): the header is corrupt, or the checkpoint is quantized in a format this "
                               "version does not read")
        if 0 in t.shape:
            raise self._err(t, f"has shape {list(t.shape)}, with a zero dimension: an expert with no weights; the "
                               "checkpoint is corrupt")

    def _scales_of(self, t: STTensor) -> STTensor | None:
        if t.dtype != "F8_E4M3":
            return None
        s = self.tensors.get(t.name + "_scale_inv")
        if s is None:
            raise self._err(t, "is FP8 but has no weight_scale_inv beside it; the checkpoint is incomplete")
        return s

    def _check_fp8_scales(self) -> None:
        """Every FP8 weight's weight_scale_inv is a float tensor covering it in 128 x 128 blocks, so that applying it
        indexes inside it: ``[ceil(rows/128), ceil(cols/128)]`` for a 2-D weight; for a 3-D one (all experts fused,
        ``[E, rows, cols]``) each expert's own grid, ``[E, ceil(rows/128), ceil(cols/128)]``, as transformers'
        FP8 experts hold it (``gate_up_proj_scale_inv``); one value for a tensor of any other rank."""
        for name in self.tensor_order:
            t = self.tensors[name]
            s = self.tensors.get(name + "_scale_inv")
            if t.dtype != "F8_E4M3" or s is None:
                continue
            want = fp8_scale_shape(t.shape)
            n = int(np.prod(s.shape, dtype=object))
            if s.dtype not in SCALE_DTYPES or (s.shape != want if want is not None else n != 1):
                raise SourceError(f"{self.files[s.file_index]}: tensor {s.name!r} ({s.dtype} {list(s.shape)}) is "
                                  f"not the block scale of {name!r} {list(t.shape)} (expected "
                                  f"{list(want) if want else [1]} of F32/BF16/F16); the checkpoint is corrupt")

    def _per_expert(self, role: str, t: STTensor) -> Projection:
        want = 1 if role.endswith("_bias") else 2
        if len(t.shape) != want:
            raise self._err(t, f"has shape {list(t.shape)}, expected {want} dimensions")
        self._check_dims(t)
        scale = self._scales_of(t)
        files = (t.file_index,) + ((scale.file_index,) if scale else ())

        def decode(view_of: ViewOf, r0: int, r1: int) -> np.ndarray:
            w = to_float32(self._array(view_of, t)[r0:r1], t.dtype)
            if scale is not None:
                s = to_float32(self._array(view_of, scale), scale.dtype)
                rows = np.arange(r0, r1) // FP8_BLOCK
                cols = np.arange(t.shape[1]) // FP8_BLOCK
                w = w * s[rows][:, cols]
            return w

        spans = ((t.file_index, t.offset, t.offset + t.nbytes),) + (
            ((scale.file_index, scale.offset, scale.offset + scale.nbytes),) if scale else ())
        return Projection(role, t.dtype, t.shape, t.file_index, t.offset, t.nbytes, t.name,
                          files=files, decode=decode if t.dtype in FLOAT_TYPES else None, spans=spans)

    def _stacked(self, role: str, part: Part, t: STTensor, e: int, n_exp: int) -> Projection:
        shape = t.shape
        if part.experts_flat:
            shape = (n_exp, shape[0] // n_exp, *shape[1:])
        bias = role.endswith("_bias")
        if len(shape) != (2 if bias else 3) or shape[0] != n_exp:
            raise self._err(t, f"has shape {list(t.shape)}, expected [{n_exp}, ...] with "
                               f"{2 if bias else 3} dimensions")
        self._check_dims(t)
        scale = self._scales_of(t)
        if scale is not None and (bias or part.experts_flat):
            raise self._err(t, f"is an FP8 {'bias' if bias else 'tensor flat over experts'} with block scales, "
                               "which this version does not convert; the checkpoint is of a kind no known model "
                               "saves")
        sub = list(shape[1:])
        ax = part.take_axis
        if part.take:
            if sub[ax] % 2:
                raise self._err(t, f"has an odd fused dimension {sub[ax]}")
            sub[ax] //= 2
        out_shape = tuple(reversed(sub)) if part.transpose else tuple(sub)
        esize = DTYPES[t.dtype][0]
        per = int(np.prod(shape[1:])) * esize
        desc = f"{t.name}[{e}]" + _slice_desc(part, len(shape) - 1, shape[1 + ax] // 2 if part.take else 0)

        def values(view_of: ViewOf) -> np.ndarray:
            a = self._array(view_of, t).reshape(shape)[e]
            if part.take:
                n = a.shape[ax]
                idx = {"first": slice(0, n // 2), "second": slice(n // 2, n), "even": slice(0, None, 2),
                       "odd": slice(1, None, 2)}[part.take]
                a = a[idx] if ax == 0 else a[:, idx]
            return a.T if part.transpose else a

        # the source row and column of each output row and column: an FP8 expert's block scale is indexed by
        # where a value sits in the stored (fused) matrix, so a gate/up split inside a 128 block is scaled as
        # transformers scales the fused tensor
        src = [np.arange(n) for n in shape[1:]]
        if part.take:
            src[ax] = src[ax][{"first": slice(0, sub[ax]), "second": slice(sub[ax], None), "even": slice(0, None, 2),
                               "odd": slice(1, None, 2)}[part.take]]
        out_rows, out_cols = (src[1], src[0]) if part.transpose else (src[0], src[1] if len(src) > 1 else None)

        def decode(view_of: ViewOf, r0: int, r1: int) -> np.ndarray:
            w = to_float32(np.ascontiguousarray(values(view_of)[r0:r1]), t.dtype)
            if scale is not None:
                s = to_float32(self._array(view_of, scale)[e], scale.dtype)  # this expert's grid only
                rb, cb = out_rows[r0:r1] // FP8_BLOCK, out_cols // FP8_BLOCK
                w = w * (s[np.ix_(cb, rb)].T if part.transpose else s[np.ix_(rb, cb)])
            return w

        nbytes = int(np.prod(out_shape)) * esize
        spans: tuple[tuple[int, int, int], ...] = ((t.file_index, t.offset + e * per, t.offset + (e + 1) * per),)
        files: tuple[int, ...] = ()
        if scale is not None:
            sper = scale.nbytes // n_exp
            spans += ((scale.file_index, scale.offset + e * sper, scale.offset + (e + 1) * sper),)
            files = (t.file_index, scale.file_index)
        if part.transform() == "none":
            start = t.offset + e * per + (part.take == "second") * (per // 2)
            return Projection(role, t.dtype, out_shape, t.file_index, start, nbytes, desc,
                              files=files, decode=decode if t.dtype in FLOAT_TYPES else None,
                              spans=((t.file_index, start, start + nbytes), *spans[1:]) if scale is not None else ())
        rows = out_shape[0]
        step = max(1, (4 << 20) // max(1, (nbytes // rows)))

        def produce(view_of: ViewOf) -> Iterator[np.ndarray]:
            v = values(view_of)
            for r0 in range(0, rows, step):
                yield _band(v, r0, min(rows, r0 + step), part.transpose).view(np.uint8).reshape(-1)

        return Projection(role, t.dtype, out_shape, t.file_index, t.offset + e * per, nbytes, desc,
                          transform=part.transform(), files=files, produce=produce,
                          decode=decode if t.dtype in FLOAT_TYPES else None, spans=spans)

    def _mxfp4(self, role: str, part: Part, blocks: STTensor, scales: STTensor, e: int, n_exp: int) -> Projection:
        if len(blocks.shape) != 4 or blocks.shape[3] != 16 or blocks.shape[0] != n_exp or blocks.dtype != "U8" \
                or scales.shape != blocks.shape[:3] or scales.dtype != "U8":
            raise self._err(blocks, f"{list(blocks.shape)} with scales {list(scales.shape)} is not an MXFP4 pair "
                                    f"[{n_exp}, rows, in/32, 16] + [{n_exp}, rows, in/32] of U8")
        if 0 in blocks.shape:
            raise self._err(blocks, f"has shape {list(blocks.shape)}, with a zero dimension; the checkpoint is corrupt")
        _n, rows, nblk, _ = blocks.shape
        if part.take:
            if rows % 2:
                raise self._err(blocks, f"has an odd number of fused rows {rows}; gate and up cannot be split")
            rows //= 2
        out_shape = (rows, nblk * 32)
        sel = {None: slice(None), "even": slice(0, None, 2), "odd": slice(1, None, 2),
               "first": slice(0, rows), "second": slice(rows, None)}[part.take]

        def repacked(view_of: ViewOf, r0: int, r1: int) -> np.ndarray:
            b = self._array(view_of, blocks)[e][sel][r0:r1]
            s = self._array(view_of, scales)[e][sel][r0:r1]
            return repack_mxfp4(b, s)

        step = max(1, (4 << 20) // (nblk * 17))

        def produce(view_of: ViewOf) -> Iterator[np.ndarray]:
            for r0 in range(0, rows, step):
                yield repacked(view_of, r0, min(rows, r0 + step)).reshape(-1)

        def decode(view_of: ViewOf, r0: int, r1: int) -> np.ndarray:
            from gguf.constants import GGMLQuantizationType
            from gguf.quants import dequantize

            return dequantize(repacked(view_of, r0, r1), GGMLQuantizationType.MXFP4)

        desc = f"{blocks.name}+{scales.name.rsplit('.', 1)[-1]}[{e}]" + (
            f"[{sel.start}::2]" if part.take in ("even", "odd") else "")
        bper, sper = blocks.nbytes // n_exp, scales.nbytes // n_exp  # one expert's slice of each
        return Projection(role, "MXFP4", out_shape, blocks.file_index, blocks.offset, rows * nblk * 17, desc,
                          transform=part.transform(), files=(blocks.file_index, scales.file_index),
                          produce=produce, decode=decode,
                          spans=((blocks.file_index, blocks.offset + e * bper, blocks.offset + (e + 1) * bper),
                                 (scales.file_index, scales.offset + e * sper, scales.offset + (e + 1) * sper)))

    # -- model summary -----------------------------------------------------------------------------------------
    def _model_info(self) -> dict[str, Any]:
        moe_layers = sorted({p.layer for p in self.experts})
        first = self.experts[0]
        shapes = {q.role: q.shape for q in first.projections}
        d_ff, d_model = shapes["gate"]
        cfg = self.path / "config.json"
        cfg_model = config_int(self.config, "d_model", cfg, 1, 1 << 24)
        if cfg_model is not None and cfg_model != d_model:
            raise SourceError(f"{self.path / 'config.json'}: hidden size {cfg_model} but the experts take {d_model} "
                              "inputs; config and weights disagree")
        n_layers = config_int(self.config, "n_layers", cfg, 1, MAX_LAYERS) or max(moe_layers) + 1
        mtp = [layer for layer in moe_layers if layer >= n_layers]
        info: dict[str, Any] = {
            "architecture": self.arch,
            "name": _model_name(self.config),
            "n_layers": n_layers + len(mtp),
            "n_experts": len([p for p in self.experts if p.layer == first.layer]),
            "n_experts_used": config_int(self.config, "n_experts_used", cfg, 0, MAX_EXPERTS) or 0,
            "d_model": d_model,
            "d_ff": max(p.projections[0].shape[0] for p in self.experts),
            "moe_layers": moe_layers,
            "has_expert_biases": any(q.role.endswith("_bias") for q in first.projections),
            "activation": dict(self.spec.activation),
        }
        if info["n_experts_used"] > info["n_experts"]:  # the manifest reader refuses it: say so before writing
            key, _v = config_key(self.config, "n_experts_used")
            raise SourceError(f"{cfg}: {key} is {info['n_experts_used']}, more than the {info['n_experts']} experts "
                              "per layer the tensors hold; fix config.json (or download it again)")
        if info["activation"]["kind"] == "swiglu_oai":
            limit = config_float(self.config, "swiglu_limit", cfg)
            if limit is not None and not 0 < limit <= 1e6:  # the manifest reader's range: say so before writing
                raise SourceError(f"{cfg}: swiglu_limit is {limit}, expected a number in (0, 1e6]; fix config.json "
                                  "(or download it again)")
            if limit is not None:
                info["activation"]["limit"] = limit
        if mtp:
            info["n_mtp_layers"] = len(mtp)
        lay = self.layer_layouts[moe_layers[0]]
        prefix = self.prefix
        shared = [p for p in lay.shared if any(n.startswith(prefix.format(layer=moe_layers[0]) + p)
                                               for n in self.tensor_order)]
        if shared:
            n_sh = config_int(self.config, "n_shared_experts", cfg, 0, MAX_EXPERTS)
            info["n_shared_experts"] = n_sh or 1
            d_sh = config_int(self.config, "d_ff_shared", cfg, 0, 1 << 24)
            if d_sh is None:
                t = next((self.tensors[n] for n in self.tensor_order
                          if n.startswith(prefix.format(layer=moe_layers[0]) + shared[0])
                          and n.endswith(("gate_proj.weight", "w1.weight", "input_linear.weight"))), None)
                d_sh = t.shape[0] // (2 if "input_linear" in t.name else 1) if t else 0
            info["d_ff_shared"] = int(d_sh)
        lead = config_int(self.config, "n_dense_layers", cfg, 0, MAX_LAYERS)
        if lead:
            info["n_dense_layers"] = lead
        scale = config_float(self.config, "expert_weights_scale", cfg)
        if scale is not None:
            info["expert_weights_scale"] = scale
        key, norm = config_key(self.config, "expert_weights_norm")
        if norm is not None:
            if not isinstance(norm, bool):
                raise SourceError(f"{cfg}: {key} is {str(norm)[:60]!r}, expected true or false; fix "
                                  "config.json (or download it again)")
            info["expert_weights_norm"] = norm
        router: dict[str, str] = {}
        for key, rel in (("weight", lay.router), ("bias", lay.router_bias), ("selection_bias", lay.selection_bias)):
            if rel and (prefix + rel).format(layer=moe_layers[0]) in self.tensors:
                router[key] = prefix + rel
        if "weight" in router and self.mtp_block_layers:
            # a separate MTP block's router is not at model.layers.{block}: its own templates, {layer} = its index i
            mlay = self.layer_layouts[min(self.mtp_block_layers)]
            for key, rel in (("weight", mlay.router), ("bias", mlay.router_bias),
                             ("selection_bias", mlay.selection_bias)):
                if rel and (MTP_PREFIX + rel).format(layer=0) in self.tensors:
                    router["mtp_" + key] = MTP_PREFIX + rel
        if "weight" in router:
            info["router"] = router
        return info

    def source_info(self) -> dict[str, Any]:
        import safetensors

        return {
            "format": "safetensors",
            "files": [{"name": p.name, "size": s} for p, s in zip(self.files, self.sizes)],
            "layout": "+".join(sorted({lay.kind for lay in self.layer_layouts.values()})),
            "layouts": {str(k): f"{lay.name} ({lay.kind})" for k, lay in self.layer_layouts.items()},
            "model_type": self.model_type,
            "safetensors_package": safetensors.__version__,
        }

    # -- bytes ---------------------------------------------------------------------------------------------------
    def _check_map(self, i: int, m: mmap.mmap) -> None:
        p = self.files[i]
        if len(m) != self.sizes[i]:
            raise SourceError(f"{p}: is {len(m)} bytes but its header said {self.sizes[i]}; the file changed or is "
                              "incomplete: download it again")
        n = int.from_bytes(m[:8], "little")
        if n != self.header_lengths[i]:
            raise SourceError(f"{p}: its header is {n} bytes, not the {self.header_lengths[i]} it was planned with; "
                              "the file changed: download it again")

    # -- dense part ----------------------------------------------------------------------------------------------
    def dense_tensors(self) -> list[STTensor]:
        return [self.tensors[n] for n in self.tensor_order
                if n not in self.expert_tensor_names and not n.endswith("_scale_inv")]

    def dense_file_indices(self) -> set[int]:
        return {t.file_index for t in self.dense_tensors()} | {
            self.tensors[t.name + "_scale_inv"].file_index for t in self.dense_tensors()
            if t.name + "_scale_inv" in self.tensors}

    def dense_estimate(self) -> int:
        return sum(t.nbytes * (2 if t.dtype == "F8_E4M3" else 1) for t in self.dense_tensors()) + (1 << 20)

    def write_dense(self, path: Path, *, fsync: bool, tick: Callable[[int], None]) -> dict[str, Any]:
        from .st_dense import write_dense

        return write_dense(self, path, fsync=fsync, tick=tick)

    def open_dense(self, path: Path, *, fsync: bool) -> Any:
        """A ``DenseWriter``: dense.gguf written tensor by tensor as source files arrive (see ``convert``)."""
        from .st_dense import DenseWriter

        return DenseWriter(self, path, fsync=fsync)

    def scale_tensors(self) -> list[tuple[STTensor, str]]:
        """(weight_scale_inv, the FP8 weight it scales) for every FP8 weight: what `sources.scales.check_scales`
        reads by value before an extraction writes anything (a NaN block scale makes its weights NaN)."""
        return [(self.tensors[n + "_scale_inv"], n) for n in self.tensor_order
                if self.tensors[n].dtype == "F8_E4M3" and n + "_scale_inv" in self.tensors]


def _model_name(config: dict[str, Any]) -> str | None:
    """The model's name for the manifest: ``_name_or_path`` or the first of ``architectures``, when a string."""
    arch = config.get("architectures")
    for v in (config.get("_name_or_path"), arch[0] if isinstance(arch, list) and arch else None):
        if isinstance(v, str) and v:
            return v.encode("utf-8", "replace").decode("utf-8")[:200]
    return None


def _band(v: np.ndarray, r0: int, r1: int, transposed: bool) -> np.ndarray:
    """Rows [r0, r1) of `v` as a contiguous array. A transposed view (an even/odd take then transposed included) is
    copied by the runtime's cache-blocked C routine into an array of its own (NumPy, striding across the whole
    source, runs at about 1 GB/s); any other goes through np.ascontiguousarray (a view when already contiguous)."""
    if not transposed or v.ndim != 2:
        return np.ascontiguousarray(v[r0:r1])
    return strided_copy(v[r0:r1])


def _slice_desc(part: Part, ndim: int, half: int) -> str:
    if not part.take:
        return ".T" if part.transpose else ""
    idx = {"first": f":{half}", "second": f"{half}:", "even": "0::2", "odd": "1::2"}[part.take]
    s = f"[{idx}]" if part.take_axis == 0 else f"[:, {idx}]"
    return s + (".T" if part.transpose else "")


def repack_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """HF MXFP4 rows (``blocks [rows, nblk, 16]``: byte i holds elements 2i (low) and 2i+1 (high);
    ``scales [rows, nblk]`` E8M0) -> ggml MXFP4 ``[rows, nblk * 17]``: scale byte, then 16 bytes where byte j holds
    elements j (low nibble) and j+16 (high). The codes and the exponent are the same in both: a pure reshuffle,
    as llama.cpp's converter does (``transform_nibble_layout``)."""
    rows, nblk, _ = blocks.shape
    codes = np.empty((rows, nblk, 32), np.uint8)
    codes[..., 0::2] = blocks & 0x0F
    codes[..., 1::2] = blocks >> 4
    out = np.empty((rows, nblk, 17), np.uint8)
    out[..., 0] = scales
    out[..., 1:] = codes[..., :16] | (codes[..., 16:] << 4)
    return out.reshape(rows, nblk * 17)


def _read_json(p: Path, what: str, unique: bool = False) -> dict[str, Any]:
    """A JSON object file of at most 64 MiB. `unique`: a key given twice is refused (the index: which shard holds
    a tensor must not depend on the reader); config.json keeps Python's last-wins, as transformers reads it.
    Opened as the runtime opens untrusted files (non-blocking, then fstat on the descriptor: a FIFO swapped in after
    a check on the name cannot block the open) and read to the size fstat gave, so a growing file cannot exhaust
    memory; symlinks are followed (Hugging Face's cache links every file of a snapshot to its blob)."""
    raw = read_regular(p, 64 << 20, error=SourceError, hint=f"{what}: put the downloaded file there")
    return json_object(raw, str(p), what, unique)


def json_object(raw: bytes, where: str, what: str, unique: bool = False) -> dict[str, Any]:
    """The JSON object in `raw` (config.json or the index, local or from the hub: one loader, one set of checks).

    >>> json_object(b'{"model_type": "mixtral"}', "config.json", "config.json")
    {'model_type': 'mixtral'}
    """
    try:
        d = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys if unique else None)
    except _DuplicateKey as exc:
        raise SourceError(f"{where}: {what} holds the key {str(exc)[:200]} twice; it is corrupt: download it again") \
            from None
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, bad UTF-8, > 4300-digit integers
        raise SourceError(f"{where}: {what} is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(d, dict):
        raise SourceError(f"{where}: {what} is not a JSON object")
    return d


def check_index(index: dict[str, Any], headers: dict[str, tuple[int, dict[str, Any], int]], where: Path) -> None:
    """Every tensor the index maps to a shard is in that shard's header (a stale index must not pass)."""
    for name, fname in index["weight_map"].items():
        if name not in headers.get(fname, (0, {}, 0))[1]:
            raise SourceError(f"{where}: maps tensor {name!r} to {fname}, whose header does not hold it; the index "
                              "and the shards are from different saves: download them again")


def _index_files(index: dict[str, Any], where: Path) -> list[str]:
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()) or not wm:
        raise SourceError(f"{where}: has no weight_map of tensor -> file; the index is corrupt")
    names = sorted(set(wm.values()))
    for n in names:
        if "/" in n or "\\" in n or n.startswith(".") or not n.endswith(".safetensors") or len(n) > 255 \
                or any(ord(c) < 32 or 0xD800 <= ord(c) < 0xE000 for c in n):
            raise SourceError(f"{where}: names shard {n[:300]!r}, which is not a plain .safetensors file name beside "
                              "it; the index is corrupt (or hostile): download it again")
    return names
