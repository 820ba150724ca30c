"""Write a folder so that it appears whole or not at all, and nothing that was there before is lost.

Every command that produces an output folder (``extract``; ``unpack``, ``export`` and hub ``pull`` too) writes
through :func:`staged_output`: a hidden staging folder beside OUT, an advisory lock held for the whole run, one
flush of the whole finished folder (:func:`flush_tree`), and a commit that puts it at OUT in one rename (or one
atomic exchange, with ``overwrite``). The guarantees
are written down in docs/format.md ("Guarantees of an output folder"); this module is their only implementation.

Names beside OUT (all hidden, all derived from OUT's name, so two outputs in one parent never meet):

- ``.OUT.mertools-lock``: the lock file (removed again when the run ends);
- ``.OUT.mertools-staging-PID-RAND``: the folder being written;
- ``.OUT.mertools-old-RAND``: an old OUT moved aside during a replace (only where the atomic exchange is missing).

Test hooks (documented here because tests drive real processes through them; they do nothing unless set):
``MERTOOLS_TEST_KILL_AT=POINT`` makes the process SIGKILL itself at POINT, ``MERTOOLS_TEST_STOP_AT=POINT`` makes
it SIGSTOP itself there once (a test then sends signals or runs a second process, and SIGCONTs it), and
``MERTOOLS_TEST_NO_EXCHANGE=1`` forces the rename-aside replace, ``MERTOOLS_TEST_NO_SYNCFS=1`` the parallel
fsyncs that stand in where syncfs(2) is missing or refused. POINTs: ``locked`` (lock held, nothing written),
``writing`` (called by writers after their first file), ``before-commit``, ``between-renames`` (OUT moved aside,
staging not yet in place), ``before-cleanup`` (new OUT in place, old copy not yet removed).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import re
import shutil
import signal
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from mer_runtime.errors import MerError

from .errors import OutputError
from .units import human_bytes

STAGING_MARK = ".mertools-staging-"
OLD_MARK = ".mertools-old-"
LOCK_MARK = ".mertools-lock"
MARKER = "manifest.json"  # every folder mertools writes has one; --overwrite replaces only such a folder
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT, SIGTERM or SIGHUP; staging was removed and OUT left as it was.

    A ``KeyboardInterrupt`` so that code which already handles Ctrl-C handles the others alike; ``signum`` says
    which signal it was (the CLI exits ``128 + signum``).

    Example:
        >>> try:
        ...     raise Interrupted(signal.SIGTERM)
        ... except KeyboardInterrupt as exc:
        ...     exc.signum == signal.SIGTERM
        True
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}; no partial output was left behind"


# -- test hooks -------------------------------------------------------------------------------------------------
_fired: set[str] = set()


def test_point(name: str) -> None:
    """Stop or kill this process at ``name`` when a test asked for it (see the module docstring)."""
    if os.environ.get("MERTOOLS_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("MERTOOLS_TEST_STOP_AT") == name and name not in _fired:
        _fired.add(name)
        os.kill(os.getpid(), signal.SIGSTOP)


test_point.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


# -- renameat2(RENAME_EXCHANGE, RENAME_NOREPLACE) ----------------------------------------------------------------
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276, "ppc64le": 357, "s390x": 347}


def _load_libc() -> ctypes.CDLL | None:
    # the process's own symbols (libc is loaded in every CPython): find_library("c") would fork ldconfig
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()  # with use_errno: ctypes keeps errno per thread, so one handle serves every thread


def _load_renameat2():
    """libc's renameat2 (glibc >= 2.28), else the raw syscall where we know its number, as f(a, b, flags) -> int;
    None if neither."""
    libc = _LIBC
    if libc is None:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b, flags: fn(_AT_FDCWD, a, _AT_FDCWD, b, flags)
    nr = _SYS_RENAMEAT2.get(platform.machine())
    if nr is None:
        return None
    sc = libc.syscall
    sc.restype = ctypes.c_long
    return lambda a, b, flags: sc(ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a),
                                  ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(b), ctypes.c_uint(flags))


_RENAMEAT2 = _load_renameat2()
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM)  # no such syscall, or a file system
# (e.g. some FUSE/NFS) without the flag


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """True once done; False where the kernel or the file system cannot (the caller falls back)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(os.fsencode(a), os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(b))


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically. False where the kernel or the file system cannot (the caller falls back)."""
    if os.environ.get("MERTOOLS_TEST_NO_EXCHANGE") == "1":
        return False
    return _renameat2(a, b, _RENAME_EXCHANGE)


# link(2) on a file system without hard links: FAT (EPERM), some FUSE, SMB and 9p mounts (EOPNOTSUPP, ENOSYS,
# EINVAL, EACCES, EMLINK). EPERM and EACCES are also an immutable file or a folder not ours, which the rename that
# follows then reports, so falling back loses nothing
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EACCES, errno.EMLINK)


def _unnamed(final: Path, exc: OSError, left: str = "") -> OutputError:
    """The one line for a finished file that could not take its name: which error, which name, what to do."""
    code = errno.errorcode.get(exc.errno or 0, "error")
    todo = ("free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else
            "check that the folder may be written to (permissions, lsattr's a/i attributes, a read-only mount)")
    return OutputError(f"{final}: the finished file could not take this name ({code}: {exc.strerror}){left}; {todo} "
                       "and run again")


def drop_temp(tmp: Path) -> bool:
    """Remove a temporary on an error path; False where it stays. A folder that refuses the removal too (the error
    being raised is often why) must not hide that error behind its own: the temporary is left for a later run's
    sweep, and the error's line says so (:func:`left_behind`)."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        return False
    return True


