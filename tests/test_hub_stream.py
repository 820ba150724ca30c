"""`mertools pull` of a sharded SafeTensors repo converts shard by shard (issue 7 item 4), against the loopback hub.

Expected bytes come from a local `extract` of the very folder the server serves (the SafeTensors extractor has its
own byte-exact tests against the source tensors and the GGUF llama.cpp made from them). Disk use is watched from the
server at every chunk it sends, so the bound is checked at every step of every download, not by timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from hubserver import HubServer
from test_hub_pull import ST, header_bytes, same_shards

pytestmark = pytest.mark.skipif(not ST.is_dir(), reason="../shared/fixtures/safetensors is not present")
SHARDS = sorted(p.name for p in ST.glob("model-*.safetensors"))
REPO = "org/mixtral-st"


@pytest.fixture
def hub():
    with HubServer() as h:
        h.add_revision(REPO, {p.name: p for p in ST.iterdir()})
        yield h


@pytest.fixture
def env(hub, tmp_path):
    return hub.env(tmp_path / "hf-home")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Local extracts of the fixture folder: {dtype or None: folder}."""
    from mertools import extract

    cache: dict = {}

    def get(dtype=None):
        if dtype not in cache:
            cache[dtype] = tmp_path_factory.mktemp("st") / f"local-{dtype}"
            extract(ST, cache[dtype], fsync=False, dtype=dtype)
        return cache[dtype]

    return get


def source_files_on_disk(stage: Path) -> list[str]:
    files = stage / "files"
    return sorted(p.name for p in files.glob("model-*.safetensors*")) if files.is_dir() else []


def test_a_streamed_pull_equals_a_local_extract_with_at_most_two_shards_on_disk(hub, env, tmp_path, local,
                                                                                monkeypatch):
    from mertools.hub import pull

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    stage = tmp_path / ".out.mertools-pull"
    seen: list[list[str]] = []
    hub.chunk = 16 << 10
    hub.on_chunk = lambda key, pos: seen.append(source_files_on_disk(stage)) if key[1] in SHARDS else None
    r = pull(REPO, tmp_path / "out")
    assert r.extract["streamed"] and r.extract["window"] == 2
    assert r.extract["experts_written"] == r.extract["experts"] == 8 and r.extract["experts_resumed"] == 0
    same_shards(tmp_path / "out", local())
    # at every chunk of every shard's download: the shard arriving (as .part) and at most one other
    assert seen and max(len(x) for x in seen) <= 2, max(seen, key=len)
    assert any(len(x) == 2 for x in seen)  # and a download did overlap a shard still on disk
    for s in SHARDS:  # each shard fetched once (plus its header, read ahead to plan)
        assert hub.served(REPO, s) == (ST / s).stat().st_size + header_bytes(ST / s)
    assert not stage.exists() and not (tmp_path / "out.source").exists()
    assert run_cli("verify", tmp_path / "out").returncode == 0


def test_a_pull_killed_after_shard_3_resumes_without_fetching_or_converting_anything_finished(hub, env, tmp_path,
                                                                                              local):
    out = tmp_path / "out"
    stage = tmp_path / ".out.mertools-pull"
    kill = {**os.environ, **env, "MERTOOLS_TEST_KILL_AT": f"pull-converted:{SHARDS[2]}"}
    p = subprocess.run([sys.executable, "-m", "mertools.cli", "pull", REPO, str(out), "--quiet"], env=kill,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists()
    journal = json.loads((stage / "pull-journal.json").read_text())
    converted = {k for k, v in journal["files"].items() if v["state"] == "converted"}
    assert converted == set(SHARDS[:3])
    assert not any((stage / "files" / s).exists() for s in SHARDS[:3])  # deleted once converted
    served = {s: hub.served(REPO, s) for s in SHARDS}
    work = stage / "work"
    made = {p.relative_to(work).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (work / "experts").rglob("*") if p.is_file()}
    assert len(made) >= 4  # layer 0's experts (shards 1-3) were written before the kill

    r = json.loads(run_cli("pull", REPO, out, "--json", env=env, check=True).stdout)
    for s in SHARDS[:3]:  # not one byte of a converted shard again, not even its header
        assert hub.served(REPO, s) == served[s] == (ST / s).stat().st_size + header_bytes(ST / s)
    for s in SHARDS[3:]:  # the rest: fetched by the two runs together, each byte at most about once
        assert hub.served(REPO, s) >= (ST / s).stat().st_size
    # the expert shards written before the kill are the very files in OUT: not written again
    for rel, (ino, mtime) in made.items():
        st = (out / rel).stat()
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime), rel
    assert r["extract"]["experts_resumed"] == len(made)
    assert r["extract"]["experts_written"] + r["extract"]["experts_resumed"] == 8
    same_shards(out, local())
    assert not stage.exists()
    assert run_cli("verify", out).returncode == 0


