"""``push``: upload a verified shard folder to a hub repo, with a generated model card; re-running resumes.

The folder is verified first (every checksum); a damaged folder is never uploaded. Files the hub already holds at
the target revision with the same content (sha256 for LFS files, git blob oid for the others) are left out of the
commit; LFS objects uploaded by an interrupted run are not sent again (the LFS batch answer has no upload action
for objects the hub stores), so a re-run sends only what is missing and then commits once. Files the repo's
manifest.json (an earlier push of another folder's) lists that the folder lacks are deleted in that commit; no
other file is (another tool's, or one the owner added, even under experts/ or hf/).

Thread safety: pushes of different folders or to different repos may run at once (quiet or not: see
:mod:`mertools.hub.quiet`). The commit names the commit its plan was made from (``parent_commit``), so when
another push (or anyone) commits to the branch first, the hub refuses it (HTTP 412) and the push plans again from
the new head, up to ``PLAN_ATTEMPTS`` times: what it deletes is always what the branch's manifest lists at the
commit it replaces, never a stale listing's (which left the other push's shards beside this folder's manifest).
Of two pushes to one branch, the one that commits last wins, whole.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ..errors import MertoolsError
from ..units import human_bytes
from .download import git_blob_sha1_file
from .quiet import adopting, quiet_scope
from .remote import HeadMoved, RepoSpec, api, hub_call, list_files, resolve_commit

CARD_NAME = "README.md"
PLAN_ATTEMPTS = 5  # plans (listing, then commit) a push makes while other commits keep landing on its branch first


def push(out: str | os.PathLike[str], repo: str, *, revision: str | None = None, private: bool = False,
         quiet: bool = True) -> dict[str, Any]:
    """Verify ``out`` and upload it to ``repo``; returns a summary dict.

    ``quiet``: no progress bars and no huggingface_hub records below ERROR from this push, for its duration only;
    the caller's logging configuration and bar settings are never changed (:mod:`mertools.hub.quiet` says how,
    and what a quiet and a loud push running at once see).

    >>> push("out/", "me/mixtral-8x7b-mer-shards", private=True)   # doctest: +SKIP
    """
    from ..verify import verify

    folder = Path(out)
    spec = RepoSpec.parse(repo, revision)
    rev = spec.revision or "main"
    report = verify(folder)
    if not report.ok:
        first = "; ".join(str(p) for p in report.problems[:3])
        raise MertoolsError(f"{folder}: verify found {len(report.problems)} problem(s) ({first}); refusing to upload "
                            "a damaged folder. Extract it again")
    from mer_runtime.manifest import load_manifest

    m = load_manifest(folder)
    # quiet: the library's own retry warnings are not printed either (one line), for this push only (see quiet.py)
    with quiet_scope(quiet):
        return _push(folder, spec, rev, private, m, report, quiet)


def _push(folder: Path, spec: RepoSpec, rev: str, private: bool, m: Any, report: Any,
          quiet: bool) -> dict[str, Any]:
    from huggingface_hub import CommitOperationAdd

    # the library uploads LFS files on its own worker threads: operations that make those follow this push
    add = adopting(CommitOperationAdd, quiet)
    h = api()
    hub_call(spec.repo_id, h.create_repo, spec.repo_id, private=private, exist_ok=True)
    if rev != "main":
        hub_call(spec.repo_id, h.create_branch, spec.repo_id, branch=rev, exist_ok=True)
    for attempt in range(1, PLAN_ATTEMPTS + 1):
        try:
            ops, stale, skipped, sent, commit, at = _plan_and_commit(folder, spec, rev, m, h, add)
            break
        except HeadMoved:
            if attempt == PLAN_ATTEMPTS:
                raise MertoolsError(f"{spec.repo_id}@{rev}: another commit landed on the branch before each of this "
                                    f"push's {PLAN_ATTEMPTS} commits (another push to it is running?); re-run when it "
                                    "is done (the files already uploaded are not sent again)") from None
    # `head`: the commit that holds this folder now, whether this push made it or found the branch already holding it
    # (as after a commit the hub made but answered with a 5xx: its retry was refused, the next plan had nothing to do)
    return {"repo": spec.repo_id, "revision": rev, "uploaded_files": len(ops) - len(stale), "uploaded_bytes": sent,
            "skipped_files": skipped, "deleted_files": len(stale), "commit": commit, "head": commit or at,
            "verified_experts": report.experts_checked, "plans": attempt}


def _plan_and_commit(folder: Path, spec: RepoSpec, rev: str, m: Any, h: Any,
                     add: Any) -> tuple[list[Any], list[str], int, int, str | None, str]:
    """(operations, stale paths deleted, files skipped, bytes sent, the commit made or None, the head planned from)
    of one plan made from the branch's head and committed on top of that very commit (HeadMoved when another landed
    first). `add`: the CommitOperationAdd class the files are sent with."""
    from huggingface_hub import CommitOperationDelete
    # the listing is read as pull reads it (bounded, validated): a malformed entry only means that file is sent again
    # at one commit: the listing and the earlier manifest read there agree (a branch name with a slash is not
    # a path in a resolve URL either)
    at = resolve_commit(RepoSpec(spec.repo_id, rev))
    listing = list_files(RepoSpec(spec.repo_id, rev), at)
    remote = {f.path: (f.sha256, f.git_oid) for f in listing}

    card = model_card(m.raw, folder).encode()
    ops, skipped, sent = [], 0, 0
    # what the manifest lists, each checked by verify (a regular file inside the folder, its hash): a file it does
    # not list (verify's warning) or a link out of the folder is never sent
    from ..reassemble import folder_files

    files = [folder / rel for rel in sorted(set(folder_files(m)))]
    for p in files:
        rel = p.relative_to(folder).as_posix()
        if rel == CARD_NAME:
            continue  # the card is generated from the manifest
        op = add(path_in_repo=rel, path_or_fileobj=str(p))
        # its sha256 is the one the upload uses (huggingface_hub >= 2 computes it on first use): one read, not two
        if _same(p, lambda: op.upload_info.sha256.hex(), remote.get(rel)):
            skipped += 1
            continue
        ops.append(op)
        sent += op.upload_info.size
    # what an earlier push of another folder left (its shards, dense.gguf, record, hf/ companions) goes in the same
    # commit: the repo is this folder, not a mix of two models. Only what the repo's own manifest.json lists, at
    # the names mertools writes: another tool's experts/ or hf/ files, a tokenizer the owner added by hand and the
    # repo's other files (.gitattributes, the owner's own) stay
    local = {p.relative_to(folder).as_posix() for p in files}
    earlier = _earlier_push(spec, at, listing)
    stale = sorted(p for p in remote if p not in local and p in earlier and _ours(p))
    ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
    if _same_bytes(card, remote.get(CARD_NAME)):
        skipped += 1
    else:
        ops.append(add(path_in_repo=CARD_NAME, path_or_fileobj=card))
        sent += len(card)
    commit = None
    if ops:
        # The uploads keep the read timeout (an upload server that takes the body and never answers must not hang
        # the push); only the commit, which may take the hub minutes to answer, waits without one. create_commit
        # skips the operations preupload_lfs_files has already sent.
        adds = [op for op in ops if isinstance(op, add)]
        hub_call(spec.repo_id, h.preupload_lfs_files, spec.repo_id, additions=adds, revision=rev)
        info = hub_call(spec.repo_id, h.create_commit, spec.repo_id, operations=ops, revision=rev, long_answer=True,
                        commit_message=f"mertools push: {len(ops)} file(s) of {folder.name}", parent_commit=at)
        commit = info.oid
    return ops, stale, skipped, sent, commit, at


def _earlier_push(spec: RepoSpec, commit: str, listing: Any) -> set[str]:
    """The files the repo's manifest.json (an earlier push's) lists; none where the repo has no manifest.json or
    one that is not a whole mertools manifest (another tool's, a damaged one): then nothing is a stale leftover."""
    from mer_runtime.errors import MerError
    from mer_runtime.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, manifest_from_bytes

    from ..reassemble import folder_files
    from .inspect import read_range

    f = next((f for f in listing if f.path == MANIFEST_NAME), None)
    if f is None or not 0 < f.size <= MAX_MANIFEST_BYTES:
        return set()
    data = read_range(spec, commit, MANIFEST_NAME, 0, f.size - 1, f.size)
    try:
        return set(folder_files(manifest_from_bytes(data, f"{spec.repo_id}@{commit[:12]}")))
    except MerError:
        return set()


def _ours(path: str) -> bool:
    """A repo path mertools writes into a folder (manifest.json, dense.gguf, the record, experts/, hf/)."""
    from mer_runtime.manifest import COMPANION_DIR

    from ..layout import DENSE_NAME, EXPERTS_DIR
    from ..reassemble import RECORD_NAME

    return path in ("manifest.json", DENSE_NAME, RECORD_NAME) or path.startswith((f"{EXPERTS_DIR}/",
                                                                                  f"{COMPANION_DIR}/"))


def _same(p: Path, sha256: Callable[[], str], remote: tuple[str | None, str | None] | None) -> bool:
    """Whether the hub's file (its (sha256, git oid)) holds the bytes of local file `p` (`sha256()` gives theirs)."""
    if remote is None:
        return False
    theirs, oid = remote
    if theirs:
        return theirs == sha256()
    return oid is not None and git_blob_sha1_file(p) == oid


def _same_bytes(data: bytes, remote: tuple[str | None, str | None] | None) -> bool:
    if remote is None:
        return False
    sha256, oid = remote
    if sha256:
        return hashlib.sha256(data).hexdigest() == sha256
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == oid


def _code(text: str) -> str:
    """``text`` as a Markdown code span whatever backticks it holds (a file name may): fenced by one more backtick
    than its longest run, padded where it starts or ends with one.

    >>> _code("a`b"), _code("plain")
    ('``a`b``', '`plain`')
    """
    runs = [len(r) for r in re.findall(r"`+", text)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def model_card(manifest: dict[str, Any], folder: Path) -> str:
    """A README.md for the hub: what the folder holds, where it came from, how to load it with mer_runtime.

    Deterministic (no dates), so that pushing the same folder twice leaves the card unchanged.
    """
    model = manifest.get("model", {})
    source = manifest.get("source", {})
    hub = source.get("hub") or {}
    experts = manifest.get("experts", [])
    types: dict[str, Counter] = {}
    for e in experts:
        for role, t in e.get("tensors", {}).items():
            types.setdefault(role, Counter())[t.get("dtype")] += 1
    expert_bytes = sum(int(e.get("size", 0)) for e in experts)
    dense = manifest.get("dense") or {}
    layers = sorted({e.get("layer") for e in experts})
    arch = model.get("architecture", "unknown")
    tags = ["mertools", "mixture-of-experts", "expert-shards", str(arch)]
    front = ["---", "library_name: mer_runtime", "tags:"] + [f"- {t}" for t in tags]
    if hub.get("repo"):
        front.append(f"base_model: {hub['repo']}")
    front.append("---")
    src_line = (f"[{hub['repo']}](https://huggingface.co/{hub['repo']}) at commit `{hub.get('commit')}`"
                if hub.get("repo") else ", ".join(f.get("name", "?") for f in source.get("files", [])) or "unknown")
    lines = front + [
        "",
        f"# {folder.name}: expert shards of {hub.get('repo') or arch}",
        "",
        "Mixture-of-Experts weights split by [mertools](https://github.com/) into one 4096-aligned file per (layer, "
        "expert), with xxh3 checksums for every file and projection in `manifest.json`, and `dense.gguf` holding "
        "everything else. The bytes of every projection are the source's, unchanged.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {arch} |",
        f"| MoE layers | {len(layers)} |",
        f"| experts per layer | {model.get('n_experts', '?')} (top-{model.get('n_experts_used', '?')}) |",
        f"| d_model, d_ff | {model.get('d_model', '?')}, {model.get('d_ff', '?')} |",
        f"| shards | {len(experts)}, {human_bytes(expert_bytes)} |",
        f"| dense.gguf | {human_bytes(int(dense.get('size', 0)))} |",
        f"| source | {src_line} |",
        f"| source layout | {source.get('format', '?')} {source.get('layout', '')} |",
        "",
        "Types per projection (number of experts):",
        "",
    ]
    for role, c in types.items():
        lines.append(f"- `{role}`: " + ", ".join(f"{t} x {n}" for t, n in sorted(c.items())))
    companions = [c.get("path", "") for c in manifest.get("companions") or [] if isinstance(c, dict)]
    if companions:
        lines += ["", "The source checkpoint's tokenizer and other small files, byte for byte (xxh3 in "
                  "`manifest.json`; an inference engine reads the tokenizer from here): "
                  + ", ".join(_code(p) for p in companions)]
    if hub.get("files"):
        lines += ["", "Source files (sha256 checked before conversion):", ""]
        lines += [f"- {_code(f['path'])} {f.get('sha256') or f.get('git_oid', '')}" for f in hub["files"]]
    lines += [
        "",
        "## Load it",
        "",
        "```sh",
        "pip install mertools",
        f"hf download <this repo> --local-dir {folder.name}",
        f"mertools verify {folder.name}",
        "```",
        "",
        "```python",
        "from mer_runtime import open_shards",
        f'with open_shards("{folder.name}", io="auto", cache_slots=16) as s:',
        "    y = s.ffn(layer, expert, x)   # x float32 [d_model] or [n, d_model]",
        "```",
        "",
    ]
    return "\n".join(lines)
