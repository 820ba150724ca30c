"""`mertools pull` against a hub-compatible server on loopback (tests/hubserver.py), real files, real HTTP.

Expected shard bytes come from a local `extract` of the very fixture the server serves (the extractor has its own
byte-exact tests against the gguf package); expected sha256 values from hashlib over the fixture files.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIX, GEN, REAL, run_cli

MIX = REAL / "mixtral-q4_0.gguf"
SPLIT = sorted(GEN.glob("moe-split-q4_0-*.gguf"))
ST = FIX / "safetensors" / "real" / "mixtral-bf16-sharded"  # transformers-made, copied from shared/ with provenance


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def same_shards(got: Path, want: Path) -> None:
    """Every shard, dense.gguf and reassembly.dat byte-identical; the manifests agree on everything but the source
    record (a SafeTensors pull converted shard by shard keeps the same reassembly record as a local extract)."""
    files = sorted(p.relative_to(want).as_posix() for p in want.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file())
    for rel in files:
        if rel != "manifest.json":
            assert (got / rel).read_bytes() == (want / rel).read_bytes(), rel
    mg, mw = (json.loads((d / "manifest.json").read_text()) for d in (got, want))
    for key in ("experts", "dense", "model", "selection", "reassembly"):
        assert mg.get(key) == mw.get(key), key


def header_bytes(path: Path) -> int:
    """8 + N: what reading a SafeTensors file's header costs."""
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def hub_record(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["source"]["hub"]


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def test_clean_pull_of_a_gguf_repo_matches_a_local_extract(hub, env, tmp_path, extracted):
    commit = hub.add_revision("org/mixtral-gguf", {"mixtral-q4_0.gguf": MIX, "README.md": b"# a model\n",
                                                   "other/notes.txt": b"not needed\n"})
    out = tmp_path / "out"
    p = run_cli("pull", "org/mixtral-gguf", out, "--json", env=env, check=True)
    r = json.loads(p.stdout)
    assert r["commit"] == commit and r["kind"] == "gguf" and r["downloaded_bytes"] == MIX.stat().st_size
    same_shards(out, extracted(MIX))
    rec = hub_record(out)
    assert rec["repo"] == "org/mixtral-gguf" and rec["commit"] == commit
    assert rec["files"] == [{"path": "mixtral-q4_0.gguf", "size": MIX.stat().st_size, "sha256": sha256(MIX)}]
    # only what conversion needs was fetched, once; no staging or source left behind
    assert hub.served("org/mixtral-gguf", "mixtral-q4_0.gguf") == MIX.stat().st_size
    assert hub.served("org/mixtral-gguf", "README.md") == 0
    assert sorted(x.name for x in tmp_path.iterdir() if x.name != "hf-home") == ["out"]
    assert run_cli("verify", out).returncode == 0
    # a second pull of the same commit into the same OUT has nothing to do
    again = json.loads(run_cli("pull", "org/mixtral-gguf", out, "--json", env=env, check=True).stdout)
    assert again["already_complete"] and hub.served("org/mixtral-gguf", "mixtral-q4_0.gguf") == MIX.stat().st_size


def test_split_set_repo_is_pulled_whole(hub, env, tmp_path, extracted):
    files = {p.name: p for p in SPLIT}
    files["merged/moe-merged-q4_0.gguf"] = GEN / "moe-merged-q4_0.gguf"
    hub.add_revision("org/split", files)
    out = tmp_path / "out"
    err = one_line_error(run_cli("pull", "org/split", out, "-q", env=env))
    assert "--gguf" in err and "moe-split-q4_0-00001-of-00006.gguf" in err and not out.exists()
    # naming any one part brings the whole set
    p = run_cli("pull", "org/split", out, "--gguf", "moe-split-q4_0-00003-of-00006.gguf", "--keep-source", "--json",
                env=env, check=True)
    r = json.loads(p.stdout)
    assert [f["path"] for f in r["files"]] == [x.name for x in SPLIT]
    same_shards(out, extracted(SPLIT[0]))
    kept = tmp_path / "out.source"
    assert r["source_kept"] == str(kept)
    # (and the mark that lets a later --overwrite replace the folder)
    assert sorted(x.name for x in kept.iterdir()) == [".mertools-kept-source"] + [x.name for x in SPLIT]
    assert all((kept / x.name).read_bytes() == x.read_bytes() for x in SPLIT)
    assert hub.served("org/split", "merged/moe-merged-q4_0.gguf") == 0
    assert [f["sha256"] for f in hub_record(out)["files"]] == [sha256(x) for x in SPLIT]


def test_a_connection_cut_midway_resumes_by_range_in_the_same_run(hub, env, tmp_path, extracted):
    hub.add_revision("org/m", {MIX.name: MIX})
    hub.chunk = 4096
    hub.fault("cut", "/org/m/resolve/*", after=300_000, times=2)
    out = tmp_path / "out"
    run_cli("pull", "org/m", out, "--quiet", env=env, check=True)
    starts = hub.range_starts[("org/m", MIX.name)]
    assert starts[0] == 0 and len(starts) == 3 and 0 < starts[1] < starts[2] <= 600_000
    same_shards(out, extracted(MIX))


def test_a_killed_pull_resumes_without_fetching_finished_files_again(hub, env, tmp_path, extracted):
    hub.add_revision("org/split", {p.name: p for p in SPLIT})
    last = SPLIT[-1].name  # downloads go in order: kill while the last part is arriving
    hub.chunk = 1024
    hub.fault("slow", f"/org/split/resolve/*/{last}", times=None, delay=0.05)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mertools.cli", "pull", "org/split", str(out), "--quiet"],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while hub.served("org/split", last) < 8192 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < hub.served("org/split", last) < SPLIT[-1].stat().st_size
    before = {p.name: hub.served("org/split", p.name) for p in SPLIT}
    assert all(before[p.name] == p.stat().st_size for p in SPLIT[:-1])
    journal = json.loads((tmp_path / ".out.mertools-pull" / "pull-journal.json").read_text())
    assert {k for k, v in journal["files"].items() if v["state"] == "verified"} == {p.name for p in SPLIT[:-1]}
    assert not out.exists()

    # a verified file changed on disk between the runs: checked again, so fetched again rather than converted
    staged = tmp_path / ".out.mertools-pull" / "files" / SPLIT[1].name
    data = bytearray(staged.read_bytes())
    data[5000] ^= 0x40
    staged.write_bytes(bytes(data))

    hub.clear_faults()
    r = json.loads(run_cli("pull", "org/split", out, "--json", env=env, check=True).stdout)
    assert hub.served("org/split", SPLIT[1].name) == 2 * SPLIT[1].stat().st_size
    for p in SPLIT[:-1]:  # finished files are not fetched again
        if p != SPLIT[1]:
            assert hub.served("org/split", p.name) == p.stat().st_size
    key, resumed_at, sent = hub.transfers[-1]
    assert key == ("org/split", last) and resumed_at > 0  # the partial file was continued, not restarted
    assert sent == SPLIT[-1].stat().st_size - resumed_at
    assert r["reused_bytes"] == sum(p.stat().st_size for p in SPLIT[:-1]) - SPLIT[1].stat().st_size + resumed_at
    same_shards(out, extracted(SPLIT[0]))
    assert not (tmp_path / ".out.mertools-pull").exists()


def test_bytes_that_do_not_match_the_sha256_are_refused_and_nothing_is_converted(hub, env, tmp_path, extracted):
    hub.add_revision("org/m", {MIX.name: MIX})
    hub.fault("corrupt", "/org/m/resolve/*", times=None, after=123_457)
    out = tmp_path / "out"
    err = one_line_error(run_cli("pull", "org/m", out, "-q", env=env))
    assert MIX.name in err and sha256(MIX) in err and "nothing was converted" in err
    assert not out.exists()
    stage = tmp_path / ".out.mertools-pull"
    assert not list((stage / "files").rglob("*.gguf*"))  # the bad bytes were deleted, .part included
    assert json.loads((stage / "pull-journal.json").read_text())["files"] == {}
    hub.clear_faults()
    run_cli("pull", "org/m", out, "--quiet", env=env, check=True)
    same_shards(out, extracted(MIX))


def test_a_5xx_storm_is_retried_with_backoff_and_bounded(hub, env, tmp_path, extracted):
    hub.add_revision("org/m", {MIX.name: MIX})
    hub.fault("error", "/org/m/resolve/*", times=3, status=503)
    hub.fault("error", "/api/models/org/m/*", times=2, status=500)  # the API calls too
    out = tmp_path / "out"
    run_cli("pull", "org/m", out, "--quiet", env=env, check=True)
    assert sum(1 for m, path, st in hub.requests if st == 503) == 3
    assert sum(1 for m, path, st in hub.requests if st == 500) == 2
    same_shards(out, extracted(MIX))

    hub.fault("error", "/org/m/resolve/*", times=None, status=502)
    out2 = tmp_path / "out2"
    err = one_line_error(run_cli("pull", "org/m", out2, "-q", env=env))
    assert "gave up after 6 attempts" in err and not out2.exists()
    assert sum(1 for m, path, st in hub.requests if st == 502) == 6


def as_named(src: Path, name: str, tmp: Path) -> Path:
    """A local extract of ``src`` copied under the file name the repo uses (dense.gguf records the source name)."""
    from mertools import extract

    d = tmp / f"named-{src.stem}"
    d.mkdir()
    (d / name).write_bytes(src.read_bytes())
    extract(d / name, d / "out", fsync=False)
    return d / "out"


def test_a_revision_pin_converts_that_commit(hub, env, tmp_path):
    other = GEN / "moe-merged-q4_0.gguf"
    old = hub.add_revision("org/m", {"model.gguf": MIX}, branch="v1")
    new = hub.add_revision("org/m", {"model.gguf": other})  # main
    expected = {src: as_named(src, "model.gguf", tmp_path) for src in (MIX, other)}
    for rev, want, src in ((old, old, MIX), ("v1", old, MIX), (None, new, other)):
        out = tmp_path / f"out-{rev}"
        args = ["pull", "org/m", out, "--quiet"] + (["--revision", rev] if rev else [])
        run_cli(*args, env=env, check=True)
        same_shards(out, expected[src])
        rec = hub_record(out)
        assert rec["commit"] == want and rec["files"][0]["sha256"] == sha256(src)
    err = one_line_error(run_cli("pull", "org/m", tmp_path / "x", "--revision", "nope", "-q", env=env))
    assert "revision" in err


def test_offline_mode_uses_a_complete_cache_and_refuses_an_incomplete_one(hub, env, tmp_path, extracted):
    from huggingface_hub import snapshot_download

    commit = hub.add_revision("org/split", {p.name: p for p in SPLIT})
    cache = Path(env["HF_HUB_CACHE"])
    snapshot_download("org/split", cache_dir=cache, endpoint=hub.url, token=False)  # the real library fills it
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing may be reached
    n_requests = len(hub.requests)
    out = tmp_path / "out"
    r = json.loads(run_cli("pull", "org/split", out, "--json", env=offline, check=True).stdout)
    assert r["offline"] and r["commit"] == commit and len(hub.requests) == n_requests
    same_shards(out, extracted(SPLIT[0]))
    assert [f["sha256"] for f in hub_record(out)["files"]] == [sha256(x) for x in SPLIT]

    # a blob whose bytes changed in the cache: refused
    snap = cache / "models--org--split" / "snapshots" / commit
    blob = Path(os.path.realpath(snap / SPLIT[2].name))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    err = one_line_error(run_cli("pull", "org/split", tmp_path / "o2", "-q", env=offline))
    assert SPLIT[2].name in err and "nothing was converted" in err and not (tmp_path / "o2").exists()
    # a part missing from the cache (an interrupted download): refused, never a half model
    blob.unlink()
    err = one_line_error(run_cli("pull", "org/split", tmp_path / "o3", "-q", env=offline))
    assert "incomplete" in err and SPLIT[2].name in err and not (tmp_path / "o3").exists()
    (snap / SPLIT[2].name).unlink()
    err = one_line_error(run_cli("pull", "org/split", tmp_path / "o4", "-q", env=offline))
    assert "00003" in err and not (tmp_path / "o4").exists()
    err = one_line_error(run_cli("pull", "org/never-pulled", tmp_path / "o5", "-q", env=offline))
    assert "HF_HUB_OFFLINE" in err


def _sources_available() -> bool:
    try:
        import mertools.sources  # noqa: F401  (the SafeTensors source, from the sources branch)
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not ST.is_dir(), reason="../shared/fixtures/safetensors is not present")
def test_safetensors_repo_downloads_and_verifies_exactly_the_checkpoint(hub, env, tmp_path):
    files = {p.name: p for p in ST.iterdir()}
    files["original/consolidated.00.pth"] = b"\0" * 300_000  # a second copy of the weights that is never needed
    commit = hub.add_revision("org/mixtral-st", files)
    out = tmp_path / "out"
    p = run_cli("pull", "org/mixtral-st", out, "--keep-source", "--json", env=env)
    index = json.loads((ST / "model.safetensors.index.json").read_text())
    # the tokenizer and the other small files beside the weights are the checkpoint's too (mertools.companions)
    companions = {"generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                  "tokenizer_config.json"}
    needed = {"config.json", "model.safetensors.index.json"} | set(index["weight_map"].values()) | companions
    for name in files:
        # a shard's header (8 + N bytes) is also read ahead by range requests: the streaming plan is made from it
        extra = header_bytes(files[name]) if name in needed and name.endswith(".safetensors") else 0
        assert hub.served("org/mixtral-st", name) == (files[name].stat().st_size + extra if name in needed else 0), name
    if p.returncode == 0:  # a SafeTensors source is installed: the pull converted it
        rec = hub_record(out)
        assert rec["commit"] == commit
        assert {f["path"]: f.get("sha256") or f.get("git_oid") for f in rec["files"]}.keys() == needed
        kept = tmp_path / "out.source"
    else:  # no SafeTensors source on this branch: a clear refusal, and every verified file kept for the next run
        one_line_error(p)
        assert not out.exists()
        kept = tmp_path / ".out.mertools-pull" / "files"
        journal = json.loads((tmp_path / ".out.mertools-pull" / "pull-journal.json").read_text())
        assert {k for k, v in journal["files"].items() if v["state"] == "verified"} == needed
        run_cli("pull", "org/mixtral-st", out, env=env)
        for name in needed:  # the re-run reused them
            assert hub.served("org/mixtral-st", name) == files[name].stat().st_size
    for name in needed:
        assert (kept / name).read_bytes() == (ST / name).read_bytes()


@pytest.mark.skipif(not _sources_available(), reason="needs the SafeTensors source (mertools.sources, issue 7 "
                    "items 1-3, another branch); the integrator enables this test by merging it")
def test_safetensors_repo_pull_matches_a_local_extract_of_the_folder(hub, env, tmp_path):
    from mertools import extract

    hub.add_revision("org/mixtral-st", {p.name: p for p in ST.iterdir()})
    out = tmp_path / "out"
    run_cli("pull", "org/mixtral-st", out, "--quiet", env=env, check=True)
    local = tmp_path / "local"
    extract(ST, local, fsync=False)
    same_shards(out, local)
    assert run_cli("verify", out).returncode == 0


def raw_tensors(path: Path) -> dict[str, bytes]:
    """Every tensor's bytes, read by the SafeTensors layout itself (8-byte header size, JSON header, data)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    base = 8 + n
    return {k: data[base + v["data_offsets"][0]:base + v["data_offsets"][1]]
            for k, v in json.loads(data[8:base]).items() if k != "__metadata__"}


class ShardByShard:
    """A streaming converter as a SafeTensors source will plug in (window 2): reads each shard with the safetensors
    library as soon as it is verified, keeps every tensor's bytes, releases the shard, and at the end writes them
    to OUT. It records how many shard files were on disk whenever it ran."""

    window = 2

    def __init__(self, choice, out, crash_after=None, **kw):
        from mertools.hub.remote import CONFIG, ST_INDEX

        self.resident = {CONFIG, ST_INDEX}
        self.paths = {f.path for f in choice.files}
        self.out, self.on_disk, self.crash_after, self.seen = out, [], crash_after, []

    def needs(self, path):
        return path in self.paths

    def begin(self, work_dir, converted):
        self.stage_files, self.work, self.resumed = work_dir.parent / "files", work_dir, set(converted)
        work_dir.mkdir(parents=True, exist_ok=True)

    def convert_available(self, present):
        self.on_disk.append(sorted(p.name for p in self.stage_files.glob("model-*.safetensors*")))
        done = set()
        for path, local in present.items():
            if path.endswith(".safetensors"):
                if self.crash_after is not None and len(self.seen) == self.crash_after:
                    raise RuntimeError("converter crashed")
                tensors = raw_tensors(local)  # written to work_dir, which survives a crash, as real shards would be
                (self.work / (path + ".json")).write_text(json.dumps({k: v.hex() for k, v in tensors.items()}))
                self.seen.append(path)
                done.add(path)
        return done

    @property
    def tensors(self):
        out = {}
        for p in sorted(self.work.glob("*.json")):
            out.update({k: bytes.fromhex(v) for k, v in json.loads(p.read_text()).items()})
        return out

    def finish(self):
        self.final = self.tensors
        self.out.mkdir()
        (self.out / "tensors.json").write_text(json.dumps(sorted(self.final)))
        return None


@pytest.mark.skipif(not ST.is_dir(), reason="../shared/fixtures/safetensors is not present")
def test_a_streaming_converter_sees_each_shard_verified_and_at_most_two_on_disk(hub, env, tmp_path, monkeypatch):
    from mertools.hub import pull

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    hub.add_revision("org/st", {p.name: p for p in ST.iterdir()})
    hub.fault("slow", "/org/st/resolve/*/model-0000[2-5]*", times=None, delay=0.01)
    made = []

    def factory(choice, out, **kw):
        made.append(ShardByShard(choice, out, **kw))
        return made[0]

    r = pull("org/st", tmp_path / "out", converter=factory)
    conv = made[0]
    shards = sorted(p.name for p in ST.glob("*.safetensors"))
    assert [f["path"] for f in r.files if f["path"].endswith(".safetensors")] == shards
    assert max(len(x) for x in conv.on_disk) <= 2, conv.on_disk  # shard i+1 (or its .part) beside shard i
    assert any(len(x) == 2 for x in conv.on_disk) or len(shards) == 1  # and the download did overlap
    want = {k: v for s in shards for k, v in raw_tensors(ST / s).items()}
    assert conv.final == want
    assert not (tmp_path / ".out.mertools-pull").exists()


@pytest.mark.skipif(not ST.is_dir(), reason="../shared/fixtures/safetensors is not present")
def test_a_streaming_conversion_that_crashed_resumes_after_its_converted_shards(hub, env, tmp_path, monkeypatch):
    from mertools.hub import pull

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    hub.add_revision("org/st", {p.name: p for p in ST.iterdir()})
    shards = sorted(p.name for p in ST.glob("*.safetensors"))
    made = []

    def factory(crash_after):
        def make(choice, out, **kw):
            made.append(ShardByShard(choice, out, crash_after=crash_after, **kw))
            return made[-1]
        return make

    with pytest.raises(RuntimeError):
        pull("org/st", tmp_path / "out", converter=factory(2))
    assert made[0].seen == shards[:2] and not (tmp_path / "out").exists()
    served = {s: hub.served("org/st", s) for s in shards}
    pull("org/st", tmp_path / "out", converter=factory(None))
    again = made[1]
    assert again.resumed == set(shards[:2]) and again.seen == shards[2:]
    for s in shards[:2]:  # converted and deleted by the first run: never fetched again
        assert hub.served("org/st", s) == served[s] == (ST / s).stat().st_size
    assert again.final == {k: v for s in shards for k, v in raw_tensors(ST / s).items()}


def test_a_second_pull_into_the_same_out_is_refused_while_one_runs(hub, env, tmp_path):
    import fcntl

    hub.add_revision("org/m", {MIX.name: MIX})
    stage = tmp_path / ".out.mertools-pull"
    stage.mkdir()
    with open(stage / "lock", "w") as held:  # what a running pull holds
        fcntl.flock(held, fcntl.LOCK_EX)
        err = one_line_error(run_cli("pull", "org/m", tmp_path / "out", "-q", env=env))
    assert "another pull" in err and not (tmp_path / "out").exists()


def test_a_listing_with_a_path_outside_the_repo_is_refused(hub, env, tmp_path):
    hub.add_revision("org/evil", {"../../escape.gguf": MIX})
    err = one_line_error(run_cli("pull", "org/evil", tmp_path / "out", "-q", env=env))
    assert "not a safe relative path" in err
    assert not list(tmp_path.rglob("escape.gguf*")) and not (tmp_path.parent / "escape.gguf").exists()


def test_bad_repo_ids_and_an_unreachable_hub_give_one_line(hub, env, tmp_path):
    assert "not a hub repo id" in one_line_error(run_cli("pull", "no-slash", tmp_path / "o", "-q", env=env))
    assert "not found" in one_line_error(run_cli("pull", "org/absent", tmp_path / "o", "-q", env=env))
    down = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}
    assert "cannot reach" in one_line_error(run_cli("pull", "org/m", tmp_path / "o", "-q", env=down))
    assert not (tmp_path / "o").exists()


def test_choose_picks_one_model_by_glob_and_include():
    from mertools.hub.remote import HubError, RemoteFile, choose

    def f(path, size=10):
        return RemoteFile(path, size, "0" * 64, None)

    listing = [f("q4/m-Q4_0.gguf"), f("q8/m-Q8_0-00001-of-00002.gguf"), f("q8/m-Q8_0-00002-of-00002.gguf"),
               f("README.md"), f("config.json"), f("model.safetensors")]
    assert choose(listing).kind == "safetensors"  # a checkpoint beside GGUF files: the checkpoint
    assert [x.path for x in choose(listing, gguf="*Q8_0*").files] == ["q8/m-Q8_0-00001-of-00002.gguf",
                                                                      "q8/m-Q8_0-00002-of-00002.gguf"]
    assert [x.path for x in choose(listing, include=["q4/*"]).files] == ["q4/m-Q4_0.gguf"]
    with pytest.raises(HubError, match="matches 2 models"):
        choose(listing, gguf="*.gguf")
    with pytest.raises(HubError, match="pick one with --gguf"):
        choose(listing, include=["q*/*"])
    with pytest.raises(HubError, match="incomplete"):
        choose(listing[1:2])
    with pytest.raises(HubError, match="no GGUF file matches"):
        choose(listing, gguf="*Q2_K*")


@pytest.mark.skipif(not ST.is_dir(), reason="../shared/fixtures/safetensors is not present")
def test_offline_refuses_a_safetensors_snapshot_missing_a_shard(hub, env, tmp_path):
    from huggingface_hub import snapshot_download

    commit = hub.add_revision("org/st", {p.name: p for p in ST.iterdir()})
    cache = Path(env["HF_HUB_CACHE"])
    snapshot_download("org/st", cache_dir=cache, endpoint=hub.url, token=False,
                      allow_patterns=["*.json", "model-0000[1-4]*"])  # as if stopped before the last shard
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    err = one_line_error(run_cli("pull", f"org/st@{commit}", tmp_path / "out", "-q", env=offline))
    assert "incomplete" in err and "model-00005-of-00005.safetensors" in err and not (tmp_path / "out").exists()


@pytest.mark.skipif(not ST.is_dir(), reason="../shared/fixtures/safetensors is not present")
def test_offline_refuses_an_index_that_is_a_fifo_instead_of_hanging(hub, env, tmp_path):
    from huggingface_hub import snapshot_download

    commit = hub.add_revision("org/st", {p.name: p for p in ST.iterdir()})
    cache = Path(env["HF_HUB_CACHE"])
    snap = Path(snapshot_download("org/st", cache_dir=cache, endpoint=hub.url, token=False))
    index = snap / "model.safetensors.index.json"
    index.unlink()
    os.mkfifo(index)  # read_bytes() would wait for a writer for ever
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    err = one_line_error(run_cli("pull", f"org/st@{commit}", tmp_path / "out", "-q", env=offline))
    assert "model.safetensors.index.json" in err and "HF_HUB_OFFLINE" in err and not (tmp_path / "out").exists()


def test_a_conversion_the_file_size_limit_stops_names_the_file_and_resumes(hub, env, tmp_path):
    """A real write refused mid-pull (RLIMIT_FSIZE, what a full disk or quota does to one file): the download side
    said which file and what to do, the conversion side only "error: File too large" (the OSError of dense.gguf's
    ftruncate in the work folder carries no name). Now one line names the file and says what is kept; the next run,
    without the limit, finishes from there."""
    import resource

    from mertools import extract

    hub.add_revision("org/mixtral-st", {p.name: p for p in ST.iterdir()})
    out = tmp_path / "out"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300 << 10, 300 << 10))  # the dense.gguf is ~1.3 MB

    p = subprocess.run([sys.executable, "-m", "mertools.cli", "pull", "org/mixtral-st", out, "-q"],
                       capture_output=True, text=True, env={**os.environ, **env}, preexec_fn=small_files, timeout=300)
    line = one_line_error(p)
    assert "/.out.mertools-pull/work/dense.gguf: " in line and "File too large" in line, line
    assert "free" in line and "kept" in line, line
    assert not out.exists()
    run_cli("pull", "org/mixtral-st", out, "-q", env=env, check=True)
    local = tmp_path / "local"
    extract(ST, local, fsync=False)
    same_shards(out, local)
