"""reassemble: the source comes back from shards + dense.gguf, byte for byte where the record allows, else tensor for
tensor. Expected bytes are the fixture files themselves and gguf's reader of them, never mertools' own plan."""

from __future__ import annotations

import filecmp
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from mer_runtime.manifest import manifest_bytes
from mertools import extract
from mertools.errors import MertoolsError
from mertools.reassemble import RECORD_NAME, reassemble

from conftest import ALL_MOE, parts_of, run_cli

SINGLE = [p for p in ALL_MOE if "-of-" not in p.name]
SPLIT = next(p for p in ALL_MOE if "-00001-of-" in p.name)


def _tensors(paths: list[Path]) -> dict[str, tuple[str, list[int], bytes]]:
    out = {}
    for p in paths:
        for t in gguf.GGUFReader(p).tensors:
            out[t.name] = (t.tensor_type.name, [int(d) for d in t.shape], t.data.tobytes())
    return out


@pytest.mark.parametrize("src", SINGLE, ids=lambda p: p.name)
def test_single_file_comes_back_byte_identical(src, extracted, tmp_path):
    r = reassemble(extracted(src), tmp_path / "back.gguf", fsync=False)
    assert r.exact
    assert filecmp.cmp(src, tmp_path / "back.gguf", shallow=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_split_set_with_split_is_byte_identical(extracted, tmp_path):
    out = tmp_path / "parts"
    out.mkdir()
    r = reassemble(extracted(SPLIT), out, split=True, fsync=False)
    assert r.exact and len(r.out) == 6
    for p in parts_of(SPLIT):
        assert filecmp.cmp(p, out / p.name, shallow=False)


def test_split_set_joined_is_tensor_identical(extracted, tmp_path):
    r = reassemble(extracted(SPLIT), tmp_path / "one.gguf", fsync=False)
    assert not r.exact and r.notes
    want = _tensors(parts_of(SPLIT))
    got = _tensors([tmp_path / "one.gguf"])
    assert got == want  # same names, types, shapes and bytes (and it loads in gguf's reader)
    meta = gguf.GGUFReader(tmp_path / "one.gguf").fields
    assert not any(k.startswith("split.") for k in meta) and "mertools.experts_removed_from" not in meta


def _fixture(name: str) -> Path:
    return next(p for p in ALL_MOE if p.name == name)


def _copy(extracted, name: str, tmp_path: Path) -> Path:
    """A private copy (tmp_path/f) of the fixture's extracted folder, to damage."""
    f = tmp_path / "f"
    shutil.copytree(extracted(_fixture(name)), f)
    return f


def _strip_record(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    m = json.loads((to / "manifest.json").read_text())
    del m["reassembly"]
    (to / "manifest.json").write_bytes(manifest_bytes(m))  # a consistent manifest_xxh3
    (to / RECORD_NAME).unlink()
    return to


@pytest.mark.parametrize("name", ["mixtral-q4_k_m.gguf", "moe-fused-q8_0.gguf", "moe-gptoss-mxfp4-bias.gguf",
                                  "moe-perexpert-f16.gguf", "mixtral-perexpert-q8_0.gguf"])
def test_folder_without_record_is_tensor_identical(name, extracted, tmp_path):
    src = _fixture(name)
    old = _strip_record(extracted(src), tmp_path / "old")
    r = reassemble(old, tmp_path / "back.gguf", fsync=False)
    assert not r.exact and "no reassembly record" in r.notes[0]
    assert _tensors([tmp_path / "back.gguf"]) == _tensors([src])


def test_old_folder_refuses_split(extracted, tmp_path):
    old = _strip_record(extracted(SPLIT), tmp_path / "old")
    with pytest.raises(MertoolsError, match="--split needs the reassembly record"):
        reassemble(old, tmp_path / "x.gguf", split=True)


def test_partial_extract_is_refused(tmp_path):
    src = _fixture("mixtral-q4_0.gguf")
    extract(src, tmp_path / "part", layers={0}, fsync=False)
    with pytest.raises(MertoolsError, match="--layers/--experts"):
        reassemble(tmp_path / "part", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def _damage(folder: Path, rel: str, at: int) -> None:
    p = folder / rel
    b = bytearray(p.read_bytes())
    b[at] ^= 0x40
    p.write_bytes(bytes(b))


def test_damaged_shard_is_caught_and_nothing_left(extracted, tmp_path):
    f = _copy(extracted, "mixtral-q4_0.gguf", tmp_path)
    m = json.loads((f / "manifest.json").read_text())
    e = m["experts"][3]
    _damage(f, e["path"], e["tensors"]["down"]["offset"] + 17)
    with pytest.raises(MertoolsError, match="checksum"):
        reassemble(f, tmp_path / "x.gguf", fsync=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_damaged_dense_is_caught(extracted, tmp_path):
    f = _copy(extracted, "mixtral-q4_k_m.gguf", tmp_path)
    r = gguf.GGUFReader(f / "dense.gguf")
    at = int(r.tensors[-1].data_offset) + 5
    del r
    _damage(f, "dense.gguf", at)
    with pytest.raises(MertoolsError, match="differ from the source"):
        reassemble(f, tmp_path / "x.gguf", fsync=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_damaged_record_is_caught(extracted, tmp_path):
    f = _copy(extracted, "mixtral-q4_0.gguf", tmp_path)
    _damage(f, RECORD_NAME, 100)
    with pytest.raises(MertoolsError, match="reassembly record is damaged"):
        reassemble(f, tmp_path / "x.gguf", fsync=False)


def test_existing_output_needs_overwrite(extracted, tmp_path):
    src = _fixture("moe-merged-q4_0.gguf")
    (tmp_path / "x.gguf").write_bytes(b"keep me")
    with pytest.raises(MertoolsError, match="--overwrite"):
        reassemble(extracted(src), tmp_path / "x.gguf")
    assert (tmp_path / "x.gguf").read_bytes() == b"keep me"
    reassemble(extracted(src), tmp_path / "x.gguf", overwrite=True, fsync=False)
    assert filecmp.cmp(src, tmp_path / "x.gguf", shallow=False)


def test_cli(extracted, tmp_path):
    src = _fixture("moe-merged-bf16.gguf")
    p = run_cli("reassemble", extracted(src), tmp_path / "b.gguf", "--json", "--no-fsync", check=True)
    d = json.loads(p.stdout)
    assert d["exact"] is True and filecmp.cmp(src, tmp_path / "b.gguf", shallow=False)
    p = run_cli("reassemble", extracted(src), tmp_path / "b.gguf")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--overwrite" in p.stderr


def test_verify_notices_a_changed_record(extracted, tmp_path):
    from mertools.verify import verify

    f = _copy(extracted, "moe-merged-q8_0.gguf", tmp_path)
    assert verify(f).ok
    _damage(f, RECORD_NAME, 7)
    r = verify(f)
    assert not r.ok and r.problems[0].path == RECORD_NAME
    (f / RECORD_NAME).unlink()
    assert [p.what for p in verify(f).problems] == ["missing"]


@pytest.mark.parametrize("edit", [
    lambda r: r["files"][0].__setitem__("header", [0, 10 ** 12]),
    lambda r: r["files"][0]["tensors"][0].__setitem__(3, "x"),
    lambda r: r.__setitem__("files", "nope"),
    lambda r: r["files"][0].__setitem__("gaps", [[1, 2]]),
])
def test_malformed_record_gives_our_error(edit, extracted, tmp_path):
    f = _copy(extracted, "moe-merged-q4_0.gguf", tmp_path)
    m = json.loads((f / "manifest.json").read_text())
    edit(m["reassembly"])
    (f / "manifest.json").write_bytes(manifest_bytes(m))  # a consistent manifest_xxh3
    with pytest.raises(MertoolsError, match="malformed"):
        reassemble(f, tmp_path / "x.gguf", fsync=False)


def test_split_to_a_file_name(extracted, tmp_path):
    r = reassemble(extracted(SPLIT), tmp_path / "m.gguf", split=True, fsync=False)
    assert [p.name for p in r.out] == [f"m-{i:05d}-of-00006.gguf" for i in range(1, 7)]
    for p, want in zip(r.out, parts_of(SPLIT)):
        assert filecmp.cmp(want, p, shallow=False)


def test_split_of_a_single_file_is_refused(extracted, tmp_path):
    src = _fixture("moe-merged-q4_0.gguf")
    with pytest.raises(MertoolsError, match="drop --split"):
        reassemble(extracted(src), tmp_path / "x.gguf", split=True)


def test_segments_smaller_than_tensors(monkeypatch, tmp_path):
    """Every copy and hash loop crosses many segment boundaries at odd places (extract's record pass included)."""
    import mertools.reassemble as ra

    monkeypatch.setattr(ra, "SEGMENT", 4096 + 513)
    src = _fixture("mixtral-f16.gguf")
    extract(src, tmp_path / "o", fsync=False)
    r = reassemble(tmp_path / "o", tmp_path / "b.gguf", fsync=False)
    assert r.exact and filecmp.cmp(src, tmp_path / "b.gguf", shallow=False)


def test_hostile_source_name_is_refused(extracted, tmp_path):
    f = _copy(extracted, "moe-merged-q4_0.gguf", tmp_path)
    m = json.loads((f / "manifest.json").read_text())
    m["source"]["files"][0]["name"] = "../../evil.gguf"
    (f / "manifest.json").write_bytes(manifest_bytes(m))  # a consistent manifest_xxh3
    (tmp_path / "o").mkdir()
    with pytest.raises(MertoolsError, match="not plain file names"):
        reassemble(f, tmp_path / "o", fsync=False)
    assert list((tmp_path / "o").iterdir()) == [] and not (tmp_path.parent / "evil.gguf").exists()


@pytest.mark.parametrize("how", ["dev-zero", "dotdot", "fifo", "size-short"])
def test_a_hostile_record_path_or_size_is_refused_without_reading_it(how, extracted, tmp_path):
    """Liveness-bounded (a read of /dev/zero or a FIFO must end) and memory-limited (a regression fails the test, not
    the machine)."""
    f = _copy(extracted, "moe-merged-q4_0.gguf", tmp_path)
    m = json.loads((f / "manifest.json").read_text())
    if how == "dev-zero":
        m["reassembly"]["path"] = "/dev/zero"
    elif how == "dotdot":
        shutil.copy(f / RECORD_NAME, tmp_path / RECORD_NAME)
        m["reassembly"]["path"] = "../" + RECORD_NAME
    elif how == "fifo":
        (f / RECORD_NAME).unlink()
        os.mkfifo(f / RECORD_NAME)
    else:
        m["reassembly"]["size"] -= 1
    (f / "manifest.json").write_bytes(manifest_bytes(m))  # a consistent manifest_xxh3
    assert "reassembly record" in _refused_in_one_line(f, tmp_path, resource.RLIMIT_AS, 6 << 30)


@pytest.mark.parametrize("victim", ["dense.gguf", "manifest.json", RECORD_NAME, "expert"])
def test_output_over_a_file_of_the_folder_is_refused(victim, extracted, tmp_path):
    """`reassemble OUT OUT/dense.gguf --overwrite` would rename the model over the folder's only dense.gguf."""
    from mertools.verify import verify

    f = _copy(extracted, "mixtral-q4_0.gguf", tmp_path)
    if victim == "expert":
        victim = json.loads((f / "manifest.json").read_text())["experts"][2]["path"]
    before = {p: p.read_bytes() for p in f.rglob("*") if p.is_file()}
    with pytest.raises(MertoolsError, match="being read; writing there would destroy it"):
        reassemble(f, f / victim, overwrite=True, fsync=False)
    assert {p: p.read_bytes() for p in f.rglob("*") if p.is_file()} == before and verify(f).ok


@pytest.mark.parametrize("how", ["fewer_names", "a_name_twice"])
def test_source_names_that_disagree_with_the_record_are_refused(how, extracted, tmp_path):
    """With one source name and a six-part record, the first part alone came back "byte-identical to the source";
    with a name twice, one part was renamed over another and the run still said six files were written."""
    f = tmp_path / "f"
    shutil.copytree(extracted(SPLIT), f)
    m = json.loads((f / "manifest.json").read_text())
    files = m["source"]["files"]
    if how == "fewer_names":
        del files[1:]
    else:
        files[1]["name"] = files[0]["name"]
    (f / "manifest.json").write_bytes(manifest_bytes(m))  # a consistent manifest_xxh3
    (tmp_path / "o").mkdir()
    with pytest.raises(MertoolsError, match="differ or repeat a name"):
        reassemble(f, tmp_path / "o", split=how == "a_name_twice", fsync=False)
    assert list((tmp_path / "o").iterdir()) == []


@pytest.mark.parametrize("lie", ["tensor_offset", "part_size", "alignment"])
def test_a_record_whose_numbers_lie_is_refused_before_writing(lie, extracted, tmp_path):
    """A tensor offset past its part's end, a part of 2^50 bytes, or an alignment of 2^31 (a split set joined into
    one file pads each tensor to it) was padding written as zeros without bound (a full disk before any check); the
    run is file-size-limited so that a regression fails the test, not the disk."""
    f = tmp_path / "f"
    shutil.copytree(extracted(SPLIT if lie == "alignment" else _fixture("moe-merged-q4_0.gguf")), f)
    m = json.loads((f / "manifest.json").read_text())
    part = m["reassembly"]["files"][0]
    if lie == "tensor_offset":
        part["tensors"][-1][3] = 1 << 40
    elif lie == "part_size":
        part["size"] = 1 << 50
    else:
        part["alignment"] = 1 << 31
    (f / "manifest.json").write_bytes(manifest_bytes(m))  # a consistent manifest_xxh3
    want = "free but only" if lie == "part_size" else "malformed"
    assert want in _refused_in_one_line(f, tmp_path, resource.RLIMIT_FSIZE, 256 << 20)


# -- reassemble --split --overwrite: a SIGTERM between two parts' renames -------------------------------------------
def test_sigterm_between_the_renames_of_a_split_set_leaves_no_mixed_set(extracted, tmp_path, monkeypatch):
    import signal
    import mertools.reassemble as ra
    from mertools.commit import Interrupted

    out = tmp_path / "parts"
    out.mkdir()
    for p in parts_of(SPLIT):
        (out / p.name).write_bytes(b"old")  # an earlier set under the same names
    real = os.replace
    calls = []

    def replace(a, b):
        real(a, b)
        calls.append(b)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's time limit, right after the first part's rename

    monkeypatch.setattr(ra.os, "replace", replace)
    with pytest.raises(Interrupted):
        ra.reassemble(extracted(SPLIT), out, split=True, overwrite=True, fsync=False)
    kinds = {(out / p.name).read_bytes() == b"old" for p in parts_of(SPLIT)}
    assert len(kinds) == 1, "some parts are new, some old"


@pytest.mark.parametrize("split", [False, True])
def test_an_absent_folder_named_with_a_slash_is_refused_not_written_as_a_file(extracted, tmp_path, split):
    src = SPLIT if split else ALL_MOE[0]
    with pytest.raises(MertoolsError, match="no such folder"):
        reassemble(extracted(src), str(tmp_path / "parts") + "/", split=split, fsync=False)
    assert list(tmp_path.iterdir()) == []


def _refused_in_one_line(folder: Path, tmp_path: Path, rlimit: int, bound: int) -> str:
    """`reassemble folder tmp_path/o/x.gguf` in a child held to `bound` of `rlimit` (memory, or file size: a
    regression fails the test instead of filling the machine): exit 2, one line, nothing written; the line."""
    (tmp_path / "o").mkdir()

    def limit() -> None:
        resource.setrlimit(rlimit, (bound, bound))

    p = subprocess.run([sys.executable, "-m", "mertools.cli", "reassemble", str(folder), str(tmp_path / "o" / "x.gguf"),
                        "-q", "--no-fsync"], capture_output=True, text=True, timeout=120, preexec_fn=limit)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stderr[-2000:])
    assert list((tmp_path / "o").iterdir()) == []
    return lines[0]


# -- a part that appears at its name while reassemble runs, without --overwrite ------------------------------------
def test_a_part_that_appears_meanwhile_is_not_replaced_and_no_part_is_left(extracted, tmp_path):
    """The targets were checked only before the run: a file that appeared under a part's name while the set was
    written was silently replaced at the final renames, without --overwrite. Now it stays, and the parts already
    named are taken back (a set is named whole or not at all)."""
    from conftest import appears_midway

    out = tmp_path / "parts"
    out.mkdir()
    names = [p.name for p in parts_of(SPLIT)]
    appears_midway(out / names[3], b"mine", "writing", "reassemble", extracted(SPLIT), out, "--split", "-q", "--no-fsync")
    assert [x.name for x in out.iterdir()] == [names[3]]