def test_dtype_q4_0_through_pull_equals_a_local_extract_with_q4_0(hub, env, tmp_path, local):
    out = tmp_path / "out"
    run_cli("pull", REPO, out, "--dtype", "q4_0", "--quiet", env=env, check=True)
    same_shards(out, local("q4_0"))
    assert json.loads((out / "manifest.json").read_text())["source"]["dtype"] == "q4_0"


def test_keep_source_keeps_every_shard_and_converts_the_same(hub, env, tmp_path, local):
    out = tmp_path / "out"
    r = json.loads(run_cli("pull", REPO, out, "--keep-source", "--json", env=env, check=True).stdout)
    assert r["extract"]["streamed"]
    kept = tmp_path / "out.source"
    assert r["source_kept"] == str(kept)
    for s in SHARDS + ["config.json", "model.safetensors.index.json"]:
        assert (kept / s).read_bytes() == (ST / s).read_bytes(), s
    same_shards(out, local())


def test_overwrite_replaces_only_a_source_folder_an_earlier_pull_kept(hub, env, tmp_path):
    """`pull --keep-source --overwrite` deleted whatever folder OUT.source was (rmtree), a folder of the user's own
    too: --overwrite replaces only an earlier output (docs/format.md), and OUT.source had no such check. A folder an
    earlier --keep-source pull kept is still replaced; any other is refused before anything is downloaded."""
    out, kept = tmp_path / "out", tmp_path / "out.source"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    p = run_cli("pull", REPO, out, "--keep-source", "--overwrite", "-q", env=env)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"error: {kept}: ") and "--keep-source" in p.stderr, p.stderr
    assert [x.name for x in kept.iterdir()] == ["notes.txt"] and not out.exists()
    kept.rename(tmp_path / "mine")
    run_cli("pull", REPO, out, "--keep-source", "-q", env=env, check=True)
    run_cli("pull", REPO, out, "--keep-source", "--overwrite", "-q", env=env, check=True)  # its own: replaced
    for s in SHARDS:
        assert (kept / s).read_bytes() == (ST / s).read_bytes(), s


