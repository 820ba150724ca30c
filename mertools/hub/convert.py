"""How a pull hands verified source files to a converter: the :class:`StreamingConverter` protocol.

The pull pipeline (:mod:`mertools.hub.pulling`) downloads the files a converter ``needs`` one after another, each
verified against its sha256 before anything reads it, and calls ``convert_available`` with every file present so
far. The converter writes whatever it can from those files and answers which files it no longer needs; the
pipeline deletes them (unless ``--keep-source``) and journals them as converted. ``window`` bounds how many source
files may be on disk at once (``resident`` small files such as config.json, the index and the checkpoint's companion
files aside): the download of
file i+1 overlaps the conversion of file i, so a streaming converter uses 2 and peak disk stays near output + 2
source files. ``finish`` commits OUT (staging + rename).

Two implementations:

- :class:`GGUFConverter`: a GGUF model (one file or a split set) is extracted once every part is present
  (``window`` None: all parts at once), with :func:`mertools.extract.extract`.
- :class:`mertools.hub.stream.SafeTensorsStreamer`: SafeTensors shard by shard (``window = 2``): plans from
  config.json and the shard headers (range requests), writes every expert and dense tensor whose bytes are on disk
  into ``work_dir`` and returns the shards nothing unwritten needs; ``begin`` gets the files the journal says an
  earlier run converted; ``finish`` writes the manifest and commits OUT through ``staged_output``.
- :class:`FolderConverter`: the SafeTensors fallback (offline pulls from the HF cache, where every file is already
  on disk): extract the folder with the same call as a local extract.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from ..errors import MertoolsError
from .remote import Choice


class StreamingConverter(Protocol):
    """A converter fed by the pull pipeline, file by file. Called from one thread only (the pipeline's)."""

    window: int | None  # most source files on disk at once, ``resident`` ones aside; None: all of them
    resident: set[str]  # small files kept to the end (config.json, the index, companions): outside the window

    def needs(self, path: str) -> bool:
        """Whether repo file ``path`` must be downloaded for this conversion."""
        ...

    def begin(self, work_dir: Path, converted: set[str]) -> None:
        """Start, or resume after files ``converted`` by an earlier run; ``work_dir`` survives across runs."""
        ...

    def convert_available(self, present: Mapping[str, Path]) -> set[str]:
        """Convert what the verified files ``present`` (repo path -> local path) allow; return paths now unneeded."""
        ...

    def finish(self) -> Any:
        """Write what is left and put the complete output at OUT; returns the extract summary."""
        ...


def extract_to(src: Path, out: Path, *, overwrite: bool, source_extra: dict[str, Any], dtype: str | None,
               progress: Callable[[int, int], Callable[[int], None]] | None,
               companions: list[Path] | None = None) -> Any:
    """The one place a pull writes its output: mertools' extract (staging folder + rename into OUT).
    ``companions``: the checkpoint's companion files the pull chose and checked (None: a GGUF source's none)."""
    from ..extract import extract

    kw: dict[str, Any] = {"overwrite": overwrite, "source_extra": source_extra, "progress": progress}
    if companions is not None:
        kw["companions"] = companions
    if dtype is not None:
        if "dtype" not in inspect.signature(extract).parameters:
            raise MertoolsError(f"--dtype {dtype}: this version of mertools cannot convert types; drop --dtype")
        kw["dtype"] = dtype
    return extract(src, out, **kw)


class _WholeConverter:
    """Converts once every needed file is present (a GGUF set, or the SafeTensors fallback)."""

    window: int | None = None
    resident: set[str] = set()

    def __init__(self, choice: Choice, out: Path, *, overwrite: bool, source_extra: dict[str, Any],
                 dtype: str | None = None, progress: Callable[[int, int], Callable[[int], None]] | None = None,
                 **_hub: Any):  # fetch/read_range (what a streaming converter plans with): not needed here
        self.choice, self.out, self.overwrite = choice, out, overwrite
        self.source_extra, self.dtype, self.progress = source_extra, dtype, progress
        self.paths = {f.path for f in choice.files}
        self.result: Any = None

    def needs(self, path: str) -> bool:
        return path in self.paths

    def begin(self, work_dir: Path, converted: set[str]) -> None:
        self.work_dir = work_dir

    def convert_available(self, present: Mapping[str, Path]) -> set[str]:
        if not self.paths <= set(present):
            return set()
        src = self.source_path(present)
        # a SafeTensors pull's companion files are the ones it chose and checked, not whatever the folder holds
        # (an offline pull's snapshot may hold more)
        companions = [present[p] for p in self.choice.companions] if self.choice.kind == "safetensors" else None
        try:
            self.result = extract_to(src, self.out, overwrite=self.overwrite, source_extra=self.source_extra,
                                     dtype=self.dtype, progress=self.progress, companions=companions)
        except MertoolsError as exc:
            raise type(exc)(f"{exc}. The verified source files stay in {src if src.is_dir() else src.parent}; "
                            "running the pull again reuses them") from None
        return set(self.paths)

    def source_path(self, present: Mapping[str, Path]) -> Path:
        raise NotImplementedError

    def finish(self) -> Any:
        return self.result


class GGUFConverter(_WholeConverter):
    """A GGUF model (single file or split set): extracted once all its parts are verified."""

    def source_path(self, present: Mapping[str, Path]) -> Path:
        return present[self.choice.main]


class FolderConverter(_WholeConverter):
    """SafeTensors fallback: all of config, index and shards first, then ``extract(folder, OUT)``."""

    def source_path(self, present: Mapping[str, Path]) -> Path:
        return present[self.choice.main].parent


def converter_for(choice: Choice, out: Path, **kw: Any) -> StreamingConverter:
    """The converter for a choice of files: GGUF whole; SafeTensors shard by shard (window 2) where the
    SafeTensors source can plan from headers, else the download-all fallback.

    ``kw``: ``overwrite``, ``source_extra``, ``dtype``, ``progress``, and from an online pull ``fetch(path) -> Path``
    (a verified resident file such as config.json) and ``read_range(path, first, last) -> bytes``.
    """
    if choice.kind == "gguf":
        return GGUFConverter(choice, out, **kw)
    try:
        from ..sources.safetensors import SafeTensorsSource
    except ImportError:
        return FolderConverter(choice, out, **kw)
    if not hasattr(SafeTensorsSource, "from_headers"):
        return FolderConverter(choice, out, **kw)
    from .stream import SafeTensorsStreamer

    return SafeTensorsStreamer(choice, out, **kw)
