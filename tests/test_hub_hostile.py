"""`mertools pull` against a hub that lies or attacks: real HTTP on loopback (tests/hubserver.py's fault kinds).

For every case: one MerError subclass whose one-line message names the repo (and the file where there is one) and
what to do; nothing written outside OUT and its staging folder; nothing left that looks complete (OUT absent, and
every file in the staging folder without ``.part`` verified against the true bytes); and once the server behaves,
a pull into the same OUT succeeds and is byte-identical to a local extract of the same file.

Decisions these tests pin (README, "From and to the Hugging Face Hub"):
- a listing that no git tree can produce (``..``/``.``/empty parts, absolute, NUL, the same path twice, a path
  that is both a file and a folder, pagination that loops) is refused whole, needed file or not;
- a name git allows but that cannot be staged here (backslash, control character, a part over 250 bytes) and an
  entry with a field of the wrong type are skipped when the conversion does not need them, refused when it does;
- ETag and X-Linked-Etag are not trusted: the listing's sha256 (or git oid) is checked against the bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GEN
from hubserver import HubServer
from test_hub_pull import one_line_error, same_shards

MODEL = GEN / "moe-merged-q4_0.gguf"  # 155 KB: every case downloads it once or twice
OTHER = GEN / "moe-merged-q8_0.gguf"
SPLIT = sorted(GEN.glob("moe-split-q4_0-*.gguf"))
REPO = "org/m"


@pytest.fixture
def live(hub, env, monkeypatch):
    """The hub's environment in this process too (in-process pulls); a timeout short enough for a test, long
    enough that a loaded machine does not add retries the counting tests would see."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MERTOOLS_HUB_TIMEOUT", "5")
    # read once, when huggingface_hub was first imported (maybe by another test, without the hub's env): this
    # server speaks LFS, not Xet, for in-process pushes too
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)
    return hub


@pytest.fixture
def out(tmp_path):
    return tmp_path / "root" / "deep" / "out"


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and "hf-home" not in p.parts}