def left_behind(kept: Iterable[Path]) -> str:
    """How an error line ends once its run cleaned up: nothing left, or the temporaries the folder kept."""
    names = [p.name for p in kept]
    if not names:
        return "nothing was left behind"
    return f"the folder refused to remove the temporary {', '.join(names)} too: delete it by hand"


def place(tmp: Path, final: Path, overwrite: bool, instead: str = "name") -> None:
    """Give the finished temporary ``tmp`` its name ``final``. Without ``overwrite`` a file that appeared at
    ``final`` after the run checked it (another run to the same name, a copy) is kept and OutputError raised: the
    test and the rename are one step (renameat2's RENAME_NOREPLACE, else a hard link, which fails on an existing
    name too), not a check followed by a rename that replaces whatever came in between.

    Any other failure (a folder or file the kernel will not rename, link or unlink in) is an OutputError naming
    ``final`` and the errno, ``final`` not given (or, where the folder refuses to take it back, both names said):
    the caller removes ``tmp`` as on any error."""
    appeared = OutputError(f"{final}: appeared while this run wrote it and was left as it is; pass --overwrite to "
                           f"replace it, or choose another {instead}")
    try:
        if overwrite:
            os.replace(tmp, final)
            return
        if _renameat2(tmp, final, _RENAME_NOREPLACE):
            return
        try:
            os.link(tmp, final)
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            if os.path.lexists(final):  # no hard links here: a check, then a rename
                raise appeared from None
            os.replace(tmp, final)
            return
    except FileExistsError:
        raise appeared from None
    except OSError as exc:
        raise _unnamed(final, exc) from None
    try:
        os.unlink(tmp)
    except OSError as exc:  # linked, but the temporary keeps its name too: take the new name back
        try:
            os.unlink(final)
        except OSError:
            raise _unnamed(final, exc, f"; it is named both {final} and {tmp.name}: remove one") from None
        raise _unnamed(final, exc) from None


def place_all(pairs: Iterable[tuple[Path, Path]], overwrite: bool, instead: str = "name") -> None:
    """:func:`place` for the files of one output (a split set's parts): without ``overwrite``, one that cannot take
    its name takes back the names already given (files this run made), so the set is named whole or not at all."""
    done: list[Path] = []
    try:
        for tmp, final in pairs:
            place(tmp, final, overwrite, instead)
            done.append(final)
    except BaseException as exc:
        if overwrite:
            raise
        kept = []
        for final in done:
            try:
                final.unlink(missing_ok=True)
            except OSError:
                kept.append(final.name)
        if kept and isinstance(exc, OutputError):  # the set is named in part: say which, not only the failed one
            raise OutputError(f"{exc}; these parts keep their names and are not a whole set: {', '.join(kept)}") \
                from None
        raise


