"""Companion files against a hostile or careless world (from a review): push sends only what the manifest lists, an
offline pull neither hangs on a FIFO in the cache nor fails on a companion whose blob is gone, and two names that
differ only in case are never both kept."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import FIX, run_cli
from mertools import extract
from mertools.verify import verify

ST = FIX / "safetensors" / "real" / "mixtral-bf16-sharded"


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rvb") / "out"
    extract(ST, out, fsync=False)
    return out


# F1: push uploads a file in hf/ the manifest does not list, a link out of OUT included (verify only warns)
def test_push_does_not_upload_unlisted_files_or_links_out_of_the_folder(hub, env, mixtral, tmp_path):
    out = shutil.copytree(mixtral, tmp_path / "out")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"api-token=hunter2\n")
    (out / "hf" / "notes.txt").symlink_to(secret)  # e.g. a user's link, or a file dropped beside the tokenizer
    r = verify(out)
    assert r.ok and [w.path for w in r.warnings] == ["hf/notes.txt"]
    run_cli("push", out, "me/leak", "-q", env=env, check=True)
    remote = hub.files_at("me/leak")
    assert "hf/notes.txt" not in remote, "push uploaded the bytes of a link that leads out of OUT"


# F2: an offline pull whose cache holds a dangling link for a companion file (blob removed) is refused whole,
# where extract of the same snapshot folder skips that file with a note ("never a failure")
def test_offline_pull_skips_a_companion_whose_blob_is_gone(hub, env, tmp_path):
    from huggingface_hub import snapshot_download

    commit = hub.add_revision("org/st", {p.name: p for p in ST.iterdir()})
    cache = Path(env["HF_HUB_CACHE"])
    snap = Path(snapshot_download("org/st", cache_dir=cache, endpoint=hub.url, token=False))
    Path(os.path.realpath(snap / "generation_config.json")).unlink()  # e.g. a cache cleaned by hand
    p = run_cli("extract", snap, tmp_path / "local", "--json", "--no-fsync")
    assert p.returncode == 0 and "generation_config.json" in p.stdout  # local: skipped with a note
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    p = run_cli("pull", f"org/st@{commit}", tmp_path / "out", "--json", env=offline)
    assert p.returncode == 0, p.stderr
    skipped = {x["name"] for x in json.loads(p.stdout)["companions_skipped"]}
    assert "generation_config.json" in skipped


# F3: extract keeps two names that differ only in case (the hub rule leaves one out: "the same rule"); on a
# case-insensitive disk reassemble then writes Config.json over config.json, or one tokenizer over the other
def test_extract_does_not_keep_two_names_that_differ_only_in_case(tmp_path):
    src = shutil.copytree(ST, tmp_path / "ckpt")
    (src / "Config.json").write_bytes(b"{}")
    (src / "TOKENIZER.JSON").write_bytes(b"{}")
    r = extract(src, tmp_path / "out", fsync=False)
    assert "hf/Config.json" not in r.companions and "hf/TOKENIZER.JSON" not in r.companions
    assert "hf/tokenizer.json" in r.companions  # the lowercase one of the pair is the one kept
    assert {x["name"] for x in r.companions_skipped if "case" in x["why"]} == {"Config.json", "TOKENIZER.JSON"}


def test_extract_does_not_keep_two_names_that_differ_only_in_unicode_normalization(tmp_path):
    """"é" as U+00E9 (NFC) and as "e" + U+0301 (NFD): two files on Linux, one on macOS; the NFC one is kept."""
    src = shutil.copytree(ST, tmp_path / "ckpt")
    nfc, nfd, upper_nfd = "caf\u00e9.md", "cafe\u0301.md", "CAFE\u0301.md"
    for n in (nfd, nfc, upper_nfd):
        (src / n).write_bytes(n.encode())
    r = extract(src, tmp_path / "out", fsync=False)
    assert f"hf/{nfc}" in r.companions and f"hf/{nfd}" not in r.companions and f"hf/{upper_nfd}" not in r.companions
    assert {x["name"] for x in r.companions_skipped if "Unicode normalization" in x["why"]} == {nfd, upper_nfd}
    assert (tmp_path / "out" / "hf" / nfc).read_bytes() == nfc.encode()


def test_a_pull_keeps_the_lowercase_one_of_two_names_that_differ_only_in_case():
    from mertools.hub.remote import RemoteFile, choose

    files = [RemoteFile(n, 10, "a" * 64, None) for n in ("config.json", "model.safetensors", "TOKENIZER.JSON",
                                                          "tokenizer.json")]
    c = choose(files)
    assert c.companions == ["config.json", "tokenizer.json"]


# F4: a cache blob that is a FIFO: the offline pull opens it with a blocking open() in check_file and hangs for ever
# (config.json: before the companions too; every companion file is a new way in)
@pytest.mark.parametrize("name", ["generation_config.json", "config.json"])
def test_offline_pull_does_not_hang_on_a_fifo_in_the_cache(hub, env, tmp_path, name):
    import subprocess
    import sys
    from huggingface_hub import snapshot_download

    commit = hub.add_revision("org/st", {p.name: p for p in ST.iterdir()})
    cache = Path(env["HF_HUB_CACHE"])
    snap = Path(snapshot_download("org/st", cache_dir=cache, endpoint=hub.url, token=False))
    blob = Path(os.path.realpath(snap / name))
    blob.unlink()
    os.mkfifo(blob)
    offline = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    try:
        p = subprocess.run([sys.executable, "-m", "mertools.cli", "pull", f"org/st@{commit}", str(tmp_path / "out"),
                            "-q"], env=offline, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the offline pull hung on a FIFO in the cache")
    assert "Traceback" not in p.stderr
    if name == "config.json":  # needed: refused in one line, nothing written
        assert p.returncode == 2 and "config.json" in p.stderr and not (tmp_path / "out").exists()
    else:  # a companion: left out with a note, as extract leaves a FIFO out
        assert p.returncode == 0 and "note: 'generation_config.json' not kept" in p.stderr


def test_companions_an_include_glob_leaves_out_are_named_not_dropped_silently():
    from mertools.hub.remote import RemoteFile, choose

    files = [RemoteFile(n, 10, "a" * 64, None) for n in ("config.json", "model.safetensors", "tokenizer.json",
                                                          "tokenizer.model", "sub/notes.txt", ".gitattributes")]
    c = choose(files, include=["*.json", "*.safetensors"])
    assert c.companions == ["config.json", "tokenizer.json"]
    assert c.companions_skipped == [{"name": "tokenizer.model", "why": "not matched by --include"}]


def test_the_model_card_quotes_a_companion_name_holding_a_backtick(mixtral):
    """A name with a backtick broke out of its code span in the card (and could start Markdown of its own)."""
    from mertools.hub.pushing import model_card

    raw = json.loads((mixtral / "manifest.json").read_text())
    raw["companions"] = [{"path": "hf/a`[x](http://e)`.txt", "size": 1, "xxh3_64": "0" * 16}]
    card = model_card(raw, mixtral)
    assert "``hf/a`[x](http://e)`.txt``" in card
