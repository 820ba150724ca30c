"""Read a GGUF model (one file or a ``-0000N-of-0000M`` split set) and find where every expert's bytes live.

Parsing is the ``gguf`` package's, after a bounded walk of the header (``gguf_header``) has accepted it; this module
adds the type checks of the metadata it uses (one typed accessor, ``kv``), the detection of the three expert
layouts, the refusal of expert tensors it does not know how to carry, and the arithmetic that locates expert
``e`` inside a merged tensor. Nothing here reads tensor bytes: the result is a plan of (file, offset, length) ranges.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf.constants import GGUFValueType

from mer_runtime.guard import guard_array, guard_mapping
from mer_runtime.manifest import ROLES

from .errors import NotMoEError, SourceError
from .gguf_header import gguf_version, scan_header, show
from .sources.plan import ExpertPlan, Projection, check_gated_shapes  # one plan type for every source

SPLIT_RE = re.compile(r"^(?P<base>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# Merged 3-D experts (ne = [in, out, E]); `gate_up` is the fused form, gate rows first. `.scale` is a per-expert
# float multiplying the projection's output (llama.cpp's ffn_*_exps_s, NVFP4's second-level scale), shape [E].
MERGED_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate_up|gate|up|down)_exps\.(weight|bias|scale)$")
# The pre-April-2024 naming: one 2-D tensor per expert, expert index last.
PER_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.(weight|bias)$")
# Anything named like a routed expert. What matches this and not the two above is refused, never sent to dense.gguf.
EXPERT_LIKE_RE = re.compile(r"^blk\.[^.]*\.ffn_[^.]*exps(\.|$)|^blk\.[^.]*\.ffn_[^.]+\.\d+(\.|$)")
SHARED_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_shexp\.weight$")
DENSE_FFN_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.weight$")

MAX_LAYERS = 1 << 16  # block numbers and block_count
MAX_EXPERTS = 1 << 16  # experts per layer (the largest models today: 512)
MAX_WIDTH = 1 << 24  # d_model / d_ff and other widths read from metadata
SCALE_TYPES = ("F32", "F16", "BF16")  # what a per-expert scale may be stored as (gguf dequantizes them all)
_INT_TYPES = {
    GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16, GGUFValueType.UINT32,
    GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
}
_FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}

# Experts whose FFN is not plain SwiGLU; the runtime needs to know. Values from each model's reference code.
ACTIVATIONS: dict[str, dict[str, Any]] = {
    "gpt-oss": {"kind": "swiglu_oai", "alpha": 1.702, "limit": 7.0},
}
DEFAULT_ACTIVATION = {"kind": "swiglu"}


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file_index: int
    dtype: str  # gguf type name, e.g. "Q4_K"
    ne: tuple[int, ...]  # ggml order: ne[0] is the contiguous (input) dimension
    offset: int  # absolute byte offset in its file
    nbytes: int
    reader_tensor: Any = field(repr=False, compare=False)


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that only parses a header our bounded walk (gguf_header.scan_header) has already accepted.

    The walk refuses, naming the file and the field or tensor, every count that runs past the end of the file or
    past a sane limit, nesting too deep, tensor types the gguf package does not know, zero-sized dimensions, and
    tensor data that leaves the file, breaks the alignment or overlaps another tensor; so the reader's own loops,
    recursion and NumPy products below stay within what the file holds.
    """

    def __init__(self, path: Path):
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m:
            g = guard_mapping(m, len(m), path)  # a file shrinking under the walk: a clear error, not SIGBUS
            try:
                self.header = scan_header(path, m)
                g.check()
            finally:
                g.close()
        super().__init__(path, "r")
        # the reader's own mapping: dense.gguf is copied from it, and the reference's lookups address it.
        # (A file shrinking during the reader's parse above is not guarded: that parse reads only the header,
        # which the walk has just read, and the window is a few milliseconds.)
        self.guard = guard_array(self.data, int(self.data.nbytes), path)


