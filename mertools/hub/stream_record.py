"""The reassembly record of a SafeTensors pull converted shard by shard: the very ``reassembly.dat`` and manifest
``reassembly`` field a local extract of the same checkpoint writes (``mertools.st_reassemble.record_st``).

Each shard is hashed (``st_reassemble.shard_entry``: one sequential xxh3 pass, the whole shard and every tensor)
when the converter first takes it, right after its sha256 was checked, while its bytes are still in the page cache
and before anything is converted from it, so before the pipeline may delete it. Its entry goes to
``work/shard-xxh3.jsonl``, one fsync'd line per shard, with the hash the hub lists for the shard, the xxh3 of its
header bytes and a checksum of the line: a resumed pull takes the entries of the shards an earlier run converted
(and deleted) from there, each line checked first (a line that fails a check counts as absent). ``finish`` writes
reassembly.dat from the entries, the shard headers the plan was made from (each checked against its line's header
xxh3) and the bytes of config.json and the index.

Kept only where extract keeps it: the whole checkpoint (pull selects no layers or experts), no ``--dtype``, no FP8
tensors; otherwise no shard is hashed. A shard converted by an earlier run without a valid line (a work folder of
an older mertools, or an edited one) is hashed again if it is still on disk (``--keep-source``), its sha256 checked
first; if it is gone the pull still finishes, without a record, and says so (``reassembly_lost``), and
``reassemble`` refuses that folder in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import xxhash

from ..st_reassemble import record_extras, recordable, shard_entry, tensors_by_file, write_record
from .download import check_file
from .journal import append_line
from .remote import IntegrityError, RemoteFile

HASHES = "shard-xxh3.jsonl"
_HEX = frozenset("0123456789abcdef")


def _line_check(rec: dict[str, Any]) -> str:
    return xxhash.xxh3_64_hexdigest(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode())


def _is_xxh3(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 16 and set(x) <= _HEX


class ShardRecord:
    """The record of one streamed pull, fed shard by shard (one pipeline thread, like the streamer).

    >>> rec = ShardRecord(work, src, conv, dtype=None, headers=raw, listed=files, fetch=get)   # doctest: +SKIP
    >>> rec.add(0, "model-00001-of-00005.safetensors", path)   # hashed once, line fsync'd      # doctest: +SKIP
    >>> rec.into(staging, manifest)                             # reassembly.dat + the field     # doctest: +SKIP
    """

    def __init__(self, work: Path, src: Any, conv: Any, *, dtype: str | None,
                 headers: dict[str, tuple[int, bytes, int]], listed: list[RemoteFile],
                 fetch: Callable[[str], Path] | None):
        self.path = work / HASHES
        self.files_dir = work.parent / "files"
        self.names = [p.name for p in src.files]
        self.headers = headers
        self.listed = {f.path: f for f in listed}
        self.fetch = fetch
        self.active = dtype is None and conv.complete and recordable(src)
        self.lost: list[str] = []
        self.by_file = tensors_by_file(src) if self.active else {}
        self.entries = self._load() if self.active else {}

    def _hash_of(self, name: str) -> str | None:
        f = self.listed.get(name)
        return f.sha256 or f.git_oid if f is not None else None

    def _load(self) -> dict[str, dict[str, Any]]:
        """The lines of earlier runs that pass every check, by shard name."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return {}
        got = {}
        for ln in lines:
            try:
                rec = json.loads(ln)
                if self._valid(rec):
                    got[rec["name"]] = rec
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
                continue  # torn by a kill, or edited: as if never written
        return got

    def _valid(self, rec: Any) -> bool:
        body = {k: v for k, v in rec.items() if k != "check"}
        name = rec["name"]
        if name not in self.names or rec["check"] != _line_check(body) or rec["hub_hash"] != self._hash_of(name):
            return False  # another file than the one this pull verifies under that name
        entry, i = rec["entry"], self.names.index(name)
        want = [t.name for t in sorted(self.by_file[i], key=lambda t: t.offset)]
        return (entry["name"] == name and entry["size"] == self.listed[name].size and _is_xxh3(entry["xxh3_64"])
                and _is_xxh3(rec["header_xxh3"]) and [t[0] for t in entry["tensors"]] == want
                and all(len(t) == 2 and _is_xxh3(t[1]) for t in entry["tensors"]))

    def add(self, i: int, name: str, path: Path) -> None:
        """Hash shard ``i`` (``name``, verified, at ``path``) unless a valid line already holds it; durable before
        returning, so before anything is converted from the shard (and it is deleted)."""
        if not self.active or name in self.entries:
            return
        got = shard_entry(path, self.headers[name][0], self.by_file[i])
        if got is None:  # tensors that do not tile the data: the source reader refuses those, extract records none
            self.active = False
            return
        entry, header = got
        body = {"name": name, "hub_hash": self._hash_of(name), "header_xxh3": xxhash.xxh3_64_hexdigest(header),
                "entry": entry}
        rec = {**body, "check": _line_check(body)}
        append_line(self.path, rec)
        self.entries[name] = rec

    def into(self, staging: Path, manifest: dict[str, Any]) -> None:
        """Write reassembly.dat into ``staging`` and the ``reassembly`` field into ``manifest``, as extract would;
        nothing (and ``lost`` names the shards) when a shard converted earlier can no longer be hashed."""
        if not self.active:
            return
        for i, name in enumerate(self.names):
            kept = self.files_dir / name
            if name not in self.entries and kept.is_file():  # --keep-source: still on disk, checked again first
                try:
                    check_file(kept, self.listed[name], str(kept))
                except IntegrityError:
                    continue  # changed since it was converted: not the bytes OUT was made from
                self.add(i, name, kept)
        self.lost = [n for n in self.names if n not in self.entries or not self._same_header(n)]
        if self.lost or not self.active:
            return
        shards = [(self.entries[n]["entry"], self._header(n)) for n in self.names]
        fetch = self.fetch
        assert fetch is not None  # a streamed pull is an online one
        extra = record_extras(lambda name: fetch(name).read_bytes() if name in self.listed else None)
        manifest["reassembly"] = write_record(staging, shards, extra)

    def _header(self, name: str) -> bytes:
        n, blob, _size = self.headers[name]
        return n.to_bytes(8, "little") + blob

    def _same_header(self, name: str) -> bool:
        """The header the plan was made from (read again by range if work/headers.json was damaged) is the one the
        shard held when it was hashed."""
        return xxhash.xxh3_64_hexdigest(self._header(name)) == self.entries[name]["header_xxh3"]

    def summary(self) -> dict[str, Any]:
        """For the pull's result: whether OUT holds the record, and why not when it could have."""
        out: dict[str, Any] = {"reassembly_record": self.active and not self.lost}
        if self.lost:
            out["reassembly_lost"] = (
                f"no reassembly record: {len(self.lost)} shard(s) ({', '.join(self.lost[:3])}) were converted and "
                "deleted by an earlier run, and their hashes in the pull's work folder are missing or damaged, so "
                "`mertools reassemble` will refuse this folder; pull again with --overwrite to get one")
        return out

