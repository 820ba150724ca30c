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