def split_parts(path: Path) -> list[Path]:
    """All files of a split set given its first part; [path] for a single file."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    no, count = int(m["no"]), int(m["count"])
    if no != 1:
        first = path.with_name(f"{m['base']}-00001-of-{m['count']}.gguf")
        raise SourceError(f"{path}: this is part {no} of a {count}-part split set; give the first part instead: {first}")
    parts = [path.with_name(f"{m['base']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise SourceError(
            f"{path}: split set of {count} parts, but {', '.join(missing)} missing; put every part beside the first"
        )
    return parts


def _open_reader(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        what = "not a regular file (a FIFO, device or socket)" if path.exists() else "no such file"
        raise SourceError(f"{path}: {what}")
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: the file is empty")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise SourceError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return _CheckedReader(path)
    except SourceError:
        raise
    except OSError as exc:
        raise SourceError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (ValueError, IndexError, OverflowError, TypeError, UnicodeDecodeError, KeyError) as exc:
        raise SourceError(
            f"{path}: the GGUF header cannot be read: the file ({path.stat().st_size} bytes) is truncated or corrupt "
            f"inside its metadata; download it again (detail: {exc})"
        ) from None


def field_value(f: Any, raw_strings: bool = False) -> Any:
    """A KV field's value as Python data; strings decoded leniently, or kept as their exact bytes."""
    def text(part: Any) -> str | bytes:
        b = bytes(part)
        return b if raw_strings else b.decode("utf-8", "replace")

    main = f.types[0]
    if main == GGUFValueType.ARRAY:
        if f.types[-1] == GGUFValueType.STRING:
            return [text(f.parts[i]) for i in f.data]
        return [v for i in f.data for v in f.parts[i].tolist()]
    if main == GGUFValueType.STRING:
        return text(f.parts[-1])
    return f.parts[-1].tolist()[0]


def _digits(path: Path, name: str, text: str, what: str, limit: int) -> int:
    """A layer or expert number from a tensor name, refused (not parsed) when it is absurd."""
    if len(text) > 9 or int(text) >= limit:
        raise SourceError(f"{path}: tensor {show(name)} has {what} number {show(text, 24)}, out of range (limit {limit})")
    return int(text)


