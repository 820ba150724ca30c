"""What a hub repo holds at one commit, and which of its files a conversion needs.

Listing goes through ``huggingface_hub`` (``HfApi.model_info`` for the commit sha, ``list_repo_tree`` for sizes and
LFS sha256), pointed at ``HF_ENDPOINT`` as read at call time, so tests and mirrors can move it after import.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from mer_runtime.manifest import SAME_FILE, same_file_key

from ..errors import MertoolsError

SPLIT_RE = re.compile(r"^(?P<base>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"
CONFIG = "config.json"


class HubError(MertoolsError):
    """The hub (or its cache) cannot give what a pull needs: unknown repo or revision, network, integrity."""


class HeadMoved(HubError):
    """A commit made with ``parent_commit`` was refused (HTTP 412): the branch moved since it was read."""


class IntegrityError(HubError):
    """A downloaded or cached file's bytes do not match the sha256 (or git oid) the hub lists for it."""


@dataclass(frozen=True)
class RepoSpec:
    """``org/name`` plus an optional revision, parsed from ``org/name``, ``org/name@rev`` or ``hf://org/name@rev``."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str, revision: str | None = None) -> "RepoSpec":
        """A repo spec from `hf://owner/name[@revision]` (or `owner/name`); `revision` when the text names none.

        >>> RepoSpec.parse("hf://mistralai/Mixtral-8x7B-v0.1@main")
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


def hub_call(what: str, fn: Any, *args: Any, long_answer: bool = False, **kw: Any) -> Any:
    """Run one huggingface_hub call (push's) under our timeout (:func:`http.session_timeout`), retrying 429/5xx
    answers with backoff (bounded, as downloads are), and turn its exceptions, malformed answers included, into one
    clear HubError line. A transport error is not retried (the call may have taken effect: a commit must not be
    sent twice). ``long_answer``: no read timeout (create_commit: the hub may take minutes to write thousands of
    files, and a client that gives up would report a commit that still lands)."""
    from huggingface_hub import errors as hf

    from .http import RETRIES, RETRY_STATUS, Retry, check_retry_after, retry_after, session_timeout, with_retries

    def once() -> Any:
        try:
            return _hub_call_once(what, fn, *args, **kw)
        except hf.HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            headers = exc.response.headers if exc.response is not None else {}
            if status in RETRY_STATUS:
                check_retry_after(what, status, headers)
                raise Retry(f"HTTP {status}", retry_after(headers)) from None
            if status == 412:  # create_commit's parent_commit is no longer the branch's head: the caller re-plans
                raise HeadMoved(f"{what}: the branch moved since it was read (HTTP 412: another commit landed "
                                "first)") from None
            raise HubError(f"{what}: the hub answered HTTP {status}; try again later") from None

    with session_timeout(read=not long_answer):
        return with_retries(what, once, lambda problem, _: f"{what}: the hub answered {problem} {RETRIES} times; try "
                                                        "again later")


def _hub_call_once(what: str, fn: Any, *args: Any, **kw: Any) -> Any:
    from huggingface_hub import errors as hf

    from .http import first_line, is_transport_error, permanent_transport_error

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
    except MertoolsError:
        raise
    except OSError as exc:  # httpx transport errors are OSError-like in spirit but not subclasses
        raise HubError(f"{what}: cannot reach {endpoint()} ({first_line(exc)}); check the network or "
                       "HF_ENDPOINT, or try again later") from None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        # huggingface_hub parses answers with r.json() and Model(**fields): a hub that sends something else
        # surfaces here (JSONDecodeError, "argument after ** must be a mapping", a missing key)
        raise HubError(f"{what}: huggingface_hub could not read the hub's answer ({type(exc).__name__}: "
                       f"{first_line(exc)[:120]}); check HF_ENDPOINT") from None
    except Exception as exc:
        if isinstance(exc, RuntimeError) and isinstance(exc.__cause__, Exception):
            # an upload's failure comes wrapped ("Error while uploading 'x' to the Hub.") from its real cause
            if isinstance(exc.__cause__, hf.HfHubHTTPError):
                raise exc.__cause__ from None  # hub_call retries or reports it
            if is_transport_error(exc.__cause__):
                exc = exc.__cause__
        if is_transport_error(exc):
            if (why := permanent_transport_error(exc)) is not None:
                raise HubError(f"{what}: {why}") from None
            raise HubError(f"{what}: cannot reach {endpoint()} ({type(exc).__name__}: {first_line(exc)}); check the "
                           "network or HF_ENDPOINT, or try again later") from None
        raise


