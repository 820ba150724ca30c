"""``inspect``: what a model source (GGUF, SafeTensors folder) holds and what ``extract`` would write, or what a
shard folder holds."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from mer_runtime.kernels import kernel_for
from mer_runtime.manifest import MANIFEST_NAME, load_manifest

from .convert import plan
from .sources.plan import RUNTIME_TYPES
from .sources import open_source
from .units import human_bytes

_BLOCK = re.compile(r"^(.*?layers\.(\d+)\.|blk\.(\d+)\.)")  # SafeTensors, GGUF


def _mtp(model: dict[str, Any], tensor_names: dict[int, str]) -> dict[str, Any]:
    """The MTP layers: blocks num_hidden_layers + i (``n_mtp_layers``), each named as its source names it.

    Qwen-style (Qwen3-Next, Qwen3.5, Qwen3.6): a separate block ``mtp.layers.{i}.``; DeepSeek-style (DeepSeek-V3,
    GLM-4.5): decoder block ``model.layers.{num_hidden_layers + i}.``, in GGUF ``blk.{block_count - n + i}.`` with
    ``{arch}.nextn_predict_layers`` = n. `tensor_names`: an expert tensor's source
    name per block (absent for a folder whose manifest does not record sources).

    >>> _mtp({"n_layers": 3, "n_mtp_layers": 1, "moe_layers": [0, 1, 2]}, {2: "mtp.layers.0.mlp.experts.0.x"})
    {'n_layers': 1, 'layers': [2], 'style': 'qwen', 'prefixes': ['mtp.layers.0.']}
    """
    n = model.get("n_mtp_layers") or 0
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return {"n_layers": 0, "layers": []}
    first = model["n_layers"] - n
    blocks = [b for b in model.get("moe_layers", []) if b >= first]
    prefixes = []
    for b in blocks:
        m = _BLOCK.match(tensor_names.get(b, ""))
        prefixes.append(m.group(1) if m else None)
    if any(p and p.startswith("mtp.") for p in prefixes) or "mtp_weight" in (model.get("router") or {}):
        style = "qwen"
    elif any(prefixes):
        style = "deepseek"
    else:
        style = "unknown"
    return {"n_layers": n, "layers": blocks, "style": style, "prefixes": prefixes}


def _per_layer(rows: list[tuple[int, dict[str, str], int]]) -> list[dict[str, Any]]:
    layers: dict[int, dict[str, Any]] = {}
    for layer, types, nbytes in rows:
        d = layers.setdefault(layer, {"layer": layer, "experts": 0, "types": {}, "bytes_per_expert": set()})
        d["experts"] += 1
        for role, t in types.items():
            d["types"].setdefault(role, set()).add(t)
        d["bytes_per_expert"].add(nbytes)
    out = []
    for layer in sorted(layers):
        d = layers[layer]
        out.append({
            "layer": layer,
            "experts": d["experts"],
            "types": {r: "/".join(sorted(v)) for r, v in d["types"].items()},
            "bytes_per_expert": max(d["bytes_per_expert"]),
        })
    return out


def describe(path: str | os.PathLike[str], dtype: str | None = None) -> dict[str, Any]:
    """A summary of a shard folder or of a source (and what extract, with `dtype`, would write).

    >>> describe("mixtral-bf16-sharded/")["model"]["n_experts"]     # doctest: +SKIP
    4
    """
    if str(path).startswith("hf:/"):  # hf://org/repo[@rev]; a click Path has collapsed the "//"
        from .hub.inspect import describe_remote

        return describe_remote(str(path))
    p = Path(path)
    if p.is_dir() and (p / MANIFEST_NAME).exists():
        m = load_manifest(p)
        rows = [(e.layer, {r: t.dtype for r, t in e.tensors.items()}, e.size) for e in m.experts]
        dtypes = Counter(t.dtype for e in m.experts for t in e.tensors.values())
        names = {}
        for e in m.raw.get("experts", []):
            for t in (e.get("tensors") or {}).values():
                if isinstance(t, dict) and isinstance(t.get("source"), str):
                    names.setdefault(e.get("layer"), t["source"])
        return {
            "kind": "shards",
            "path": str(p),
            "format_version": m.format_version,
            "alignment": m.alignment,
            "model": m.model,
            "source": m.source,
            "experts": len(m.experts),
            "expert_bytes": sum(e.size for e in m.experts),
            "dense": m.dense,
            "companions": [{"path": c.path, "size": c.size} for c in m.companions],
            "layers": _per_layer(rows),
            "mtp": _mtp(m.model, names),
            "kernels": {t: kernel_for(t) for t in sorted(dtypes)},
        }
    src = open_source(p)
    try:
        return _describe_source(src, str(path), dtype)
    finally:
        src.close()


def _describe_source(src: Any, path: str, dtype: str | None = None) -> dict[str, Any]:
    """What `src` holds and what extract would write (any ``sources.Source``; the hub reuses it remotely)."""
    native = Counter(q.dtype for e in src.experts for q in e.projections)
    conv = plan(src, dtype=dtype) if dtype or set(native) <= RUNTIME_TYPES else None
    plans = conv.plans if conv else src.experts
    shards = conv.shards if conv else None
    rows = [(e.layer, {q.role: q.dtype for q in e.projections},
             shards[i].size if shards else e.nbytes) for i, e in enumerate(plans)]
    dtypes = Counter(q.dtype for e in plans for q in e.projections)
    dense = src.dense_tensors()
    transforms = Counter(f"{q.role}: {q.transform}" for e in plans for q in e.projections
                         if getattr(q, "transform", "none") != "none")
    d: dict[str, Any] = {
        "kind": src.kind,
        "path": path,
        "source": src.source_info(),
        "model": src.model,
        "experts": len(src.experts),
        "layers": _per_layer(rows),
        "mtp": _mtp(src.model, {e.layer: e.projections[0].tensor for e in reversed(src.experts) if e.projections}),
        "transforms": sorted(transforms),
        "kernels": {t: kernel_for(t) for t in sorted(dtypes)},
    }
    if conv is None:
        # a type --dtype can convert needs it; one it cannot (GGUF's integer types, F64, Q8_1, Q8_K, Q1_0) is not
        # extractable at all: saying "needs --dtype" of it sent the user to a refusal
        foreign = [q for e in src.experts for q in e.projections if q.dtype not in RUNTIME_TYPES]
        d["needs_dtype"] = sorted({q.dtype for q in foreign if q.decode is not None})
        d["not_extractable"] = sorted({q.dtype for q in foreign if q.decode is None})
    else:
        d["would_write"] = {
            "shards": len(conv.shards),
            "expert_bytes": conv.expert_bytes,
            "payload_bytes": conv.payload_bytes,
            "dtype": conv.dtype,
            "dense_tensors": len(dense),
            "dense_bytes": sum(t.nbytes for t in dense),
        }
    if src.kind == "safetensors" and Path(src.path).is_dir():  # a local folder: the companion files it would keep
        from .companions import local

        kept, skipped = local(Path(src.path))
        d["companions"] = [p.name for p in kept]
        d["companions_skipped"] = skipped
    return d


def render(d: dict[str, Any]) -> str:
    if "hub" in d and str(d["path"]).startswith("hf://"):
        from .hub.inspect import render_remote

        return render_remote(d, _render_local)
    return _render_local(d)


def _render_local(d: dict[str, Any]) -> str:
    m = d["model"]
    what = {"shards": "shard folder", "gguf": "GGUF model", "safetensors": "SafeTensors checkpoint"}
    lines = [f"{d['path']}  ({what.get(d['kind'], d['kind'])})"]
    if d["kind"] != "shards":
        s = d["source"]
        files = [f["name"] for f in s["files"]]
        shown = ", ".join(files[:4]) + (f", ... ({len(files)} files)" if len(files) > 4 else "")
        lines.append(f"  files: {shown}  layout: {s['layout']}")
        if d.get("transforms"):
            lines.append("  transforms: " + ", ".join(d["transforms"]))
    else:
        lines.append(f"  format v{d['format_version']}, alignment {d['alignment']}, from {d['source'].get('layout')} "
                     f"{', '.join(f['name'] for f in d['source'].get('files', []))}")
    lines.append(
        f"  architecture {m['architecture']}: {m['n_layers']} layers, MoE layers {len(m['moe_layers'])}, "
        f"{m['n_experts']} experts (top-{m['n_experts_used']}), d_model {m['d_model']}, d_ff {m['d_ff']}"
    )
    extras = [f"{k} {m[k]}" for k in ("n_shared_experts", "d_ff_shared", "n_dense_layers") if k in m]
    if m.get("has_expert_biases"):
        extras.append("expert biases")
    if m["activation"]["kind"] != "swiglu":
        extras.append(f"activation {m['activation']['kind']}")
    if extras:
        lines.append("  " + ", ".join(extras))
    mtp = d.get("mtp") or {}
    if mtp.get("n_layers"):
        style = {"qwen": "Qwen-style separate MTP block", "deepseek": "DeepSeek-style, after the decoder blocks"}
        named = ", ".join(f"{b} = {p.rstrip('.')}" if p else str(b) for b, p in zip(mtp["layers"], mtp["prefixes"]))
        lines.append(f"  MTP layers: {mtp['n_layers']} (block{'s' if len(mtp['layers']) != 1 else ''} {named}; "
                     f"{style.get(mtp['style'], 'source names not recorded')})")
    lines.append("  layer  experts  types (gate/up/down...)            bytes/expert")
    for row in d["layers"]:
        types = " ".join(f"{r}={t}" for r, t in row["types"].items())
        lines.append(f"  {row['layer']:5d}  {row['experts']:7d}  {types:34s} {human_bytes(row['bytes_per_expert'])}")
    lines.append("  kernels: " + ", ".join(f"{t}: {k}" for t, k in d["kernels"].items()))
    if d.get("not_extractable"):
        lines.append(f"  experts are {', '.join(d['not_extractable'])}: not extractable (the runtime cannot compute "
                     "with them and --dtype converts only float sources and MXFP4)")
    elif d.get("needs_dtype"):
        lines.append(f"  experts are {', '.join(d['needs_dtype'])}: extract needs --dtype (bf16, f16, q8_0 or q4_0)")
    elif d["kind"] != "shards":
        w = d["would_write"]
        lines.append(
            f"  extract would write {w['shards']} shards ({human_bytes(w['expert_bytes'])}, payload {human_bytes(w['payload_bytes'])}) "
            f"and dense.gguf with {w['dense_tensors']} tensors ({human_bytes(w['dense_bytes'])})"
        )
    else:
        lines.append(f"  {d['experts']} shards, {human_bytes(d['expert_bytes'])}; dense: "
                     f"{d['dense']['path'] if d['dense'] else 'none'}")
    if d.get("companions"):
        names = [c["path"].rpartition("/")[2] if isinstance(c, dict) else c for c in d["companions"]]
        where = "in hf/" if d["kind"] == "shards" else "extract would keep in hf/"
        lines.append(f"  companion files {where}: {', '.join(names)}")
    for x in d.get("companions_skipped", []):
        lines.append(f"  not kept: {x['name']!r}: {x['why']}")
    return "\n".join(lines)
