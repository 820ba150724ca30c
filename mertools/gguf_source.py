"""Read a GGUF model (one file or a ``-0000N-of-0000M`` split set) and find where every expert's bytes live.

Parsing is the ``gguf`` package's; this module only adds bounds and type checks that name the tensor, the
detection of the three expert layouts, and the arithmetic that locates expert ``e`` inside a merged tensor.
Nothing here reads tensor bytes: the result is a plan of (file, offset, length) ranges.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from mer_runtime.manifest import ROLES

from .errors import NotMoEError, SourceError

SPLIT_RE = re.compile(r"^(?P<base>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# Merged 3-D experts (ne = [in, out, E]); `gate_up` is the fused form, gate rows first.
MERGED_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate_up|gate|up|down)_exps\.(weight|bias)$")
# The pre-April-2024 naming: one 2-D tensor per expert, expert index last.
PER_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.(weight|bias)$")
SHARED_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_shexp\.weight$")
DENSE_FFN_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.weight$")

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


@dataclass(frozen=True)
class Projection:
    role: str  # gate, up, down, gate_bias, up_bias, down_bias
    dtype: str
    shape: tuple[int, ...]  # [out, in] for weights (nn.Linear orientation), [n] for biases
    file_index: int
    offset: int  # absolute offset in the source file
    nbytes: int
    tensor: str  # human-readable origin, e.g. "blk.0.ffn_gate_exps.weight[3]"


@dataclass
class ExpertPlan:
    layer: int
    expert: int
    projections: list[Projection]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.projections)


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that refuses, naming the tensor, what it would otherwise turn into an opaque numpy error."""

    def __init__(self, path: Path):
        self._mt_path = path
        super().__init__(path, "r")

    def _build_tensors(self, start_offs: int, fields: list) -> None:  # type: ignore[override]
        size = len(self.data)
        for f in fields:
            _nl, name_data, _nd, dims, raw_dtype, offset = f.parts
            name = bytes(name_data).decode("utf-8", "replace")
            tid = int(raw_dtype[0])
            try:
                qt = GGMLQuantizationType(tid)
            except ValueError:
                raise SourceError(
                    f"{self._mt_path}: tensor {name!r} has type id {tid}, which gguf {_gguf_version()} does not know; "
                    "upgrade the gguf package (pip install -U gguf) or re-quantize the model to a known type"
                ) from None
            block, tsize = GGML_QUANT_SIZES[qt]
            ne = [int(d) for d in dims]
            if ne and ne[0] % block:
                raise SourceError(
                    f"{self._mt_path}: tensor {name!r} is {qt.name} with rows of {ne[0]} elements, not a multiple "
                    f"of its block size {block}; the file is corrupt"
                )
            nbytes = math.prod(ne) // block * tsize
            start = start_offs + int(offset[0])
            if start + nbytes > size:
                raise SourceError(
                    f"{self._mt_path}: tensor {name!r} ({qt.name}, {nbytes} bytes at offset {start}) runs past the end "
                    f"of the file ({size} bytes); the file is truncated: download or copy it again"
                )
        super()._build_tensors(start_offs, fields)


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "?"


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
        raise SourceError(f"{path}: no such file")
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


