"""pack / unpack: round trips of every fixture, and damaged or hostile archives refused with nothing left behind.

Hostile archives are built here with the standard library's tarfile and the zstandard package, not with our packer.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import zstandard

from mertools.errors import MertoolsError
from mertools.pack import pack, unpack
from mertools.verify import verify

from conftest import ALL_MOE, run_cli

Q4 = next(p for p in ALL_MOE if p.name == "mixtral-q4_0.gguf")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _left(tmp: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name not in keep)


@pytest.mark.parametrize("src", ALL_MOE, ids=lambda p: p.name)
def test_round_trip(src, extracted, tmp_path):
    folder = extracted(src)
    r = pack(folder, tmp_path / "a.tar.zst", fsync=False)
    assert r.bytes_out == (tmp_path / "a.tar.zst").stat().st_size
    unpack(tmp_path / "a.tar.zst", tmp_path / "back", fsync=False)
    assert _files(tmp_path / "back") == _files(folder)
    assert verify(tmp_path / "back").ok


def test_archive_is_a_plain_tar_zst_manifest_first(extracted, tmp_path):
    folder = extracted(Q4)
    pack(folder, tmp_path / "a.tar.zst", fsync=False)
    with open(tmp_path / "a.tar.zst", "rb") as fh:
        data = zstandard.ZstdDecompressor().stream_reader(fh).read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        assert all(m.isreg() for m in tar.getmembers())
    assert names[0] == "manifest.json"
    assert sorted(names) == sorted(_files(folder))


def _extracted_copy(extracted, tmp_path) -> Path:
    f = tmp_path / "src"
    shutil.copytree(extracted(Q4), f)
    return f


def test_pack_refuses_damaged_folder(extracted, tmp_path):
    f = _extracted_copy(extracted, tmp_path)
    m = json.loads((f / "manifest.json").read_text())
    p = f / m["experts"][5]["path"]
    b = bytearray(p.read_bytes())
    b[100] ^= 1
    p.write_bytes(bytes(b))
    with pytest.raises(MertoolsError, match="checksum mismatch"):
        pack(f, tmp_path / "a.tar.zst", fsync=False)
    assert _left(tmp_path, {"src"}) == []


@pytest.mark.parametrize("how", ["flip", "truncate", "truncate_member_boundary"])
def test_corrupted_archive_is_refused(how, extracted, tmp_path):
    pack(extracted(Q4), tmp_path / "a.tar.zst", fsync=False)
    b = bytearray((tmp_path / "a.tar.zst").read_bytes())
    if how == "flip":
        b[len(b) // 2] ^= 0x10
    elif how == "truncate":
        b = b[: len(b) * 2 // 3]
    if how == "truncate_member_boundary":
        # a well-formed archive that simply stops after a few members
        with open(tmp_path / "a.tar.zst", "rb") as fh:
            data = zstandard.ZstdDecompressor().stream_reader(fh).read()
        src = tarfile.open(fileobj=io.BytesIO(data))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
            for m in src.getmembers()[:4]:
                out.addfile(m, src.extractfile(m))
        b = bytearray(zstandard.ZstdCompressor().compress(buf.getvalue()))
    (tmp_path / "bad.tar.zst").write_bytes(bytes(b))
    with pytest.raises(MertoolsError, match="damaged|truncated|checksum"):
        unpack(tmp_path / "bad.tar.zst", tmp_path / "out", fsync=False)
    assert _left(tmp_path, {"a.tar.zst", "bad.tar.zst"}) == []


def _hostile(extracted, tmp_path, change, fmt=tarfile.GNU_FORMAT, tail: bytes = b"") -> Path:
    """Our folder's members as a tar written by tarfile, with `change(list of (TarInfo, bytes))` applied, and
    `tail` after the tar's end."""
    folder = extracted(Q4)
    members = []
    for rel in ["manifest.json", *[p for p in _files(folder) if p != "manifest.json"]]:
        data = (folder / rel).read_bytes()
        ti = tarfile.TarInfo(rel)
        ti.size = len(data)
        members.append((ti, data))
    change(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    path = tmp_path / "hostile.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue() + tail))
    return path


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = link
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = 1, 3
    return ti, None


def _rename(i: int, name: str):
    def change(ms):
        ms[i][0].name = name
    return change


def _replace_with(i: int, kind: bytes, link: str = ""):
    def change(ms):
        ms[i] = _special(ms[i][0].name, kind, link)
    return change


def _extra(ms):
    ti = tarfile.TarInfo("experts/L000/E9999.bin")
    ti.size = 4096
    ms.append((ti, bytes(4096)))


def _duplicate(ms):
    ti = tarfile.TarInfo(ms[3][0].name)
    ti.size = ms[3][0].size
    ms.append((ti, ms[3][1]))


def _oversized(ms):
    ti, data = ms[3]
    data = data + bytes(4096)
    ti.size = len(data)
    ms[3] = (ti, data)


def _manifest_not_first(ms):
    ms.append(ms.pop(0))


HOSTILE = {
    "absolute": (_rename(3, "/tmp/mertools-evil.bin"), "absolute"),
    "dotdot": (_rename(3, "experts/../../evil.bin"), r"'\.\.'"),
    "symlink": (_replace_with(3, tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
    "hardlink": (_replace_with(3, tarfile.LNKTYPE, "manifest.json"), "hard link"),
    "chardev": (_replace_with(3, tarfile.CHRTYPE), "device"),
    "fifo": (_replace_with(3, tarfile.FIFOTYPE), "FIFO"),
    "directory": (lambda ms: ms.insert(1, _special("experts", tarfile.DIRTYPE)), "folder entry"),
    "extra": (_extra, "not listed"),
    "duplicate": (_duplicate, "twice"),
    "oversized": (_oversized, "the manifest says"),
    "manifest_not_first": (_manifest_not_first, "first member"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused(case, extracted, tmp_path):
    change, msg = HOSTILE[case]
    arc = _hostile(extracted, tmp_path, change)
    with pytest.raises(MertoolsError, match=msg):
        unpack(arc, tmp_path / "out", fsync=False)
    assert _left(tmp_path, {"hostile.tar.zst"}) == []
    assert not Path("/tmp/mertools-evil.bin").exists() and not (tmp_path.parent / "evil.bin").exists()


def test_hostile_manifest_path_is_refused(extracted, tmp_path):
    def change(ms):
        m = json.loads(ms[0][1])
        old = m["experts"][0]["path"]
        m["experts"][0]["path"] = "../escape.bin"
        data = json.dumps(m).encode()
        ms[0][0].size = len(data)
        ms[0] = (ms[0][0], data)
        for ti, _ in ms:
            if ti.name == old:
                ti.name = "../escape.bin"
    arc = _hostile(extracted, tmp_path, change)
    with pytest.raises(MertoolsError):
        unpack(arc, tmp_path / "out", fsync=False)
    assert _left(tmp_path, {"hostile.tar.zst"}) == []


def _with_manifest(change_bytes):
    def change(ms):
        data = change_bytes(ms[0][1])
        ms[0][0].size = len(data)
        ms[0] = (ms[0][0], data)
    return change


@pytest.mark.parametrize("how", ["edited", "duplicate_key"])
def test_manifest_the_runtime_would_refuse_is_refused(how, extracted, tmp_path):
    """unpack checks the manifest as the runtime reads it (strict JSON, manifest_xxh3): a folder it writes loads."""
    if how == "edited":  # one more space: the JSON means the same, the file is not the one that was written
        edit = _with_manifest(lambda b: b.replace(b'"format_version":', b'"format_version": ', 1))
    else:  # json.loads keeps the last of two keys, the runtime refuses both
        edit = _with_manifest(lambda b: b.replace(b'"format_version":', b'"format_version": 7, "format_version":', 1))
    arc = _hostile(extracted, tmp_path, edit)
    with pytest.raises(MertoolsError, match="changed after it was written|appears twice"):
        unpack(arc, tmp_path / "out", fsync=False)
    assert _left(tmp_path, {"hostile.tar.zst"}) == []


def _big_pax(i: int):
    def change(ms):
        ms[i][0].pax_headers = {"comment": "x" * (4 << 20)}
    return change


@pytest.mark.parametrize("where", ["before_manifest", "before_member", "after_end"])
def test_more_than_the_manifest_lists_is_refused(where, extracted, tmp_path):
    """A tar header record is read whole into memory: one bigger than any we write (a few zstd KiB can ask for
    gigabytes) is refused, and so is data after the tar's end (it would be decompressed to the last byte)."""
    if where == "after_end":
        arc = _hostile(extracted, tmp_path, lambda ms: None, tail=b"\x01" * (2 << 20))
    else:
        arc = _hostile(extracted, tmp_path, _big_pax(0 if where == "before_manifest" else 3), fmt=tarfile.PAX_FORMAT)
    with pytest.raises(MertoolsError, match="holds more than its manifest lists"):
        unpack(arc, tmp_path / "out", fsync=False)
    assert _left(tmp_path, {"hostile.tar.zst"}) == []


def test_unpack_into_non_empty_folder_needs_overwrite(extracted, tmp_path):
    pack(extracted(Q4), tmp_path / "a.tar.zst", fsync=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(MertoolsError, match="--overwrite"):
        unpack(tmp_path / "a.tar.zst", tmp_path / "out", fsync=False)
    assert (tmp_path / "out" / "keep").read_text() == "x"
    # --overwrite replaces only an earlier output (one holding manifest.json), never a folder mertools did not write
    with pytest.raises(MertoolsError, match="did not write it"):
        unpack(tmp_path / "a.tar.zst", tmp_path / "out", overwrite=True, fsync=False)
    assert (tmp_path / "out" / "keep").read_text() == "x"
    unpack(tmp_path / "a.tar.zst", tmp_path / "out2", fsync=False)
    (tmp_path / "out2" / "experts" / "stale").write_text("x")
    unpack(tmp_path / "a.tar.zst", tmp_path / "out2", overwrite=True, fsync=False)
    assert verify(tmp_path / "out2").ok and not (tmp_path / "out2" / "experts" / "stale").exists()


def test_cli(extracted, tmp_path):
    folder = extracted(Q4)
    p = run_cli("pack", folder, tmp_path / "a.tar.zst", "--json", check=True)
    d = json.loads(p.stdout)
    assert d["ratio"] > 1.0 and d["files"] == len(_files(folder))
    p = run_cli("unpack", tmp_path / "a.tar.zst", tmp_path / "o", "--json", "--no-fsync", check=True)
    assert json.loads(p.stdout)["files"] == d["files"]
    assert _files(tmp_path / "o") == _files(folder)
    (tmp_path / "junk.tar.zst").write_bytes(os.urandom(1000))
    p = run_cli("unpack", tmp_path / "junk.tar.zst", tmp_path / "o2")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert not (tmp_path / "o2").exists()


def test_small_chunks(monkeypatch, extracted, tmp_path):
    """Projection hashes fed across many chunk boundaries at odd places still match."""
    import mertools.pack as pk

    monkeypatch.setattr(pk, "CHUNK", 3001)
    folder = extracted(next(p for p in ALL_MOE if p.name == "mixtral-q4_k_m.gguf"))
    pack(folder, tmp_path / "a.tar.zst", fsync=False)
    unpack(tmp_path / "a.tar.zst", tmp_path / "o", fsync=False)
    assert _files(tmp_path / "o") == _files(folder)


@pytest.mark.parametrize("victim", ["manifest.json", "dense.gguf", "expert"])
def test_pack_onto_a_file_of_the_folder_is_refused(victim, extracted, tmp_path):
    """`pack OUT OUT/dense.gguf --overwrite` would rename the archive over the folder's only copy of that file."""
    f = _extracted_copy(extracted, tmp_path)
    if victim == "expert":
        victim = json.loads((f / "manifest.json").read_text())["experts"][0]["path"]
    before = _files(f)
    with pytest.raises(MertoolsError, match="of the folder .* being read"):
        pack(f, f / victim, overwrite=True, fsync=False)
    (tmp_path / "link").symlink_to(f)  # the same name reached through a link
    with pytest.raises(MertoolsError, match="of the folder .* being read"):
        pack(f, tmp_path / "link" / victim, overwrite=True, fsync=False)
    assert _files(f) == before and verify(f).ok
    pack(f, f / "inside.tar.zst", fsync=False)  # a new name inside the folder takes nothing from it


def test_a_record_path_that_is_dense_gguf_is_refused(extracted, tmp_path):
    """The reassembly record named dense.gguf replaced dense.gguf's expected checksum by the record's: an archive
    whose dense.gguf was the record's bytes unpacked with "every checksum matches" and a dense.gguf that does not."""
    from mer_runtime.manifest import manifest_bytes

    folder = extracted(Q4)
    rec = (folder / "reassembly.dat").read_bytes()

    def change(ms):
        m = json.loads(ms[0][1])
        m["reassembly"]["path"] = m["dense"]["path"]
        ms[0] = (ms[0][0], manifest_bytes(m))
        ms[0][0].size = len(ms[0][1])
        for i, (ti, _) in enumerate(ms):
            if ti.name == "dense.gguf":
                ti.size = len(rec)
                ms[i] = (ti, rec)
        ms[:] = [(ti, d) for ti, d in ms if ti.name != "reassembly.dat"]
    arc = _hostile(extracted, tmp_path, change)
    with pytest.raises(MertoolsError, match="dense and the reassembly record both give the path 'dense.gguf'"):
        unpack(arc, tmp_path / "out", fsync=False)
    assert _left(tmp_path, {"hostile.tar.zst"}) == []


def test_overwrite_replaces_only_a_file(extracted, tmp_path):
    """`pack OUT /dev/null --overwrite` renamed the archive over the device node (as root: /dev/null became a
    regular file). A FIFO stands in for the device here; a folder gave an error naming the hidden temporary."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    for target in (fifo, tmp_path / "dir"):
        with pytest.raises(MertoolsError, match="exists and is not a file"):
            pack(extracted(Q4), target, overwrite=True, fsync=False)
    assert fifo.is_fifo() and (tmp_path / "dir").is_dir() and _left(tmp_path, {"fifo", "dir"}) == []


# -- refuse_folder_file: a folder file that is a link inside the folder (verify accepts such a folder) -------------
def test_pack_over_the_target_of_an_in_folder_link_is_refused(extracted, tmp_path):
    f = tmp_path / "f"
    shutil.copytree(extracted(Q4), f)
    (f / "store").mkdir()
    os.replace(f / "dense.gguf", f / "store" / "dense.bin")
    (f / "dense.gguf").symlink_to("store/dense.bin")
    assert verify(f).ok
    with pytest.raises(MertoolsError, match="being read"):
        pack(f, f / "store" / "dense.bin", overwrite=True, fsync=False)
    assert verify(f).ok


# -- a file that appears at the target while pack runs, without --overwrite --------------------------------------
def test_an_archive_that_appears_meanwhile_is_not_replaced_without_overwrite(extracted, tmp_path):
    """The target was checked only before the run: a second `pack` to the same name (or a copy) that finished while
    this one compressed was silently replaced at the final rename, without --overwrite."""
    from conftest import appears_midway

    arc = tmp_path / "a.tar.zst"
    appears_midway(arc, b"another run's archive", "writing", "pack", extracted(Q4), arc, "-q")
    assert _left(tmp_path, {"a.tar.zst"}) == []


def test_a_folder_file_linked_outside_is_refused_and_a_fifo_named_as_such(extracted, tmp_path):
    """pack archived a file reached through a link out of the folder (verify and the runtime refuse it), and said
    "0 bytes or not a regular file" of a FIFO; it now opens each file as the runtime does (inside the folder, a
    regular file, never blocking on a FIFO swapped in after a check)."""
    f = tmp_path / "f"
    shutil.copytree(extracted(Q4), f)
    shutil.move(f / "dense.gguf", tmp_path / "dense.gguf")
    (f / "dense.gguf").symlink_to(tmp_path / "dense.gguf")
    with pytest.raises(MertoolsError, match="resolves outside the output folder"):
        pack(f, tmp_path / "a.tar.zst", fsync=False)
    (f / "dense.gguf").unlink()
    os.mkfifo(f / "dense.gguf")
    with pytest.raises(MertoolsError, match="dense.gguf: is a FIFO, not a regular file"):
        pack(f, tmp_path / "a.tar.zst", fsync=False)
    assert _left(tmp_path, {"f", "dense.gguf"}) == []


def test_a_dangling_link_at_the_target_is_not_replaced_without_overwrite(extracted, tmp_path):
    """The target check asked exists(), which follows links: a link to nothing passed, and the finished archive was
    renamed over the link (or, renamed without replacing, refused only at the end as if it had just appeared)."""
    arc = tmp_path / "a.tar.zst"
    arc.symlink_to(tmp_path / "elsewhere" / "a.tar.zst")
    with pytest.raises(MertoolsError, match="exists; pass --overwrite to replace it"):
        pack(extracted(Q4), arc, fsync=False)
    assert arc.is_symlink() and _left(tmp_path, {"a.tar.zst"}) == []
    pack(extracted(Q4), arc, overwrite=True, fsync=False)  # asked: the link is replaced by the archive
    assert not arc.is_symlink() and unpack(arc, tmp_path / "back", fsync=False)