class GGUFSource:
    """An opened GGUF model: its parts, metadata, tensors, detected expert layout and the expert plan."""

    kind = "gguf"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.files = split_parts(self.path)
        self.readers = [_open_reader(p) for p in self.files]
        self.sizes = [p.stat().st_size for p in self.files]
        self.fields = self.readers[0].fields
        self.alignment = self.readers[0].header.alignment
        self._check_split_set()
        self.tensors: dict[str, SourceTensor] = {}
        self.tensor_order: list[str] = []
        for i, r in enumerate(self.readers):
            for t in r.tensors:
                if t.name in self.tensors:
                    raise SourceError(f"{self.files[i]}: tensor {show(t.name)} appears in two parts of the split set")
                ne = tuple(int(d) for d in t.shape)
                self.tensors[t.name] = SourceTensor(
                    t.name, i, t.tensor_type.name, ne, int(t.data_offset), int(t.n_bytes), t
                )
                self.tensor_order.append(t.name)
        self._check_split_counts()
        self.arch = self.kv("general.architecture", str, "unknown")
        self.experts, self.layouts, self.expert_tensor_names = self._plan()
        self.model = self._model_info()

    def close(self) -> None:
        """Unregister the readers' mapping guards while the mappings still exist (the memmaps themselves go with
        their last view; see mer_runtime.guard.Guard). The readers are not to be used afterwards."""
        for r in self.readers:
            r.guard.close()

    # -- metadata -----------------------------------------------------------------------------------------
    def kv(self, key: str, kind: type = object, default: Any = None, *, lo: float | None = None,
           hi: float | None = None) -> Any:
        """The value of metadata `key` checked to be of `kind` (int, float, bool, str; object: any) and in
        [lo, hi]; `default` when absent. The one place metadata is read, so a wrong type is always our error.

        >>> src.kv("llama.expert_count", int, lo=1)  # doctest: +SKIP
        8
        """
        f = self.fields.get(key)
        if f is None:
            return default
        main = f.types[0]
        ok = {
            int: main in _INT_TYPES,
            float: main in _INT_TYPES or main in _FLOAT_TYPES,
            bool: main == GGUFValueType.BOOL,
            str: main == GGUFValueType.STRING,
            object: True,
        }[kind]
        if not ok:
            raise SourceError(
                f"{self.files[0]}: metadata {show(key)} is a {main.name}, expected {kind.__name__}; the file is corrupt"
            )
        v = field_value(f)
        if kind is float:
            v = float(v)
            if not math.isfinite(v):
                raise SourceError(f"{self.files[0]}: metadata {show(key)} is {v}, expected a finite number")
        if kind is bool:
            v = bool(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise SourceError(
                f"{self.files[0]}: metadata {show(key)} is {v}, outside {lo}..{hi}; the file is corrupt"
            )
        return v

    def arch_kv(self, suffix: str, kind: type = object, default: Any = None, **bounds: Any) -> Any:
        return self.kv(f"{self.arch}.{suffix}", kind, default, **bounds)

    def _split_field(self, i: int, key: str) -> int | None:
        f = self.readers[i].fields.get(key)
        if f is None:
            return None
        if f.types[0] not in _INT_TYPES:
            raise SourceError(f"{self.files[i]}: metadata {key} is a {f.types[0].name}, expected an integer")
        return int(field_value(f))

    def _check_split_set(self) -> None:
        if len(self.files) == 1:
            return
        for i in range(len(self.files)):
            n = self._split_field(i, "split.count")
            if n is not None and n != len(self.files):
                raise SourceError(f"{self.files[i]}: says split.count={n} but the set has {len(self.files)} parts")
            no = self._split_field(i, "split.no")  # 0-based; llama.cpp refuses a part whose number is not its own
            if no is not None and no != i:
                raise SourceError(f"{self.files[i]}: says split.no={no} (part {no + 1} of the set) but is named as "
                                  f"part {i + 1}; parts were renamed or come from different sets: give each part "
                                  "its own name, or download the set again")

    def _check_split_counts(self) -> None:
        """Every part's split.tensors.count is the number of tensors of the whole set (as llama.cpp checks): a part
        from another conversion must not make a dense.gguf without the tensors it lacks."""
        if len(self.files) == 1:
            return
        for i in range(len(self.files)):
            n = self._split_field(i, "split.tensors.count")
            if n is not None and n != len(self.tensors):
                raise SourceError(f"{self.files[i]}: says split.tensors.count={n} but the parts of the set hold "
                                  f"{len(self.tensors)} tensors; a part is from another conversion or damaged: "
                                  "download the whole set again")

    # -- layout detection ---------------------------------------------------------------------------------
    def _plan(self) -> tuple[list[ExpertPlan], list[str], set[str]]:
        merged: dict[int, dict[tuple[str, str], SourceTensor]] = {}
        per_expert: dict[int, dict[tuple[str, str], dict[int, SourceTensor]]] = {}
        for name in self.tensor_order:
            t = self.tensors[name]
            if m := MERGED_RE.match(name):
                layer = _digits(self.path, name, m[1], "block", MAX_LAYERS)
                if m[3] == "scale" and m[2] == "gate_up":
                    raise self._unknown(t, "a scale of the fused gate_up experts")
                merged.setdefault(layer, {})[(m[2], m[3])] = t
            elif m := PER_EXPERT_RE.match(name):
                layer = _digits(self.path, name, m[1], "block", MAX_LAYERS)
                e = _digits(self.path, name, m[3], "expert", MAX_EXPERTS)
                per_expert.setdefault(layer, {}).setdefault((m[2], m[4]), {})[e] = t
            elif EXPERT_LIKE_RE.match(name):
                raise self._unknown(t, "named like a routed-expert tensor")
        if not merged and not per_expert:
            raise NotMoEError(
                f"{self.path}: no routed-expert tensors (blk.N.ffn_*_exps or blk.N.ffn_*.E); architecture "
                f"{show(self.arch)} is not a Mixture-of-Experts model, so there is nothing to extract"
            )
        kv_e = self.arch_kv("expert_count", int, None, lo=1, hi=MAX_EXPERTS)
        blocks = self.arch_kv("block_count", int, None, lo=1, hi=MAX_LAYERS)
        plans: list[ExpertPlan] = []
        layouts: set[str] = set()
        names: set[str] = set()
        for layer in sorted(set(merged) | set(per_expert)):
            if blocks is not None and layer >= blocks:
                raise SourceError(
                    f"{self.path}: expert tensors of block {layer}, but {self.arch}.block_count is {blocks}; "
                    "the file is inconsistent"
                )
            if layer in merged and layer in per_expert:
                raise SourceError(f"{self.path}: layer {layer} has both merged *_exps and per-expert tensors")
            if layer in merged:
                lp, lay = self._plan_merged(layer, merged[layer], kv_e)
                names.update(t.name for t in merged[layer].values())
            else:
                lp, lay = self._plan_per_expert(layer, per_expert[layer], kv_e)
                names.update(t.name for d in per_expert[layer].values() for t in d.values())
            layouts.add(lay)
            plans.extend(lp)
        return plans, sorted(layouts), names

    def _err(self, t: SourceTensor, msg: str) -> SourceError:
        return SourceError(f"{self.files[t.file_index]}: tensor {show(t.name)} {msg}")

    def _unknown(self, t: SourceTensor, why: str) -> SourceError:
        return self._err(
            t, f"is {why} that mertools does not know how to carry (it knows blk.N.ffn_{{gate,up,down,gate_up}}"
               "_exps.{weight,bias}, ffn_{gate,up,down}_exps.scale and blk.N.ffn_{gate,up,down}.E.{weight,bias}); "
               "refusing rather than lose it: extracting this model needs a newer mertools"
        )

    def _expert_count(self, layer: int, n: int, kv_e: int | None, t: SourceTensor) -> None:
        if kv_e is not None and n != kv_e:
            raise SourceError(
                f"{self.path}: {self.arch}.expert_count is {kv_e} but tensor {show(t.name)} holds {n} experts "
                f"(layer {layer}); the file is inconsistent"
            )
        if n > MAX_EXPERTS:
            raise self._err(t, f"holds {n} experts, more than the {MAX_EXPERTS} this reader accepts")

    def _plan_merged(self, layer: int, ts: dict[tuple[str, str], SourceTensor],
                     kv_e: int | None) -> tuple[list[ExpertPlan], str]:
        fused = ("gate_up", "weight") in ts
        if fused and (("gate", "weight") in ts or ("up", "weight") in ts):
            raise SourceError(f"{self.path}: layer {layer} has both ffn_gate_up_exps and separate gate/up experts")
        need = [("gate_up", "weight"), ("down", "weight")] if fused else [(r, "weight") for r in ("gate", "up", "down")]
        missing = [f"blk.{layer}.ffn_{r}_exps.weight" for r, k in need if (r, k) not in ts]
        if missing:
            raise SourceError(f"{self.path}: layer {layer} lacks {', '.join(missing)}; the expert set is incomplete")
        counts = set()
        for (_role, kind), t in ts.items():
            want = {"weight": 3, "bias": 2, "scale": 1}[kind]
            if len(t.ne) != want:
                raise self._err(t, f"has {len(t.ne)} dimensions {list(t.ne)}, expected {want} (the last is experts)")
            if kind == "scale" and t.dtype not in SCALE_TYPES:
                raise self._err(t, f"is a per-expert scale of type {t.dtype}; only {', '.join(SCALE_TYPES)} are known")
            counts.add(t.ne[-1])
        if len(counts) != 1:
            raise SourceError(f"{self.path}: layer {layer}: expert tensors disagree on the expert count {sorted(counts)}")
        (n_exp,) = counts
        self._expert_count(layer, n_exp, kv_e, ts[need[0]])

        def split(t: SourceTensor, e: int, halves: int = 1) -> list[tuple[int, int, tuple[int, ...]]]:
            per = t.nbytes // n_exp
            if per * n_exp != t.nbytes or per % halves:
                raise self._err(t, "cannot be cut into equal expert slices")
            shape = tuple(reversed(t.ne[:-1])) or (1,)
            if halves == 2:
                if shape[0] % 2:
                    raise self._err(t, f"has an odd fused dimension {shape[0]}")
                shape = (shape[0] // 2, *shape[1:])
            part = per // halves
            return [(t.offset + e * per + h * part, part, shape) for h in range(halves)]

        plans = []
        for e in range(n_exp):
            projs: list[Projection] = []
            for kind, suffix in (("weight", ""), ("bias", "_bias"), ("scale", "_scale")):
                if fused and ("gate_up", kind) in ts:
                    t = ts[("gate_up", kind)]
                    for role, (off, nb, shape) in zip(("gate", "up"), split(t, e, 2)):
                        projs.append(Projection(role + suffix, t.dtype, shape, t.file_index, off, nb, f"{t.name}[{e}]"))
                for role in ("gate", "up", "down"):
                    if (role, kind) in ts:
                        t = ts[(role, kind)]
                        ((off, nb, shape),) = split(t, e)
                        projs.append(Projection(role + suffix, t.dtype, shape, t.file_index, off, nb, f"{t.name}[{e}]"))
            plans.append(ExpertPlan(layer, e, _ordered(projs)))
            if e == 0:
                check_gated_shapes(self.path, layer, plans)  # every expert of a merged tensor has the same shapes
        return plans, "fused" if fused else "merged"

    def _plan_per_expert(
        self, layer: int, ts: dict[tuple[str, str], dict[int, SourceTensor]], kv_e: int | None
    ) -> tuple[list[ExpertPlan], str]:
        weights = [(r, "weight") for r in ("gate", "up", "down")]
        missing = [f"blk.{layer}.ffn_{r}.E.weight" for r, k in weights if (r, k) not in ts]
        if missing:
            raise SourceError(f"{self.path}: layer {layer} lacks {', '.join(missing)}; the expert set is incomplete")
        # Expert numbers must be exactly 0..n-1 for every projection; compared by count, so a huge number in a
        # name never becomes a huge range.
        n_exp = max(len(d) for d in ts.values())
        for (role, kind), d in ts.items():
            if len(d) != n_exp or max(d) != n_exp - 1:
                lost = [e for e in range(min(max(d) + 1, n_exp + 64)) if e not in d][:8]  # bounded by the count
                raise SourceError(
                    f"{self.path}: layer {layer}: blk.{layer}.ffn_{role}.E.{kind} is missing for experts {lost} "
                    f"(found {len(d)} of them, numbered up to {max(d)})"
                )
        self._expert_count(layer, n_exp, kv_e, ts[("gate", "weight")][0])
        plans = []
        for e in range(n_exp):
            projs = []
            for (role, kind), d in ts.items():
                t = d[e]
                if len(t.ne) != (2 if kind == "weight" else 1):
                    raise self._err(t, f"has shape {list(t.ne)}, expected a {'matrix' if kind == 'weight' else 'vector'}")
                r = role if kind == "weight" else role + "_bias"
                projs.append(
                    Projection(r, t.dtype, tuple(reversed(t.ne)), t.file_index, t.offset, t.nbytes, t.name)
                )
            plans.append(ExpertPlan(layer, e, _ordered(projs)))
        check_gated_shapes(self.path, layer, plans)
        return plans, "per_expert"

    # -- model summary ------------------------------------------------------------------------------------
    def _model_info(self) -> dict[str, Any]:
        moe_layers = sorted({p.layer for p in self.experts})
        first = self.experts[0]
        shapes = {q.role: q.shape for q in first.projections}
        d_ff, d_model = shapes["gate"]
        per_layer: dict[int, int] = {}
        for p in self.experts:
            per_layer[p.layer] = per_layer.get(p.layer, 0) + 1
        if len(set(per_layer.values())) != 1:
            raise SourceError(
                f"{self.path}: layers hold different numbers of experts ({sorted(set(per_layer.values()))}); "
                "the file is inconsistent"
            )
        n_exp = per_layer[first.layer]
        d_ffs = {next(q.shape[0] for q in p.projections if q.role == "gate") for p in self.experts}
        emb = self.arch_kv("embedding_length", int, None, lo=1, hi=MAX_WIDTH)
        if emb is not None and emb != d_model:
            raise SourceError(f"{self.path}: {self.arch}.embedding_length={emb} but the experts take {d_model} inputs")
        info: dict[str, Any] = {
            "architecture": self.arch,
            "name": self.kv("general.name", str),
            "n_layers": self.arch_kv("block_count", int, max(moe_layers) + 1, lo=1, hi=MAX_LAYERS),
            "n_experts": n_exp,
            "n_experts_used": self.arch_kv("expert_used_count", int, 0, lo=0, hi=n_exp),
            "d_model": d_model,
            "d_ff": d_ff if len(d_ffs) == 1 else max(d_ffs),
            "moe_layers": moe_layers,
            "has_expert_biases": any(q.role.endswith("_bias") for q in first.projections),
            "activation": ACTIVATIONS.get(self.arch, DEFAULT_ACTIVATION),
        }
        # llama.cpp counts DeepSeek-V3's / GLM-4.5's NextN (MTP) layers in block_count, after the decoder's: the
        # manifest's rule for n_mtp_layers too (docs/format.md), so inspect and the router templates agree
        nextn = self.arch_kv("nextn_predict_layers", int, None, lo=0, hi=info["n_layers"] - 1)
        if nextn:
            info["n_mtp_layers"] = nextn
        shexp = {int(m[1]) for n in self.tensors if (m := SHARED_RE.match(n)) and len(m[1]) <= 9}
        if shexp:
            info["n_shared_experts"] = self.arch_kv("expert_shared_count", int, 1, lo=0, hi=MAX_EXPERTS)
            t = self.tensors.get(f"blk.{min(shexp)}.ffn_gate_shexp.weight")
            default = t.ne[1] if t and len(t.ne) > 1 else 0
            info["d_ff_shared"] = self.arch_kv("expert_shared_feed_forward_length", int, default, lo=0, hi=MAX_WIDTH)
        dense_layers = sorted(
            {int(m[1]) for n in self.tensors if (m := DENSE_FFN_RE.match(n)) and len(m[1]) <= 9} - set(moe_layers)
        )
        lead = self.arch_kv("leading_dense_block_count", int, None, lo=0, hi=MAX_LAYERS)
        if lead is not None or dense_layers:
            info["n_dense_layers"] = lead if lead is not None else len(dense_layers)
        for key, kind in (("expert_gating_func", int), ("expert_weights_norm", bool), ("expert_weights_scale", float)):
            v = self.arch_kv(key, kind)
            if v is not None:
                info[key] = v
        layer = moe_layers[0]
        router = {"weight": "blk.{layer}.ffn_gate_inp.weight"}
        if f"blk.{layer}.ffn_gate_inp.bias" in self.tensors:
            router["bias"] = "blk.{layer}.ffn_gate_inp.bias"
        for name in ("exp_probs_b.bias", "exp_probs_b"):
            if f"blk.{layer}.{name}" in self.tensors:
                router["selection_bias"] = "blk.{layer}." + name
        info["router"] = router
        return info

    def source_info(self) -> dict[str, Any]:
        return {
            "format": "gguf",
            "files": [{"name": p.name, "size": s} for p, s in zip(self.files, self.sizes)],
            "layout": "+".join(self.layouts),
            "gguf_package": gguf_version(),
        }

    def dense_tensors(self) -> list[SourceTensor]:
        return [self.tensors[n] for n in self.tensor_order if n not in self.expert_tensor_names]


def _ordered(projs: list[Projection]) -> list[Projection]:
    return sorted(projs, key=lambda p: ROLES.index(p.role))


def open_source(path: str | os.PathLike[str]) -> GGUFSource:
    """Open a GGUF model (or the first part of a split set) and plan its experts; SourceError on bad input.

    >>> src = open_source("fixtures/real/mixtral-q4_0.gguf")  # doctest: +SKIP
    >>> src.model["n_experts"], src.layouts  # doctest: +SKIP
    (4, ['merged'])
    """
    p = Path(path)
    if p.is_dir():
        raise SourceError(
            f"{p}: is a folder; give a .gguf file (the first part of a split set). SafeTensors folders are not "
            "supported by this version"
        )
    if not p.exists():
        raise SourceError(f"{p}: no such file")
    return GGUFSource(p)
