"""``inspect hf://org/repo[@rev]``: what a hub repo holds and what ``pull`` would fetch and write, without the weights.

GGUF: the header of each part is read by HTTP range requests into a sparse file of the part's full size (the gguf
reader wants a file and maps tensor data it never reads here), growing the range until the parsed header ends
inside the bytes fetched; then the same description as for a local file. SafeTensors: ``config.json`` plus the
shard headers by range requests (the same reads as ``huggingface_hub``'s ``get_safetensors_metadata``, done here
so that nothing lands in the HF cache and the raw header bytes can fill sparse shard files: where this mertools reads
SafeTensors folders, the folder of sparse shards is described like a local one, giving what extract would write).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from ..units import human_bytes
from .download import resolve_url
from .remote import (
    CONFIG, ST_INDEX, HubError, RemoteFile, RepoSpec, add_index_shards, check_needed, choose, list_files,
    resolve_commit,
)

FIRST = 64 << 10  # then 4x per try: a large tokenizer header (~8 MiB) takes 5 small requests
MAX_HEADER = 1 << 30  # a GGUF header (metadata + tensor infos) past 1 GiB is not a model we can inspect


def read_range(spec: RepoSpec, commit: str, path: str, start: int, end: int, size: int | None = None) -> bytes:
    """Bytes [start, end] (inclusive) of a repo file, by range requests (bounded: see :func:`http.get_range`);
    ``size``: the listed size, which the hub's answer must agree with."""
    from .http import get_range

    return get_range(resolve_url(spec, commit, path), f"{spec.repo_id}@{commit[:12]}: {path}", start, end, size=size)


def _gguf_header_file(spec: RepoSpec, commit: str, f: RemoteFile, folder: Path) -> Path:
    import gguf

    dest = folder / f.path.rpartition("/")[2]
    n = min(FIRST, f.size)
    while True:
        data = read_range(spec, commit, f.path, 0, n - 1, f.size)
        with open(dest, "wb") as fh:
            fh.write(data)
            _sparse_size(fh, f, spec)  # sparse: the tensor data is never fetched
        try:
            r = gguf.GGUFReader(dest)
            if r.data_offset <= n or n >= f.size:
                return dest
        except Exception:
            if n >= f.size:
                raise HubError(f"{spec.repo_id}@{commit[:12]}: {f.path}: the GGUF header cannot be read") from None
        if n >= MAX_HEADER:
            raise HubError(f"{spec.repo_id}: {f.path}: GGUF header larger than {human_bytes(MAX_HEADER)}; refusing")
        n = min(n * 4, f.size)


def describe_remote(text: str, *, gguf: str | None = None) -> dict[str, Any]:
    """Describe ``hf://org/repo[@rev][/FILE_OR_GLOB]`` from its listing and headers only.

    A trailing file name or glob picks one GGUF model where the repo holds several (as ``pull --gguf`` does).

    >>> describe_remote("hf://TheBloke/Mixtral-8x7B-v0.1-GGUF/*Q4_0.gguf")   # doctest: +SKIP
    """
    parts = re.sub(r"^hf:/+", "", text.strip()).split("/", 2)
    if len(parts) == 3:
        gguf = gguf or parts[2]
    spec = RepoSpec.parse("/".join(parts[:2]))
    commit = resolve_commit(spec)
    listing = list_files(spec, commit)
    where = f"{spec.repo_id}@{commit[:12]}"
    choice = choose(listing, gguf=gguf, where=where, unusable=listing.unusable)
    check_needed(choice.files, listing.unusable, where)
    hub = {"repo": spec.repo_id, "revision": spec.revision or "main", "commit": commit}
    if choice.kind == "gguf":
        from ..describe import describe

        with tempfile.TemporaryDirectory(prefix="mertools-inspect-") as tmp:
            for f in choice.files:
                _gguf_header_file(spec, commit, f, Path(tmp))
            d = describe(Path(tmp) / choice.main.rpartition("/")[2])
        d["path"] = f"hf://{spec.repo_id}@{commit[:12]}/{choice.main}"
        d["hub"] = {**hub, "would_download": choice.as_dict()}
        return d
    from ..sources.safetensors import json_object

    with tempfile.TemporaryDirectory(prefix="mertools-inspect-") as tmp:
        folder = Path(tmp)
        small = {}
        for f in choice.files:  # config.json and the index (not the companion files: only listed)
            if f.path in (CONFIG, ST_INDEX):
                small[f.path] = read_range(spec, commit, f.path, 0, f.size - 1, f.size)
                (folder / f.path).write_bytes(small[f.path])
        # the loader of local folders: nesting too deep, a key twice in the index, not an object: one SourceError
        config = json_object(small[CONFIG], f"{where}: {CONFIG}", CONFIG)
        if ST_INDEX in small:
            json_object(small[ST_INDEX], f"{where}: {ST_INDEX}", ST_INDEX, unique=True)
        if choice.index_needed:
            choice = add_index_shards(choice, listing, small[ST_INDEX], where)
            check_needed(choice.files, listing.unusable, where)
        headers = {f.path: _safetensors_header_file(spec, commit, f, folder)
                   for f in choice.files if f.path.endswith(".safetensors")}
        plan = _plan_from_headers(folder)
    dtypes: Counter = Counter()
    nbytes, experts_bytes, expert_tensors = 0, 0, 0
    for header in headers.values():
        for name, t in header.items():
            if name == "__metadata__":
                continue
            size = t["data_offsets"][1] - t["data_offsets"][0]
            dtypes[t["dtype"]] += 1
            nbytes += size
            if re.search(r"\.experts?\.", name):
                expert_tensors += 1
                experts_bytes += size
    keys = ("model_type", "architectures", "num_hidden_layers", "hidden_size", "intermediate_size",
            "moe_intermediate_size", "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
            "torch_dtype", "quantization_config")
    d: dict[str, Any] = {
        "kind": "hub-safetensors",
        "path": f"hf://{spec.repo_id}@{commit[:12]}",
        "hub": {**hub, "would_download": choice.as_dict()},
        "config": {k: config[k] for k in keys if k in config},
        "tensors": sum(len([k for k in h if k != "__metadata__"]) for h in headers.values()),
        "dtypes": dict(dtypes),
        "tensor_bytes": nbytes,
        "expert_tensors": expert_tensors,
        "expert_bytes": experts_bytes,
    }
    if plan is not None:  # what extract would write, from the SafeTensors source where mertools has one
        d["plan"] = {k: plan[k] for k in ("model", "layers", "would_write", "kernels") if k in plan}
    return d