def pull_fails(out: Path, *want: str, repo: str = REPO, **kw):
    """In-process pull that must fail with one MerError line naming the repo and each of ``want``."""
    from mer_runtime.errors import MerError

    from mertools.hub import pull

    with pytest.raises(MerError) as ei:
        pull(repo, out, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and repo in msg, msg
    for w in want:
        assert w in msg, (w, msg)
    return ei.value


def nothing_looks_complete(tmp_path: Path, out: Path, truth: dict[str, bytes]) -> None:
    """OUT absent; everything written lies in OUT's staging folder; a staged file without .part is the true bytes."""
    stage = out.parent / f".{out.name}.mertools-pull"
    assert not out.exists()
    for p in files_under(tmp_path):
        assert p.is_relative_to(stage), p
    files = stage / "files"
    for p in files.rglob("*") if files.is_dir() else []:
        if p.is_file() and not p.name.endswith(".part"):
            assert p.read_bytes() == truth[p.relative_to(files).as_posix()], p


def pull_ok(out: Path, src: Path, extracted, **kw) -> None:
    from mertools.hub import pull

    pull(REPO, out, **kw)
    same_shards(out, extracted(src))


def cli(env: dict, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """The real command, bounded: a client that never gives up fails the test instead of hanging it."""
    return subprocess.run([sys.executable, "-m", "mertools.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout)


def run_ok(env: dict, *args: str) -> bool:
    r = cli(env, *args)
    assert r.returncode == 0, r.stderr
    return True


def add_model(hub: HubServer, **extra) -> str:
    return hub.add_revision(REPO, {MODEL.name: MODEL, **extra})


def tree_adds(*entries: dict):
    """A json-fault edit that appends entries to a tree listing."""
    def edit(v):
        return v + list(entries) if isinstance(v, list) else v
    return edit


def tree_sets(path: str, **fields):
    """A json-fault edit that changes fields of one tree entry."""
    def edit(v):
        if isinstance(v, list):
            for e in v:
                if e.get("path") == path:
                    e.update(fields)
        return v
    return edit


def entry(path: str, size: int = 10, **kw) -> dict:
    return {"type": "file", "path": path, "size": size, "oid": "1" * 40, **kw}


TREE = f"/api/models/{REPO}/tree/*"
RESOLVE = f"/{REPO}/resolve/*"


# -- names ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../escape.safetensors", "a/../../b.gguf", "/etc/evil.gguf", "x\0y.gguf",
                                  "./m.gguf", "a//b.gguf", "", "dir/", ".."])
def test_a_listing_no_git_tree_can_hold_is_refused_whole(live, out, tmp_path, extracted, name):
    add_model(live)
    live.fault("json", TREE, times=None, edit=tree_adds(entry(name)))
    pull_fails(out, "not a safe relative path")
    nothing_looks_complete(tmp_path, out, {})
    assert live.served(REPO, MODEL.name) == 0
    live.clear_faults()
    pull_ok(out, MODEL, extracted)


@pytest.mark.parametrize("extra", [
    [entry(MODEL.name)],  # the same path twice
    [entry("model-dir"), entry("model-dir/x.txt")],  # a file that is also a folder
    [{"type": "directory", "path": MODEL.name}],  # the model is also listed as a folder
], ids=["twice", "file-and-folder", "model-also-folder"])
def test_a_listing_that_is_not_a_tree_is_refused(live, out, tmp_path, extracted, extra):
    add_model(live)
    live.fault("json", TREE, times=None, edit=tree_adds(*extra))
    pull_fails(out, "not a repo tree")
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    pull_ok(out, MODEL, extracted)


def test_names_git_allows_but_we_cannot_stage_are_skipped_when_not_needed(live, out, tmp_path, extracted):
    odd = {"notes\nevil.md": b"x", "docs\\win.md": b"y", "l" * 300 + ".md": b"z", "README.md": b"a",
           "readme.MD": b"b", "sub/README.md": b"c"}
    add_model(live, **odd)
    pull_ok(out, MODEL, extracted)
    assert all(live.served(REPO, n) == 0 for n in odd)
    assert {p.name for p in files_under(tmp_path)} <= {p.name for p in files_under(out)}


@pytest.mark.parametrize("name", ["m\\odel.gguf", "mo\ndel.gguf", "m" * 251 + ".gguf", "m\x7f.gguf"])
def test_a_needed_file_with_a_name_we_cannot_stage_is_refused(live, out, tmp_path, name):
    live.add_revision(REPO, {name: MODEL})
    err = pull_fails(out, "conversion needs", "refusing")
    assert repr(name)[1:40] in str(err)
    nothing_looks_complete(tmp_path, out, {})
    assert live.served(REPO, name) == 0


def st_repo(hub: HubServer, shards: list[str]) -> dict[str, bytes]:
    index = {"metadata": {}, "weight_map": {f"t{i}": s for i, s in enumerate(shards)}}
    files = {"config.json": b'{"model_type": "mixtral"}', "model.safetensors.index.json": json.dumps(index).encode(),
             **{s: b"\0" * 64 for s in shards}}
    hub.add_revision(REPO, files)
    return files


@pytest.mark.parametrize("shards,why", [
    (["model-1.safetensors", "Model-1.safetensors"], "differ only in case"),
    (["a.safetensors", "a.safetensors.part"], "plain .safetensors file name"),  # the index check comes first
])
def test_needed_files_that_would_overwrite_each_other_are_refused(live, out, tmp_path, shards, why):
    st_repo(live, shards)
    pull_fails(out, why)
    assert not out.exists() and all(live.served(REPO, s) == 0 for s in shards)


# -- sizes and bytes that lie ---------------------------------------------------------------------------------
@pytest.mark.parametrize("delta", [-1000, 1000])
def test_a_content_length_that_contradicts_the_listing_is_refused_then_resumed(live, out, tmp_path, extracted, delta):
    add_model(live)
    live.fault("declare", RESOLVE, times=None, after=delta)
    err = pull_fails(out, MODEL.name, "listing says")
    assert type(err).__name__ == "IntegrityError"
    assert sum(1 for _m, p, _s in live.requests if "/resolve/" in p) == 1  # no retry of a hub contradicting itself
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    pull_ok(out, MODEL, extracted)


def test_bytes_past_the_declared_body_poison_only_their_connection(live, out, extracted):
    live.add_revision(REPO, {p.name: p for p in SPLIT})
    live.fault("extra", RESOLVE, times=2, after=5000)  # junk where the next answer on the connection would start
    pull_ok(out, SPLIT[0], extracted)


def test_a_body_longer_than_the_listing_is_refused(live, out, tmp_path, extracted):
    add_model(live)
    live.fault("nolength", RESOLVE, times=None, after=4096)
    pull_fails(out, MODEL.name, "more than")
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    pull_ok(out, MODEL, extracted)


def test_a_hub_that_ignores_range_and_cuts_every_answer_is_given_up_on(live, env, out, tmp_path, extracted):
    # each answer starts again at byte 0 and stops at the same byte: attempts bring nothing new (the old client
    # counted every byte as progress and retried for ever)
    add_model(live)
    live.chunk = 4096
    live.fault("norange", RESOLVE, times=None)
    live.fault("cut", RESOLVE, times=None, after=50_000)
    err = one_line_error(cli(env, "pull", REPO, out, "-q"))
    assert "gave up after 6 attempts" in err and MODEL.name in err and REPO in err and "run the pull again" in err
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    pull_ok(out, MODEL, extracted)


def test_a_kept_prefix_from_a_bad_hub_does_not_poison_the_resumed_pull(live, out, tmp_path, extracted):
    add_model(live)
    live.chunk = 4096
    live.fault("corrupt", RESOLVE, times=None, after=1000)
    live.fault("norange", RESOLVE, times=None)
    live.fault("cut", RESOLVE, times=None, after=50_000)
    pull_fails(out, "gave up")
    part = out.parent / f".{out.name}.mertools-pull" / "files" / f"{MODEL.name}.part"
    assert part.stat().st_size == 50_000 and part.read_bytes() != MODEL.read_bytes()[:50_000]
    live.clear_faults()
    pull_ok(out, MODEL, extracted)  # resumed from the bad prefix, found the hash wrong, fetched afresh once
    starts = live.range_starts[(REPO, MODEL.name)]
    assert starts[-2:] == [50_000, 0]


def test_a_huge_listed_size_is_refused_before_a_byte_is_written(live, out, tmp_path, extracted):
    add_model(live)
    huge = 1 << 60
    live.fault("json", TREE, times=None, edit=tree_sets(MODEL.name, size=huge, lfs={
        "oid": hashlib.sha256(MODEL.read_bytes()).hexdigest(), "size": huge, "pointerSize": 134}))
    err = pull_fails(out, MODEL.name, "free")
    assert type(err).__name__ == "OutputError"
    assert live.served(REPO, MODEL.name) == 0
    assert not [p for p in files_under(tmp_path) if "files" in p.parts]  # the journal and lock only
    live.clear_faults()
    pull_ok(out, MODEL, extracted)


def test_a_listed_sha256_the_bytes_do_not_have_is_refused(live, out, tmp_path, extracted):
    add_model(live)
    live.fault("json", TREE, times=None, edit=tree_sets(MODEL.name, lfs={
        "oid": "0" * 64, "size": MODEL.stat().st_size, "pointerSize": 134}))
    pull_fails(out, MODEL.name, "0" * 64, "nothing was converted")
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    pull_ok(out, MODEL, extracted)


def test_an_etag_that_lies_is_not_trusted_the_bytes_are_checked(live, out, extracted):
    add_model(live)
    live.fault("etag", RESOLVE, times=None, value="f" * 64)
    pull_ok(out, MODEL, extracted)


def test_an_lfs_pointer_served_for_the_file_is_named_as_such(live, out, tmp_path, extracted):
    add_model(live)
    live.fault("pointer", RESOLVE, times=None)
    pull_fails(out, MODEL.name, "Git LFS pointer")
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    pull_ok(out, MODEL, extracted)


# -- protocol -------------------------------------------------------------------------------------------------
def test_429_and_5xx_with_a_short_retry_after_are_retried(live, out, extracted):
    add_model(live)
    live.fault("error", RESOLVE, times=2, status=429, headers={"Retry-After": "0"})
    live.fault("error", TREE, times=2, status=502, headers={"Retry-After": "0"})
    live.fault("error", TREE, times=1, status=503, headers={"Retry-After": "1"})
    live.fault("error", f"/api/models/{REPO}", times=1, status=500)
    pull_ok(out, MODEL, extracted)
    assert [s for _m, _p, s in live.requests if s >= 400] == [500, 502, 502, 503, 429, 429]


@pytest.mark.parametrize("where", [TREE, RESOLVE])
def test_a_retry_after_longer_than_our_longest_wait_ends_the_pull_at_once(live, env, out, tmp_path, extracted,
                                                                           where):
    # huggingface_hub's pagination sleeps Retry-After + 1 s whatever it says: the old listing waited an hour here
    add_model(live)
    live.fault("error", where, times=None, status=429, headers={"Retry-After": "3600"})
    err = one_line_error(cli(env, "pull", REPO, out, "-q", timeout=60))
    assert "3600 s" in err and REPO in err and "again" in err
    assert sum(1 for _m, _p, s in live.requests if s == 429) == 1
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    pull_ok(out, MODEL, extracted)


@pytest.mark.parametrize("where", [TREE, RESOLVE])
def test_endless_5xx_is_bounded_and_names_what_to_do(live, out, tmp_path, extracted, where):
    add_model(live)
    live.fault("error", where, times=None, status=500)
    pull_fails(out, "6", "again")
    assert sum(1 for _m, _p, s in live.requests if s == 500) == 6
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    pull_ok(out, MODEL, extracted)


def test_a_redirect_loop_is_one_error_not_retried(live, out, tmp_path, extracted):
    add_model(live)
    live.fault("redirect", RESOLVE, times=None, location="{path}")
    pull_fails(out, MODEL.name, "redirects loop")
    assert sum(1 for _m, p, s in live.requests if s == 302) <= 25
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    pull_ok(out, MODEL, extracted)


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://x/"])
def test_a_redirect_to_another_scheme_is_refused(live, out, tmp_path, location):
    add_model(live)
    live.fault("redirect", RESOLVE, times=None, location=location)
    pull_fails(out, MODEL.name, "not http(s)")
    nothing_looks_complete(tmp_path, out, {})


def test_a_redirect_to_another_host_is_followed_without_the_token(live, out, extracted):
    # the hub sends LFS downloads to a CDN on another host: followed, bytes checked, the token not sent there
    add_model(live)
    with HubServer() as cdn:
        cdn.add_revision(REPO, {MODEL.name: MODEL})
        live.fault("redirect", RESOLVE, times=None, status=302, location=cdn.url + "{path}")
        pull_ok(out, MODEL, extracted)
        assert cdn.range_starts[(REPO, MODEL.name)] == [0] and live.served(REPO, MODEL.name) == 0
        assert cdn.seen_headers and not any("authorization" in {k.lower() for k in h} for _p, h in cdn.seen_headers)
    assert any("authorization" in {k.lower() for k in h} for _p, h in live.seen_headers)


def test_a_hub_that_never_answers_times_out(live, env, out, tmp_path, extracted, monkeypatch):
    # huggingface_hub's client has no timeout: the old repo-info call waited for ever here
    add_model(live)
    live.fault("hang", f"/api/models/{REPO}", times=None, delay=30)
    err = one_line_error(cli({**env, "MERTOOLS_HUB_TIMEOUT": "0.2"}, "pull", REPO, out, "-q", timeout=60))
    assert "Timeout" in err and REPO in err and "try again" in err
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    hang = live.fault("hang", RESOLVE, times=2, delay=30)  # a download that stalls twice: retried, then fine
    monkeypatch.setenv("MERTOOLS_HUB_TIMEOUT", "2")
    pull_ok(out, MODEL, extracted)
    # only the hung requests are counted: a real request that also times out on a loaded machine is retried too
    assert hang.fired == 2 and 200 in [s for _m, p, s in live.requests if "/resolve/" in p]


def test_a_bad_timeout_setting_is_one_clear_error(live, out, monkeypatch):
    add_model(live)
    for bad in ("0", "-1", "soon", "nan", "inf"):
        monkeypatch.setenv("MERTOOLS_HUB_TIMEOUT", bad)
        from mertools.hub.remote import HubError

        with pytest.raises(HubError, match="MERTOOLS_HUB_TIMEOUT"):
            from mertools.hub import pull

            pull(REPO, out)


NESTED = b"[" * 200_000 + b"]" * 200_000


@pytest.mark.parametrize("where,body", [
    (f"/api/models/{REPO}", b"<html>hub is down</html>"),
    (f"/api/models/{REPO}", b"[1, 2, 3]"),
    (f"/api/models/{REPO}", NESTED),
    (f"/api/models/{REPO}", b'{"sha": 12345}'),
    (f"/api/models/{REPO}", b'{"sha": "../../../etc"}'),
    (f"/api/models/{REPO}", b'{"sha": null, "siblings": "x"}'),
    (TREE, b"not json"),
    (TREE, b'{"files": []}'),
    (TREE, NESTED),
    (TREE, b'[1, "x", null]'),
    (TREE, b'[{"type": "file", "path": 7}]'),
    (TREE, b'[{"path": "a.gguf", "size": 3}]'),
], ids=["info-html", "info-list", "info-deep", "info-sha-int", "info-sha-path", "info-null", "tree-text",
        "tree-object", "tree-deep", "tree-scalars", "tree-path-int", "tree-no-type"])
def test_json_that_is_not_what_a_hub_sends_is_one_clear_error(live, out, tmp_path, extracted, where, body):
    add_model(live)
    live.fault("body", where, times=None, body=body)
    pull_fails(out, "HF_ENDPOINT")
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    pull_ok(out, MODEL, extracted)


@pytest.mark.parametrize("fields,why", [
    ({"size": "big"}, "size"), ({"size": -5}, "size"), ({"size": True}, "size"), ({"size": None}, "size"),
    ({"lfs": "x"}, "LFS sha256"), ({"lfs": {"oid": "zz", "size": 1}}, "LFS sha256"), ({"lfs": [1]}, "LFS sha256"),
    ({"lfs": {"oid": "a" * 64, "size": 3}}, "LFS size"), ({"lfs": None, "oid": 5}, "git oid"),
    ({"lfs": None, "oid": None}, "git oid"),
])
def test_wrong_field_types_skip_an_unneeded_file_and_refuse_a_needed_one(live, out, tmp_path, extracted, fields,
                                                                         why):
    add_model(live, **{"notes.md": b"hello\n"})
    live.fault("json", TREE, times=None, edit=tree_sets(MODEL.name, **fields))
    pull_fails(out, MODEL.name, why, "conversion needs")
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    live.fault("json", TREE, times=None, edit=tree_sets("notes.md", **fields))
    pull_ok(out, MODEL, extracted)


@pytest.mark.parametrize("link,why", [
    ('<{url}/api/models/org/m/tree/{sha}?recursive=true&expand=false>; rel="next"', "loop"),
    ('<http://127.0.0.2:9/x>; rel="next"', "another host"),
])
def test_listing_pages_that_loop_or_leave_the_hub_are_refused(live, out, tmp_path, link, why):
    sha = add_model(live)
    # empty pages, so that only the links themselves can stop the client
    live.fault("json", TREE, times=None, edit=lambda v: [],
               headers={"Link": link.replace("{url}", live.url).replace("{sha}", sha)})
    pull_fails(out, why)
    nothing_looks_complete(tmp_path, out, {})


def test_a_listing_split_over_pages_is_read_whole(live, out, extracted):
    sha = add_model(live)
    page2 = f"{live.url}/api/models/{REPO}/tree/{sha}?page=2"
    live.fault("json", TREE, times=1, edit=lambda v: v[:1], headers={"Link": f'<{page2}>; rel="next"'})
    live.fault("json", TREE, times=1, edit=lambda v: v[1:])  # the last page may be empty: it has no next link
    pull_ok(out, MODEL, extracted)


# -- the revision moves ---------------------------------------------------------------------------------------
def test_a_branch_moved_between_listing_and_download_still_pulls_the_listed_commit(live, out, extracted):
    old = add_model(live)

    def move(_handler):
        live.add_revision(REPO, {MODEL.name: OTHER})  # main now names other bytes under the same path

    live.fault("hook", TREE, times=1, edit=move)
    from mertools.hub import pull

    r = pull(REPO, out)
    assert r.commit == old
    same_shards(out, extracted(MODEL))
    assert not any("/resolve/main/" in p for _m, p, _s in live.requests)
    assert all(f"/resolve/{old}/" in p for _m, p, _s in live.requests if "/resolve/" in p)


def test_a_hub_serving_the_branch_head_for_a_pinned_commit_is_caught(live, out, tmp_path, extracted):
    add_model(live)
    live.add_revision(REPO, {MODEL.name: OTHER}, branch="next")
    old_main = live.repos[REPO].refs["main"]
    live.fault("hook", TREE, times=1, edit=lambda h: live.repos[REPO].refs.update(main=live.repos[REPO].refs["next"]))
    live.fault("ignore_rev", RESOLVE, times=None)
    pull_fails(out, MODEL.name, "nothing was converted")
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    live.repos[REPO].refs["main"] = old_main
    pull_ok(out, MODEL, extracted)


def test_a_hub_that_answers_another_commit_for_a_pinned_sha_is_refused(live, out):
    add_model(live)
    asked = "ab" * 20
    live.fault("body", f"/api/models/{REPO}/revision/*", times=None,
               body=json.dumps({"sha": live.repos[REPO].refs["main"]}).encode())
    pull_fails(out, asked, "pinned", revision=asked)


def test_push_reads_a_malformed_remote_listing_as_one_error(live, tmp_path, extracted):
    from mer_runtime.errors import MerError

    from mertools.hub.pushing import push

    live.add_revision("me/shards", {})
    live.fault("body", "/api/models/me/shards/tree/*", times=None, body=b"<html>")
    with pytest.raises(MerError, match="not valid JSON"):
        push(extracted(MODEL), "me/shards")


def test_a_range_read_the_hub_answers_with_the_whole_file_reads_only_what_it_asked(live):
    # planning a SafeTensors pull and `inspect hf://` read headers by range requests; the old reader took a 200's
    # whole body into memory (a 100 GB shard from a hub that ignores Range)
    from mertools.hub.inspect import read_range
    from mertools.hub.remote import RepoSpec

    data = os.urandom(8 << 20)
    sha = live.add_revision(REPO, {"big.bin": data})
    live.chunk = 64 << 10
    live.fault("norange", RESOLVE, times=None)
    # after 2 chunks the server waits for the client to hang up (30 s at most, then it sends the rest): what it sent
    # does not depend on how fast the client closes, nor on the loopback's buffers
    live.fault("stall", RESOLVE, after=2 * live.chunk)
    assert read_range(RepoSpec(REPO), sha, "big.bin", 100, 107) == data[100:108]
    deadline = time.monotonic() + 60
    while not live.transfers and time.monotonic() < deadline:  # the server notices the closed connection
        time.sleep(0.01)
    (key, first, sent), = live.transfers
    assert key == (REPO, "big.bin") and first == 0 and sent <= 2 * live.chunk


def test_inspect_of_a_file_listed_at_an_impossible_size_is_one_error(live, env):
    add_model(live)
    live.fault("json", TREE, times=None, edit=tree_sets(MODEL.name, size=1 << 62, lfs={
        "oid": hashlib.sha256(MODEL.read_bytes()).hexdigest(), "size": 1 << 62, "pointerSize": 134}))
    err = one_line_error(cli(env, "inspect", f"hf://{REPO}"))
    assert MODEL.name in err and REPO in err and "HF_ENDPOINT" in err


def test_repo_info_fields_the_pull_does_not_read_may_be_anything(live, out, extracted):
    sha = add_model(live)
    live.fault("body", f"/api/models/{REPO}", times=None,
               body=json.dumps({"sha": sha, "siblings": 5, "private": "maybe", "id": [None]}).encode())
    pull_ok(out, MODEL, extracted)


# -- review fixes: compression, trickles, one byte per answer, Retry-After forms, push's timeout, stop -------------
API = f"/api/models/{REPO}*"


def test_json_the_hub_gzips_as_a_cdn_does_is_read(live, out, extracted):
    # the old reader asked for gzip (httpx's default) and read the raw bytes: "not valid JSON ... captive portal"
    add_model(live)
    live.fault("gzip", "/api/*", times=None)
    pull_ok(out, MODEL, extracted)
    assert live.gzipped >= 2  # repo info and the tree listing both came compressed


def test_a_gzip_bomb_is_refused_by_its_decoded_size(live, out, tmp_path):
    import gzip

    add_model(live)
    bomb = gzip.compress(b"[" + b" " * (200 << 20) + b"]", 9)  # 200 MB of JSON in about 200 KB
    assert len(bomb) < 1 << 20
    live.fault("body", TREE, times=None, body=bomb, headers={"Content-Encoding": "gzip"})
    pull_fails(out, "larger than 8 MiB", "HF_ENDPOINT")
    nothing_looks_complete(tmp_path, out, {})


@pytest.mark.parametrize("enc", ["br", "deflate", "zstd"])
def test_json_in_an_encoding_we_did_not_ask_for_is_named(live, out, tmp_path, enc):
    add_model(live)
    live.fault("body", TREE, times=None, body=b"\x00\x01junk", headers={"Content-Encoding": enc})
    pull_fails(out, f"{enc}-encoded", "HF_ENDPOINT")
    nothing_looks_complete(tmp_path, out, {})


def test_a_download_answered_one_byte_at_a_time_is_given_up_on(live, env, out, tmp_path, extracted):
    # every answer brought one new byte, which the old count took for progress: ~155,000 requests for this file
    add_model(live)
    live.fault("cut", RESOLVE, times=None, after=1)
    err = one_line_error(cli(env, "pull", REPO, out, "-q", timeout=60))
    assert "gave up after 6 attempts" in err and MODEL.name in err and REPO in err and "run the pull again" in err
    assert sum(1 for _m, p, _s in live.requests if "/resolve/" in p) == 6
    nothing_looks_complete(tmp_path, out, {})
    live.clear_faults()
    pull_ok(out, MODEL, extracted)  # the 6 bytes kept are resumed from


@pytest.mark.parametrize("where", [f"/api/models/{REPO}", RESOLVE])
def test_an_answer_that_trickles_for_ever_is_cut_by_the_deadline_and_retried(live, env, out, extracted, where):
    # one byte every 0.1 s never trips a 0.5 s read timeout: the old JSON and range readers waited for ever
    add_model(live)
    tr = live.fault("trickle", where, times=1, delay=0.1)
    env = {**env, "MERTOOLS_HUB_TIMEOUT": "0.5"}
    args = ("inspect", f"hf://{REPO}", "--json") if where == RESOLVE else ("pull", REPO, out, "-q")
    r = cli(env, *args, timeout=60)
    assert r.returncode == 0, r.stderr
    assert tr.fired == 1


@pytest.mark.parametrize("value", ["9" * 400, "99999999999"])
def test_an_absurd_retry_after_is_one_clear_error(live, out, tmp_path, value):
    add_model(live)  # the old code: OverflowError (int of an infinite float), a traceback
    live.fault("error", TREE, times=None, status=429, headers={"Retry-After": value})
    pull_fails(out, "asks to wait 999999999 s", "again")
    nothing_looks_complete(tmp_path, out, {})


@pytest.mark.parametrize("value", ["\u00b2", "1.5", "-3", "soon", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_a_retry_after_that_is_junk_or_a_past_date_is_a_plain_retry(live, out, extracted, value):
    add_model(live)  # "\u00b2": str.isdigit() took it, float() did not: ValueError
    live.fault("error", TREE, times=2, status=503, headers={"Retry-After": value})
    pull_ok(out, MODEL, extracted)


def test_push_has_a_timeout_and_gives_the_client_its_setting_back(live, env, extracted):
    from huggingface_hub import get_session

    from mertools.hub.remote import hub_call

    folder = extracted(MODEL)
    live.fault("hang", "/api/repos/create", times=None, delay=120)  # accepted, never answered
    err = one_line_error(cli({**env, "MERTOOLS_HUB_TIMEOUT": "1"}, "push", folder, "me/pushed", "-q", timeout=60))
    assert "Timeout" in err and "me/pushed" in err and "pull" not in err and "OFFLINE" not in err
    live.clear_faults()
    assert run_ok(env, "push", folder, "me/pushed", "-q") and "dense.gguf" in live.files_at("me/pushed")
    # in this process: the shared client carries our timeout only while a push's call runs
    before = get_session().timeout
    during = hub_call("me/pushed", lambda: get_session().timeout)
    assert during.read == 5.0 and get_session().timeout == before != during


@pytest.mark.parametrize("where,status,headers", [
    ("/api/repos/create", 429, {"Retry-After": "3600"}),
    ("/api/models/me/pushed/tree/*", 429, {"Retry-After": "3600"}),
    ("/api/models/me/pushed/tree/*", 500, {}),
])
def test_push_errors_do_not_give_a_pulls_advice(live, env, extracted, where, status, headers):
    live.fault("error", where, times=None, status=status, headers=headers)
    err = one_line_error(cli(env, "push", extracted(MODEL), "me/pushed", "-q", timeout=60))
    assert "me/pushed" in err and "again" in err
    assert "pull" not in err and "downloaded" not in err and "OFFLINE" not in err, err


def test_a_stopped_download_does_not_sleep_out_a_retry_after(live, tmp_path):
    # run_pipeline joins the download thread for 10 s; the old backoff slept a 60 s Retry-After through a stop
    import threading

    from mertools.hub.download import fetch
    from mertools.hub.remote import RepoSpec, list_files

    sha = add_model(live)
    f, = [f for f in list_files(RepoSpec(REPO), sha) if f.path == MODEL.name]
    stop = threading.Event()
    live.fault("hook", RESOLVE, times=1, edit=lambda handler: stop.set())  # the stop comes while the hub answers
    live.fault("error", RESOLVE, times=None, status=429, headers={"Retry-After": "60"})
    errors: list[Exception] = []
    dest = tmp_path / MODEL.name
    t = threading.Thread(target=lambda: _fetch_into(errors, fetch, RepoSpec(REPO), sha, f, dest, stop), daemon=True)
    t.start()
    t.join(timeout=40)  # a liveness bound, well under the 60 s the old code slept
    assert not t.is_alive(), "the download slept through the stop"
    assert len(errors) == 1 and "stopped" in str(errors[0]) and MODEL.name in str(errors[0])
    assert sum(1 for _m, _p, s in live.requests if s == 429) == 1


def _fetch_into(errors, fetch, spec, sha, f, dest, stop):
    try:
        fetch(spec, sha, f, dest, stop=stop)
    except Exception as exc:  # noqa: BLE001 - handed to the test
        errors.append(exc)


def test_a_hub_that_ignores_range_and_cuts_past_a_mib_is_given_up_on(live, tmp_path):
    # each answer restarts at byte 0 and brings more than the 1 MiB that counts as progress, but never past where the
    # file has been: a progress mark reset with the restart would retry for ever
    import threading

    from mertools.hub.download import fetch
    from mertools.hub.remote import RepoSpec, list_files

    sha = live.add_revision(REPO, {"big.bin": os.urandom(3 << 20)})
    f, = [f for f in list_files(RepoSpec(REPO), sha) if f.path == "big.bin"]
    live.fault("norange", RESOLVE, times=None)
    live.fault("cut", RESOLVE, times=None, after=3 << 19)
    errors: list[Exception] = []
    t = threading.Thread(target=lambda: _fetch_into(errors, fetch, RepoSpec(REPO), sha, f, tmp_path / "big.bin",
                                                    None), daemon=True)
    t.start()
    t.join(timeout=120)  # a liveness bound: the bug retried for ever
    assert not t.is_alive(), "retried for ever"
    assert len(errors) == 1 and "gave up after 6 attempts" in str(errors[0]) and "big.bin" in str(errors[0])
    assert sum(1 for _m, p, _s in live.requests if "/resolve/" in p) == 7  # 1 that got furthest, then 6 that did not


# -- second review: the commit's timeout, range reads resume, small files' progress, empty pages ---------------
def test_a_commit_slower_than_the_timeout_still_lands_and_a_set_timeout_is_kept(live, extracted, monkeypatch):
    # a commit of thousands of files may take the hub minutes: the read timeout reported "cannot reach" for it
    from huggingface_hub import get_session

    from mertools.hub.pushing import push
    from mertools.hub.remote import hub_call

    monkeypatch.setenv("MERTOOLS_HUB_TIMEOUT", "1")
    live.fault("hook", "/api/models/me/slow/commit/*", times=1, edit=lambda _h: time.sleep(3))
    r = push(extracted(MODEL), "me/slow", quiet=True)
    assert r["commit"] and "dense.gguf" in live.files_at("me/slow") and len(live.commits) == 1
    # a timeout the caller set (set_client_factory) is kept; only unset fields get ours
    client = get_session()
    before = client.timeout
    timeout_type = type(client.timeout)  # httpx's (or its fork's, as huggingface_hub 2.x ships)
    client.timeout = timeout_type(7.0, connect=None)
    try:
        during = hub_call("me/slow", lambda: get_session().timeout)
        assert (during.read, during.write, during.connect) == (7.0, 7.0, 1.0)
        client.timeout = timeout_type(None)
        assert hub_call("me/slow", lambda: get_session().timeout, long_answer=True).read is None
        assert hub_call("me/slow", lambda: get_session().timeout).read == 1.0
    finally:
        client.timeout = before


def test_a_range_read_cut_again_and_again_resumes_where_it_stopped(live):
    # each answer is cut after 30 KB: restarting from the first byte never got past it
    from mertools.hub.inspect import read_range
    from mertools.hub.remote import RepoSpec

    sha = add_model(live)
    live.chunk = 4096
    live.fault("cut", RESOLVE, times=None, after=30_000)
    data = MODEL.read_bytes()
    assert read_range(RepoSpec(REPO), sha, MODEL.name, 100, 150_099) == data[100:150_100]
    starts = live.range_starts[(REPO, MODEL.name)]
    assert starts[0] == 100 and starts == sorted(set(starts)) and len(starts) == 5


def test_a_range_read_that_brings_nothing_new_is_given_up_on(live):
    from mertools.hub.inspect import read_range
    from mertools.hub.remote import HubError, RepoSpec

    sha = add_model(live)
    live.fault("cut", RESOLVE, times=None, after=0)
    with pytest.raises(HubError, match="gave up after 6 attempts"):
        read_range(RepoSpec(REPO), sha, MODEL.name, 0, 150_000)


def test_a_small_file_cut_into_more_pieces_than_attempts_still_downloads(live, out, extracted):
    # 155 KB cut every 20 KB: eight answers; with 1 MiB per reset of the count, a small file had only six
    add_model(live)
    live.chunk = 4096
    live.fault("cut", RESOLVE, times=None, after=20_000)
    pull_ok(out, MODEL, extracted)


def test_an_empty_listing_page_with_a_next_page_is_refused(live, out, tmp_path):
    # each page has its own deadline: slow empty pages, one after another, held a listing for days
    sha = add_model(live)
    for n in (2, 3, 4):  # distinct links: no loop to detect; the fourth page is the whole listing
        live.fault("json", TREE, times=1, edit=lambda v: [],
                   headers={"Link": f'<{live.url}/api/models/{REPO}/tree/{sha}?page={n}>; rel="next"'})
    pull_fails(out, "empty listing page")
    nothing_looks_complete(tmp_path, out, {})


# -- SafeTensors headers, config and index from the hub: the local reader's checks ----------------------------------
OLMOE = FIX_ST = GEN.parent / "safetensors" / "gen" / "olmoe"
DEEP = b"[" * 100_000 + b"]" * 100_000


def _st_file(edit) -> bytes:
    """olmoe's model.safetensors with its header JSON replaced by `edit(header dict)` (bytes, or a dict to dump)."""
    raw = (OLMOE / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    h = json.loads(raw[8:8 + n])
    new = edit(h)
    text = new if isinstance(new, bytes) else json.dumps(new).encode()
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def _expert(h: dict) -> str:
    return next(k for k in h if ".experts." in k)


ST_HOSTILE = {
    "dtype-list": ({"model.safetensors": _st_file(lambda h: {**h, _expert(h): {**h[_expert(h)], "dtype": ["BF16"]}})},
                   "malformed header entry"),
    "entry-int": ({"model.safetensors": _st_file(lambda h: {**h, _expert(h): 5})}, "malformed header entry"),
    "header-deep": ({"model.safetensors": _st_file(lambda h: DEEP)}, "not valid JSON"),
    "header-dup": ({"model.safetensors": _st_file(lambda h: json.dumps(h)[:-1].encode() + b", "
                                                  + json.dumps({_expert(h): h[_expert(h)]})[1:].encode())}, "twice"),
    "config-deep": ({"config.json": DEEP}, "config.json is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(ST_HOSTILE))
def test_safetensors_from_the_hub_gets_the_local_checks(live, env, out, tmp_path, case):
    """A hostile header or config.json on the hub once gave "unhashable type: 'list'", "'int' object is not
    subscriptable" or a RecursionError from inspect and pull (they indexed raw headers): now the same checks as a
    local folder, one line naming the file; the pull leaves nothing that looks complete."""
    files, want = ST_HOSTILE[case]
    served = {"config.json": (OLMOE / "config.json").read_bytes(),
              "model.safetensors": (OLMOE / "model.safetensors").read_bytes(), **files}
    live.add_revision(REPO, served)
    err = one_line_error(cli(env, "inspect", f"hf://{REPO}"))
    assert want in err and ("config.json" if case.startswith("config") else "model.safetensors") in err, err
    pull_fails(out, want)
    nothing_looks_complete(tmp_path, out, served)


def test_an_index_from_the_hub_gets_the_local_checks(live, env, out, tmp_path):
    """A SafeTensors index nested 100,000 deep or naming one tensor twice: one line, from inspect and pull."""
    idx = json.loads((GEN.parent / "safetensors" / "gen" / "deepseek_v2" / "model.safetensors.index.json").read_text())
    k, v = next(iter(idx["weight_map"].items()))
    dup = json.dumps(idx).replace('"weight_map": {', '"weight_map": {' + json.dumps(k) + ": " + json.dumps(v) + ", ", 1)
    for body, want in ((DEEP, "not valid JSON"), (dup.encode(), "twice")):
        served = {"config.json": b'{"model_type": "deepseek_v2"}', "model.safetensors.index.json": body,
                  **{s: b"\0" * 64 for s in set(idx["weight_map"].values())}}
        live.add_revision(REPO, served)
        err = one_line_error(cli(env, "inspect", f"hf://{REPO}"))
        assert want in err and "model.safetensors.index.json" in err, err
        pull_fails(out, want)
        nothing_looks_complete(tmp_path, out, served)


# -- final review: the uploads keep the read timeout; concurrent blocks share the client -------------------------
def test_an_upload_server_that_takes_the_body_and_never_answers_does_not_hang_push(live, env, extracted):
    # only the commit may wait without a read timeout; the LFS uploads before it keep theirs
    live.fault("hang", "/lfs-upload/*", times=None, delay=120)
    err = one_line_error(cli({**env, "MERTOOLS_HUB_TIMEOUT": "1"}, "push", extracted(MODEL), "me/hung", "-q",
                             timeout=100))
    assert "me/hung" in err and "pull" not in err
    assert "dense.gguf" not in live.files_at("me/hung")  # nothing was committed
    live.clear_faults()
    assert run_ok(env, "push", extracted(MODEL), "me/hung", "-q") and "dense.gguf" in live.files_at("me/hung")


@pytest.mark.parametrize("order", ["bounded-first", "unbounded-first"])
def test_concurrent_push_calls_keep_the_read_timeout_unset_while_any_commit_runs(live, order):
    # push A in create_repo (read timeout) while push B waits for its commit (none): B must not get A's timeout
    import threading

    from huggingface_hub import get_session

    from mertools.hub.http import session_timeout

    def block(read: bool):
        entered, leave = threading.Event(), threading.Event()

        def run() -> None:
            with session_timeout(read=read):
                entered.set()
                leave.wait(60)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert entered.wait(60)
        return leave, t

    def read_now():
        return get_session().timeout.read

    before = get_session().timeout
    if order == "bounded-first":
        leave_a, a = block(True)
        assert read_now() == 5.0
        leave_b, b = block(False)
        assert read_now() is None
        leave_a.set(); a.join(60)
        assert read_now() is None  # A's end must not bring its read timeout back under B's commit
        leave_b.set(); b.join(60)
    else:
        leave_b, b = block(False)
        assert read_now() is None
        leave_a, a = block(True)
        assert read_now() is None  # A's start must not give B's commit a read timeout
        leave_b.set(); b.join(60)
        assert read_now() == 5.0  # B gone: A's calls are bounded again
        leave_a.set(); a.join(60)
    assert get_session().timeout == before


@pytest.mark.parametrize("shard", ["weights.bin", "model-1.safetensors\x7f"])
def test_an_index_naming_no_plain_safetensors_file_is_refused_before_any_download(live, out, shard):
    # the local reader's plain-file-name check, not a weaker copy of it ("/" and a leading "." only)
    st_repo(live, [shard])
    pull_fails(out, "plain .safetensors file name")
    assert not out.exists() and live.served(REPO, shard) == 0


# -- leftovers: a range read's allowance for the prefix a 200 skips, the listed size -------------------------------
def test_a_retry_answered_with_the_whole_file_is_allowed_the_time_to_skip_its_prefix(live, monkeypatch):
    # the first answer is cut; the hub then ignores Range and sends the whole file at 640 KiB/s, ten times the rate a
    # range read is allowed: the deadline counted only the bytes asked for (4x0.5 s + 0.4 s), not the 2 MiB prefix
    # read and thrown away, so every retry ran out of time and the correct bytes were refused
    from mertools.hub.inspect import read_range
    from mertools.hub.remote import RepoSpec

    monkeypatch.setenv("MERTOOLS_HUB_TIMEOUT", "0.5")
    data = os.urandom(3 << 20)
    sha = live.add_revision(REPO, {"big.bin": data})
    live.chunk = 64 << 10
    live.fault("cut", RESOLVE, times=1, after=8 << 10)
    live.fault("slow", RESOLVE, times=None, delay=0.1)
    answers: list[int] = []

    def norange_from_the_second(_handler) -> None:
        answers.append(1)
        if len(answers) == 2:
            live.fault("norange", RESOLVE, times=None)

    live.fault("hook", RESOLVE, times=None, edit=norange_from_the_second)
    start, end = 2 << 20, (2 << 20) + (24 << 10) - 1
    assert read_range(RepoSpec(REPO), sha, "big.bin", start, end) == data[start:end + 1]
    assert [s for _m, p, s in live.requests if "/resolve/" in p] == [206, 200]


@pytest.mark.parametrize("norange", [False, True])
@pytest.mark.parametrize("delta", [-100, 1000])
def test_a_range_answer_that_contradicts_the_listed_size_is_refused(live, norange, delta):
    # a 200 (Range ignored) whose Content-Length is not the listed size was read as far as asked and taken: a body
    # longer (or shorter) than the file the listing names is the hub contradicting itself, as for a download
    from mertools.hub.inspect import read_range
    from mertools.hub.remote import IntegrityError, RepoSpec

    sha = add_model(live)
    size = MODEL.stat().st_size
    if norange:
        live.fault("norange", RESOLVE, times=None)
    live.fault("declare", RESOLVE, times=None, after=delta)
    with pytest.raises(IntegrityError, match="listing says the file has") as ei:
        read_range(RepoSpec(REPO), sha, MODEL.name, 1000, 1999, size)
    assert MODEL.name in str(ei.value) and "\n" not in str(ei.value)
    assert sum(1 for _m, p, _s in live.requests if "/resolve/" in p) == 1  # not retried


@pytest.mark.parametrize("listed", [False, True])
def test_a_range_answer_shorter_than_asked_but_consistent_is_resumed(live, listed):
    # a 206 holding 1000 bytes of the 5000 asked, its Content-Range and Content-Length agreeing, was refused as the
    # hub contradicting itself (Content-Length compared with the span asked, not the span answered)
    from mertools.hub.inspect import read_range
    from mertools.hub.remote import RepoSpec

    sha = add_model(live)
    size = MODEL.stat().st_size
    live.fault("cap", RESOLVE, times=None, after=1000)
    got = read_range(RepoSpec(REPO), sha, MODEL.name, 1000, 5999, size if listed else None)
    assert got == MODEL.read_bytes()[1000:6000]
    assert live.range_starts[(REPO, MODEL.name)] == [1000, 2000, 3000, 4000, 5000]


def test_inspect_refuses_a_range_answer_that_contradicts_the_listing(live, env):
    add_model(live)
    live.fault("norange", RESOLVE, times=None)
    live.fault("declare", RESOLVE, times=None, after=4096)
    err = one_line_error(cli(env, "inspect", f"hf://{REPO}"))
    assert MODEL.name in err and "listing says" in err and "HF_ENDPOINT" in err


# -- leftovers: our download names (NAME.part) cannot clash with a needed file ------------------------------------
# A needed file is a GGUF part (*.gguf), config.json, the SafeTensors index, or a shard the index names, which the
# local reader's plain-name check holds to *.safetensors (case-sensitive): no needed name ends in ".part", in any
# case, so no needed file is another's download name. What remains to prove: an index naming such a name is refused
# before anything is fetched, and a repo that really holds files named as our downloads are does not disturb a pull.
@pytest.mark.parametrize("shards", [
    ["a.safetensors", "a.safetensors.part"],
    ["a.safetensors", "A.SAFETENSORS.PART"],  # the same on a case-insensitive file system
    ["a.safetensors.part"],
])
def test_an_index_naming_a_download_name_is_refused_with_nothing_left_that_looks_complete(live, out, tmp_path,
                                                                                         shards):
    served = st_repo(live, shards)
    pull_fails(out, "plain .safetensors file name", shards[-1])
    nothing_looks_complete(tmp_path, out, served)
    assert all(live.served(REPO, s) == 0 for s in shards)
    stage = out.parent / f".{out.name}.mertools-pull" / "files"
    assert not any(p.name.endswith(".part") for p in stage.rglob("*")) if stage.is_dir() else True


def test_repo_files_named_as_our_downloads_are_never_fetched_nor_clash(live, out, extracted):
    # the repo holds model.gguf.part (junk) beside model.gguf: the pull writes its own model.gguf.part while it
    # downloads, and must neither fetch the repo's nor take it for its own
    add_model(live, **{MODEL.name + ".part": b"\x00junk" * 1000})
    pull_ok(out, MODEL, extracted)
    assert live.served(REPO, MODEL.name + ".part") == 0


def test_a_safetensors_repo_holding_files_named_as_our_downloads_pulls_the_checkpoint(live, out, tmp_path):
    from mertools import extract
    from mertools.hub import pull
    from test_hub_pull import ST, _sources_available

    if not _sources_available():
        pytest.skip("needs the SafeTensors source (mertools.sources)")
    files: dict = {p.name: p for p in ST.iterdir()}
    needed = [n for n in files if n.endswith((".safetensors", ".json"))]
    files.update({n + ".part": b"\x00junk" * 1000 for n in needed})  # config.json.part, the index's, each shard's
    live.add_revision(REPO, files)
    pull(REPO, out)
    assert all(live.served(REPO, n + ".part") == 0 for n in needed)
    local = tmp_path / "local"
    extract(ST, local, fsync=False)
    same_shards(out, local)


# -- leftovers: a client huggingface_hub makes anew in the middle of a push keeps our timeout --------------------
def test_a_client_made_anew_after_a_connection_error_keeps_the_push_timeout(live):
    # huggingface_hub's http_backoff calls close_session() on a ConnectError and makes a new client from its
    # factory at the next request: that client had no timeout, for the rest of the push
    import huggingface_hub
    from huggingface_hub import get_session

    from mertools.hub.remote import hub_call

    def after_a_connection_error():
        huggingface_hub.close_session()  # what http_backoff does on a ConnectError
        return get_session().timeout

    from huggingface_hub.utils import _http

    factory, before = _http._GLOBAL_CLIENT_FACTORY, get_session().timeout
    during = hub_call("me/x", after_a_connection_error)
    assert (during.connect, during.read, during.write, during.pool) == (5.0, 5.0, 5.0, 5.0)
    unbounded = hub_call("me/x", after_a_connection_error, long_answer=True)
    assert unbounded.read is None and unbounded.connect == 5.0
    # afterwards: the new client is the library's own again, and so is its factory
    assert get_session().timeout == before and _http._GLOBAL_CLIENT_FACTORY is factory


def test_a_factory_read_while_a_block_was_open_still_makes_clients_with_the_callers_factory(live):
    # another thread's get_session may load the wrapped factory while a block is open and call it after the last
    # block ended: the wrapper read the factory back from the scope, found None, and made the client with
    # huggingface_hub's default, bypassing the caller's set_client_factory (proxy, certificates)
    import huggingface_hub
    from huggingface_hub.utils import _http

    from mertools.hub.http import session_timeout

    def mine():
        client = _http.default_client_factory()
        client.headers["X-Mine"] = "proxy"  # stands for the caller's proxy and certificates
        return client

    old = _http._GLOBAL_CLIENT_FACTORY
    huggingface_hub.set_client_factory(mine)
    try:
        with session_timeout():
            loaded = _http._GLOBAL_CLIENT_FACTORY  # what the other thread's get_session read
        assert _http._GLOBAL_CLIENT_FACTORY is mine
        with loaded() as client:  # ... and called, after the block
            client.get(f"{live.url}/api/models/{REPO}")
        assert live.seen_headers[-1][1].get("X-Mine") == "proxy", live.seen_headers[-1]
    finally:
        huggingface_hub.set_client_factory(old)


def test_opening_and_closing_a_block_waits_for_huggingface_hubs_own_lock(live):
    # the factory was read and written without huggingface_hub's lock: a set_client_factory in another thread
    # between our read and our write was lost (the factory we had wrapped was put back over it)
    import threading

    from huggingface_hub import get_session
    from huggingface_hub.utils import _http

    from mertools.hub.http import session_timeout

    lock = getattr(_http, "_CLIENT_LOCK", None)
    if lock is None:
        pytest.skip("this huggingface_hub has no _CLIENT_LOCK")
    def one_block():
        with session_timeout():
            pass

    get_session()  # a shared client exists: only our read and write of the factory may wait for the lock
    t = threading.Thread(target=one_block, daemon=True)
    with lock:  # as set_client_factory holds it
        t.start()
        t.join(1.0)
        blocked = t.is_alive()
    t.join(60)
    assert blocked and not t.is_alive()
