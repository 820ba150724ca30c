"""The durable commit flushes the whole finished output at once (docs/format.md, guarantee 1).

Real files on the real file system of tmp_path; the flush's own return value says what it covered, and the counts
are checked against the tree that OUT ends up holding, so a flush that ran before the last file (the manifest) was
written, or that missed a folder, fails here. ``MERTOOLS_TEST_NO_SYNCFS=1`` (a hook of mertools.commit) takes the
parallel-fsync path that stands in where syncfs(2) is missing or refused.
"""

from __future__ import annotations

import json
import os

import pytest

from mertools import extract
from mertools.commit import flush_files, flush_tree, staged_output
from mertools.pack import pack, unpack
from mertools.reassemble import reassemble

from conftest import GEN, run_cli

Q4 = GEN / "moe-merged-q4_0.gguf"


def tree(root) -> tuple[int, int, int]:
    """(files, folders including root, bytes) under root, counted independently of the code under test."""
    files = dirs = size = 0
    for d, _, names in os.walk(root):
        dirs += 1
        for n in names:
            files += 1
            size += os.path.getsize(os.path.join(d, n))
    return files, dirs, size


@pytest.fixture(params=["syncfs", "fsync"])
def how(request, monkeypatch):
    if request.param == "fsync":
        monkeypatch.setenv("MERTOOLS_TEST_NO_SYNCFS", "1")
    return request.param


def test_flush_tree_covers_every_file_and_folder(tmp_path, how):
    root = tmp_path / "t"
    for i in range(3):
        (root / "a" / f"l{i}").mkdir(parents=True)
        for j in range(5):
            (root / "a" / f"l{i}" / f"f{j}").write_bytes(os.urandom(4096 * (j + 1)))
    (root / "empty").mkdir()
    (root / "top").write_bytes(b"x")
    r = flush_tree(root)
    assert (r.files, r.dirs, r.bytes) == tree(root) == (16, 6, 3 * 15 * 4096 + 1)
    assert r.how == {"syncfs": "syncfs+fsync", "fsync": "fsync"}[how]


def test_flush_files_is_the_chosen_set(tmp_path, how):
    paths = [tmp_path / f"p{i}" for i in range(4)]
    for p in paths:
        p.write_bytes(b"y" * 100)
    r = flush_files(paths[:3], [tmp_path])
    assert (r.files, r.dirs, r.bytes) == (3, 1, 300) and r.how.split("+")[0] == how
    with pytest.raises(FileNotFoundError):
        flush_files([tmp_path / "missing"])


def test_durable_extract_flushes_the_complete_output(tmp_path, how):
    out = tmp_path / "out"
    r = extract(Q4, out)  # fsync is the default
    files, dirs, size = tree(out)
    assert r.flushed == {"files": files, "dirs": dirs, "bytes": size, "how": r.flushed["how"]}
    assert r.flushed["how"].split("+")[0] == how
    assert (out / "manifest.json").is_file() and files == r.experts + 3  # shards, dense, reassembly, manifest


def test_no_fsync_flushes_nothing(tmp_path):
    r = extract(Q4, tmp_path / "out", fsync=False)
    assert r.flushed is None
    p = run_cli("extract", Q4, tmp_path / "o2", "--json", "--no-fsync", check=True)
    assert json.loads(p.stdout)["flushed"] is None
    p = run_cli("extract", Q4, tmp_path / "o3", "--json", check=True)
    assert json.loads(p.stdout)["flushed"]["files"] == tree(tmp_path / "o3")[0]


def test_staged_output_reports_the_flush_of_what_the_block_wrote(tmp_path, how):
    report: dict = {}
    with staged_output(tmp_path / "out", marker=None, report=report) as st:
        (st / "sub" / "deeper").mkdir(parents=True)
        (st / "sub" / "deeper" / "a").write_bytes(b"1" * 10)
        (st / "b").write_bytes(b"2" * 20)
    files, dirs, size = tree(tmp_path / "out")
    assert report["flushed"]["files"] == files == 2 and report["flushed"]["dirs"] == dirs == 3
    assert report["flushed"]["bytes"] == size == 30
    report = {}
    with staged_output(tmp_path / "out2", marker=None, report=report, fsync=False) as st:
        (st / "b").write_bytes(b"2")
    assert report == {"flushed": None}


def test_unpack_and_reassemble_still_durable_by_default(tmp_path, how):
    """The commands that lost their own per-file fsyncs still produce whole outputs through the shared flush."""
    src = tmp_path / "src"
    extract(Q4, src)
    pack(src, tmp_path / "a.tar.zst")
    unpack(tmp_path / "a.tar.zst", tmp_path / "back")
    assert tree(tmp_path / "back")[:2] == tree(src)[:2]
    r = reassemble(src, tmp_path / "m.gguf")
    assert r.exact and (tmp_path / "m.gguf").read_bytes() == Q4.read_bytes()