def _safetensors_header_file(spec: RepoSpec, commit: str, f: RemoteFile, folder: Path) -> dict[str, Any]:
    """The shard's JSON header, by range requests; the shard is also written as a sparse file holding only it."""
    from ..sources.safetensors import parse_header

    first = read_range(spec, commit, f.path, 0, min(f.size, FIRST) - 1, f.size)
    n = int.from_bytes(first[:8], "little")
    if len(first) < 8 or n > MAX_HEADER or 8 + n > f.size:
        raise HubError(f"{spec.repo_id}@{commit[:12]}: {f.path}: not a SafeTensors file (header size {n})")
    data = first if 8 + n <= len(first) else first + read_range(spec, commit, f.path, len(first), 8 + n - 1, f.size)
    # the local reader's checks (entries, dtypes, shapes, offsets, duplicate keys, nesting), before anything here
    # indexes the header's entries
    _n, header = parse_header(data[:8 + n], f"{spec.repo_id}@{commit[:12]}: {f.path}", f.size)
    with open(folder / f.path, "wb") as fh:
        fh.write(data[:8 + n])
        _sparse_size(fh, f, spec)
    return header


def _sparse_size(fh: Any, f: RemoteFile, spec: RepoSpec) -> None:
    """Give the header-only file its listed size without writing it (a hole); a size no file system can hold is
    the hub's lie, not a local problem."""
    try:
        fh.truncate(f.size)
    except (OSError, OverflowError):
        raise HubError(f"{spec.repo_id}: {f.path}: the hub lists it at {f.size} bytes, more than a file can hold "
                       "here; its listing is damaged: check HF_ENDPOINT") from None


def _plan_from_headers(folder: Path) -> dict[str, Any] | None:
    """describe() of the header-only folder if this mertools reads SafeTensors folders; None where it does not."""
    from ..describe import describe
    from ..errors import MertoolsError

    try:
        return describe(folder)
    except MertoolsError:
        return None


def render_remote(d: dict[str, Any], render_local: Any) -> str:
    h = d["hub"]
    w = h["would_download"]
    head = (f"  hub: {h['repo']} at {h['revision']} = commit {h['commit']}\n"
            f"  pull would download {len(w['files'])} file(s), {human_bytes(w['bytes'])}: "
            + ", ".join(f["path"] for f in w["files"][:8]) + (" ..." if len(w["files"]) > 8 else ""))
    if d["kind"] != "hub-safetensors":
        local = render_local(d).split("\n")
        return "\n".join([local[0].replace("(GGUF model)", "(GGUF model on the hub)"), head] + local[1:])
    c = d["config"]
    lines = [f"{d['path']}  (SafeTensors checkpoint on the hub)", head,
             "  config: " + ", ".join(f"{k} {v}" for k, v in c.items() if k != "quantization_config"),
             f"  {d['tensors']} tensors, {human_bytes(d['tensor_bytes'])}; types "
             + ", ".join(f"{t} x {n}" for t, n in sorted(d["dtypes"].items())),
             f"  routed-expert tensors: {d['expert_tensors']}, {human_bytes(d['expert_bytes'])} (what the shards "
             "will hold, in the source type unless --dtype)"]
    if "quantization_config" in c:
        lines.append(f"  quantization: {json.dumps(c['quantization_config'])[:120]}")
    if "plan" in d and "would_write" in d["plan"]:
        w = d["plan"]["would_write"]
        lines.append(f"  pull would write {w.get('shards')} shards ({human_bytes(w.get('expert_bytes', 0))}) and "
                     f"dense.gguf with {w.get('dense_tensors')} tensors")
    return "\n".join(lines)
