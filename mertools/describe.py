"""``inspect``: what a GGUF model holds and what ``extract`` would write, or what a shard folder holds."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from mer_runtime.kernels import kernel_for
from mer_runtime.manifest import MANIFEST_NAME, load_manifest

from .gguf_source import open_source
from .layout import place
from .units import human_bytes


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


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    if str(path).startswith("hf:/"):  # hf://org/repo[@rev]; a click Path has collapsed the "//"
        from .hub.inspect import describe_remote

        return describe_remote(str(path))
    p = Path(path)
    if p.is_dir() and (p / MANIFEST_NAME).exists():
        m = load_manifest(p)
        rows = [(e.layer, {r: t.dtype for r, t in e.tensors.items()}, e.size) for e in m.experts]
        dtypes = Counter(t.dtype for e in m.experts for t in e.tensors.values())
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
            "layers": _per_layer(rows),
            "kernels": {t: kernel_for(t) for t in sorted(dtypes)},
        }
    src = open_source(p)
    shards = [place(e) for e in src.experts]
    rows = [(e.layer, {q.role: q.dtype for q in e.projections}, s.size) for e, s in zip(src.experts, shards)]
    dtypes = Counter(q.dtype for e in src.experts for q in e.projections)
    dense = src.dense_tensors()
    return {
        "kind": "gguf",
        "path": str(p),
        "source": src.source_info(),
        "model": src.model,
        "experts": len(src.experts),
        "layers": _per_layer(rows),
        "would_write": {
            "shards": len(shards),
            "expert_bytes": sum(s.size for s in shards),
            "payload_bytes": sum(e.nbytes for e in src.experts),
            "dense_tensors": len(dense),
            "dense_bytes": sum(t.nbytes for t in dense),
        },
        "kernels": {t: kernel_for(t) for t in sorted(dtypes)},
    }




def render(d: dict[str, Any]) -> str:
    if "hub" in d and str(d["path"]).startswith("hf://"):
        from .hub.inspect import render_remote

        return render_remote(d, _render_local)
    return _render_local(d)


def _render_local(d: dict[str, Any]) -> str:
    m = d["model"]
    lines = [f"{d['path']}  ({'shard folder' if d['kind'] == 'shards' else 'GGUF model'})"]
    if d["kind"] == "gguf":
        s = d["source"]
        lines.append(f"  files: {', '.join(f['name'] for f in s['files'])}  layout: {s['layout']}")
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
    lines.append("  layer  experts  types (gate/up/down...)            bytes/expert")
    for row in d["layers"]:
        types = " ".join(f"{r}={t}" for r, t in row["types"].items())
        lines.append(f"  {row['layer']:5d}  {row['experts']:7d}  {types:34s} {human_bytes(row['bytes_per_expert'])}")
    lines.append("  kernels: " + ", ".join(f"{t}: {k}" for t, k in d["kernels"].items()))
    if d["kind"] == "gguf":
        w = d["would_write"]
        lines.append(
            f"  extract would write {w['shards']} shards ({human_bytes(w['expert_bytes'])}, payload {human_bytes(w['payload_bytes'])}) "
            f"and dense.gguf with {w['dense_tensors']} tensors ({human_bytes(w['dense_bytes'])})"
        )
    else:
        lines.append(f"  {d['experts']} shards, {human_bytes(d['expert_bytes'])}; dense: "
                     f"{d['dense']['path'] if d['dense'] else 'none'}")
    return "\n".join(lines)
