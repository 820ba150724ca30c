"""Where commands meet: an output never replaces its own input, --overwrite replaces an earlier output of the same
command, and a folder converted with --dtype is checked against its source through the same quantizer."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import REAL
from mertools import extract, verify
from mertools.errors import MertoolsError
from mertools.export_mer import export_mer
from mertools.pack import pack, unpack


def test_export_never_replaces_its_own_source(tmp_path):
    out = tmp_path / "out"
    extract(REAL / "mixtral-q4_0.gguf", out, fsync=False)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(MertoolsError, match="did not write it|inside"):
        export_mer(out, out, overwrite=True, fsync=False)
    assert sorted(p.name for p in out.rglob("*")) == before and verify(out).ok
    (out / "metadata.json").write_text("{}")  # even looking like an earlier export, it holds the source
    with pytest.raises(MertoolsError, match="inside"):
        export_mer(out, out, overwrite=True, fsync=False)
    assert (out / "manifest.json").is_file()


def test_export_overwrite_replaces_an_earlier_export(tmp_path):
    out, mer = tmp_path / "out", tmp_path / "mer"
    extract(REAL / "mixtral-q4_0.gguf", out, fsync=False)
    export_mer(out, mer, fsync=False)
    first = {p.name: p.read_bytes() for p in mer.iterdir()}
    export_mer(out, mer, overwrite=True, fsync=False)
    assert {p.name: p.read_bytes() for p in mer.iterdir()} == first


def test_unpack_never_replaces_the_folder_holding_its_archive(tmp_path):
    out = tmp_path / "out"
    extract(REAL / "mixtral-q4_0.gguf", out, fsync=False)
    archive = out / "a.tar.zst"
    pack(out, tmp_path / "a.tar.zst", fsync=False)
    shutil.move(tmp_path / "a.tar.zst", archive)
    with pytest.raises(MertoolsError, match="inside"):
        unpack(archive, out, overwrite=True, fsync=False)
    assert archive.is_file()


def test_dtype_folder_has_no_reassembly_record_and_verifies_against_its_gguf(tmp_path):
    src = REAL / "mixtral-f16.gguf"
    out = tmp_path / "q8"
    extract(src, out, dtype="q8_0", fsync=False)
    raw = json.loads((out / "manifest.json").read_text())
    assert "reassembly" not in raw and raw["source"]["dtype"] == "q8_0"
    r = verify(out, deep=True, against=src)
    assert r.ok, r.problems
