"""Shard-by-shard conversion of a SafeTensors repo during ``pull``: the :class:`SafeTensorsStreamer`.

The plan comes from config.json and the shard headers alone (the first 8 + N bytes of each shard, by two range
requests per shard, kept in the work folder so that a resumed pull reads none of them again). Then, as each shard
arrives verified, every expert shard and dense tensor whose source bytes are all on disk is written, and each
source shard that nothing unwritten needs any more is handed back to the pipeline, which journals it
``converted`` and deletes it (unless ``--keep-source``). With ``window = 2`` the download of shard i+1 overlaps the
conversion of shard i and peak disk stays near output + two source shards (a model whose experts span more than
two consecutive shards gets the smallest window that cannot stall; see :func:`needed_window`).

Everything is written into ``work/`` inside the pull's staging folder, which survives a kill:

- ``work/experts/...``: the expert shards, exactly where OUT will have them;
- ``work/dense.gguf``: header written at once, each dense tensor at its final offset as its shard arrives; a
  resumed run checks the header is the one this plan writes and carries on in the same file (no copy);
- ``work/headers.json``: the shard headers the plan was made from (checked against each verified shard);
- ``work/progress.jsonl``: one fsync'd line per conversion step: the manifest entries of the expert shards and
  the indices of the dense tensors written (after their bytes were fsync'd). A line a kill tore is skipped (its
  step is done again); the next line starts on a line of its own (`journal.append_line`).
- ``work/shard-xxh3.jsonl``: each shard's hashes for the reassembly record, written as the shard is first taken
  (:mod:`mertools.hub.stream_record`), so that OUT gets the record a local extract writes, after a resume too.

``finish`` hard-links the finished files into the folder :func:`mertools.commit.staged_output` gives (lock,
staging, one atomic rename into OUT), so that a kill at any point leaves ``work/`` whole for the next run.

Not thread-safe: one pipeline thread calls it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

from ..commit import staged_output, test_point
from ..companions import write as write_companions
from ..errors import MertoolsError, OutputError
from ..layout import DENSE_NAME
from ..sources.scales import check_scales
from ..units import human_bytes
from .journal import append_line
from .remote import CONFIG, ST_INDEX, Choice, HubError
from .stream_record import ShardRecord

HEADERS = "headers.json"
PLAN = "plan.json"
PROGRESS = "progress.jsonl"
MAX_HEADER = 100 << 20  # the safetensors library's own limit on a header


def needed_window(order: list[int], items: list[set[int]], start: int = 2) -> int:
    """Smallest number of source files on disk at once that lets every item (a set of file indices that must be
    present together) be written when files arrive in ``order`` and leave once no unwritten item needs them.

    >>> needed_window([0, 1, 2], [{0}, {0, 1}, {1, 2}])
    2
    >>> needed_window([0, 1, 2], [{0, 2}, {1}])      # file 1 goes once {1} is written, before file 2 comes
    2
    >>> needed_window([0, 1, 2], [{0, 2}, {1, 2}])   # files 0 and 1 both wait for file 2
    3
    """
    w = max(1, start)
    while w < len(order):
        present: set[int] = set()
        left = [set(s) for s in items]
        stalled = False
        for i in order:
            if len(present) >= w:
                stalled = True
                break
            present.add(i)
            left = [s for s in left if not s <= present]
            present &= set().union(*left)
        if not stalled:
            return w
        w += 1
    return max(w, 1)


class SafeTensorsStreamer:
    """The pull's SafeTensors converter (see the module docstring), made by :func:`mertools.hub.convert.converter_for`
    and driven by :func:`mertools.hub.pulling.run_pipeline`. Not thread-safe: one pipeline thread calls it.

    >>> conv = SafeTensorsStreamer(choice, out, overwrite=False, source_extra=extra, fetch=get,
    ...                            read_range=lambda p, a, b: read_range(spec, commit, p, a, b))  # doctest: +SKIP
    >>> conv.begin(stage / "work", converted=set())          # plans; conv.window is now set   # doctest: +SKIP
    >>> conv.convert_available({"model-00001-of-00005.safetensors": path})  # -> shards now unneeded  # doctest: +SKIP
    >>> conv.finish()                                         # OUT committed                   # doctest: +SKIP
    """

    window: int | None = 2

    def __init__(self, choice: Choice, out: Path, *, overwrite: bool, source_extra: dict[str, Any],
                 dtype: str | None = None, progress: Callable[[int, int], Callable[[int], None]] | None = None,
                 fetch: Callable[[str], Path] | None = None,
                 read_range: Callable[[str, int, int], bytes] | None = None):
        self.choice, self.out, self.overwrite = choice, out, overwrite
        self.source_extra, self.dtype, self.progress = source_extra, dtype, progress
        self.fetch, self.read_range = fetch, read_range
        self.paths = {f.path for f in choice.files}
        # small files kept to the end: config.json, the index, and the companion files finish copies into OUT/hf/
        self.resident = {p for p in self.paths if p in (CONFIG, ST_INDEX)} | set(choice.companions)
        self.companion_files: dict[str, Path] = {}
        self.shard_names = [f.path for f in choice.files if f.path.endswith(".safetensors")]
        self.sizes = {f.path: f.size for f in choice.files}
        self.conv: Any = None
        self.dense: Any = None
        self.entries: list[dict[str, Any]] = []
        self.checked: set[str] = set()
        self.released: set[str] = set()
        self.stats = {"experts_written": 0, "experts_resumed": 0, "dense_written": 0, "dense_resumed": 0}
        self.t0 = time.perf_counter()

    def needs(self, path: str) -> bool:
        return path in self.paths

    # -- planning --------------------------------------------------------------------------------------
    def begin(self, work_dir: Path, converted: set[str]) -> None:
        self.work = work_dir
        self.converted = set(converted) & set(self.shard_names)
        self.released = set(self.converted)
        if self.fetch is None or self.read_range is None:
            return  # no hub at hand (offline: everything is local): plan once the files are present
        work_dir.mkdir(parents=True, exist_ok=True)
        from ..sources.safetensors import json_object

        config = json_object(self.fetch(CONFIG).read_bytes(), f"{self._where()}: {CONFIG}", CONFIG)
        self._plan(config, self._remote_headers())

    def _where(self) -> str:
        """repo@commit, for messages about the files of this pull."""
        hub = self.source_extra.get("hub", {})
        return f"{hub.get('repo', '?')}@{str(hub.get('commit', ''))[:12]}"

    def _remote_headers(self) -> dict[str, tuple[int, bytes, int]]:
        """Each shard's header: from work/headers.json of an earlier run, else by range requests (in parallel)."""
        cache = self.work / HEADERS
        try:
            kept = json.loads(cache.read_text(encoding="utf-8"))
            if sorted(kept) == sorted(self.shard_names):
                # The length is the blob's own (an older cache's "n" is ignored: an edited one must not reach
                # int.to_bytes as a negative number or a string)
                blobs = {n: kept[n]["header"].encode("latin-1") for n in self.shard_names}
                return {n: (len(b), b, self.sizes[n]) for n, b in blobs.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            pass  # damaged (ours, but the work folder may have been edited): read the headers again
        assert self.read_range is not None

        def one(name: str) -> tuple[int, bytes, int]:
            size = self.sizes[name]
            first = self.read_range(name, 0, 7) if size >= 8 else b""
            n = int.from_bytes(first, "little") if len(first) == 8 else -1
            if not 0 <= n <= MAX_HEADER or 8 + n > size:
                raise HubError(f"{name}: not a SafeTensors file (header length {n}, file size {size}); the repo is "
                               "damaged")
            blob = self.read_range(name, 8, 8 + n - 1) if n else b""
            if len(blob) != n:
                raise HubError(f"{name}: the hub sent {len(blob)} header bytes, not {n}; run the pull again")
            return n, blob, size

        with ThreadPoolExecutor(max_workers=8) as pool:
            got = dict(zip(self.shard_names, pool.map(one, self.shard_names)))
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text(json.dumps({k: {"header": b.decode("latin-1")} for k, (_n, b, _s) in got.items()}),
                       encoding="utf-8")
        os.replace(tmp, cache)
        return got

    def _plan(self, config: dict[str, Any], raw: dict[str, tuple[int, bytes, int]]) -> None:
        from ..convert import plan
        from ..sources.safetensors import SafeTensorsSource, _index_files, check_index, json_object, parse_header

        self.raw_headers = raw
        headers = {}
        for name in self.shard_names:  # the local reader's checks (nesting, duplicate keys, entries, offsets)
            _n, blob, size = raw[name]
            head = len(blob).to_bytes(8, "little") + blob
            headers[name] = (*parse_header(head, f"{self._where()}: {name}", size), size)
        files_dir = self.work.parent / "files"
        src = SafeTensorsSource.from_headers(files_dir, config, headers)
        if ST_INDEX in self.paths and self.fetch is not None:
            index = json_object(self.fetch(ST_INDEX).read_bytes(), f"{self._where()}: {ST_INDEX}", ST_INDEX,
                                unique=True)
            _index_files(index, files_dir / ST_INDEX)
            check_index(index, headers, files_dir / ST_INDEX)
        self.src = src
        self.conv = plan(src, dtype=self.dtype)
        self.index_of = {name: i for i, name in enumerate(self.shard_names)}
        self.record = ShardRecord(self.work, src, self.conv, dtype=self.dtype, headers=raw,
                                  listed=self.choice.files, fetch=self.fetch)
        self._check_plan_key()
        done_entries, done_dense = self._load_progress()
        self.dense = self._open_dense(done_dense)
        by_key = {(s.layer, s.expert): s for s in self.conv.shards}
        for e in done_entries:
            key = (e["layer"], e["expert"])
            if key not in by_key or not (self.work / e["path"]).is_file() or \
                    (self.work / e["path"]).stat().st_size != e["size"]:
                continue  # not in this plan, or its file is gone: written again if its sources are still at hand
            self.conv.written.add(key)
            self.entries.append(e)
        kept = {e["path"] for e in self.entries}
        if (self.work / "experts").is_dir():  # shards a kill cut short (never logged): written again from scratch
            for f in (self.work / "experts").rglob("*"):
                if f.is_file() and f.relative_to(self.work).as_posix() not in kept:
                    f.unlink()
        self.stats["experts_resumed"] = len(self.entries)
        self.stats["dense_resumed"] = len(self.dense.done)
        lost = set(self.index_of[n] for n in self.converted) & self.conv.pending_files(self.dense)
        if lost:
            names = ", ".join(self.shard_names[i] for i in sorted(lost))
            raise MertoolsError(f"{self.work}: the pull's work folder lacks output made from {names}, which an "
                                f"earlier run already deleted; remove {self.work.parent} and pull again")
        items = [self.conv.files_of(s) for s in self.conv.shards if (s.layer, s.expert) not in self.conv.written]
        items += [self.dense._files_of(t) for k, t in enumerate(self.dense.tensors) if k not in self.dense.done]
        order = [self.index_of[n] for n in self.shard_names if n not in self.converted]
        self.window = needed_window(order, items, 2)
        # what is still to be written, plus the largest shards still to come (as many as the window holds)
        left = self.conv.expert_bytes - sum(e["size"] for e in self.entries) + src.dense_estimate()
        left += sum(sorted((self.sizes[n] for n in self.shard_names if n not in self.converted), reverse=True)[
            :self.window])
        free = shutil.disk_usage(self.work).free
        if free < left:
            raise OutputError(f"{self.out}: the pull needs about {human_bytes(left)} free beside it (output + "
                              f"{self.window} source shards) but only {human_bytes(free)} is; free some space or "
                              "choose another OUT")
        self.total = self.conv.payload_bytes + sum(t.nbytes for t in src.dense_tensors())
        self.tick = self.progress(self.total, len(self.conv.shards)) if self.progress else (lambda n: None)

    def _check_plan_key(self) -> None:
        """work/ holds output of one plan (today: one --dtype); output of another must not be mixed in."""
        key = {"dtype": self.dtype}
        path = self.work / PLAN
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old == key:
            return
        if old is not None and self.converted:
            was = old.get("dtype") or "(none)"
            raise OutputError(f"{self.out}: an earlier, unfinished pull into it used --dtype {was}; run it again "
                              f"with the same --dtype, or remove {self.work.parent} to start over")
        for name in (PROGRESS, DENSE_NAME):
            (self.work / name).unlink(missing_ok=True)
        shutil.rmtree(self.work / "experts", ignore_errors=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(key), encoding="utf-8")
        os.replace(tmp, path)

    def _load_progress(self) -> tuple[list[dict[str, Any]], set[int]]:
        entries: dict[tuple[int, int], dict[str, Any]] = {}
        dense: set[int] = set()
        try:
            lines = (self.work / PROGRESS).read_text(encoding="utf-8").splitlines()
        except OSError:
            lines = []
        for ln in lines:
            try:
                rec = json.loads(ln)
            except ValueError:
                continue  # torn by a kill: that step is done again; the lines after it are a later run's
            for e in rec.get("experts", []):
                entries[(e["layer"], e["expert"])] = e
            dense.update(rec.get("dense", []))
        return list(entries.values()), dense

    def _open_dense(self, done: set[int]) -> Any:
        """work/dense.gguf: a fresh one, or the one an earlier run began (its header checked, no byte copied)."""
        from ..convert import open_dense

        path = self.work / DENSE_NAME
        if not done:
            path.unlink(missing_ok=True)
            return open_dense(self.conv, self.work, fsync=True)
        scratch = self.work / "dense-header"
        scratch.mkdir(exist_ok=True)
        dw = open_dense(self.conv, scratch, fsync=True)  # header + sparse body: next to no space
        if not hasattr(dw, "adopt"):
            dw.close()
            raise MertoolsError("this SafeTensors source cannot resume dense.gguf; remove "
                                f"{self.work.parent} and pull again")
        try:
            if not path.is_file():
                raise ValueError("missing")
            dw.adopt(path, done)
        except ValueError as exc:
            dw.close()
            raise MertoolsError(f"{path}: {exc}; the pull's work folder is damaged: remove {self.work.parent} and "
                                "pull again") from None
        return dw

    # -- converting ------------------------------------------------------------------------------------
    def convert_available(self, present: Mapping[str, Path]) -> set[str]:
        if self.conv is None:
            return self._whole(present)
        self.companion_files.update((p, Path(present[p])) for p in self.choice.companions if p in present)
        have = set()
        for name in self.shard_names:
            if name in present and name not in self.released:
                i = self.index_of[name]
                if name not in self.checked:
                    self._check_header(name, Path(present[name]))
                    self.record.add(i, name, Path(present[name]))  # hashed while hot, before it can be deleted
                    self.src.files[i] = Path(present[name])
                    # its scales by value, before anything is converted from it (a scale is converted with its
                    # weight only once both files are here, so every scale is checked before it is applied)
                    check_scales(self.src, self.conv.plans, files={i})
                    self.checked.add(name)
                have.add(i)
        ready = self.conv.ready(have)
        if ready:
            from ..convert import write_experts

            # fsync: the step's shards and their folders durable at once, before the progress line names them
            entries = write_experts(self.conv, self.work, ready, fsync=True, tick=self.tick)
            self.entries.extend(entries)
            self.stats["experts_written"] += len(entries)
        before = set(self.dense.done)
        self.stats["dense_written"] += self.dense.write_ready(have, self.tick)
        new_dense = sorted(set(self.dense.done) - before)
        if ready or new_dense:
            if new_dense:
                os.fsync(self.dense.fd)
            self._log({"experts": entries if ready else [], "dense": new_dense})
        pending = self.conv.pending_files(self.dense)
        done = set()
        for i in have - pending:
            self.src.release(i)
            done.add(self.shard_names[i])
        self.released |= done
        return done

    def _check_header(self, name: str, local: Path) -> None:
        """The verified shard must have the header the plan was made from (range reads are not hash-checked)."""
        n, blob, _size = self.raw_headers[name]
        with open(local, "rb") as fh:
            got = fh.read(8 + n)
        if got != n.to_bytes(8, "little") + blob:
            raise HubError(f"{name}: its verified bytes start with another header than the one read ahead to plan "
                           f"the conversion; the hub served inconsistent data: remove {self.work.parent} and pull "
                           "again")

    def _log(self, rec: dict[str, Any]) -> None:
        append_line(self.work / PROGRESS, rec)  # (the file's own name too, or a power cut loses its steps)
        test_point("pull-step")

    def _whole(self, present: Mapping[str, Path]) -> set[str]:
        """Offline (files from the HF cache, all present at once): extract the folder as a local extract does."""
        from .convert import FolderConverter

        self._fallback = FolderConverter(self.choice, self.out, overwrite=self.overwrite,
                                         source_extra=self.source_extra, dtype=self.dtype, progress=self.progress)
        self._fallback.begin(self.work, set())
        return self._fallback.convert_available(present)

    # -- committing ------------------------------------------------------------------------------------
    def finish(self) -> Any:
        if self.conv is None:
            return self._fallback.finish() if hasattr(self, "_fallback") else None
        from ..convert import build_manifest, write_manifest

        missing = [f"layer {s.layer} expert {s.expert}" for s in self.conv.shards
                   if (s.layer, s.expert) not in self.conv.written]
        if missing:
            raise MertoolsError(f"{self.out}: {len(missing)} expert shards were not written (e.g. {missing[0]}); "
                                "run the pull again")
        dense_entry = self.dense.finish()
        manifest = build_manifest(self.conv, self.entries, dense_entry, extra_source=self.source_extra)
        files = [e["path"] for e in self.entries] + [DENSE_NAME]
        with staged_output(self.out, overwrite=self.overwrite, sources=[], fsync=True,
                           need_bytes=0) as staging:
            # hard links: work/ stays whole until OUT is in place, so a kill here loses nothing
            for rel in files:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(self.work / rel, staging / rel)
            self.record.into(staging, manifest)
            # the checkpoint's tokenizer and other small files (mertools.companions)
            manifest["companions"] = write_companions([self.companion_files[p] for p in self.choice.companions],
                                                      staging)
            write_manifest(staging, manifest)  # staged_output flushes it and every new link before the commit
        self.src.close()
        return _Summary({
            "out": str(self.out), "experts": len(self.conv.shards),
            "layers": len({s.layer for s in self.conv.shards}),
            "bytes_written": self.conv.expert_bytes + dense_entry["size"], "expert_bytes": self.conv.expert_bytes,
            "dense_bytes": dense_entry["size"], "seconds": round(time.perf_counter() - self.t0, 4),
            "streamed": True, "window": self.window, **self.stats, **self.record.summary(),
        })


class _Summary(dict):
    def as_dict(self) -> dict[str, Any]:
        return dict(self)