SHA_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")


def resolve_commit(spec: RepoSpec) -> str:
    """The commit sha a branch, tag or sha names now (one request, as ``HfApi.model_info`` makes it).

    The answer is checked: a sha that is not 40 hex digits, or another sha than the one asked for, is refused (it
    would be put into every URL and the journal).
    """
    from urllib.parse import quote

    from .http import get_json

    url = f"{endpoint()}/api/models/{spec.repo_id}"
    if spec.revision:
        url += f"/revision/{quote(spec.revision, safe='')}"
    info, _ = get_json(url, str(spec))
    sha = info.get("sha") if isinstance(info, dict) else None
    if not isinstance(sha, str) or not SHA_RE.fullmatch(sha):
        raise HubError(f"{spec}: the hub did not say which commit this revision is (its answer has "
                       f"{'no' if sha is None else 'a malformed'} commit sha); check HF_ENDPOINT")
    if spec.revision and SHA_RE.fullmatch(spec.revision) and sha != spec.revision:
        raise HubError(f"{spec}: asked for commit {spec.revision}, the hub answered with commit {sha}; refusing a "
                       "hub that changes a pinned commit: check HF_ENDPOINT")
    return sha


MAX_ENTRIES = 1_000_000  # files and folders in one listing; the largest model repos hold some 10^4
MAX_PAGES = 10_000
NAME_MAX = 255 - len(".part")  # a file is downloaded as NAME.part beside its final name
PATH_MAX = 1024


@dataclass
class Listing:
    """A repo's files at one commit: the ones a pull can stage (``files``) and the ones it cannot (``unusable``:
    path -> why), which are fine to skip unless the conversion needs them (see :func:`check_needed`)."""

    files: list[RemoteFile]
    unusable: dict[str, str]

    def __iter__(self):  # noqa: ANN204  (a listing reads as its files)
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def list_files(spec: RepoSpec, commit: str) -> Listing:
    """Every file at ``commit`` with its size and sha256 (LFS) or git oid (others), checked as it is read.

    A listing that cannot come from a git tree (a path with ``..``, ``.`` or empty parts, absolute, with a NUL; the
    same path twice; a path both a file and a folder; pagination that loops or sends an empty page with a next link)
    is refused whole: the hub, or something between, is lying. A path git allows but that cannot be staged here (a backslash or control character, a part
    over NAME_MAX bytes, not UTF-8) and an entry with a field of the wrong type are ``unusable``: skipped, and an
    error only if the conversion needs that file.
    """
    from urllib.parse import quote, urlencode

    from .http import get_json, same_origin

    where = f"{spec.repo_id}@{commit[:12]}"
    url: str | None = f"{endpoint()}/api/models/{spec.repo_id}/tree/{quote(commit, safe='')}"
    params: dict[str, str] | None = {"recursive": "true", "expand": "false"}
    seen_urls: set[str] = set()
    files: list[RemoteFile] = []
    unusable: dict[str, str] = {}
    kinds: dict[str, str] = {}
    pages = 0
    while url is not None:
        seen_urls.add(url)
        if params:  # the first page's own URL too, as a next link would spell it
            seen_urls.add(f"{url}?{urlencode(params)}")
        page, headers = get_json(url, f"{where}: listing", params=params)
        params = None  # a next link carries its own query
        pages += 1
        if not isinstance(page, list):
            raise HubError(f"{where}: the hub's file listing is not a list; check HF_ENDPOINT")
        for e in page:
            _read_entry(e, where, files, unusable, kinds)
        if len(kinds) > MAX_ENTRIES:
            raise HubError(f"{where}: the hub lists more than {MAX_ENTRIES} entries; refusing (check HF_ENDPOINT)")
        url = _next_link(headers)
        if url is not None:
            if not same_origin(url, endpoint()):
                raise HubError(f"{where}: the listing's next page is on another host ({url[:80]}); refusing")
            if url in seen_urls or pages >= MAX_PAGES:
                raise HubError(f"{where}: the hub's listing pages loop; refusing (check HF_ENDPOINT)")
            if not page:  # each page has its own deadline: empty pages would let a hub hold the listing for days
                raise HubError(f"{where}: the hub sent an empty listing page with a next page; refusing (check "
                               "HF_ENDPOINT)")
    _check_tree(kinds, where)
    return Listing(files, unusable)