def test_a_damaged_work_folder_is_refused_with_one_line(hub, env, tmp_path):
    out = tmp_path / "out"
    stage = tmp_path / ".out.mertools-pull"
    kill = {**os.environ, **env, "MERTOOLS_TEST_KILL_AT": f"pull-converted:{SHARDS[2]}"}
    subprocess.run([sys.executable, "-m", "mertools.cli", "pull", REPO, str(out), "--quiet"], env=kill,
                   capture_output=True, timeout=300)
    for p in (stage / "work" / "experts").rglob("*"):
        if p.is_file():
            p.unlink()  # output made from shards that are already deleted
    p = run_cli("pull", REPO, out, "-q", env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pull again" in lines[0] and str(stage) in lines[0], p.stderr
    assert not out.exists()


def test_a_resumed_pull_with_another_dtype_is_refused_with_one_line(hub, env, tmp_path, local):
    out = tmp_path / "out"
    kill = {**os.environ, **env, "MERTOOLS_TEST_KILL_AT": f"pull-converted:{SHARDS[2]}"}
    subprocess.run([sys.executable, "-m", "mertools.cli", "pull", REPO, str(out), "--dtype", "q4_0", "--quiet"],
                   env=kill, capture_output=True, timeout=300)
    p = run_cli("pull", REPO, out, "-q", env=env)  # q4_0 shards of the first run must not mix with BF16 ones
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "--dtype q4_0" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    run_cli("pull", REPO, out, "--dtype", "q4_0", "-q", env=env, check=True)  # the same --dtype carries on
    same_shards(out, local("q4_0"))


def test_the_window_grows_only_when_an_expert_spans_more_than_two_shards():
    from mertools.hub.stream import needed_window

    assert needed_window([0, 1, 2, 3], [{0}, {0, 1}, {1}, {1, 2}, {2, 3}, {3}]) == 2  # adjacent spans stream in 2
    assert needed_window([0, 1, 2, 3], [{0, 2}, {1}, {3}]) == 2  # shard 1 leaves before shard 2 must come
    assert needed_window([0, 1, 2, 3], [{0, 2}, {1, 3}]) == 3  # 0 and 1 both wait for a later shard
    assert needed_window([0, 1, 2, 3], [{0, 3}, {1, 3}, {2, 3}]) == 4
    assert needed_window([2, 3], [{2}, {3}]) == 2  # a resumed run: only the shards still to come
    assert needed_window([], []) == 2


GPTOSS = ST.parent / "gptoss-bf16"


@pytest.mark.skipif(not GPTOSS.is_dir(), reason="../shared/fixtures/safetensors/gptoss-bf16 is not present")
def test_a_single_file_repo_with_fused_experts_streams_too(tmp_path, monkeypatch):
    from mertools import extract
    from mertools.hub import pull

    with HubServer() as hub:
        hub.add_revision("org/gptoss", {p.name: p for p in GPTOSS.iterdir()})
        for k, v in hub.env(tmp_path / "hf-home").items():
            monkeypatch.setenv(k, v)
        r = pull("org/gptoss", tmp_path / "out")
        assert r.extract["streamed"]
        assert hub.served("org/gptoss", "model.safetensors") == (
            (GPTOSS / "model.safetensors").stat().st_size + header_bytes(GPTOSS / "model.safetensors"))
    extract(GPTOSS, tmp_path / "local", fsync=False)
    same_shards(tmp_path / "out", tmp_path / "local")


@pytest.mark.parametrize("point", ["writing", "pull-step", "before-commit"])
def test_a_pull_killed_at_any_step_resumes_to_the_same_output(hub, env, tmp_path, local, point):
    """writing: an expert shard half done and unacknowledged; pull-step: a step logged, its shards not yet handed
    back; before-commit: every file linked into the staging folder, OUT not yet renamed into place."""
    out = tmp_path / "out"
    kill = {**os.environ, **env, "MERTOOLS_TEST_KILL_AT": point}
    p = subprocess.run([sys.executable, "-m", "mertools.cli", "pull", REPO, str(out), "--quiet"], env=kill,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists()
    served = {s: hub.served(REPO, s) for s in SHARDS}
    r = json.loads(run_cli("pull", REPO, out, "--json", env=env, check=True).stdout)
    same_shards(out, local())
    if point == "before-commit":  # everything was converted: nothing fetched or written again
        assert {s: hub.served(REPO, s) for s in SHARDS} == served
        assert r["extract"]["experts_resumed"] == 8 and r["extract"]["experts_written"] == 0
    assert not (tmp_path / ".out.mertools-pull").exists()
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".out")] == []


@pytest.mark.parametrize("damage", ["negative-n", "string-n", "header-not-text"])
def test_an_edited_headers_cache_is_read_again_or_ignored_not_a_traceback(hub, env, tmp_path, local, damage):
    # "n" once came from the cache into int.to_bytes: -1 gave OverflowError, "x" AttributeError, outside the
    # try meant for a damaged cache; the length is now the header's own
    out = tmp_path / "out"
    stage = tmp_path / ".out.mertools-pull"
    kill = {**os.environ, **env, "MERTOOLS_TEST_KILL_AT": f"pull-converted:{SHARDS[0]}"}
    subprocess.run([sys.executable, "-m", "mertools.cli", "pull", REPO, str(out), "--quiet"], env=kill,
                   capture_output=True, timeout=300)
    cache = stage / "work" / "headers.json"
    kept = json.loads(cache.read_text())
    for v in kept.values():
        if damage == "negative-n":
            v["n"] = -1
        elif damage == "string-n":
            v["n"] = "x"
        else:
            v["header"] = 5
    cache.write_text(json.dumps(kept))
    p = run_cli("pull", REPO, out, "-q", env=env)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    same_shards(out, local())