# -- the lock ---------------------------------------------------------------------------------------------------
class _Lock:
    """flock on ``.OUT.mertools-lock`` beside OUT.

    Not on OUT itself: OUT may not exist yet, and the commit replaces it by a rename, so a lock on OUT's inode
    would guard the old folder while the new one appears unguarded. Not on the parent folder: that would serialise
    unrelated outputs that share a parent. flock rather than POSIX (lockf) locks: a POSIX lock is per process, so
    a second run in the same process would not be refused, and it is dropped by any close of the file.

    The file is unlinked while still locked at release; a run that opened it before the unlink and locks it
    afterwards sees that its inode is no longer the one at the path, and starts over.
    """

    def __init__(self, path: Path, wait: bool):
        self.path = path
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(f"{path.parent}: cannot write there ({exc.strerror}); choose another OUT") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BaseException as exc:
                if not isinstance(exc, OSError):
                    os.close(fd)  # interrupted while waiting
                    raise
                self._refuse(fd, exc)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder unlinked it between our open and our lock: take the new one
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # only for the message a refused run prints
        except OSError:
            pass

    def _refuse(self, fd: int, exc: OSError) -> None:
        path = self.path
        try:
            if isinstance(exc, BlockingIOError):
                holder = _read_pid(fd)
                who = f"process {holder}" if holder else "another process"
                raise OutputError(
                    f"{path.parent / path.name.removeprefix('.').removesuffix(LOCK_MARK)}: {who} is writing this "
                    "output now; wait for it to finish (or pass --wait), or choose another OUT"
                ) from None
            raise OutputError(f"{path}: cannot lock it ({exc.strerror}); choose OUT on a local file system"
                              ) from None
        finally:
            os.close(fd)

    def release(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


# -- signals ----------------------------------------------------------------------------------------------------
class _Signals:
    """SIGTERM and SIGHUP (and SIGINT) raise Interrupted in the main thread while a run writes; restored after.

    Only the main thread may install handlers; elsewhere the process's own handling stays as it is. A signal the
    process ignores (``nohup`` ignores SIGHUP) stays ignored.
    """

    def __init__(self) -> None:
        self.saved: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for s in _SIGNALS:
            if signal.getsignal(s) is signal.SIG_IGN:
                continue  # ignored on purpose (nohup, a background job): a hangup must not abort the run
            self.saved[s] = signal.signal(s, self._raise)

    def _raise(self, signum: int, frame: object) -> None:
        if _held:  # inside signals_held: the OS mask does not cover other threads; act after the block
            _held[-1].append(signum)
            return
        for s in self.saved:  # a second signal must not interrupt the clean-up the first one started
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    def restore(self) -> None:
        for s, h in self.saved.items():
            signal.signal(s, h)  # type: ignore[arg-type]


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Interrupted in the main thread while the block runs, as SIGINT does: a writer of one
    output file (pack, reassemble) then removes its temporary as it does on Ctrl-C, instead of dying with it."""
    sig = _Signals()
    try:
        yield
    finally:
        sig.restore()


_held: list[list[int]] = []  # main thread only: signals that arrived inside signals_held


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold signals back for the few syscalls of a commit, so that no handler runs between two renames.

    The mask covers this thread only: a process-directed signal then goes to another thread (numpy's, a download
    thread) and CPython still runs the handler in the main thread, so the handler itself defers too."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    if main:
        _held.append([])
    try:
        yield
    finally:
        got = _held.pop() if main else []
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if got:
            for s in _SIGNALS:
                h = signal.getsignal(s)
                if getattr(h, "__func__", None) is _Signals._raise:
                    h(got[0], None)  # raises Interrupted now, the block's work done


# -- helpers ----------------------------------------------------------------------------------------------------
def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- flushing a finished tree -----------------------------------------------------------------------------------
FLUSH_THREADS = 8  # fsyncs in flight at once: the disk and the journal merge them, one thread would not


def _load_syncfs():
    libc = _LIBC
    if libc is None:
        return None
    fn = getattr(libc, "syncfs", None)  # glibc >= 2.14, musl; absent elsewhere (macOS)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()


@dataclass(frozen=True)
class Flushed:
    """What :func:`flush_tree` / :func:`flush_files` made durable: ``how`` is ``syncfs+fsync`` (one syncfs writes
    everything, then a parallel fsync of each file reports any write error of it) or ``fsync`` (syncfs missing or
    refused: the parallel fsyncs do the writing too)."""

    files: int
    dirs: int
    bytes: int
    how: str

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "dirs": self.dirs, "bytes": self.bytes, "how": self.how}


def _load_sync_file_range():
    libc = _LIBC
    if libc is None:
        return None
    fn = getattr(libc, "sync_file_range", None)  # Linux only
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Ask the kernel to begin writing ``fd``'s dirty pages now, without waiting for them (and without any
    promise: a hint, never a substitute for :func:`flush_tree`).

    Writers of a durable output call it after each file, so the disk works while the next files are still being
    copied; otherwise nothing is written until the dirty-page limits or the final flush, and the flush then waits
    for every byte. Errors are ignored (the flush reports them).
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _syncfs(fd: int) -> bool:
    """syncfs(2) on the file system holding ``fd``; False where it is missing or refused (then fsync each file).

    An I/O error is not "refused": it is raised, as a failed fsync would be.
    """
    if _SYNCFS is None or os.environ.get("MERTOOLS_TEST_NO_SYNCFS") == "1":
        return False
    if _SYNCFS(fd) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL):
        return False  # seccomp profiles that refuse it, exotic file systems: the fsyncs below still hold
    raise OSError(err, f"syncfs: {os.strerror(err)}")


def _fsync_path(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:  # os.fsync names no file: say which one, or the user sees a bare "Input/output error"
        raise OSError(e.errno, f"flushing to disk failed: {e.strerror}", path) from None


def _fsync_all(paths: list[str]) -> None:
    if len(paths) <= 1:
        for p in paths:
            _fsync_path(p)
        return
    # fsync blocks in the kernel without the GIL: several in flight let the device and the journal batch them,
    # where one after another each waits for its own commit and cache flush
    ex = ThreadPoolExecutor(max_workers=min(FLUSH_THREADS, len(paths)), thread_name_prefix="mertools-fsync")
    try:
        for f in [ex.submit(_fsync_path, p) for p in paths]:
            f.result()  # the first error is raised (the others' files are gone with the staging folder anyway)
    finally:
        # on an error or Ctrl-C, drop the fsyncs not yet started: without syncfs each may write a whole file
        ex.shutdown(wait=True, cancel_futures=True)


def _flush(files: list[str], dirs: list[str], anchors: dict[int, str], size: int) -> Flushed:
    """Every byte of ``files`` durable, then every entry of ``dirs``; ``anchors``: one path per file system
    (st_dev) they lie on, each synced once."""
    synced = True
    for anchor in anchors.values():
        fd = os.open(anchor, os.O_RDONLY | os.O_CLOEXEC)
        try:
            synced = _syncfs(fd) and synced
        finally:
            os.close(fd)
    # After a syncfs every file is still fsync'd (in parallel): that writes nothing more, but it is what reports a
    # failed write of that file to us. syncfs alone may not: before Linux 5.8 it reported no write error at all,
    # and since then it reports a file system's error once, to whoever asks first (another process's syncfs may
    # have taken it). A file's own error is seen only through its file, and only we have ours.
    _fsync_all(files)
    how = "syncfs+fsync" if synced else "fsync"
    # syncfs has written the entries too, but only an fsync of the folder is promised (by POSIX, and by every file
    # system's own rules) to make a new name in it durable; all before the commit rename, so their order is free
    _fsync_all(dirs)
    return Flushed(len(files), len(dirs), size, how)


def flush_tree(root: str | os.PathLike[str]) -> Flushed:
    """Make everything under ``root`` durable at once: its files' bytes, then the entries of every folder in it
    (``root`` included). One ``syncfs(2)`` of root's file system writes it all where syncfs exists and works; then
    every file and every folder is fsync'd, several at a time (after the syncfs they write nothing more and only
    report a write error; without it they do the writing). Returns what was flushed.

    Used by :func:`staged_output` on the finished staging folder, before the commit rename: once it returns, the
    rename is the only thing left to reach the disk. Symbolic links are not followed (nothing of ours writes them).

    Example:
        >>> flush_tree("out/.out.mertools-staging-1-ab12cd34")          # doctest: +SKIP
        Flushed(files=25, dirs=5, bytes=2394972160, how='syncfs+fsync')
    """
    root = os.fspath(root)
    files: list[str] = []
    dirs: list[str] = []
    anchors = {os.stat(root).st_dev: root}
    size = 0
    todo = [root]
    while todo:  # one scandir per folder; an unreadable one raises (skipped, it would be committed unflushed)
        d = todo.pop()
        dirs.append(d)
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    files.append(e.path)
                    size += st.st_size
                    anchors.setdefault(st.st_dev, e.path)  # a mount inside root: sync that file system too
    return _flush(files, dirs, anchors, size)


def flush_files(paths: Iterable[str | os.PathLike[str]], dirs: Iterable[str | os.PathLike[str]] = ()) -> Flushed:
    """Make the given files durable, then the given folders' entries: like :func:`flush_tree` for a chosen set
    (a step of a pull, the parts of a reassembled model). Returns what was flushed.

    Example:
        >>> flush_files(["work/experts/layer_000/expert_000.bin"], ["work/experts/layer_000"])  # doctest: +SKIP
    """
    files = [os.fspath(p) for p in paths]
    dlist = [os.fspath(d) for d in dirs]
    anchors: dict[int, str] = {}
    size = 0
    for p in files:
        st = os.stat(p)
        size += st.st_size
        anchors.setdefault(st.st_dev, p)
    if not files:
        _fsync_all(dlist)  # only folder entries (e.g. after renames): nothing for syncfs to add
        return Flushed(0, len(dlist), 0, "fsync")
    return _flush(files, dlist, anchors, size)



def _is_empty_dir(p: Path) -> bool:
    with os.scandir(p) as it:
        return next(it, None) is None


def _siblings(out: Path, mark: str) -> list[Path]:
    prefix = f".{out.name}{mark}"
    try:
        return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


TMP_MARK = ".mertools-tmp-"  # a one-file writer's temporary: .NAME.mertools-tmp-PID-RANDOM beside NAME


def temp_name(final: Path) -> Path:
    """The temporary a one-file writer (pack, reassemble) writes ``final`` under, renamed over it at the end."""
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def sweep_temps(final: Path, folders: bool = False) -> list[str]:
    """Remove the temporaries of ``final`` left by writers that are gone (SIGKILL, the OOM killer, a power cut: no
    handler ran), each as large as the model; a live process's are left alone. The names removed.

    Only ``.NAME.mertools-tmp-PID-RANDOM`` entries, named exactly as :func:`temp_name` names them (so not those of
    another target whose name starts with NAME's), whose PID no process holds: a reused PID keeps a dead run's
    temporary until that process ends, never the other way round. Files, and with ``folders`` folders (the
    SafeTensors ``reassemble`` writes a new folder as one), never a symbolic link nor anything it leads to."""
    exact = re.compile(re.escape(f".{final.name}{TMP_MARK}") + r"([0-9]{1,10})-[0-9a-f]{8}")
    gone = []
    for p in _siblings(final, TMP_MARK):
        m = exact.fullmatch(p.name)
        if m is None or _alive(int(m[1])) or p.is_symlink():
            continue
        try:
            if p.is_file():
                p.unlink()
            elif folders and p.is_dir():
                # rmtree refuses a link put in its place meanwhile and follows none inside (fd-based on Linux)
                shutil.rmtree(p)
            else:
                continue
            gone.append(p.name)
        except OSError:
            pass
    return gone


def check_file_target(target: Path, overwrite: bool, instead: str = "name") -> None:
    """Refuse, before any work, an output file that may not be written as asked: one that exists without
    ``overwrite``, or anything there but a regular file (the final rename would replace a folder, a FIFO or a device
    such as /dev/null). ``instead``: what the user should choose instead (a name, a folder)."""
    if target.exists() and not target.is_file():
        raise OutputError(f"{target}: exists and is not a file; choose another {instead}")
    if os.path.lexists(target) and not overwrite:  # a link to nothing is a name there too
        raise OutputError(f"{target}: exists; pass --overwrite to replace it, or choose another {instead}")


@contextmanager
def file_output(final: Path, overwrite: bool, fsync: bool = True) -> Iterator[Path]:
    """Yield the path of a temporary beside ``final`` for the block to write; renamed over ``final`` once the block
    ends without an exception, removed otherwise (SIGTERM and SIGHUP included, see :func:`interruptible`).

    ``final`` is checked again just before the rename (:func:`check_file_target`), and the rename itself replaces
    nothing without ``overwrite`` (:func:`place`): a file that appeared there while the block ran is kept. A killed
    run's temporary is removed by the next one (:func:`sweep_temps`).

    Example:
        >>> with file_output(Path("golden.npz"), overwrite=False) as tmp:   # doctest: +SKIP
        ...     tmp.write_bytes(b"...")
    """
    sweep_temps(final)
    tmp = temp_name(final)
    with interruptible():
        try:
            yield tmp
            if fsync:
                _fsync_path(str(tmp))
            check_file_target(final, overwrite)
            test_point("before-commit")
            place(tmp, final, overwrite)
            if fsync:
                fsync_dir(final.parent)
        except BaseException:
            drop_temp(tmp)
            raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: someone else's process; beyond pid_t: not ours to judge
        return True
    return True


def recover(out: Path, fsync: bool = True) -> str | None:
    """Repair what a run killed mid-commit left beside OUT. Call only with the lock held.

    - staging folders: all belong to dead runs (a live one would hold the lock); removed;
    - an old copy and no OUT (or an empty one): the kill came between the two renames of a replace; the old
      output is put back;
    - an old copy beside a non-empty OUT: the kill came after the new OUT was in place; the old copy goes.

    Returns a line saying what was restored, or None.
    """
    for p in _siblings(out, STAGING_MARK):
        shutil.rmtree(p, ignore_errors=True)
    olds = _siblings(out, OLD_MARK)
    if not olds:
        return None
    present = out.is_dir() and not out.is_symlink() and not _is_empty_dir(out)
    if present:
        for p in olds:
            shutil.rmtree(p, ignore_errors=True)
        return None
    if len(olds) > 1:
        raise OutputError(
            f"{out}: missing, and {len(olds)} earlier copies of it lie beside it ({', '.join(p.name for p in olds)});"
            " rename the one you want to keep to OUT and remove the others"
        )
    if out.is_dir():
        out.rmdir()
    os.rename(olds[0], out)
    if fsync:
        fsync_dir(out.parent)
    return f"{out}: restored the previous output that an interrupted replace had moved aside"


def _check_sources(out: Path, sources: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse a replace that would delete a source: a path inside OUT, or the same file reached another way."""
    real_out = out.resolve()
    inodes: dict[tuple[int, int], str] = {}
    for s in sources:
        real = Path(s).resolve()
        if real == real_out or real.is_relative_to(real_out):
            raise _inside(out, s)
        try:
            st = os.stat(real)
        except OSError:
            continue
        if not os.path.isdir(real):
            inodes[(st.st_dev, st.st_ino)] = str(s)
    if not inodes:
        return
    # A bind mount or a hard link can put a source's bytes inside OUT under a path that does not say so: compare
    # inodes (readdir gives them without a stat per file; a shard folder holds a few thousand files at most).
    wanted = {ino for _, ino in inodes}
    for folder, _, _ in os.walk(real_out):
        with os.scandir(folder) as it:
            for e in it:
                if e.inode() in wanted and e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    if (key := (st.st_dev, st.st_ino)) in inodes:
                        raise _inside(out, inodes[key], also=f" (as {e.path})")


def refuse_folder_file(target: Path, folder: Path, rels: Iterable[str]) -> None:
    """Refuse an output file that would be renamed over one of the files ``rels`` of ``folder``, the folder being
    read (``pack OUT OUT/dense.gguf --overwrite`` would destroy the folder's only copy of it).

    The name is compared, not the file: the rename replaces the name (a link to elsewhere at that name is lost
    with it), and a hard link under another name keeps the folder's file alive.
    """
    where = os.path.join(os.path.realpath(target.parent), target.name)
    for rel in rels:
        p = folder / rel
        # the name itself, or the file a link at that name leads to (dense.gguf -> store/dense.bin)
        if where in (os.path.join(os.path.realpath(p.parent), p.name), os.path.realpath(p)):
            raise OutputError(f"{target}: is {rel} of the folder {folder} being read; writing there would destroy "
                              "it. Choose an output outside the folder's files")


def _inside(out: Path, source: object, also: str = "") -> OutputError:
    return OutputError(
        f"{out}: --overwrite would delete the source {source}, which lies inside it{also}; write to another OUT"
    )


def _check_target(out: Path, overwrite: bool, marker: str | None) -> bool:
    """Whether OUT holds something to replace. Raises when OUT may not be written as asked."""
    if out.is_symlink():
        raise OutputError(f"{out}: is a symbolic link; give the folder it points to, or another OUT")
    if not out.exists():
        return False
    if not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another OUT")
    if _is_empty_dir(out):
        return False
    if not overwrite:
        raise OutputError(f"{out}: folder is not empty; pass --overwrite to replace it, or choose an empty folder")
    if marker is not None and not (out / marker).is_file():
        raise OutputError(
            f"{out}: not empty and has no {marker}, so mertools did not write it; --overwrite replaces only an "
            "earlier output. Choose an empty folder"
        )
    return True


def _commit(staging: Path, out: Path, overwrite: bool, marker: str | None, fsync: bool) -> None:
    replace = _check_target(out, overwrite, marker)  # again, under the lock: the last word before the rename
    test_point("before-commit")
    with signals_held():
        if not replace:
            # rename() onto an absent path or an empty folder is atomic, and fails (ENOTEMPTY/EEXIST) if a
            # process that ignores our lock filled OUT meanwhile: then nothing is replaced
            try:
                os.rename(staging, out)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise OutputError(f"{out}: something else wrote into it while we worked; nothing was replaced "
                                      "and our output was discarded. Choose an empty folder") from None
                raise
            old = None
        elif exchange(staging, out):
            old = staging  # the old output now lies at the staging name: a crash before it is removed leaves
            # a staging folder of a dead run, which the next run removes
        else:
            old = out.parent / f".{out.name}{OLD_MARK}{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            if fsync:
                fsync_dir(out.parent)  # the aside-rename must reach the disk before the old name is reused
            test_point("between-renames")
            try:
                os.rename(staging, out)
            except BaseException:
                os.rename(old, out)  # put the old output back: a failed replace must not lose it
                raise
        if fsync:
            fsync_dir(out.parent)
    if old is not None:
        test_point("before-cleanup")
        shutil.rmtree(old, ignore_errors=True)


def check_space(where: Path, need: int,
                hint: str = "another OUT (use --layers/--experts to extract part of the model)") -> None:
    """Refuse, before anything is written, an output that needs more than the free space at ``where``."""
    free = shutil.disk_usage(where).free
    if free < need:
        raise OutputError(f"{where}: needs {human_bytes(need)} free but only {human_bytes(free)} is; free some space "
                          f"or choose {hint}")


def _os_error(exc: OSError, out: Path) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{out}: the disk filled up while writing ({exc.strerror}); nothing was left behind. "
                           "Free space or choose another OUT")
    return OutputError(f"{exc.filename or out}: {exc.strerror or exc}; nothing was left behind")


