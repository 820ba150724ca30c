"""What a hub repo holds at one commit, and which of its files a conversion needs.

Listing goes through ``huggingface_hub`` (``HfApi.model_info`` for the commit sha, ``list_repo_tree`` for sizes and
LFS sha256), pointed at ``HF_ENDPOINT`` as read at call time, so tests and mirrors can move it after import.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import MertoolsError

SPLIT_RE = re.compile(r"^(?P<base>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"
CONFIG = "config.json"


class HubError(MertoolsError):
    """The hub (or its cache) cannot give what a pull needs: unknown repo or revision, network, integrity."""


class IntegrityError(HubError):
    """A downloaded or cached file's bytes do not match the sha256 (or git oid) the hub lists for it."""


@dataclass(frozen=True)
class RepoSpec:
    """``org/name`` plus an optional revision, parsed from ``org/name``, ``org/name@rev`` or ``hf://org/name@rev``."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str, revision: str | None = None) -> "RepoSpec":
        """>>> RepoSpec.parse("hf://mistralai/Mixtral-8x7B-v0.1@main")
        RepoSpec(repo_id='mistralai/Mixtral-8x7B-v0.1', revision='main')
        """
        t = re.sub(r"^hf:/+", "", text.strip())
        if "@" in t:
            t, rev = t.split("@", 1)
            if revision and revision != rev:
                raise HubError(f"{text}: revision given twice ({rev} and --revision {revision}); give one")
            revision = rev
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", t) or ".." in t:
            raise HubError(f"{text}: not a hub repo id; expected org/name, e.g. mistralai/Mixtral-8x7B-v0.1")
        return cls(t, revision or None)

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repo at a commit. ``sha256`` for LFS files; ``git_oid`` (git blob sha1) for the others."""

    path: str
    size: int
    sha256: str | None
    git_oid: str | None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "size": self.size}
        if self.sha256:
            d["sha256"] = self.sha256
        if self.git_oid:
            d["git_oid"] = self.git_oid
        return d


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    from huggingface_hub import constants

    v = os.environ.get("HF_HUB_OFFLINE")
    if v is not None:
        return v.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def hub_call(what: str, fn: Any, *args: Any, **kw: Any) -> Any:
    """Run one huggingface_hub call, retrying 429/5xx answers with backoff (bounded, as downloads are), and turn
    its exceptions into one clear HubError line."""
    import time

    from huggingface_hub import errors as hf

    from .download import RETRIES, RETRY_STATUS, retry_wait

    for attempt in range(1, RETRIES + 1):
        try:
            return _hub_call_once(what, fn, *args, **kw)
        except hf.HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status not in RETRY_STATUS or attempt == RETRIES:
                raise HubError(f"{what}: the hub answered HTTP {status}"
                               f"{f' {attempt} times' if attempt > 1 else ''}; try again later") from None
            time.sleep(min(retry_wait() * 2 ** (attempt - 1), retry_wait() * 16))
    raise AssertionError("unreachable")


def _hub_call_once(what: str, fn: Any, *args: Any, **kw: Any) -> Any:
    from huggingface_hub import errors as hf

    try:
        return fn(*args, **kw)
    except hf.RepositoryNotFoundError:
        raise HubError(f"{what}: repository not found on {endpoint()} (check the id; a private repo needs "
                       "HF_TOKEN or `hf auth login`)") from None
    except hf.RevisionNotFoundError:
        raise HubError(f"{what}: revision not found; check --revision (a branch, tag or commit sha)") from None
    except hf.EntryNotFoundError:
        raise HubError(f"{what}: file not found in the repo") from None
    except hf.HfHubHTTPError:
        raise  # hub_call retries or reports it (it is an OSError too)
    except OSError as exc:  # httpx transport errors are OSError-like in spirit but not subclasses
        raise HubError(f"{what}: cannot reach {endpoint()} ({_first_line(exc)}); check the network or set "
                       "HF_HUB_OFFLINE=1 to use the local cache") from None
    except Exception as exc:
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise HubError(f"{what}: cannot reach {endpoint()} ({type(exc).__name__}: {_first_line(exc)}); check the "
                           "network or set HF_HUB_OFFLINE=1 to use the local cache") from None
        raise


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def resolve_commit(spec: RepoSpec) -> str:
    """The commit sha a branch, tag or sha names now (one request)."""
    info = hub_call(str(spec), api().model_info, spec.repo_id, revision=spec.revision)
    if not info.sha:
        raise HubError(f"{spec}: the hub did not say which commit this revision is")
    return str(info.sha)


def list_files(spec: RepoSpec, commit: str) -> list[RemoteFile]:
    """Every file at ``commit`` with its size and sha256 (LFS) or git oid (others)."""
    from huggingface_hub.hf_api import RepoFile

    out = []
    for e in hub_call(str(spec), lambda: list(api().list_repo_tree(spec.repo_id, revision=commit, recursive=True))):
        if isinstance(e, RepoFile):
            check_repo_path(e.path, str(spec))
            out.append(RemoteFile(e.path, int(e.size), e.lfs.sha256 if e.lfs else None,
                                  None if e.lfs else e.blob_id))
    return out


