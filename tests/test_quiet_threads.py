"""A quiet push and a loud push at once, in two threads: each gets its own bars and warnings.

The quiet scope used to be partly process-wide: huggingface_hub's bar table was emptied while any quiet push ran
(a loud push beside it showed no bar), and the library's upload workers, with no link back to their push, were
judged by "is any loud push running" (a quiet push's worker warnings showed beside a loud one). Now each push's
files are uploaded by workers that follow it (`quiet.adopting`), and bars are decided per thread.

Real HTTP on loopback (tests/hubserver.py), the real huggingface_hub. stderr is captured per writing thread (a
stand-in `sys.stderr` that files each write under the thread that made it; tqdm writes from the thread that
updates a bar), and the files of the two pushes have different names, so a bar is attributed by what it says
(a per-file bar names its file) as well as by its thread. Warnings are attributed by the LFS object (oid) their
retried URL names. The two pushes meet twice on the hub (both inside their LFS batch call, then both at their
commit) so that every upload of each runs while the other push is open.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
import threading

import pytest

from conftest import GEN

QUIET_SRC, LOUD_SRC = GEN / "moe-merged-f32.gguf", GEN / "moe-merged-q8_0.gguf"  # shards with NULs: LFS


@pytest.fixture
def live(hub, env, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)
    bars = importlib.import_module("huggingface_hub.utils.tqdm")  # by name: utils.tqdm is also a class
    monkeypatch.setattr(bars, "HF_HUB_DISABLE_PROGRESS_BARS", None)  # bars left to code, as without the variable
    monkeypatch.setattr(bars, "progress_bar_states", {"_global": True})  # the user's table: bars on
    importlib.import_module("huggingface_hub.utils.logging")  # it sets the library's level once, when imported
    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "level", logging.INFO)
    return hub


class PerThread:
    """A stand-in stderr: every write filed under the name of the thread that made it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.writes: list[tuple[str, str]] = []

    def write(self, s: str) -> int:
        with self.lock:
            self.writes.append((threading.current_thread().name, s))
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def of(self, name: str) -> str:
        return "".join(s for t, s in self.writes if t == name)

    def everything(self) -> str:
        return "".join(s for _t, s in self.writes)


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.got: list[str] = []

    def emit(self, record):
        self.got.append(record.getMessage())


