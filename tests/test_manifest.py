"""The one manifest reader refuses what no consumer should trust."""

from __future__ import annotations

import copy
import json

import pytest

from mer_runtime import ManifestError, load_manifest
from mer_runtime.manifest import parse_manifest

from conftest import GEN


@pytest.fixture
def good(extracted):
    out = extracted(GEN / "moe-merged-q4_0.gguf")
    return out, json.loads((out / "manifest.json").read_text())


def bad(good, mutate, needle):
    root, raw = good
    raw = copy.deepcopy(raw)
    mutate(raw)
    with pytest.raises(ManifestError, match=needle):
        parse_manifest(raw, root)


def test_good_manifest_loads(good):
    m = load_manifest(good[0])
    assert len(m.experts) == 8 and m.alignment == 4096 and m.max_expert_size == m.experts[0].size


@pytest.mark.parametrize("path", ["/etc/passwd", "../x.bin", "experts/../../x.bin", "experts\\L001\\E0000.bin", "", "a//b"])
def test_paths_that_escape_or_are_odd(good, path):
    bad(good, lambda r: r["experts"][0].__setitem__("path", path), "path")


def test_symlink_escaping_the_folder(tmp_path, good):
    root, raw = good
    fake = tmp_path / "m"
    fake.mkdir()
    (fake / "experts").symlink_to(tmp_path.parent)
    with pytest.raises(ManifestError, match="resolves outside"):
        parse_manifest(copy.deepcopy(raw), fake)


def test_version_alignment_and_fields(good):
    bad(good, lambda r: r.__setitem__("format_version", 99), "format_version 99 is not supported")
    bad(good, lambda r: r.__setitem__("alignment", 1000), "not a power of two")
    bad(good, lambda r: r["model"].pop("d_ff"), "missing field 'd_ff'")
    bad(good, lambda r: r["experts"][0]["tensors"]["up"].__setitem__("offset", 100), "not a multiple of the alignment")
    bad(good, lambda r: r["experts"][0]["tensors"]["up"].__setitem__("nbytes", 10), "Q4_0 \\[96, 64\\] takes 3456")
    bad(good, lambda r: r["experts"][0]["tensors"].pop("down"), "missing projections down")
    bad(good, lambda r: r["experts"][0]["tensors"]["up"].__setitem__("offset", 0), "overlap")
    bad(good, lambda r: r["experts"][0]["tensors"]["up"].__setitem__("dtype", "Q9_9"), "unknown tensor type")
    bad(good, lambda r: r["experts"][0].__setitem__("size", 4096), "outside the 4096-byte file")
    bad(good, lambda r: r["experts"].append(r["experts"][0]), "listed twice")
    bad(good, lambda r: r["experts"][0]["tensors"].__setitem__("evil", {}), "unknown tensor role")
    bad(good, lambda r: r["experts"][0].__setitem__("xxh3_64", "zz"), "16 lowercase hex")


def test_unreadable_manifest(tmp_path):
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)
