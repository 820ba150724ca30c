"""A SafeTensors checkpoint pulled from the loopback hub (converted shard by shard) keeps reassemble's record: the
very reassembly.dat and manifest field a local extract of the same files writes, so `reassemble` gives every file of
the repo back byte for byte, through a kill and a resume too.

Expected bytes are the fixture files the server serves; expected records a local `extract` of the same folder
(whose own reassemble is tested against safetensors' reader in test_st_reassemble).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from conftest import run_cli, st_folder
from mer_runtime.manifest import manifest_bytes
from mertools.hub.stream_record import _line_check
from mertools.reassemble import RECORD_NAME

MIX = st_folder("real/mixtral-bf16-sharded")
SHARDS = sorted(p.name for p in MIX.glob("model-*.safetensors"))
REPO = "org/ck"
HASHES = "shard-xxh3.jsonl"


def serve(hub, name: str) -> Path:
    folder = st_folder(name)
    hub.add_revision(REPO, {p.name: p for p in folder.iterdir() if p.is_file()})
    return folder


def repo_files(folder: Path) -> list[str]:
    """What reassemble gives back: every file of the repo (the shards, the index, config.json and the companion
    files kept in OUT/hf/, which are all the rest of these checkpoints' files)."""
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def same_record(got: Path, want: Path) -> None:
    assert (got / RECORD_NAME).read_bytes() == (want / RECORD_NAME).read_bytes()
    rec = json.loads((got / "manifest.json").read_text())["reassembly"]
    assert rec == json.loads((want / "manifest.json").read_text())["reassembly"]
    assert rec["format"] == "safetensors"


def gives_back(out: Path, src: Path, tmp_path: Path) -> None:
    back = tmp_path / "back"
    run_cli("reassemble", out, back, "--json", check=True)
    assert sorted(p.name for p in back.iterdir()) == repo_files(src)
    for name in repo_files(src):
        assert (back / name).read_bytes() == (src / name).read_bytes(), name


def refused(out: Path, tmp_path: Path) -> str:
    dest = tmp_path / "dest"
    dest.mkdir()
    p = run_cli("reassemble", out, dest / "back", "--quiet")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert list(dest.iterdir()) == []
    return lines[0]


def killed_pull(env: dict, out: Path, point: str, *args: str) -> None:
    kill = {**os.environ, **env, "MERTOOLS_TEST_KILL_AT": point}
    p = subprocess.run([sys.executable, "-m", "mertools.cli", "pull", REPO, str(out), "--quiet", *args], env=kill,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists()


@pytest.mark.parametrize("name", ["real/mixtral-bf16-sharded", "real/gptoss-bf16", "deepseek_v2", "gpt_oss_mxfp4",
                                  "dbrx", "qwen3_5_moe"])
def test_a_pull_keeps_the_record_a_local_extract_keeps_and_gives_every_file_back(name, hub, env, tmp_path,
                                                                                 st_extracted, monkeypatch):
    from mertools.hub import pull

    src = serve(hub, name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = pull(REPO, tmp_path / "out")
    assert r.extract["streamed"] and r.extract["reassembly_record"]
    same_record(tmp_path / "out", st_extracted(name))
    assert run_cli("verify", tmp_path / "out").returncode == 0  # the record's size and xxh3 too
    gives_back(tmp_path / "out", src, tmp_path)


def test_a_pull_killed_after_its_first_shard_was_converted_still_gives_the_checkpoint_back(hub, env, tmp_path,
                                                                                          st_extracted):
    serve(hub, "real/mixtral-bf16-sharded")
    out, stage = tmp_path / "out", tmp_path / ".out.mertools-pull"
    killed_pull(env, out, f"pull-converted:{SHARDS[0]}")
    assert not (stage / "files" / SHARDS[0]).exists()  # converted and deleted: its hashes live in work/
    served = hub.served(REPO, SHARDS[0])
    r = json.loads(run_cli("pull", REPO, out, "--json", env=env, check=True).stdout)
    assert r["extract"]["reassembly_record"] and hub.served(REPO, SHARDS[0]) == served  # not fetched again
    same_record(out, st_extracted("real/mixtral-bf16-sharded"))
    gives_back(out, MIX, tmp_path)


def test_a_hash_line_torn_by_a_power_cut_loses_no_later_line(hub, env, tmp_path, st_extracted):
    serve(hub, "real/mixtral-bf16-sharded")
    out, stage = tmp_path / "out", tmp_path / ".out.mertools-pull"
    killed_pull(env, out, f"pull-converted:{SHARDS[0]}")
    with open(stage / "work" / HASHES, "a") as fh:
        fh.write('{"name":"' + SHARDS[1])  # a line cut short, no newline
    killed_pull(env, out, "before-commit")  # the lines of the shards this run hashed follow it; all are deleted
    r = json.loads(run_cli("pull", REPO, out, "--json", env=env, check=True).stdout)
    assert r["extract"]["reassembly_record"], r["extract"]
    same_record(out, st_extracted("real/mixtral-bf16-sharded"))



def test_a_progress_line_torn_by_a_power_cut_loses_no_later_line(hub, env, tmp_path, st_extracted):
    """The same for the conversion's own journal (work/progress.jsonl): the next run's first line used to be glued
    to the torn one and every line after it was ignored, so the run after that refused the work folder."""
    serve(hub, "real/mixtral-bf16-sharded")
    out, stage = tmp_path / "out", tmp_path / ".out.mertools-pull"
    killed_pull(env, out, f"pull-converted:{SHARDS[0]}")
    with open(stage / "work" / "progress.jsonl", "a") as fh:
        fh.write('{"experts":[{"layer":')  # a line cut short, no newline
    killed_pull(env, out, "before-commit")
    p = run_cli("pull", REPO, out, "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["extract"]["reassembly_record"]
    same_record(out, st_extracted("real/mixtral-bf16-sharded"))
    assert run_cli("verify", out).returncode == 0

def _drop_hashes(stage: Path) -> None:
    (stage / "work" / HASHES).unlink()


def _edit_a_hash(stage: Path) -> None:
    path = stage / "work" / HASHES
    lines = path.read_text().splitlines()
    rec = json.loads(lines[0])
    h = rec["entry"]["tensors"][0][1]
    rec["entry"]["tensors"][0][1] = ("0" if h[0] != "0" else "1") + h[1:]  # its line check no longer matches
    path.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")


@pytest.mark.parametrize("damage", [_drop_hashes, _edit_a_hash])
def test_hashes_lost_with_their_shard_give_no_record_said_by_pull_and_reassemble(damage, hub, env, tmp_path):
    serve(hub, "real/mixtral-bf16-sharded")
    out, stage = tmp_path / "out", tmp_path / ".out.mertools-pull"
    killed_pull(env, out, f"pull-converted:{SHARDS[0]}")
    damage(stage)
    p = run_cli("pull", REPO, out, env=env, check=True)
    assert "note: no reassembly record" in p.stdout and SHARDS[0] in p.stdout and "--overwrite" in p.stdout
    assert "reassembly" not in json.loads((out / "manifest.json").read_text()) and not (out / RECORD_NAME).exists()
    line = refused(out, tmp_path)
    assert f"{REPO} at" in line and "without a reassembly record" in line and "--overwrite" in line


def test_keep_source_hashes_a_kept_shard_again_when_its_hashes_are_lost(hub, env, tmp_path, st_extracted):
    serve(hub, "real/mixtral-bf16-sharded")
    out, stage = tmp_path / "out", tmp_path / ".out.mertools-pull"
    killed_pull(env, out, f"pull-converted:{SHARDS[0]}", "--keep-source")
    _drop_hashes(stage)
    r = json.loads(run_cli("pull", REPO, out, "--keep-source", "--json", env=env, check=True).stdout)
    assert r["extract"]["reassembly_record"] and "reassembly_lost" not in r["extract"]
    same_record(out, st_extracted("real/mixtral-bf16-sharded"))
    gives_back(out, MIX, tmp_path)


def test_a_changed_expert_byte_of_a_pulled_folder_is_caught_by_the_record(hub, env, tmp_path):
    serve(hub, "real/mixtral-bf16-sharded")
    out = tmp_path / "out"
    run_cli("pull", REPO, out, "-q", env=env, check=True)
    # the byte and the manifest's checksum of its projection both changed: only the pulled record can tell
    m = json.loads((out / "manifest.json").read_text())
    x = m["experts"][-1]
    t = next(iter(x["tensors"].values()))
    path = out / x["path"]
    data = bytearray(path.read_bytes())
    data[t["offset"] + 3] ^= 0x01
    path.write_bytes(bytes(data))
    t["xxh3_64"] = xxhash.xxh3_64_hexdigest(bytes(data[t["offset"]:t["offset"] + t["nbytes"]]))
    x["xxh3_64"] = xxhash.xxh3_64_hexdigest(bytes(data))
    (out / "manifest.json").write_bytes(manifest_bytes(m))
    line = refused(out, tmp_path)
    assert "differ from the source's" in line and str(t["source"]).split("[")[0] in line


def test_a_pull_converted_with_dtype_keeps_no_record_and_is_refused(hub, env, tmp_path):
    serve(hub, "real/mixtral-bf16-sharded")
    out = tmp_path / "out"
    r = json.loads(run_cli("pull", REPO, out, "--dtype", "q8_0", "--json", env=env, check=True).stdout)
    assert r["extract"]["reassembly_record"] is False and "reassembly_lost" not in r["extract"]
    assert "reassembly" not in json.loads((out / "manifest.json").read_text()) and not (out / RECORD_NAME).exists()
    line = refused(out, tmp_path)
    assert "Q8_0" in line and "lossy" in line


def test_a_keep_source_pull_keeps_the_same_record(hub, env, tmp_path, st_extracted):
    serve(hub, "real/mixtral-bf16-sharded")
    run_cli("pull", REPO, tmp_path / "out", "--keep-source", "-q", env=env, check=True)
    same_record(tmp_path / "out", st_extracted("real/mixtral-bf16-sharded"))
    gives_back(tmp_path / "out", MIX, tmp_path)


def test_an_offline_pull_keeps_the_same_record(hub, env, tmp_path, st_extracted):
    from huggingface_hub import snapshot_download

    serve(hub, "real/mixtral-bf16-sharded")
    snapshot_download(REPO, cache_dir=Path(env["HF_HUB_CACHE"]), endpoint=hub.url, token=False)
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing may be reached
    run_cli("pull", REPO, tmp_path / "out", "-q", env=offline, check=True)
    same_record(tmp_path / "out", st_extracted("real/mixtral-bf16-sharded"))
    gives_back(tmp_path / "out", MIX, tmp_path)


@pytest.mark.parametrize("bad", [[], ""])
def test_a_malformed_tensor_entry_with_a_valid_check_counts_as_absent(bad, hub, env, tmp_path):
    serve(hub, "real/mixtral-bf16-sharded")
    out, stage = tmp_path / "out", tmp_path / ".out.mertools-pull"
    killed_pull(env, out, f"pull-converted:{SHARDS[0]}")
    path = stage / "work" / HASHES
    lines = path.read_text().splitlines()
    rec = json.loads(lines[0])
    rec["entry"]["tensors"][0] = bad
    body = {k: v for k, v in rec.items() if k != "check"}
    rec["check"] = _line_check(body)
    path.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    p = run_cli("pull", REPO, out, env=env)
    assert p.returncode == 0, p.stderr
    assert "note: no reassembly record" in p.stdout