def _sha256(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_quiet_and_a_loud_push_at_once_each_get_their_own_bars_and_warnings(live, tmp_path, monkeypatch):
    from mertools import extract
    from mertools.hub import push

    quiet_out, loud_out = tmp_path / "q", tmp_path / "l"
    extract(QUIET_SRC, quiet_out, experts=[0, 1], fsync=False)  # E0000, E0001
    extract(LOUD_SRC, loud_out, experts=[2, 3], fsync=False)  # E0002, E0003: names the quiet push never has
    quiet_shards = sorted(quiet_out.rglob("E*.bin"))
    loud_shards = sorted(loud_out.rglob("E*.bin"))
    assert len(quiet_shards) >= 2 and len(loud_shards) >= 2  # several LFS files: the library's upload pool runs
    q_oid, l_oid = _sha256(quiet_out / "dense.gguf"), _sha256(loud_out / "dense.gguf")  # binary: always LFS

    entered = {"me/q": [threading.Event(), threading.Event()], "me/l": [threading.Event(), threading.Event()]}

    def meet(repo, other, i):
        def edit(_handler):
            entered[repo][i].set()
            entered[other][i].wait(60)  # a liveness bound: both pushes are here before either is answered
        return edit

    for repo, other in (("me/q", "me/l"), ("me/l", "me/q")):
        live.fault("hook", f"/{repo}.git/info/lfs/objects/batch", times=1, edit=meet(repo, other, 0))
        live.fault("hook", f"/api/models/{repo}/commit/*", times=1, edit=meet(repo, other, 1))
    # one 503 on dense.gguf of each: huggingface_hub's retry warns, on the upload worker that sends the file
    live.fault("error", f"/lfs-upload/{q_oid}", times=1, status=503)
    live.fault("error", f"/lfs-upload/{l_oid}", times=1, status=503)

    err = PerThread()
    monkeypatch.setattr(sys, "stderr", err)
    rec = Records()
    logging.getLogger("huggingface_hub").addHandler(rec)
    errors: list[BaseException] = []

    def run(folder, repo, quiet):
        try:
            push(folder, repo, quiet=quiet)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    try:
        threads = [threading.Thread(target=run, args=(quiet_out, "me/q", True), name="quiet-push"),
                   threading.Thread(target=run, args=(loud_out, "me/l", False), name="loud-push")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        logging.getLogger("huggingface_hub").removeHandler(rec)
        monkeypatch.undo()
    assert not errors and all(not t.is_alive() for t in threads), errors
    assert all(e.is_set() for pair in entered.values() for e in pair)  # the pushes met, both times
    assert sum(1 for _m, p, s in live.requests if p.endswith(q_oid) and s == 503) == 1
    assert sum(1 for _m, p, s in live.requests if p.endswith(l_oid) and s == 503) == 1

    # bars: the loud push's own (on its thread) and its files' (on the library's workers) are there, though a
    # quiet push ran all along; nothing at all from the quiet push's thread, and no bar names a quiet file
    assert "Upload" in err.of("loud-push") and "LFS files" in err.of("loud-push"), err.writes
    everything = err.everything()
    put = {p.rsplit("/", 1)[1] for m, p, _s in live.requests if m == "PUT" and "/lfs-upload/" in p}
    loud_lfs = [p for p in loud_shards if _sha256(p) in put]  # the hub keeps a small text-like file in git
    quiet_lfs = [p for p in quiet_shards if _sha256(p) in put]
    assert len(loud_lfs) >= 2 and len(quiet_lfs) >= 2, (loud_lfs, quiet_lfs)
    for p in loud_lfs:
        assert p.name in everything, (p.name, err.writes)
    assert err.of("quiet-push") == "", err.of("quiet-push")
    for p in quiet_lfs:
        assert p.name not in everything, (p.name, err.writes)
    # warnings: the loud push's worker retry is reported, the quiet one's is not, though a loud push ran beside it
    assert any(l_oid in m for m in rec.got), rec.got
    assert not any(q_oid in m for m in rec.got), rec.got
    assert "dense.gguf" in live.files_at("me/q") and "dense.gguf" in live.files_at("me/l")


def test_the_wrapped_bar_switch_answers_the_users_table_outside_quiet_pushes(live, monkeypatch):
    """While a quiet push runs, the library's switch is wrapped; a thread running no push (or a loud one) gets the
    user's own answer, and the switch is the library's again once the quiet push has ended."""
    from mertools.hub.quiet import adopt, quiet_scope

    bars = importlib.import_module("huggingface_hub.utils.tqdm")
    real = bars.are_progress_bars_disabled
    seen: dict[str, bool] = {}
    inside = threading.Event()
    leave = threading.Event()

    def quiet_thread():
        with quiet_scope(True):
            seen["quiet"] = bars.are_progress_bars_disabled()
            inside.set()
            leave.wait(30)

    t = threading.Thread(target=quiet_thread)
    t.start()
    try:
        assert inside.wait(30)
        seen["other"] = bars.are_progress_bars_disabled()
        with quiet_scope(False):
            seen["loud"] = bars.are_progress_bars_disabled()
            with adopt(True):  # a worker uploading for a quiet push
                seen["adopted"] = bars.are_progress_bars_disabled()
        bars.progress_bar_states["_global"] = False  # the user turns bars off meanwhile: theirs to decide
        seen["user_off"] = bars.are_progress_bars_disabled()
        bars.progress_bar_states["_global"] = True
    finally:
        leave.set()
        t.join(30)
    assert seen == {"quiet": True, "other": False, "loud": False, "adopted": True, "user_off": True}
    assert bars.are_progress_bars_disabled is real and bars.progress_bar_states == {"_global": True}