def _next_link(headers: Any) -> str | None:
    """The ``rel="next"`` URL of a ``Link`` header (GitHub's pagination format, which the hub uses), or None."""
    for part in (headers.get("Link") or "").split(","):
        m = re.match(r'\s*<([^>]*)>\s*;(.*)$', part)
        if m and re.search(r'(^|;)\s*rel="?next"?\s*(;|$)', m[2]):
            return m[1]
    return None


def _read_entry(e: Any, where: str, files: list[RemoteFile], unusable: dict[str, str], kinds: dict[str, str]) -> None:
    if not isinstance(e, dict) or not isinstance(e.get("path"), str) or e.get("type") not in ("file", "directory"):
        raise HubError(f"{where}: the hub's file listing holds an entry that is not a file or folder "
                       f"({str(e)[:60]!r}); check HF_ENDPOINT")
    path = e["path"]
    check_repo_path(path, where)
    if path in kinds:
        raise HubError(f"{where}: the hub lists {path!r} twice; its listing is not a repo tree, refusing")
    kinds[path] = e["type"]
    if e["type"] != "file":
        return
    why = unstageable(path)
    size, oid, lfs = e.get("size"), e.get("oid"), e.get("lfs")
    sha256 = None
    if why is None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        why = f"its size is {str(size)[:40]!r}, not a byte count"
    if why is None and lfs is not None:
        sha256 = lfs.get("oid") if isinstance(lfs, dict) else None
        if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
            why = f"its LFS sha256 is {str(sha256)[:70]!r}, not 64 hex digits"
        elif lfs.get("size", size) != size:
            why = f"its LFS size {str(lfs.get('size'))[:40]!r} is not its size {size}"
    if why is None and lfs is None and (not isinstance(oid, str) or not SHA_RE.fullmatch(oid)):
        why = f"its git oid is {str(oid)[:50]!r}, not 40 hex digits: its bytes could not be checked"
    if why is not None:
        unusable[path] = why
        files.append(RemoteFile(path, size if isinstance(size, int) and not isinstance(size, bool) and size >= 0
                                else 0, None, None))
        return
    files.append(RemoteFile(path, size, sha256, None if lfs is not None else oid))


def _check_tree(kinds: dict[str, str], where: str) -> None:
    for path, kind in kinds.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            if kinds.get("/".join(parts[:i])) == "file":
                raise HubError(f"{where}: the hub lists {'/'.join(parts[:i])!r} as a file and as the folder of "
                               f"{path!r}; its listing is not a repo tree, refusing")