class GGUFSource:
    """An opened GGUF model: its parts, metadata, tensors, detected expert layout and the expert plan."""

    kind = "gguf"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.files = split_parts(self.path)
        self.readers = [_open_reader(p) for p in self.files]
        self.sizes = [p.stat().st_size for p in self.files]
        self.fields = self.readers[0].fields
        self._check_split_set()
        self.tensors: dict[str, SourceTensor] = {}
        self.tensor_order: list[str] = []
        for i, r in enumerate(self.readers):
            for t in r.tensors:
                if t.name in self.tensors:
                    raise SourceError(f"{self.files[i]}: tensor {t.name!r} appears in two parts of the split set")
                ne = tuple(int(d) for d in t.shape)
                self.tensors[t.name] = SourceTensor(
                    t.name, i, t.tensor_type.name, ne, int(t.data_offset), int(t.n_bytes), t
                )
                self.tensor_order.append(t.name)
        self.arch = str(self.kv("general.architecture") or "unknown")
        self.experts, self.layouts, self.expert_tensor_names = self._plan()
        self.model = self._model_info()

    # -- metadata -----------------------------------------------------------------------------------------
    def kv(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else field_value(f)

    def arch_kv(self, suffix: str, default: Any = None) -> Any:
        return self.kv(f"{self.arch}.{suffix}", default)

    def _check_split_set(self) -> None:
        if len(self.files) == 1:
            return
        for i, r in enumerate(self.readers):
            f = r.fields.get("split.count")
            if f is not None and int(field_value(f)) != len(self.files):
                raise SourceError(
                    f"{self.files[i]}: says split.count={field_value(f)} but the set has {len(self.files)} parts"
                )

    # -- layout detection ---------------------------------------------------------------------------------
    def _plan(self) -> tuple[list[ExpertPlan], list[str], set[str]]:
        merged: dict[int, dict[tuple[str, str], SourceTensor]] = {}
        per_expert: dict[int, dict[tuple[str, str], dict[int, SourceTensor]]] = {}
        for name in self.tensor_order:
            t = self.tensors[name]
            if m := MERGED_RE.match(name):
                merged.setdefault(int(m[1]), {})[(m[2], m[3])] = t
            elif m := PER_EXPERT_RE.match(name):
                per_expert.setdefault(int(m[1]), {}).setdefault((m[2], m[4]), {})[int(m[3])] = t
        if not merged and not per_expert:
            raise NotMoEError(
                f"{self.path}: no routed-expert tensors (blk.N.ffn_*_exps or blk.N.ffn_*.E); architecture "
                f"{self.arch!r} is not a Mixture-of-Experts model, so there is nothing to extract"
            )
        plans: list[ExpertPlan] = []
        layouts: set[str] = set()
        names: set[str] = set()
        for layer in sorted(set(merged) | set(per_expert)):
            if layer in merged and layer in per_expert:
                raise SourceError(f"{self.path}: layer {layer} has both merged *_exps and per-expert tensors")
            if layer in merged:
                lp, lay = self._plan_merged(layer, merged[layer])
                names.update(t.name for t in merged[layer].values())
            else:
                lp, lay = self._plan_per_expert(layer, per_expert[layer])
                names.update(t.name for d in per_expert[layer].values() for t in d.values())
            layouts.add(lay)
            plans.extend(lp)
        n_experts = {len([p for p in plans if p.layer == layer]) for layer in {p.layer for p in plans}}
        kv_e = self.arch_kv("expert_count")
        if kv_e is not None and n_experts != {int(kv_e)}:
            raise SourceError(
                f"{self.path}: {self.arch}.expert_count is {kv_e} but the tensors hold {sorted(n_experts)} experts "
                "per layer; the file is inconsistent"
            )
        return plans, sorted(layouts), names

    def _err(self, t: SourceTensor, msg: str) -> SourceError:
        return SourceError(f"{self.files[t.file_index]}: tensor {t.name!r} {msg}")

    def _plan_merged(self, layer: int, ts: dict[tuple[str, str], SourceTensor]) -> tuple[list[ExpertPlan], str]:
        fused = ("gate_up", "weight") in ts
        if fused and (("gate", "weight") in ts or ("up", "weight") in ts):
            raise SourceError(f"{self.path}: layer {layer} has both ffn_gate_up_exps and separate gate/up experts")
        need = [("gate_up", "weight"), ("down", "weight")] if fused else [(r, "weight") for r in ("gate", "up", "down")]
        missing = [f"blk.{layer}.ffn_{r}_exps.weight" for r, k in need if (r, k) not in ts]
        if missing:
            raise SourceError(f"{self.path}: layer {layer} lacks {', '.join(missing)}; the expert set is incomplete")
        counts = set()
        for t in ts.values():
            want = 3 if t.name.endswith(".weight") else 2
            if len(t.ne) != want:
                raise self._err(t, f"has {len(t.ne)} dimensions {list(t.ne)}, expected {want} (the last is experts)")
            counts.add(t.ne[-1])
        if len(counts) != 1:
            raise SourceError(f"{self.path}: layer {layer}: expert tensors disagree on the expert count {sorted(counts)}")
        (n_exp,) = counts

        def split(t: SourceTensor, e: int, halves: int = 1) -> list[tuple[int, int, tuple[int, ...]]]:
            per = t.nbytes // n_exp
            if per * n_exp != t.nbytes or per % halves:
                raise self._err(t, "cannot be cut into equal expert slices")
            shape = tuple(reversed(t.ne[:-1]))
            if halves == 2:
                if shape[0] % 2:
                    raise self._err(t, f"has an odd fused dimension {shape[0]}")
                shape = (shape[0] // 2, *shape[1:])
            part = per // halves
            return [(t.offset + e * per + h * part, part, shape) for h in range(halves)]

        plans = []
        for e in range(n_exp):
            projs: list[Projection] = []
            for kind, suffix in (("weight", ""), ("bias", "_bias")):
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
        self._check_shapes(layer, plans)
        return plans, "fused" if fused else "merged"

    def _plan_per_expert(
        self, layer: int, ts: dict[tuple[str, str], dict[int, SourceTensor]]
    ) -> tuple[list[ExpertPlan], str]:
        ids = {key: set(d) for key, d in ts.items()}
        weights = [(r, "weight") for r in ("gate", "up", "down")]
        missing = [f"blk.{layer}.ffn_{r}.E.weight" for r, k in weights if (r, k) not in ts]
        if missing:
            raise SourceError(f"{self.path}: layer {layer} lacks {', '.join(missing)}; the expert set is incomplete")
        all_ids = set().union(*ids.values())
        n_exp = max(all_ids) + 1
        for (role, kind), got in ids.items():
            if got != set(range(n_exp)):
                lost = sorted(set(range(n_exp)) - got)
                raise SourceError(
                    f"{self.path}: layer {layer}: blk.{layer}.ffn_{role}.E.{kind} is missing for experts {lost}"
                )
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
        self._check_shapes(layer, plans)
        return plans, "per_expert"

    def _check_shapes(self, layer: int, plans: list[ExpertPlan]) -> None:
        for p in plans:
            s = {q.role: q.shape for q in p.projections}
            f_, h = s["gate"]
            ok = s["up"] == (f_, h) and s["down"] == (h, f_)
            ok = ok and s.get("gate_bias", (f_,)) == (f_,) and s.get("up_bias", (f_,)) == (f_,)
            ok = ok and s.get("down_bias", (h,)) == (h,)
            if not ok:
                shapes = ", ".join(f"{r} {list(v)}" for r, v in s.items())
                raise SourceError(
                    f"{self.path}: layer {layer} expert {p.expert}: projection shapes do not fit a gated FFN ({shapes}); "
                    "expected gate/up [d_ff, d_model] and down [d_model, d_ff]"
                )

    # -- model summary ------------------------------------------------------------------------------------
    def _model_info(self) -> dict[str, Any]:
        moe_layers = sorted({p.layer for p in self.experts})
        first = self.experts[0]
        shapes = {q.role: q.shape for q in first.projections}
        d_ff, d_model = shapes["gate"]
        n_exp = len([p for p in self.experts if p.layer == first.layer])
        d_ffs = {next(q.shape[0] for q in p.projections if q.role == "gate") for p in self.experts}
        emb = self.arch_kv("embedding_length")
        if emb is not None and int(emb) != d_model:
            raise SourceError(f"{self.path}: {self.arch}.embedding_length={emb} but the experts take {d_model} inputs")
        info: dict[str, Any] = {
            "architecture": self.arch,
            "name": self.kv("general.name"),
            "n_layers": int(self.arch_kv("block_count", max(moe_layers) + 1)),
            "n_experts": n_exp,
            "n_experts_used": int(self.arch_kv("expert_used_count", 0)),
            "d_model": d_model,
            "d_ff": d_ff if len(d_ffs) == 1 else max(d_ffs),
            "moe_layers": moe_layers,
            "has_expert_biases": any(q.role.endswith("_bias") for q in first.projections),
            "activation": ACTIVATIONS.get(self.arch, DEFAULT_ACTIVATION),
        }
        shexp = {int(m[1]) for n in self.tensors if (m := SHARED_RE.match(n))}
        if shexp:
            info["n_shared_experts"] = int(self.arch_kv("expert_shared_count", 1))
            t = self.tensors.get(f"blk.{min(shexp)}.ffn_gate_shexp.weight")
            info["d_ff_shared"] = int(self.arch_kv("expert_shared_feed_forward_length", t.ne[1] if t else 0))
        dense_layers = sorted({int(m[1]) for n in self.tensors if (m := DENSE_FFN_RE.match(n))} - set(moe_layers))
        lead = self.arch_kv("leading_dense_block_count")
        if lead is not None or dense_layers:
            info["n_dense_layers"] = int(lead) if lead is not None else len(dense_layers)
        for key in ("expert_gating_func", "expert_weights_norm", "expert_weights_scale"):
            v = self.arch_kv(key)
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
            "gguf_package": _gguf_version(),
        }

    def dense_tensors(self) -> list[SourceTensor]:
        return [self.tensors[n] for n in self.tensor_order if n not in self.expert_tensor_names]


def _ordered(projs: list[Projection]) -> list[Projection]:
    return sorted(projs, key=lambda p: ROLES.index(p.role))


def open_source(path: str | os.PathLike[str]) -> GGUFSource:
    p = Path(path)
    if p.is_dir():
        raise SourceError(
            f"{p}: is a folder; give a .gguf file (the first part of a split set). SafeTensors folders are not "
            "supported by this version"
        )
    if not p.exists():
        raise SourceError(f"{p}: no such file")
    return GGUFSource(p)
