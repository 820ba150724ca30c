"""``push(quiet=True)``: huggingface_hub's warnings and progress bars silenced for that push, and only for it.

Why not ``huggingface_hub.logging.set_verbosity_error()`` and ``disable_progress_bars()`` (what push did): both
change process-wide settings and nothing put them back, so a user's own logging configuration was clobbered for
the rest of the process, and two threads pushing (one quiet, one not) raced on the library's logger level.

Here a scope (:func:`quiet_scope`, entered by every push, quiet or not) adds one :class:`logging.Filter` to
huggingface_hub's loggers while any push runs, and takes it off when the last one ends; levels, handlers and the
user's own filters are never touched. "Its loggers" includes those of modules not imported yet (a push imports
several mid-way): the logger of each of its modules is created, filtered, before the module makes it. The filter lets ERROR and above through and decides the rest by the thread
that logs:

- a thread running a push follows that push (its innermost one): quiet drops, loud keeps;
- a thread of huggingface_hub's upload pool follows the push whose file it is uploading: push hands the library
  its files as :func:`adopting` operations, whose ``as_file`` (what the library's LFS upload streams the file
  through, retries included) makes the worker follow that push for the duration (:func:`adopt`);
- any other thread (a worker between two files, e.g. a multipart upload's completion request) is dropped only
  while every open push is quiet: a loud push running anywhere keeps them all, so a quiet push never hides what a
  loud one asked to see.

Progress bars follow the same per-push rule, with no process-wide switch: huggingface_hub decides each bar when it
is made by one module-level function (``utils.tqdm.are_progress_bars_disabled``); while a quiet push runs it is
wrapped so that a thread running (or uploading for) a quiet push gets no bar, and every other thread gets the
library's own answer from the user's table, which is never written (it used to be emptied for the duration of
any quiet push: a loud push beside it showed no bar). A quiet push's file uploads are also asked for no bar
(``with_tqdm=False``). ``HF_HUB_DISABLE_PROGRESS_BARS`` set in the environment keeps its priority, as
huggingface_hub gives it. (Xet uploads report progress through hf_xet, outside both.)

Thread-safe: the scopes' bookkeeping is under one lock; nested scopes in one thread stack.

>>> with quiet_scope(True):                     # doctest: +SKIP
...     HfApi().create_commit(...)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import threading
from pathlib import Path
from typing import Any, Iterator

LIBRARY = "huggingface_hub"

_LOCK = threading.Lock()
_OWNERS: dict[int, list[bool]] = {}  # thread ident -> quiet flag of each of its open scopes, innermost last
_OPEN = {"quiet": 0, "loud": 0}
_FILTERED: list[logging.Logger] = []  # the loggers the filter was added to, to take it off again
_SAVED_BARS: dict[str, Any] = {}  # {"real": the library's are_progress_bars_disabled} while it is wrapped


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        with _LOCK:
            # record.thread is None where logging.logThreads is off: no thread to follow, so the rule for threads
            # that run no push (dropped only while every open push is quiet)
            stack = _OWNERS.get(record.thread) if record.thread is not None else None
            if stack:
                return not stack[-1]
            return not (_OPEN["quiet"] and not _OPEN["loud"])


_FILTER = _QuietFilter()


@functools.lru_cache(maxsize=1)
def _module_logger_names() -> tuple[str, ...]:
    """The logger name of every module of huggingface_hub, imported or not, read from its files.

    Its modules make their loggers with ``get_logger(__name__)`` when first imported, and a push imports several
    mid-way (``_commit_api``, ``lfs``, ``_upload_pipeline``): a filter added only to the loggers existing when the
    scope opened missed those, and the first quiet push of a process was not quiet. A logger's filter sees only
    that logger's own records (not its children's, and a handler is the user's), so each one must exist, with the
    filter on, before its module logs: creating it by name is what ``getLogger`` does at import anyway, and the
    module then gets this same object."""
    import huggingface_hub

    names = {LIBRARY}
    for base in map(Path, huggingface_hub.__path__):
        for f in base.rglob("*.py"):
            parts = f.relative_to(base).with_suffix("").parts
            if parts and parts[-1] == "__init__":
                parts = parts[:-1]
            if all(p.isidentifier() for p in parts):
                names.add(".".join((LIBRARY, *parts)))
    return tuple(sorted(names))


def _library_loggers() -> list[logging.Logger]:
    """huggingface_hub's loggers: one for each of its modules (created now where its module has not made it yet),
    and any other logger under its name that exists now (a logger's filter sees only its own records, not its
    children's, so each one that logs needs the filter)."""
    out = [logging.getLogger(n) for n in _module_logger_names()]
    seen = set(map(id, out))
    for n in list(logging.root.manager.loggerDict):
        if n == LIBRARY or n.startswith(LIBRARY + "."):
            lg = logging.root.manager.loggerDict.get(n)
            if isinstance(lg, logging.Logger) and id(lg) not in seen:
                seen.add(id(lg))
                out.append(lg)
    return out


def _bars_module() -> Any:
    # by name: huggingface_hub.utils re-exports a class called tqdm, which hides the module of that name
    return importlib.import_module(f"{LIBRARY}.utils.tqdm")


def _thread_quiet() -> bool:
    """Whether the calling thread runs (or uploads for) a quiet push, its innermost one deciding."""
    with _LOCK:
        stack = _OWNERS.get(threading.get_ident())
        return bool(stack and stack[-1])


def bars_wanted(quiet: bool) -> bool:
    """Whether a push (quiet or not) asks for bars: a quiet one does not, unless the environment's
    ``HF_HUB_DISABLE_PROGRESS_BARS=0`` says bars are never to be turned off (it has priority, as the library says).

    >>> bars_wanted(False), bars_wanted(True)      # doctest: +SKIP
    (True, False)
    """
    return not quiet or _bars_module().HF_HUB_DISABLE_PROGRESS_BARS is False


def _bars_off() -> None:
    """(with _LOCK held) The first quiet scope opens: wrap the library's bar switch (see the module's doc)."""
    mod = _bars_module()
    real = mod.are_progress_bars_disabled

    def are_progress_bars_disabled(name: str | None = None) -> bool:
        if mod.HF_HUB_DISABLE_PROGRESS_BARS is None and _thread_quiet():
            return True
        return real(name)

    are_progress_bars_disabled.__wrapped__ = real  # type: ignore[attr-defined]
    mod.are_progress_bars_disabled = are_progress_bars_disabled
    _SAVED_BARS["real"], _SAVED_BARS["wrapper"] = real, are_progress_bars_disabled


def _bars_back() -> None:
    """(with _LOCK held) The last quiet scope ended: the library's own switch back, unless someone has replaced
    ours since (theirs is kept: putting ours back would undo their change)."""
    real, wrapper = _SAVED_BARS.pop("real", None), _SAVED_BARS.pop("wrapper", None)
    if real is not None:
        mod = _bars_module()
        if mod.are_progress_bars_disabled is wrapper:
            mod.are_progress_bars_disabled = real


@contextlib.contextmanager
def adopt(quiet: bool) -> Iterator[None]:
    """Make the calling thread follow a push (quiet or loud) for the block: its records and bars are that push's.
    For a thread that works for a push it did not start (huggingface_hub's upload pool); inside the push's
    :func:`quiet_scope` only (outside it, nothing is filtered or wrapped, and this changes nothing).

    >>> with adopt(True):                          # doctest: +SKIP
    ...     upload_one_file()
    """
    me = threading.get_ident()
    with _LOCK:
        _OWNERS.setdefault(me, []).append(quiet)
    try:
        yield
    finally:
        with _LOCK:
            stack = _OWNERS[me]
            stack.pop()
            if not stack:
                del _OWNERS[me]


def adopting(cls: type, quiet: bool) -> type:
    """A subclass of huggingface_hub's ``CommitOperationAdd`` (`cls`) whose file, when the library streams it
    (``as_file``: an LFS upload, on whichever thread), is read by a thread following this push (:func:`adopt`), with
    the push's bar wish. Instances are ordinary operations for the library (same fields, isinstance holds).

    >>> Add = adopting(CommitOperationAdd, quiet=True)                # doctest: +SKIP
    >>> ops = [Add(path_in_repo="manifest.json", path_or_fileobj="out/manifest.json")]   # doctest: +SKIP
    """
    return _adopting(cls, bool(quiet))


@functools.lru_cache(maxsize=None)
def _adopting(cls: type, quiet: bool) -> type:
    class Adopted(cls):  # type: ignore[valid-type, misc]
        @contextlib.contextmanager
        def as_file(self, with_tqdm: bool = False) -> Iterator[Any]:
            with adopt(quiet), super().as_file(with_tqdm=with_tqdm and bars_wanted(quiet)) as fh:
                yield fh

    Adopted.__name__ = Adopted.__qualname__ = f"{cls.__name__}"
    return Adopted


@contextlib.contextmanager
def quiet_scope(quiet: bool) -> Iterator[None]:
    """Run the block as one push, quiet or loud (see the module's doc); everything is put back on every exit."""
    import huggingface_hub.hf_api  # noqa: F401  (its modules create their loggers on import: filter them all)

    me = threading.get_ident()
    kind = "quiet" if quiet else "loud"
    loggers = _library_loggers()  # outside our lock: getLogger takes logging's, and our filter takes ours
    with _LOCK:
        for lg in loggers:  # every scope: loggers made since the first one under other names
            if _FILTER not in lg.filters:
                lg.addFilter(_FILTER)
                _FILTERED.append(lg)
        _OWNERS.setdefault(me, []).append(quiet)
        _OPEN[kind] += 1
        try:
            if quiet and _OPEN["quiet"] == 1:
                _bars_off()
        except BaseException:
            _leave(me, kind, quiet)  # a scope that did not open must not leave the filter or its count behind
            raise
    try:
        yield
    finally:
        with _LOCK:
            _leave(me, kind, quiet)


def _leave(me: int, kind: str, quiet: bool) -> None:
    """(with _LOCK held) One scope of thread ``me`` ends: the bars back after the last quiet one, the filter off
    after the last one."""
    stack = _OWNERS[me]
    stack.pop()
    if not stack:
        del _OWNERS[me]
    _OPEN[kind] -= 1
    try:
        if quiet and _OPEN["quiet"] == 0:
            _bars_back()
    finally:
        if _OPEN["quiet"] == 0 and _OPEN["loud"] == 0:
            for lg in _FILTERED:
                lg.removeFilter(_FILTER)
            _FILTERED.clear()