def check_repo_path(path: str, where: str) -> None:
    """Refuse a listed path that would land outside the staging folder (the listing comes from the network)."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise HubError(f"{where}: the hub lists a file named {path[:200]!r}, which is not a safe relative path; "
                       "refusing (a git tree cannot hold it: check HF_ENDPOINT)")


def unstageable(path: str) -> str | None:
    """Why a path git allows cannot be staged here as a file of its own name, or None."""
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "its name holds a control character"
    if "\\" in path:
        return "its name holds a backslash (a folder separator on Windows)"
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    if len(raw) > PATH_MAX or any(len(p.encode()) > NAME_MAX for p in path.split("/")):
        return f"its name is longer than a file system allows ({len(raw)} bytes)"
    return None


def check_needed(files: Iterable[RemoteFile], unusable: dict[str, str], where: str) -> None:
    """Refuse a conversion that needs a file which cannot be staged safely: unusable, or colliding with another
    needed file on a case-insensitive file system, or with another's download name (NAME.part).

    The last cannot happen with what :func:`choose` and :func:`add_index_shards` pick (GGUF parts, config.json, the
    index, and shards the index names, held to plain ``*.safetensors`` names): none ends in ``.part``. It stays as a
    guard for a future kind of needed file; tests/test_hub_hostile.py pins the reasons."""
    fs = list(files)
    for f in fs:
        if f.path in unusable:
            raise HubError(f"{where}: the conversion needs {f.path[:200]!r}, but {unusable[f.path]}; refusing. If "
                           "the repo really holds it, download it by hand and extract the local copy")
        if not (f.sha256 or f.git_oid):
            raise HubError(f"{where}: the hub lists no hash for {f.path!r}, so its bytes could not be checked; "
                           "refusing: check HF_ENDPOINT")
    folded: dict[str, str] = {}
    names = {f.path for f in fs}
    for f in fs:
        key = same_file_key(f.path)
        if key in folded:
            raise HubError(f"{where}: the conversion needs {folded[key]!r} and {f.path!r}, which {SAME_FILE}: they "
                           "would overwrite each other there; refusing")
        folded[key] = f.path
        if f.path + ".part" in names:
            raise HubError(f"{where}: the conversion needs {f.path!r} and {f.path + '.part'!r}; the second is the "
                           "first one's download name: refusing")


# -- what a conversion needs ------------------------------------------------------------------------------
@dataclass
class Choice:
    """The files to fetch for one conversion, in fetch order, and the kind of source they make."""

    kind: str  # "gguf" | "safetensors"
    files: list[RemoteFile]
    main: str  # the path extract is given: first GGUF part, or the folder's config.json
    index_needed: bool = False  # safetensors with an index whose shard list is not known yet
    # SafeTensors: the checkpoint's companion files (tokenizer, ...; mertools.companions), also in ``files``, and
    # the top-level files the same rule left out, [{name, why}]
    companions: list[str] = field(default_factory=list)
    companions_skipped: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "main": self.main, "files": [f.as_dict() for f in self.files],
                "bytes": sum(f.size for f in self.files), "companions": self.companions,
                "companions_skipped": self.companions_skipped}


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
           where: str = "the repo", unusable: dict[str, str] | None = None) -> Choice:
    """Pick what conversion needs: one GGUF model (``gguf`` a file name or glob), or config + SafeTensors and the
    checkpoint's companion files (``unusable``: the listing's paths that cannot be staged; such a companion is
    left out with a note)."""
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
        first = [by_path[CONFIG], by_path[ST_INDEX if ST_INDEX in by_path else ST_SINGLE]]
        extra, skipped = _companions(fs, unusable or {})
        if include:  # said, not dropped without a word
            from ..companions import wanted

            skipped += [{"name": f.path, "why": "not matched by --include"} for f in files
                        if "/" not in f.path and f.path not in by_path and wanted(f.path)]
        return Choice("safetensors", first + [f for f in extra if f.path != CONFIG], CONFIG,
                      index_needed=ST_INDEX in by_path,
                      companions=[f.path for f in extra], companions_skipped=skipped)
    if len(models) == 1:
        return _gguf_choice(where, *next(iter(models.items())))
    if models:
        raise HubError(f"{where}: holds {len(models)} GGUF models; pick one with --gguf, e.g. --gguf "
                       f"'{next(iter(models)).rpartition('/')[2]}' (all: {_names(models)})")
    raise HubError(f"{where}: no GGUF model and no SafeTensors checkpoint (config.json with model.safetensors or "
                   f"{ST_INDEX}) found{' among files matching --include' if include else ''}")


def _companions(files: list[RemoteFile], unusable: dict[str, str]) -> tuple[list[RemoteFile], list[dict[str, str]]]:
    """The checkpoint's companion files among the repo's top-level files (the rule of ``mertools.companions``, as
    for a local folder), each with a hash to check it by; the rest of the candidates with why they are left out."""
    from ..companions import select, wanted

    cands, skipped = {}, []
    for f in sorted(files, key=lambda f: f.path):
        if "/" in f.path or not wanted(f.path):
            continue
        why = unusable.get(f.path)
        if why is None and not (f.sha256 or f.git_oid):
            why = "the hub lists no hash for it, so its bytes could not be checked"
        if why is None and f.path.endswith(".part"):
            why = "its name ends in .part, the name a download in progress takes here"
        if why is not None:
            skipped.append({"name": f.path, "why": why})
            continue
        cands[f.path] = f
    kept, more = select((f.path, f.size) for f in cands.values())
    return [cands[n] for n in kept], skipped + more


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
    from ..sources.safetensors import _index_files, json_object

    # the loader of local folders: nesting too deep, a key given twice, not an object give one SourceError; the
    # same plain-file-name check on every shard name (no path, no control characters, a .safetensors name)
    index = json_object(index_bytes, f"{where}: {ST_INDEX}", ST_INDEX, unique=True)
    shards = _index_files(index, f"{where}: {ST_INDEX}")  # type: ignore[arg-type]  # only printed
    by_path = {f.path: f for f in files}
    missing = [s for s in shards if s not in by_path]
    if missing:
        raise HubError(f"{where}: incomplete: {ST_INDEX} names {len(missing)} shard(s) that are not there "
                       f"({', '.join(missing[:3])}); nothing was converted")
    return Choice("safetensors", choice.files + [by_path[s] for s in shards], choice.main,
                  companions=choice.companions, companions_skipped=choice.companions_skipped)


def _names(models: dict[str, list[RemoteFile]]) -> str:
    return ", ".join(sorted(models))
