"""verify catches a flipped byte anywhere, a truncated file, a missing file, and a tampered manifest."""

from __future__ import annotations

import json
import shutil

import pytest

from mertools import verify
from mer_runtime import load_manifest

from conftest import REAL, run_cli


@pytest.fixture
def out(tmp_path, extracted):
    dst = tmp_path / "copy"
    shutil.copytree(extracted(REAL / "gptoss-mxfp4_moe.gguf"), dst)
    return dst


def flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_clean_folder_passes(out):
    r = verify(out)
    assert r.ok and r.experts_checked == 8 and not r.warnings
    assert r.bytes_read == sum(p.stat().st_size for p in out.rglob("*.bin")) + (out / "dense.gguf").stat().st_size


@pytest.mark.parametrize("role", ["gate", "up", "down", "gate_bias", "up_bias", "down_bias"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_flipped_byte_in_any_projection(out, role, where):
    m = load_manifest(out)
    e = m.expert(1, 2)
    t = e.tensors[role]
    flip(out / e.path, t.offset if where == "first" else t.offset + t.nbytes - 1)
    r = verify(out)
    assert not r.ok
    whats = [p.what for p in r.problems if p.path == e.path]
    assert any(w.startswith(f"{role} checksum mismatch") for w in whats)
    assert all(p.path == e.path for p in r.problems)


def test_flipped_byte_in_padding(out):
    m = load_manifest(out)
    e = m.expert(0, 0)
    flip(out / e.path, e.tensors["gate"].offset + e.tensors["gate"].nbytes + 5)
    r = verify(out)
    assert [(p.path, p.what.split(" (")[0]) for p in r.problems] == [(e.path, "file checksum mismatch in the padding")]


def test_every_shard_is_checked(out):
    """A flip in each shard in turn is caught: no expert is skipped."""
    m = load_manifest(out)
    for e in m.experts:
        flip(out / e.path, e.size - 1)
    r = verify(out)
    assert sorted(p.path for p in r.problems) == sorted(e.path for e in m.experts)


def test_flipped_byte_in_dense(out):
    flip(out / "dense.gguf", 1000)
    r = verify(out)
    assert [p.path for p in r.problems] == ["dense.gguf"]


def test_truncated_and_missing_files(out):
    m = load_manifest(out)
    a, b = m.experts[1], m.experts[5]
    with open(out / a.path, "r+b") as fh:
        fh.truncate(a.size - 4096)
    (out / b.path).unlink()
    r = verify(out)
    got = {p.path: p.what for p in r.problems}
    assert got[a.path].startswith("truncated") and got[b.path] == "missing" and len(got) == 2


def test_cli_exit_code_and_listing(out):
    m = load_manifest(out)
    flip(out / m.experts[3].path, 10)
    p = run_cli("verify", out, "-q")
    assert p.returncode == 1
    assert f"FAIL {m.experts[3].path}: gate checksum mismatch" in p.stdout
    j = json.loads(run_cli("verify", out, "--json").stdout)
    assert j["ok"] is False and j["problems"][0]["path"] == m.experts[3].path


def test_manifest_rewritten_to_escape_is_refused(out):
    mp = out / "manifest.json"
    raw = json.loads(mp.read_text())
    raw["experts"][0]["path"] = "../../etc/passwd"
    mp.write_text(json.dumps(raw))
    r = verify(out)
    assert not r.ok and r.problems[0].path == "manifest.json" and "escapes the output folder" in r.problems[0].what


def test_missing_manifest(out):
    (out / "manifest.json").unlink()
    r = verify(out)
    assert not r.ok and "interrupted extract" in r.problems[0].what


def test_unlisted_file_is_a_warning(out):
    (out / "experts" / "L000" / "E0099.bin").write_bytes(b"x")
    r = verify(out)
    assert r.ok and [w.path for w in r.warnings] == ["experts/L000/E0099.bin"]


def test_manifest_checksum_rewritten_is_caught_by_projection_hash(out):
    """Rewriting only the file hash to match a changed shard (and the manifest's own hash after it) still fails on
    the projection hash."""
    import xxhash

    from mer_runtime.manifest import manifest_bytes

    m = load_manifest(out)
    e = m.expert(0, 1)
    flip(out / e.path, e.tensors["down"].offset + 7)
    raw = json.loads((out / "manifest.json").read_text())
    for x in raw["experts"]:
        if x["path"] == e.path:
            x["xxh3_64"] = xxhash.xxh3_64_hexdigest((out / e.path).read_bytes())
    (out / "manifest.json").write_bytes(manifest_bytes(raw))
    r = verify(out)
    assert [p.what.split(" (")[0] for p in r.problems] == ["down checksum mismatch"]
