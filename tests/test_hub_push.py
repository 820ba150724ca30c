"""`mertools push` and `inspect hf://` against the loopback hub (tests/hubserver.py): real HTTP, real CLI processes."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import types

import pytest

from conftest import GEN, REAL, run_cli
from test_hub_pull import ST, one_line_error

MIX = REAL / "mixtral-q4_0.gguf"


def local_files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_an_interrupted_push_resumes_and_sends_each_file_once(hub, env, extracted):
    out = extracted(MIX)
    files = local_files(out)
    hub.fault("error", "/api/models/me/shards/commit/*", times=None, status=500)  # the hub fails every commit
    assert "HTTP 500 6 times" in one_line_error(run_cli("push", out, "me/shards", "-q", env=env))
    uploaded = dict(hub.lfs_uploads)
    assert uploaded and all(n == 1 for n in uploaded.values())
    assert "manifest.json" not in hub.files_at("me/shards")  # nothing was committed

    hub.clear_faults()
    r = json.loads(run_cli("push", out, "me/shards", "--json", env=env, check=True).stdout)
    assert hub.lfs_uploads == uploaded  # the re-run sent no LFS object a second time
    remote = hub.files_at("me/shards")
    for rel, data in files.items():
        assert remote[rel].read() == data, rel
    card = remote["README.md"].read().decode()
    assert "mer_runtime" in card and "open_shards" in card and "Q4_0" in card and "llama" in card
    assert r["commit"] == hub.repos["me/shards"].refs["main"] and r["verified_experts"] == 8

    # a third run finds everything on the hub: nothing sent, no new commit
    n_commits = len(hub.commits)
    r3 = json.loads(run_cli("push", out, "me/shards", "--json", env=env, check=True).stdout)
    assert r3["uploaded_files"] == 0 and r3["skipped_files"] == len(files) + 1 and len(hub.commits) == n_commits
    assert r3["commit"] is None and r3["head"] == r["commit"]  # the commit that holds the folder


def test_a_push_of_another_folder_leaves_none_of_the_last_ones_files(hub, env, extracted, st_extracted):
    """Pushing a re-extracted folder to the repo an earlier push filled only added files: the earlier folder's
    shards, dense.gguf, reassembly record and hf/ companions (a tokenizer an engine reads from hf/) stayed on the
    hub beside the new manifest, a mix of two models. Files mertools writes that the new folder lacks are deleted
    in the same commit; other files of the repo (a .gitattributes, the owner's own) are left alone."""
    first = st_extracted("real/mixtral-bf16-sharded")
    run_cli("push", first, "me/m", "-q", env=env, check=True)
    hub.add_revision("me/m", {"NOTES.md": b"the owner's own"}, base=hub.repos["me/m"].refs["main"])
    assert any(p.startswith("hf/") for p in hub.files_at("me/m"))
    second = extracted(GEN / "moe-merged-q8_0.gguf")
    r = json.loads(run_cli("push", second, "me/m", "--json", env=env, check=True).stdout)
    remote = hub.files_at("me/m")
    assert set(remote) == set(local_files(second)) | {"README.md", "NOTES.md"}, sorted(set(remote))
    assert r["deleted_files"] == len(set(local_files(first)) - set(local_files(second)))


def test_push_to_a_branch_of_a_private_repo(hub, env, extracted):
    out = extracted(GEN / "moe-merged-q8_0.gguf")
    run_cli("push", out, "me/p", "--revision", "q8", "--private", "-q", env=env, check=True)
    assert hub.repos["me/p"].private
    assert set(local_files(out)) | {"README.md"} == set(hub.files_at("me/p", "q8"))
    assert hub.files_at("me/p", "main") == {}


def test_a_damaged_folder_is_never_uploaded(hub, env, extracted, tmp_path):
    import shutil

    out = tmp_path / "bad"
    shutil.copytree(extracted(MIX), out)
    shard = next((out / "experts").rglob("*.bin"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    err = one_line_error(run_cli("push", out, "me/bad", "-q", env=env))
    assert "verify" in err and "me/bad" not in hub.repos and not hub.lfs_uploads


def test_inspect_a_gguf_repo_reads_only_the_header(hub, env):
    big = GEN / "moe-merged-f32.gguf"
    commit = hub.add_revision("org/mix", {big.name: big, MIX.name: MIX})
    p = run_cli("inspect", f"hf://org/mix@{commit}", "--json", env=env)
    assert p.returncode == 2 and big.name in p.stderr  # two models: name one
    d = json.loads(run_cli("inspect", f"hf://org/mix@{commit}/{big.name}", "--json", env=env, check=True).stdout)
    assert d["hub"]["commit"] == commit
    hub.add_revision("org/one", {big.name: big})
    d = json.loads(run_cli("inspect", "hf://org/one", "--json", env=env, check=True).stdout)
    local = json.loads(run_cli("inspect", big, "--json", check=True).stdout)
    assert d["model"] == local["model"] and d["layers"] == local["layers"] and d["would_write"] == local["would_write"]
    assert d["hub"]["commit"] == hub.repos["org/one"].refs["main"]
    assert d["hub"]["would_download"]["files"][0]["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    assert 0 < hub.served("org/one", big.name) < big.stat().st_size
    text = run_cli("inspect", "hf://org/one", env=env, check=True).stdout
    assert "pull would download 1 file(s)" in text and "extract would write" in text


@pytest.mark.skipif(not ST.is_dir(), reason="../shared/fixtures/safetensors is not present")
def test_inspect_a_safetensors_repo_reads_headers_and_config(hub, env):
    hub.add_revision("org/st", {p.name: p for p in ST.iterdir()})
    d = json.loads(run_cli("inspect", "hf://org/st", "--json", env=env, check=True).stdout)
    config = json.loads((ST / "config.json").read_text())
    index = json.loads((ST / "model.safetensors.index.json").read_text())
    assert d["config"]["model_type"] == config["model_type"] == "mixtral"
    assert d["tensors"] == len(index["weight_map"])
    n_layers, n_exp = config["num_hidden_layers"], config["num_local_experts"]
    assert d["expert_tensors"] == 3 * n_layers * n_exp
    shards = sorted(set(index["weight_map"].values()))
    companions = ["generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                  "tokenizer_config.json"]  # the checkpoint's tokenizer and friends: a pull keeps them in OUT/hf/
    assert [f["path"] for f in d["hub"]["would_download"]["files"]] == ["config.json", "model.safetensors.index.json",
                                                                         *companions, *shards]
    assert d["hub"]["would_download"]["companions"] == ["config.json", *companions]  # config.json: read anyway
    for s in shards:  # headers only, by range requests
        assert hub.served("org/st", s) < (ST / s).stat().st_size
    for c in companions:  # listed, never read by inspect
        assert hub.served("org/st", c) == 0, c


# -- push(quiet=True) is scoped: the caller's logging and bars come back, and a loud push beside it stays loud -----
MODEL = GEN / "moe-merged-q4_0.gguf"


@pytest.fixture
def live(hub, env, monkeypatch):
    """In-process pushes to the loopback hub (LFS, not Xet: see test_hub_hostile's fixture of the same name)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)
    return hub


class Records(logging.Handler):
    """huggingface_hub's log records as they reach the library's root logger: (thread ident, message)."""

    def __init__(self):
        super().__init__()
        self.got: list[tuple[int, str]] = []

    def emit(self, record):
        self.got.append((record.thread, record.getMessage()))

    def __enter__(self):
        logging.getLogger("huggingface_hub").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("huggingface_hub").removeHandler(self)


def hf_logging_state():
    import importlib

    bars = importlib.import_module("huggingface_hub.utils.tqdm").progress_bar_states
    loggers = [logging.getLogger(n) for n in sorted(logging.root.manager.loggerDict) if n.startswith("huggingface_hub")]
    return (logging.getLogger("huggingface_hub").level, dict(bars),
            {lg.name: list(lg.filters) for lg in loggers if isinstance(lg, logging.Logger) and lg.filters})


@pytest.mark.parametrize("fails", [False, True])
def test_a_quiet_push_silences_its_warnings_then_gives_the_callers_logging_and_bars_back(live, extracted, monkeypatch,
                                                                                      fails):
    # push(quiet=True) set huggingface_hub's level to ERROR and turned every bar off for the rest of the process
    from mertools.hub import push
    from mertools.hub.remote import HubError

    import importlib

    bars = importlib.import_module("huggingface_hub.utils.tqdm")  # by name: utils.tqdm is also a class
    monkeypatch.setattr(bars, "HF_HUB_DISABLE_PROGRESS_BARS", None)  # the environment leaves bars to code
    monkeypatch.setattr(bars, "progress_bar_states", {"_global": True, "huggingface_hub.mine": False})  # the user's
    importlib.import_module("huggingface_hub.utils.logging")  # it sets its own level once, when first imported
    hf_root = logging.getLogger("huggingface_hub")
    monkeypatch.setattr(hf_root, "level", logging.INFO)  # the user's own logging configuration
    before = hf_logging_state()
    # a 503 once on each LFS upload: huggingface_hub's own retry warns, in its upload worker threads
    live.fault("error", "/lfs-upload/*", times=3, status=503)
    if fails:
        live.fault("error", "/api/models/me/q/commit/*", times=None, status=500)
    with Records() as rec:
        if fails:
            with pytest.raises(HubError, match="HTTP 500"):
                push(extracted(MODEL), "me/q", quiet=True)
        else:
            push(extracted(MODEL), "me/q", quiet=True)
    assert sum(1 for _m, p, s in live.requests if "/lfs-upload/" in p and s == 503) >= 1
    assert [m for _t, m in rec.got if "503" in m or "Retrying" in m] == []
    assert hf_logging_state() == before
    # the same with a loud push: the warnings are there to be silenced (the test can fail)
    live.clear_faults()
    live.fault("error", "/lfs-upload/*", times=1, status=503)
    with Records() as rec:
        push(extracted(OTHER), "me/loud", quiet=False)
    assert any("503" in m for _t, m in rec.got), rec.got
    assert hf_logging_state() == before


OTHER = GEN / "moe-merged-q8_0.gguf"


def test_a_loud_push_beside_a_quiet_one_keeps_its_warnings(live, extracted):
    # two threads, one quiet push and one loud, both inside their LFS batch call when the hub answers it 503 once:
    # the quiet one's level change silenced the loud one too (and whichever ended last decided the level after)
    import threading

    from mertools.hub import push

    entered = {"me/q": threading.Event(), "me/l": threading.Event()}

    def meet(repo, other):
        def edit(_handler):
            entered[repo].set()
            entered[other].wait(30)  # both pushes are in their batch call before either is answered
        return edit

    for repo, other in (("me/q", "me/l"), ("me/l", "me/q")):
        live.fault("hook", f"/{repo}.git/info/lfs/objects/batch", times=1, edit=meet(repo, other))
        live.fault("error", f"/{repo}.git/info/lfs/objects/batch", times=1, status=503)
    errors: list[BaseException] = []
    idents: dict[str, int] = {}

    def run(repo, src, quiet):
        idents[repo] = threading.get_ident()
        try:
            push(extracted(src), repo, quiet=quiet)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    extracted(MODEL), extracted(OTHER)  # extracted in this thread, before the race
    before = hf_logging_state()
    with Records() as rec:
        threads = [threading.Thread(target=run, args=("me/q", MODEL, True)),
                   threading.Thread(target=run, args=("me/l", OTHER, False))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors and all(not t.is_alive() for t in threads), errors
    assert entered["me/q"].is_set() and entered["me/l"].is_set()
    assert "dense.gguf" in live.files_at("me/q") and "dense.gguf" in live.files_at("me/l")
    loud = [m for t, m in rec.got if t == idents["me/l"]]
    quiet = [m for t, m in rec.got if t == idents["me/q"] or "me/q" in m]
    assert any("503" in m and "me/l.git" in m for m in loud), rec.got
    assert quiet == [], quiet
    assert hf_logging_state() == before


FRESH_PUSH = """
import json, logging, sys
got = []
class Keep(logging.Handler):
    def emit(self, r):
        got.append((r.name, r.levelname))
import huggingface_hub.utils.logging  # sets the library's level once, when first imported: the user's comes after
hf = logging.getLogger("huggingface_hub")
hf.setLevel(logging.DEBUG)  # the user's own logging configuration: everything
hf.addHandler(Keep())
from mertools.hub import push
push(sys.argv[1], "me/fresh-q", quiet=True)
quiet, got[:] = list(got), []
push(sys.argv[2], "me/fresh-l", quiet=False)
print(json.dumps({"quiet": quiet, "loud": got}))
"""


def test_the_first_quiet_push_of_a_fresh_process_is_quiet(hub, env, extracted):
    # the filter went only on the loggers that existed when the push began; huggingface_hub makes the loggers of
    # _commit_api, lfs and _upload_pipeline when a push first imports them, mid-push, so the first quiet push of a
    # process let their records through (the in-process tests cannot see it: earlier tests made those loggers)
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    penv = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    r = subprocess.run([sys.executable, "-c", FRESH_PUSH, str(extracted(MODEL)), str(extracted(OTHER))], env=penv,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["quiet"] == [], got["quiet"]
    # the loud push, in the same process, shows what the quiet one had to hide (the test can fail)
    assert {"huggingface_hub._commit_api", "huggingface_hub.lfs"} <= {n for n, _l in got["loud"]}, got["loud"]


class _TableThatRefusesWrites(dict):
    def __setitem__(self, key, value):
        raise RuntimeError("this bar table takes no writes")


class _ModuleThatRefusesWrites(types.ModuleType):
    def __setattr__(self, key, value):
        raise RuntimeError("this module takes no writes")


def test_a_quiet_push_that_fails_to_open_leaves_no_filter_behind(live, extracted, monkeypatch):
    # the scope's counts went up and the filter on before turning the bars off, outside any try: a failure there
    # left huggingface_hub's loggers filtered, and every later record of other threads judged by a quiet push
    # that no longer ran
    import importlib

    from mertools.hub import push

    importlib.import_module("huggingface_hub.hf_api")  # its import sets the library's level once: not ours to see
    bars = importlib.import_module("huggingface_hub.utils.tqdm")
    monkeypatch.setattr(bars, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setattr(bars, "progress_bar_states", _TableThatRefusesWrites({"_global": True}))
    # a quiet scope no longer writes the table: it wraps the module's bar switch, which this module refuses
    refusing = _ModuleThatRefusesWrites(bars.__name__)
    refusing.__dict__.update(bars.__dict__)
    monkeypatch.setitem(sys.modules, bars.__name__, refusing)
    before = hf_logging_state()
    with pytest.raises(RuntimeError, match="takes no writes"):
        push(extracted(MODEL), "me/broken", quiet=True)
    assert hf_logging_state() == before
    assert dict(bars.progress_bar_states) == {"_global": True}


def test_without_thread_ids_in_records_a_quiet_push_alone_is_still_quiet(live, extracted, monkeypatch):
    # logging.logThreads = False makes record.thread None: such a record follows the rule for threads that run no
    # push (dropped only while every open push is quiet)
    monkeypatch.setattr(logging, "logThreads", False)
    from mertools.hub import push

    __import__("huggingface_hub.utils.logging")  # it sets the library's level once, when first imported
    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "level", logging.INFO)
    live.fault("error", "/lfs-upload/*", times=1, status=503)
    with Records() as rec:
        push(extracted(MODEL), "me/nothreads-q", quiet=True)
    assert sum(1 for _m, p, s in live.requests if "/lfs-upload/" in p and s == 503) == 1
    assert [m for _t, m in rec.got if "503" in m] == []
    live.fault("error", "/lfs-upload/*", times=1, status=503)
    with Records() as rec:
        push(extracted(OTHER), "me/nothreads-l", quiet=False)
    assert any("503" in m for _t, m in rec.got) and all(t is None for t, _m in rec.got), rec.got


def test_the_package_gives_the_functions_and_the_modules_stay_importable(monkeypatch):
    # a submodule named like the function is the package's attribute once imported: either the function hid the
    # module (`import mertools.hub.push as m` gave a function; monkeypatch("mertools.hub.push.api") broke) or the
    # module hid the function (`from mertools.hub import push; push(...)` raised TypeError)
    import importlib
    import types

    mods = {n: importlib.import_module(f"mertools.hub.{n}") for n in ("pushing", "pulling")}
    from mertools.hub import pull, push

    assert all(isinstance(m, types.ModuleType) for m in mods.values())
    assert callable(push) and push is mods["pushing"].push and push.__module__ == "mertools.hub.pushing"
    assert callable(pull) and pull is mods["pulling"].pull and pull.__module__ == "mertools.hub.pulling"
    monkeypatch.setattr("mertools.hub.pushing.api", lambda: None)  # the dotted path resolves to the module
    assert mods["pushing"].api() is None


def test_the_xet_timeouts_the_readme_names_are_hf_xets_and_take_a_unit():
    # README ("From and to the Hugging Face Hub"): Xet uploads use hf_xet's own timeouts, not MERTOOLS_HUB_TIMEOUT;
    # this pins what it says of them against the installed hf_xet (read in a fresh process: once per process)
    import os
    import subprocess
    import sys

    pytest.importorskip("hf_xet")
    code = ("import hf_xet; c = hf_xet.XetConfig(); "
            "print(c.get('client.connect_timeout').total_seconds(), c.get('client.read_timeout').total_seconds())")

    def timeouts(**env):
        base = {k: v for k, v in os.environ.items() if not k.startswith("HF_XET_")}
        out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()
        return tuple(float(x) for x in out)

    default = timeouts()
    assert default[0] > 0 and default[1] > 0
    assert timeouts(HF_XET_CLIENT_CONNECT_TIMEOUT="7s", HF_XET_CLIENT_READ_TIMEOUT="2m") == (7.0, 120.0)
    assert timeouts(HF_XET_CLIENT_READ_TIMEOUT="45") == default  # no unit: ignored, as the README warns


def test_a_push_deletes_nothing_no_earlier_push_wrote(hub, env, extracted):
    """Files at the names mertools writes that no earlier mertools push listed are not its to delete: another tool's
    experts/ and hf/ files in a repo without a mertools manifest, and a tokenizer the owner put in hf/ by hand
    beside a folder that listed none (an older mertools kept no companions and told the user to copy them)."""
    theirs = {"experts/layer0.safetensors": b"another tool's shard", "hf/tokenizer.json": b"{}",
              "manifest.json": b'{"not": "a mertools manifest"}'}
    hub.add_revision("me/o", theirs)
    out = extracted(GEN / "moe-merged-q8_0.gguf")
    run_cli("push", out, "me/o", "-q", env=env, check=True)
    remote = hub.files_at("me/o")
    assert {p: remote[p].read() for p in theirs if p != "manifest.json"} == {p: b for p, b in theirs.items()
                                                                             if p != "manifest.json"}

    first = extracted(MIX)
    run_cli("push", first, "me/t", "-q", env=env, check=True)
    hub.add_revision("me/t", {"hf/tokenizer.json": b"the owner's tokenizer"}, base=hub.repos["me/t"].refs["main"])
    r = json.loads(run_cli("push", out, "me/t", "--json", env=env, check=True).stdout)
    remote = hub.files_at("me/t")
    assert remote["hf/tokenizer.json"].read() == b"the owner's tokenizer"
    assert set(remote) == set(local_files(out)) | {"README.md", "hf/tokenizer.json"}, sorted(remote)
    assert r["deleted_files"] == len(set(local_files(first)) - set(local_files(out)))


def test_a_push_another_commit_overtakes_plans_again_from_the_new_head(hub, env, extracted):
    """Another push lands on the branch between this push's listing and its commit. The commit names the commit it
    was planned from (parent_commit), the hub refuses it (412), and the push plans again from the new head: the
    other push's shards are deleted as the leftovers they now are. Without it the commit applied on top of the other
    push and left its shards beside this folder's manifest, a mix of two models."""
    mine, theirs = extracted(GEN / "moe-merged-q8_0.gguf"), extracted(MIX)
    assert set(local_files(theirs)) - set(local_files(mine))  # what a stale plan would leave behind
    hub.add_revision("me/r", {"NOTES.md": b"the owner's own"})

    def overtake(handler):  # the other push commits first
        hub.add_revision("me/r", {**local_files(theirs), "README.md": b"their card"},
                         base=hub.repos["me/r"].refs["main"])

    hub.fault("hook", "/api/models/me/r/commit/*", times=1, edit=overtake)
    r = json.loads(run_cli("push", mine, "me/r", "--json", env=env, check=True).stdout)
    remote = hub.files_at("me/r")
    assert set(remote) == set(local_files(mine)) | {"README.md", "NOTES.md"}, sorted(set(remote))
    assert r["plans"] == 2 and r["deleted_files"] == len(set(local_files(theirs)) - set(local_files(mine)))
    assert r["commit"] == r["head"] == hub.repos["me/r"].refs["main"]


def test_a_push_overtaken_at_every_commit_gives_up_with_one_line(hub, env, extracted):
    """A branch another writer commits to before each of this push's commits: after PLAN_ATTEMPTS plans the push
    stops with one line that says what happened and what to do; none of its commits landed."""
    from mertools.hub.pushing import PLAN_ATTEMPTS

    mine = extracted(GEN / "moe-merged-q8_0.gguf")
    hub.add_revision("me/busy", {"NOTES.md": b"0"})
    n = iter(range(1, 100))
    hub.fault("hook", "/api/models/me/busy/commit/*", times=None, edit=lambda handler: hub.add_revision(
        "me/busy", {"NOTES.md": str(next(n)).encode()}))
    line = one_line_error(run_cli("push", mine, "me/busy", "-q", env=env))
    assert f"before each of this push's {PLAN_ATTEMPTS} commits" in line and "re-run" in line, line
    assert set(hub.files_at("me/busy")) == {"NOTES.md"}
    assert not [c for c in hub.commits if c["repo"] == "me/busy"]  # every commit of the push was refused


def test_a_push_planned_again_sends_no_lfs_object_twice(hub, env, extracted):
    """The plan made again after a 412 sends the same shards: the objects its first plan uploaded are stored, so
    none goes over the wire a second time (the LFS batch answers them without actions)."""
    mine, theirs = extracted(GEN / "moe-merged-q8_0.gguf"), extracted(MIX)
    hub.add_revision("me/r2", {"NOTES.md": b"the owner's own"})

    def overtake(handler):
        hub.add_revision("me/r2", {**local_files(theirs), "README.md": b"their card"},
                         base=hub.repos["me/r2"].refs["main"])

    hub.fault("hook", "/api/models/me/r2/commit/*", times=1, edit=overtake)
    r = json.loads(run_cli("push", mine, "me/r2", "--json", env=env, check=True).stdout)
    assert r["plans"] == 2
    assert hub.lfs_uploads and max(hub.lfs_uploads.values()) == 1, hub.lfs_uploads
