"""The pull journal: which source files are verified and which are converted, fsync'd at every change.

One JSON file in the pull's staging folder, replaced atomically (write, fsync, rename, fsync the folder), so that
a kill at any moment leaves either the old or the new state, never a torn one. A journal for another commit than the
one being pulled is stale: the pull starts over rather than mix two revisions.

Not thread-safe by itself: the pull's downloader thread and converter both go through :meth:`Journal.mark`,
which holds a lock.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from ..commit import fsync_dir

JOURNAL_NAME = "pull-journal.json"
VERSION = 1


class Journal:
    """>>> j = Journal.open(Path("staging"), repo="org/m", commit=sha)   # doctest: +SKIP
    >>> j.mark("model.gguf", "verified", sha256="...")                   # doctest: +SKIP
    """

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data
        self.lock = threading.Lock()

    @classmethod
    def open(cls, folder: Path, *, repo: str, commit: str) -> "Journal":
        path = folder / JOURNAL_NAME
        data: dict[str, Any] | None = None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not (isinstance(data, dict) and data.get("version") == VERSION and data.get("repo") == repo
                    and data.get("commit") == commit and isinstance(data.get("files"), dict)):
                data = None
        except (OSError, ValueError):
            data = None
        fresh = data is None
        j = cls(path, data or {"version": VERSION, "repo": repo, "commit": commit, "files": {}, "done": False})
        j.fresh = fresh
        if fresh:
            j._write()
        return j

    def state(self, name: str) -> str | None:
        with self.lock:
            return self.data["files"].get(name, {}).get("state")

    def mark(self, name: str, state: str, **extra: Any) -> None:
        """Record ``state`` ("verified", "converted", "deleted") for file ``name``, durably, before returning."""
        with self.lock:
            self.data["files"].setdefault(name, {}).update(state=state, **extra)
            self._write()

    def set(self, **kw: Any) -> None:
        with self.lock:
            self.data.update(kw)
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)


def append_line(path: Path, rec: dict[str, Any]) -> None:
    """Append ``rec`` as one JSON line to ``path``, durable before returning (the folder too when the file is new).

    A line a kill cut short stays a line of its own: this one starts on a new line, so that a reader skipping lines
    that do not parse loses only the torn one (the step it acknowledged is done again), not every later run's."""
    new = not path.exists()
    with open(path, "ab") as fh:
        lead = b""
        if fh.tell():
            with open(path, "rb") as rd:
                rd.seek(-1, os.SEEK_END)
                lead = b"" if rd.read(1) == b"\n" else b"\n"
        fh.write(lead + json.dumps(rec, separators=(",", ":")).encode() + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    if new:
        fsync_dir(path.parent)
