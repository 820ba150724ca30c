"""`mertools push` and `inspect hf://` against the loopback hub (tests/hubserver.py): real HTTP, real CLI processes."""

from __future__ import annotations

import hashlib
import json

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
    assert [f["path"] for f in d["hub"]["would_download"]["files"]] == ["config.json", "model.safetensors.index.json",
                                                                         *shards]
    for s in shards:  # headers only, by range requests
        assert hub.served("org/st", s) < (ST / s).stat().st_size