def check_repo_path(path: str, where: str) -> None:
    """Refuse a listed path that would land outside the staging folder (the listing comes from the network)."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise HubError(f"{where}: the hub lists a file named {path!r}, which is not a safe relative path; refusing")


# -- what a conversion needs ------------------------------------------------------------------------------
@dataclass
class Choice:
    """The files to fetch for one conversion, in fetch order, and the kind of source they make."""

    kind: str  # "gguf" | "safetensors"
    files: list[RemoteFile]
    main: str  # the path extract is given: first GGUF part, or the folder's config.json
    index_needed: bool = False  # safetensors with an index whose shard list is not known yet

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "main": self.main, "files": [f.as_dict() for f in self.files],
                "bytes": sum(f.size for f in self.files)}


def _filter(files: Iterable[RemoteFile], include: list[str] | None) -> list[RemoteFile]:
    fs = list(files)
    if include:
        fs = [f for f in fs if any(fnmatch.fnmatch(f.path, g) for g in include)]
    return fs


def gguf_models(files: Iterable[RemoteFile]) -> dict[str, list[RemoteFile]]:
    """GGUF models in a listing: a single file, or every part of a split set, keyed by the first part's path."""
    models: dict[str, list[RemoteFile]] = {}
    for f in sorted(files, key=lambda f: f.path):
        if not f.path.endswith(".gguf"):
            continue
        d, _, name = f.path.rpartition("/")
        m = SPLIT_RE.match(name)
        key = f.path if not m else f"{d + '/' if d else ''}{m['base']}-00001-of-{m['count']}.gguf"
        models.setdefault(key, []).append(f)
    return models


def choose(files: list[RemoteFile], *, gguf: str | None = None, include: list[str] | None = None,
           where: str = "the repo") -> Choice:
    """Pick what conversion needs: one GGUF model (``gguf`` a file name or glob), or config + SafeTensors."""
    fs = _filter(files, include)
    by_path = {f.path: f for f in fs}
    models = gguf_models(fs)
    if gguf is not None:
        picked = {k: v for k, v in models.items() if any(fnmatch.fnmatch(f.path, gguf) or
                                                          fnmatch.fnmatch(f.path.rpartition("/")[2], gguf) for f in v)}
        if not picked:
            raise HubError(f"{where}: no GGUF file matches --gguf {gguf!r}; it has: {_names(models) or 'none'}")
        if len(picked) > 1:
            raise HubError(f"{where}: --gguf {gguf!r} matches {len(picked)} models ({_names(picked)}); "
                           "give one file name")
        return _gguf_choice(where, *next(iter(picked.items())))
    if ST_INDEX in by_path or ST_SINGLE in by_path:
        if CONFIG not in by_path:
            raise HubError(f"{where}: has SafeTensors weights but no config.json; cannot tell the model's layout")
        if ST_INDEX in by_path:
            return Choice("safetensors", [by_path[CONFIG], by_path[ST_INDEX]], CONFIG, index_needed=True)
        return Choice("safetensors", [by_path[CONFIG], by_path[ST_SINGLE]], CONFIG)
    if len(models) == 1:
        return _gguf_choice(where, *next(iter(models.items())))
    if models:
        raise HubError(f"{where}: holds {len(models)} GGUF models; pick one with --gguf, e.g. --gguf "
                       f"'{next(iter(models)).rpartition('/')[2]}' (all: {_names(models)})")
    raise HubError(f"{where}: no GGUF model and no SafeTensors checkpoint (config.json with model.safetensors or "
                   f"{ST_INDEX}) found{' among files matching --include' if include else ''}")


def _gguf_choice(where: str, first: str, parts: list[RemoteFile]) -> Choice:
    m = SPLIT_RE.match(first.rpartition("/")[2])
    if m and len(parts) != int(m["count"]):
        have = {SPLIT_RE.match(p.path.rpartition("/")[2])["no"] for p in parts}  # type: ignore[index]
        missing = [f"{m['base']}-{i:05d}-of-{m['count']}.gguf" for i in range(1, int(m["count"]) + 1)
                   if f"{i:05d}" not in have]
        raise HubError(f"{where}: incomplete: split set {first} has {len(parts)} of {int(m['count'])} parts (missing "
                       f"{', '.join(missing[:4])}); nothing was converted")
    return Choice("gguf", sorted(parts, key=lambda f: f.path), first)


def add_index_shards(choice: Choice, files: list[RemoteFile], index_bytes: bytes, where: str) -> Choice:
    """Complete a SafeTensors choice once its index is read: the shards its ``weight_map`` names, in order."""
    try:
        index = json.loads(index_bytes)
        shards = sorted(set(index["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise HubError(f"{where}: {ST_INDEX} is not a SafeTensors index (no weight_map); the repo is damaged") from None
    by_path = {f.path: f for f in files}
    missing = [s for s in shards if s not in by_path]
    if missing:
        raise HubError(f"{where}: incomplete: {ST_INDEX} names {len(missing)} shard(s) that are not there "
                       f"({', '.join(missing[:3])}); nothing was converted")
    bad = [s for s in shards if "/" in s or s.startswith(".")]
    if bad:
        raise HubError(f"{where}: {ST_INDEX} names shard paths outside its folder ({bad[:3]}); refusing")
    return Choice("safetensors", choice.files + [by_path[s] for s in shards], choice.main)


def _names(models: dict[str, list[RemoteFile]]) -> str:
    return ", ".join(sorted(models))
