"""``inspect hf://org/repo[@rev]``: what a hub repo holds and what ``pull`` would fetch and write, without the weights.

GGUF: the header of each part is read by HTTP range requests into a sparse file of the part's full size (the gguf
reader wants a file and maps tensor data it never reads here), growing the range until the parsed header ends
inside the bytes fetched; then the same description as for a local file. SafeTensors: ``config.json`` plus the
shard headers through ``huggingface_hub``'s ``get_safetensors_metadata`` (range requests too).
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
from .remote import CONFIG, HubError, RemoteFile, RepoSpec, api, choose, hub_call, list_files, resolve_commit

FIRST = 64 << 10  # then 4x per try: a large tokenizer header (~8 MiB) takes 5 small requests
MAX_HEADER = 1 << 30  # a GGUF header (metadata + tensor infos) past 1 GiB is not a model we can inspect


def read_range(spec: RepoSpec, commit: str, path: str, start: int, end: int) -> bytes:
    """Bytes [start, end] (inclusive) of a repo file, by one range request."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    def get() -> bytes:
        r = get_session().get(resolve_url(spec, commit, path), headers={**build_hf_headers(),
                              "Range": f"bytes={start}-{end}"}, follow_redirects=True, timeout=30)
        if r.status_code == 206:
            return r.content
        if r.status_code == 200:
            return r.content[start:end + 1]
        raise HubError(f"{spec.repo_id}@{commit[:12]}: {path}: range request answered HTTP {r.status_code}")

    return hub_call(f"{spec.repo_id}: {path}", get)


def _gguf_header_file(spec: RepoSpec, commit: str, f: RemoteFile, folder: Path) -> Path:
    import gguf

    dest = folder / f.path.rpartition("/")[2]
    n = min(FIRST, f.size)
    while True:
        data = read_range(spec, commit, f.path, 0, n - 1)
        with open(dest, "wb") as fh:
            fh.write(data)
            fh.truncate(f.size)  # sparse: the tensor data is never fetched
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
    choice = choose(listing, gguf=gguf, where=where)
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
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # a header parse per shard: quick, and stdout is the description
    meta = hub_call(where, api().get_safetensors_metadata, spec.repo_id, revision=commit)
    config = json.loads(read_range(spec, commit, CONFIG, 0, next(f.size for f in listing if f.path == CONFIG) - 1))
    shards = sorted(meta.files_metadata)
    files = choice.files + [f for f in listing if f.path in shards and f not in choice.files]
    dtypes: Counter = Counter()
    nbytes, experts_bytes, expert_tensors = 0, 0, 0
    for fm in meta.files_metadata.values():
        for name, t in fm.tensors.items():
            size = t.data_offsets[1] - t.data_offsets[0]
            dtypes[t.dtype] += 1
            nbytes += size
            if re.search(r"\.experts?\.", name):
                expert_tensors += 1
                experts_bytes += size
    keys = ("model_type", "architectures", "num_hidden_layers", "hidden_size", "intermediate_size",
            "moe_intermediate_size", "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
            "torch_dtype", "quantization_config")
    return {
        "kind": "hub-safetensors",
        "path": f"hf://{spec.repo_id}@{commit[:12]}",
        "hub": {**hub, "would_download": {"kind": "safetensors", "main": CONFIG,
                                          "files": [f.as_dict() for f in files], "bytes": sum(f.size for f in files)}},
        "config": {k: config[k] for k in keys if k in config},
        "tensors": sum(len(fm.tensors) for fm in meta.files_metadata.values()),
        "dtypes": dict(dtypes),
        "tensor_bytes": nbytes,
        "expert_tensors": expert_tensors,
        "expert_bytes": experts_bytes,
    }


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
    return "\n".join(lines)