def test_killed_after_the_flush_before_the_rename(tmp_path):
    """SIGKILL once the flush is done but before the rename: OUT is still the old output, the complete new one lies
    under the staging name (flushed, never named OUT), and the next run removes it."""
    import signal

    from mertools.commit import STAGING_MARK

    out = tmp_path / "out"
    extract(Q4, out, fsync=False)
    old = (out / "manifest.json").read_bytes()
    p = run_cli("extract", GEN / "moe-merged-f16.gguf", out, "--overwrite", "-q",
                env={"MERTOOLS_TEST_KILL_AT": "before-commit"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert (out / "manifest.json").read_bytes() == old
    (staging,) = [x for x in tmp_path.iterdir() if STAGING_MARK in x.name]
    assert (staging / "manifest.json").is_file() and tree(staging)[0] == tree(out)[0]
    run_cli("extract", GEN / "moe-merged-f16.gguf", out, "--overwrite", "-q", check=True)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]


# -- what reached fsync(2), observed at the system-call boundary --------------------------------------------------
# os.fsync (the stdlib's, not our code) is wrapped to record which file each call flushed, and at what size, through
# /proc/self/fd; os.replace likewise records renames. The recorded order is what the guarantees are about.
@pytest.fixture
def syscalls(monkeypatch):
    import threading

    seen: list[tuple[str, str, int]] = []
    lock = threading.Lock()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path, size = os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size
        real_fsync(fd)
        with lock:
            seen.append(("fsync", path, size))

    def replace(a, b, **kw):
        real_replace(a, b, **kw)
        with lock:
            seen.append(("replace", os.fspath(a), 0))

    from mertools import commit

    real_renameat2 = commit._renameat2

    def renameat2(a, b, flags):  # a rename that replaces nothing (commit.place, without --overwrite)
        done = real_renameat2(a, b, flags)
        if done:
            with lock:
                seen.append(("replace", os.fspath(a), 0))
        return done

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(commit, "_renameat2", renameat2)
    return seen


def _flushed_under(seen, parent):
    """{path relative to the staging folder: size when fsync'd} for every fsync inside a staging folder of parent."""
    from mertools.commit import STAGING_MARK

    got = {}
    for op, path, size in seen:
        rel = os.path.relpath(path, parent).split(os.sep)
        if op == "fsync" and STAGING_MARK in rel[0]:
            got[os.sep.join(rel[1:]) or "."] = size
    return got


def test_every_file_and_folder_of_out_was_fsynced_whole_before_the_rename(tmp_path, how, syscalls):
    out = tmp_path / "out"
    extract(Q4, out)
    got = _flushed_under(syscalls, tmp_path)
    want = {}
    for d, _, names in os.walk(out):
        want[os.path.relpath(d, out)] = None
        for n in names:
            p = os.path.join(d, n)
            want[os.path.relpath(p, out)] = os.path.getsize(p)
    missing = [k for k in want if k not in got]
    assert not missing, f"never fsync'd: {missing}"
    short = [k for k, size in want.items() if size is not None and got[k] != size]
    assert not short, f"fsync'd before their last byte: {short}"
    # then, and only then, the parent (the rename's entry)
    last_staged = max(i for i, (op, p, _) in enumerate(syscalls) if op == "fsync" and "staging" in p)
    assert any(op == "fsync" and p == str(tmp_path) for op, p, _ in syscalls[last_staged + 1:])


@pytest.mark.parametrize("victim", ["manifest.json", "E0001.bin", "L002"])
def test_a_failed_fsync_fails_the_run_and_names_nothing_out(tmp_path, monkeypatch, victim):
    import errno

    from mertools.errors import OutputError

    out = tmp_path / "out"
    extract(Q4, out, fsync=False)
    old = (out / "manifest.json").read_bytes()
    real = os.fsync

    def failing(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(victim):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OutputError, match="Input/output error"):
        extract(GEN / "moe-merged-f16.gguf", out, overwrite=True)
    assert (out / "manifest.json").read_bytes() == old  # the old output, untouched
    with pytest.raises(OutputError, match="Input/output error"):
        extract(Q4, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(x.name for x in tmp_path.iterdir() if "staging" in x.name) == []


def test_a_failed_syncfs_fails_the_run(tmp_path, monkeypatch):
    import ctypes
    import errno

    from mertools import commit
    from mertools.errors import OutputError

    def syncfs(fd):
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(commit, "_SYNCFS", syncfs)
    with pytest.raises(OutputError, match="syncfs"):
        extract(Q4, tmp_path / "out")
    assert sorted(x.name for x in tmp_path.iterdir() if not x.name.endswith("lock")) == []


def test_reassemble_flushes_each_part_before_naming_it(tmp_path, syscalls):
    src = tmp_path / "src"
    extract(Q4, src, fsync=False)
    syscalls.clear()
    reassemble(src, tmp_path / "m.gguf")
    renames = [(i, p) for i, (op, p, _) in enumerate(syscalls) if op == "replace"]
    assert renames
    for i, tmp in renames:
        assert any(op == "fsync" and p == tmp for op, p, _ in syscalls[:i]), f"{tmp} renamed before its fsync"
    assert any(op == "fsync" and p == str(tmp_path) for op, p, _ in syscalls[renames[-1][0]:])


def test_a_flushed_step_of_a_pull_covers_every_new_folder_up_to_the_work_folder(tmp_path, syscalls):
    """pull journals a step only after write_experts(fsync=True): a new layer folder's name lives in its parent, so
    every folder from the shards up to the work folder must be fsync'd, or a power cut loses a journalled step."""
    from mertools.convert import plan, write_experts
    from mertools.sources import open_source

    work = tmp_path / "work"
    work.mkdir()
    src = open_source(Q4)
    try:
        write_experts(plan(src), work, fsync=True)
    finally:
        src.close()
    flushed = {p for op, p, _ in syscalls if op == "fsync"}
    for d, _, names in os.walk(work):
        assert d in flushed, f"folder {d} not fsync'd"
        for n in names:
            assert os.path.join(d, n) in flushed
