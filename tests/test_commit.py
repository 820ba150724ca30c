"""The output-folder guarantees of docs/format.md, each tested with real processes, real signals and real files.

Processes are paused and killed at exact points through the test hooks documented in mertools/commit.py
(MERTOOLS_TEST_STOP_AT / MERTOOLS_TEST_KILL_AT / MERTOOLS_TEST_NO_EXCHANGE), so no test depends on timing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from mertools import MertoolsError, extract
from mertools.commit import exchange, staged_output
from mer_runtime import load_manifest

from conftest import GEN, run_cli, start_cli, wait_stopped

Q4 = GEN / "moe-merged-q4_0.gguf"
F16 = GEN / "moe-merged-f16.gguf"


def finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


def one_line_error(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def dtype_of(out) -> str:
    return load_manifest(out).expert(1, 0).tensors["gate"].dtype


def leftovers(folder, keep=("out",)) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.mark.parametrize("point", ["locked", "before-commit"])
@pytest.mark.parametrize("second_overwrites", [False, True])
def test_second_run_into_same_out_fails_while_first_holds_it(tmp_path, point, second_overwrites):
    out = tmp_path / "out"
    first = start_cli("extract", Q4, out, "-q", MERTOOLS_TEST_STOP_AT=point)
    try:
        wait_stopped(first)
        second = run_cli("extract", F16, out, "-q", *(["--overwrite"] if second_overwrites else []))
        assert second.returncode == 2
        one_line_error(second.stderr, str(out), f"process {first.pid} is writing this output now", "--wait")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    rc, _, err = finish(first)
    assert rc == 0, err
    assert dtype_of(out) == "Q4_0"  # the first run's output, not replaced by the second
    assert run_cli("verify", out, "-q").returncode == 0
    assert leftovers(tmp_path) == []  # no staging, no lock file


def test_two_runs_started_together_never_both_succeed(tmp_path):
    """Whichever order the scheduler picks: one run writes OUT, the other exits 2, and OUT is the winner's."""
    out = tmp_path / "out"
    runs = {src: start_cli("extract", src, out, "-q") for src in (Q4, F16)}
    codes = {src: finish(p)[0] for src, p in runs.items()}
    assert sorted(codes.values()) == [0, 2], codes
    winner = next(src for src, rc in codes.items() if rc == 0)
    assert dtype_of(out) == ("Q4_0" if winner == Q4 else "F16")
    assert run_cli("verify", out, "-q").returncode == 0 and leftovers(tmp_path) == []


def test_wait_takes_turns(tmp_path):
    out = tmp_path / "out"
    first = start_cli("extract", Q4, out, "-q", MERTOOLS_TEST_STOP_AT="before-commit")
    wait_stopped(first)
    second = start_cli("extract", F16, out, "-q", "--overwrite", "--wait")
    os.kill(first.pid, signal.SIGCONT)
    assert finish(first)[0] == 0
    rc, _, err = finish(second)
    assert rc == 0, err
    assert dtype_of(out) == "F16"  # the second waited for the first, then replaced its complete output
    assert leftovers(tmp_path) == []


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    """flock, not a POSIX lock: a second staged_output of the same OUT in this very process is refused too."""
    out = tmp_path / "out"
    with staged_output(out, marker=None) as st:
        (st / "a").write_text("1")
        errors = []

        def other():
            try:
                with staged_output(out, marker=None):
                    pass
            except MertoolsError as exc:
                errors.append(str(exc))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1 and "is writing this output now" in errors[0]
    assert (out / "a").read_text() == "1" and leftovers(tmp_path) == []