@contextmanager
def staged_output(
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    sources: Iterable[str | os.PathLike[str]] = (),
    fsync: bool = True,
    wait: bool = False,
    need_bytes: int = 0,
    marker: str | None = MARKER,
    report: dict[str, Any] | None = None,
) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without an exception, its contents become OUT.

    Args:
        out: the output folder. It must be absent or empty, or, with ``overwrite``, a folder holding ``marker``.
        overwrite: replace a non-empty OUT, only once the new output is complete.
        sources: the files (or folders) read to make the output; refused with ``overwrite`` if any lies inside
            OUT (the replace would delete them). Pass every part of a split set.
        fsync: make the output durable before it gets its name: once the block ends, every file and folder in
            staging is flushed at once (:func:`flush_tree`: one syncfs, then parallel fsyncs of every file and folder), then the rename and
            the parent folder. False: no flush at all (``--no-fsync``; a power cut may lose or tear the output).
            Writers need not (and should not) flush their own files.
        wait: wait for another run writing the same OUT to finish, instead of failing at once.
        need_bytes: free space the output needs; refused before anything is written if the disk has less.
        marker: the file that identifies a folder ``overwrite`` may replace (None: any folder).
        report: if given, ``report["flushed"]`` is set to what the flush covered (:meth:`Flushed.as_dict`), or
            None without ``fsync``.

    Yields:
        the staging folder (``.OUT.mertools-staging-PID-RAND`` beside OUT), empty.

    Raises:
        OutputError: OUT cannot be written as asked, another run holds it, or a write failed (disk full, ...);
            the staging folder is gone and OUT is as it was.
        Interrupted: SIGINT, SIGTERM or SIGHUP arrived (only caught in the main thread); same clean-up.

    While the block runs, a lock beside OUT refuses every other ``staged_output`` for the same OUT (in this process
    or another). On entry, what a killed run left is repaired (see :func:`recover`).

    Thread safety: any number of threads may each run their own ``staged_output`` (a second one for the same OUT
    is refused, or waits). Signal handlers are installed only when called from the main thread; elsewhere a signal
    acts as the process's handlers say, and a SIGKILL-like end is repaired by the next run.

    Example:
        >>> with staged_output("out/", overwrite=True, sources=["model.gguf"]) as staging:  # doctest: +SKIP
        ...     (staging / "manifest.json").write_text("{}")
    """
    out = Path(os.path.abspath(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in out.parents if p.exists()), out.parent)
        raise OutputError(f"{out}: {blocker} is a file, not a folder, so OUT cannot go there; choose another OUT"
                          ) from None
    except OSError as exc:
        raise OutputError(f"{out.parent}: cannot create the parent folder ({exc.strerror}); choose another OUT"
                          ) from None
    sig = _Signals()
    lock = None
    staging = None
    try:
        lock = _Lock(out.parent / f".{out.name}{LOCK_MARK}", wait)
        test_point("locked")
        recover(out, fsync)
        _check_target(out, overwrite, marker)
        if overwrite:
            _check_sources(out, sources)
        if need_bytes:
            check_space(out.parent, need_bytes)
        staging = out.parent / f".{out.name}{STAGING_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir()
        except OSError as exc:
            raise OutputError(f"{out.parent}: cannot write there ({exc.strerror}); choose another OUT") from None
        try:
            yield staging
            flushed = flush_tree(staging) if fsync else None  # nothing is named OUT before all of it is durable
            if report is not None:
                report["flushed"] = flushed.as_dict() if flushed else None
            _commit(staging, out, overwrite, marker, fsync)
        except OSError as exc:
            if isinstance(exc, MerError):  # ours already says what happened (e.g. ShardIOError)
                raise
            raise _os_error(exc, out) from None
    finally:
        try:
            with signals_held():  # a signal now must not cut the clean-up short; it is raised after it
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)
                if lock is not None:
                    lock.release()
        finally:
            sig.restore()