def test_lock_released_after_a_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output(out) as st:
            (st / "half").write_text("x")
            raise RuntimeError("writer failed")
    assert leftovers(tmp_path, keep=()) == []  # no staging, no lock file, no OUT
    with staged_output(out, marker=None) as st:  # and the next run gets the lock at once
        (st / "manifest.json").write_text("{}")
    assert (out / "manifest.json").is_file()
    # the same through the CLI: a refused run (source inside OUT) leaves nothing that blocks the next one
    shutil.copy(Q4, out / "model.gguf")
    assert run_cli("extract", out / "model.gguf", out, "--overwrite", "-q").returncode == 2
    assert run_cli("extract", Q4, out, "--overwrite", "-q").returncode == 0
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_a_source_inside_out(tmp_path):
    out = tmp_path / "out"
    extract(Q4, out, fsync=False)
    src = out / "model.gguf"
    shutil.copy(F16, src)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    p = run_cli("extract", src, out, "--overwrite", "-q")
    assert p.returncode == 2
    one_line_error(p.stderr, "would delete the source", "model.gguf")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and src.read_bytes() == F16.read_bytes()
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_when_any_split_part_is_inside_out(tmp_path):
    """Only part 4 of 6 lies inside OUT, reached through a symbolic link: still refused."""
    out = tmp_path / "out"
    extract(Q4, out, fsync=False)
    parts = tmp_path / "set"
    parts.mkdir()
    for i in range(1, 7):
        name = f"moe-split-q4_0-{i:05d}-of-00006.gguf"
        if i == 4:
            shutil.copy(GEN / name, out / name)
            (parts / name).symlink_to(out / name)
        else:
            shutil.copy(GEN / name, parts / name)
    p = run_cli("extract", parts / "moe-split-q4_0-00001-of-00006.gguf", out, "--overwrite", "-q")
    assert p.returncode == 2
    one_line_error(p.stderr, "would delete the source", "00004-of-00006")
    assert (out / "moe-split-q4_0-00004-of-00006.gguf").is_file() and dtype_of(out) == "Q4_0"


def test_overwrite_refuses_a_source_that_is_a_file_inside_out_by_another_name(tmp_path):
    """A hard link (as a bind mount would) gives the source a path outside OUT; its inode is found inside."""
    out = tmp_path / "out"
    extract(Q4, out, fsync=False)
    os.link(shutil.copy(F16, out / "inside.gguf"), tmp_path / "outside.gguf")
    p = run_cli("extract", tmp_path / "outside.gguf", out, "--overwrite", "-q")
    assert p.returncode == 2
    one_line_error(p.stderr, "would delete the source", "outside.gguf", "inside.gguf")
    assert (out / "inside.gguf").is_file() and dtype_of(out) == "Q4_0"


def test_overwrite_replaces_only_an_earlier_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    p = run_cli("extract", Q4, out, "--overwrite", "-q")
    assert p.returncode == 2
    one_line_error(p.stderr, "has no manifest.json", "mertools did not write it")
    assert [x.name for x in out.iterdir()] == ["notes.txt"]


def test_fallback_replace_without_exchange(tmp_path, monkeypatch):
    out = tmp_path / "out"
    extract(Q4, out, fsync=False)
    monkeypatch.setenv("MERTOOLS_TEST_NO_EXCHANGE", "1")
    extract(F16, out, overwrite=True)
    assert dtype_of(out) == "F16" and leftovers(tmp_path) == []


def test_exchange_is_atomic_where_the_kernel_has_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this kernel or file system")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def kill_during_replace(tmp_path, point, no_exchange):
    out = tmp_path / "out"
    extract(Q4, out, fsync=False)
    old_manifest = (out / "manifest.json").read_bytes()
    env = {"MERTOOLS_TEST_KILL_AT": point}
    if no_exchange:
        env["MERTOOLS_TEST_NO_EXCHANGE"] = "1"
    p = run_cli("extract", F16, out, "--overwrite", "-q", env=env)
    assert p.returncode == -signal.SIGKILL, p.stderr
    return out, old_manifest


def test_kill_between_the_two_renames_loses_nothing(tmp_path):
    out, old_manifest = kill_during_replace(tmp_path, "between-renames", no_exchange=True)
    assert not out.exists()
    olds = [x for x in leftovers(tmp_path) if ".mertools-old-" in x]
    assert len(olds) == 1 and (tmp_path / olds[0] / "manifest.json").read_bytes() == old_manifest
    # the next run (here one without --overwrite) first puts the old output back, then refuses to replace it
    p = run_cli("extract", F16, out, "-q")
    assert p.returncode == 2
    one_line_error(p.stderr, "not empty", "--overwrite")
    assert (out / "manifest.json").read_bytes() == old_manifest
    assert run_cli("verify", out, "-q").returncode == 0
    assert leftovers(tmp_path) == []
    run_cli("extract", F16, out, "--overwrite", "-q", check=True)  # and a replace now completes
    assert dtype_of(out) == "F16" and leftovers(tmp_path) == []


@pytest.mark.parametrize("no_exchange", [True, False])
def test_kill_after_the_new_output_is_in_place(tmp_path, no_exchange):
    if not no_exchange and not exchange(tmp_path, tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    out, old_manifest = kill_during_replace(tmp_path, "before-cleanup", no_exchange)
    assert dtype_of(out) == "F16"  # the new output is complete and in place
    assert run_cli("verify", out, "-q").returncode == 0
    (old,) = [x for x in leftovers(tmp_path) if x != ".out.mertools-lock"]
    # with the exchange the old output sits under the staging name, otherwise under an -old- name
    assert (".mertools-old-" if no_exchange else ".mertools-staging-") in old
    assert (tmp_path / old / "manifest.json").read_bytes() == old_manifest
    p = run_cli("extract", Q4, tmp_path / "elsewhere", "-q")  # another OUT's run leaves this one alone
    assert p.returncode == 0 and (tmp_path / old).exists()
    p = run_cli("extract", Q4, out, "-q")  # the next run into OUT removes the old copy (then refuses: not empty)
    assert p.returncode == 2 and dtype_of(out) == "F16"
    assert leftovers(tmp_path, keep=("out", "elsewhere")) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_mid_write_remove_staging_and_keep_out(tmp_path, sig):
    out = tmp_path / "out"
    extract(Q4, out, fsync=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    p = start_cli("extract", F16, out, "--overwrite", "-q", MERTOOLS_TEST_STOP_AT="writing")
    wait_stopped(p)
    staging = [x for x in leftovers(tmp_path) if ".mertools-staging-" in x]
    assert len(staging) == 1 and any((tmp_path / staging[0]).rglob("*.bin"))  # really mid-write
    os.kill(p.pid, sig)
    os.kill(p.pid, signal.SIGCONT)
    rc, _, err = finish(p)
    assert rc == 128 + sig, err
    one_line_error(err, f"interrupted by {signal.Signals(sig).name}", "no partial output")
    assert leftovers(tmp_path) == []  # staging and lock file gone
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_ignored_hangup_stays_ignored(tmp_path):
    """Under nohup SIGHUP is ignored on purpose: the run goes on and commits."""
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "mertools.cli", "extract", str(Q4), str(out), "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "MERTOOLS_TEST_STOP_AT": "writing"},
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_stopped(p)
    os.kill(p.pid, signal.SIGHUP)
    os.kill(p.pid, signal.SIGCONT)
    rc, _, err = finish(p)
    assert rc == 0, err
    assert dtype_of(out) == "Q4_0" and leftovers(tmp_path) == []


def test_signal_handlers_are_restored(tmp_path):
    mine = lambda s, f: None  # noqa: E731
    old = signal.signal(signal.SIGTERM, mine)
    try:
        with staged_output(tmp_path / "out", marker=None):
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, old)


def test_staged_output_from_a_worker_thread(tmp_path):
    """Handlers can only be installed in the main thread; elsewhere the protocol works without them."""
    errors = []

    def work():
        try:
            with staged_output(tmp_path / "out", marker=None) as st:
                (st / "f").write_text("x")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert errors == [] and (tmp_path / "out" / "f").read_text() == "x"


@pytest.mark.parametrize("where", ["file", "proc"])
def test_unwritable_out_parent(tmp_path, where):
    # the suite runs as root, so chmod would not stop it: a path under a regular file, or under /proc
    out = tmp_path / "a-file" / "sub" / "out" if where == "file" else "/proc/mertools-test/out"
    (tmp_path / "a-file").write_text("x")
    p = run_cli("extract", Q4, out, "-q")
    assert p.returncode == 2
    one_line_error(p.stderr, "choose another OUT")
    assert leftovers(tmp_path, keep=("a-file",)) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("command", ["pack", "reassemble"])
def test_signals_mid_write_of_one_file_remove_its_temporary(tmp_path, command, sig):
    """pack and reassemble write one file under a hidden temporary name: SIGTERM or SIGHUP (a closed terminal, a
    scheduler's time limit) killed them and left it behind, as large as the model; now they end as Ctrl-C does."""
    folder = tmp_path / "folder"
    extract(Q4, folder, fsync=False)
    target = tmp_path / ("a.tar.zst" if command == "pack" else "m.gguf")
    p = start_cli(command, folder, target, "-q", MERTOOLS_TEST_STOP_AT="writing")
    wait_stopped(p)
    assert [x for x in leftovers(tmp_path, keep=("folder",)) if ".mertools-tmp-" in x]  # really mid-write
    os.kill(p.pid, sig)
    os.kill(p.pid, signal.SIGCONT)
    rc, _, err = finish(p)
    assert rc == 128 + sig, err
    one_line_error(err, f"interrupted by {signal.Signals(sig).name}", "no partial output")
    assert leftovers(tmp_path, keep=("folder",)) == []


def test_sigterm_while_running_between_the_two_renames(tmp_path, monkeypatch):
    """As above, but the signal arrives while the process runs (a scheduler's SIGTERM during the fsync of the
    parent folder between the renames), not while it is stopped: the kernel hands it to a thread that does not
    block it (numpy's OpenBLAS thread is enough) and the main thread raises Interrupted inside the block."""
    import signal
    import mertools.commit as cm
    from mertools.commit import Interrupted, staged_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    monkeypatch.setenv("MERTOOLS_TEST_NO_EXCHANGE", "1")
    real_tp = cm.test_point

    def tp(name):
        if name == "between-renames":
            os.kill(os.getpid(), signal.SIGTERM)  # process-directed, as kill(1) or a scheduler sends it
            for _ in range(10000):
                pass
        real_tp(name)

    monkeypatch.setattr(cm, "test_point", tp)
    with pytest.raises(Interrupted):
        with staged_output(out, overwrite=True, sources=[], fsync=False) as st:
            (st / "manifest.json").write_text("new")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert out.exists(), f"OUT is gone; left: {left}"
    assert (out / "manifest.json").read_text() == "new", left


@pytest.mark.parametrize("command", ["pack", "reassemble"])
def test_the_next_run_removes_a_killed_writers_temporary_and_keeps_a_live_ones(tmp_path, command):
    """SIGKILL (the OOM killer, kill -9) runs no handler: the temporary, as large as the model, stayed beside the
    target for good. The next write of that target removes it; a temporary of a process still running stays."""
    folder = tmp_path / "folder"
    extract(Q4, folder, fsync=False)
    target = tmp_path / ("a.tar.zst" if command == "pack" else "m.gguf")
    p = start_cli(command, folder, target, "-q", MERTOOLS_TEST_STOP_AT="writing")
    wait_stopped(p)
    dead = [x for x in leftovers(tmp_path, keep=("folder",)) if ".mertools-tmp-" in x]
    assert len(dead) == 1  # really mid-write
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    live = tmp_path / f".{target.name}.mertools-tmp-{os.getpid()}-0123abcd"  # this test's own process: alive
    live.write_bytes(b"a run still writing")
    run_cli(command, folder, target, "-q", check=True)
    assert not (tmp_path / dead[0]).exists()
    assert live.read_bytes() == b"a run still writing"
    assert target.is_file()
