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


@pytest.mark.parametrize("path", ["/etc/passwd", "../x.bin", "experts/../../x.bin", "experts\\L001\\E0000.bin", "",
                                  "a//b", "./x", "x/", "x/./y"])
def test_paths_that_escape_or_are_odd(good, path):
    bad(good, lambda r: r["experts"][0].__setitem__("path", path), "path")


def test_symlink_escaping_the_folder(tmp_path, good):
    """Links are checked when a file is about to be opened, so one bad expert does not hide the rest."""
    root, raw = good
    fake = tmp_path / "m"
    fake.mkdir()
    (fake / "experts").symlink_to(tmp_path.parent)
    m = parse_manifest(copy.deepcopy(raw), fake)
    with pytest.raises(ManifestError, match="resolves outside"):
        m.path_of(m.experts[0])


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
    bad(good, lambda r: r.__setitem__("manifest_xxh3", "ZZ"), "manifest_xxh3 must be 16 lowercase hex")


def set_model(key, value):
    return lambda r: r["model"].__setitem__(key, value)


def set_tensor(role, key, value, expert=0):
    return lambda r: r["experts"][expert]["tensors"][role].__setitem__(key, value)


@pytest.mark.parametrize("key", ["d_model", "d_ff", "n_experts", "n_layers"])
@pytest.mark.parametrize("value", [0, -1, 1 << 40, True, 1.5, "64"])
def test_model_dimensions_positive_and_bounded(good, key, value):
    bad(good, set_model(key, value), key)


def test_shapes_against_d_model_and_each_role(good):
    # every role checked against d_model and the expert's width (d_ff 96, d_model 64 here)
    bad(good, set_model("d_model", 96), r"gate: shape \[96, 64\] but d_model 96")
    bad(good, set_tensor("up", "shape", [64, 96]), r"up: shape \[64, 96\] but d_model 64 and expert width 96 make "
                                                   r"it \[96, 64\]")
    bad(good, set_tensor("down", "shape", [96, 64]), r"down: shape \[96, 64\] .* make it \[64, 96\]")
    bad(good, set_tensor("gate", "shape", [0, 64]), "gate: bad shape")
    bad(good, set_tensor("gate", "shape", [96, 64, 1, 1, 1]), "bad shape")
    bad(good, set_tensor("gate", "shape", [96, True]), "bad shape")


def test_width_other_than_d_ff_only_if_consistent(good):
    """A per-layer expert width is accepted (nbytes and shapes must still agree), a mixed one inside a layer not."""
    root, raw = good

    def widen(r, expert, width):
        e = r["experts"][expert]
        for role in ("gate", "up"):
            e["tensors"][role]["shape"] = [width, 64]
            e["tensors"][role]["nbytes"] = width * 64 // 32 * 18
        e["tensors"]["down"]["shape"] = [64, width]
        e["tensors"]["down"]["nbytes"] = 64 * width // 32 * 18

    layer1 = [i for i, e in enumerate(raw["experts"]) if e["layer"] == 1]
    r = copy.deepcopy(raw)
    for i in layer1:
        widen(r, i, 64)
    m = parse_manifest(r, root)  # a whole layer of width 64: a model whose width varies by layer
    assert m.expert(1, 0).tensors["down"].shape == (64, 64)
    bad(good, lambda r: widen(r, layer1[1], 64), "expert width 64 differs from the other experts of layer 1")
    bad(good, lambda r: r["experts"][0]["tensors"]["down"].__setitem__("shape", [64, 64]), "down: shape")


@pytest.mark.parametrize("act, needle", [
    ({"kind": "gelu"}, "activation 'gelu' is not one this reader knows"),
    ("swiglu", "field .activation. has the wrong type"),
    ({"kind": "swiglu_oai", "alpha": float("nan")}, "alpha nan must be a finite number"),
    ({"kind": "swiglu_oai", "limit": -7.0}, "limit -7.0 must be"),
    ({"kind": "swiglu_oai", "limit": 1e300}, "limit 1e\\+300 must be"),
    ({"kind": "swiglu_oai", "alpha": "1.7"}, "alpha '1.7' must be"),
])
def test_activation_known_and_sane(good, act, needle):
    bad(good, set_model("activation", act), needle)


def test_sane_activation_parameters_pass(good):
    root, raw = good
    r = copy.deepcopy(raw)
    r["model"]["activation"] = {"kind": "swiglu_oai", "alpha": 1.702, "limit": 7}
    assert parse_manifest(r, root).model["activation"]["limit"] == 7


def test_sizes_within_reality(good):
    bad(good, lambda r: r["experts"][0].__setitem__("size", (1 << 40) + 4096), "size .* is outside")
    bad(good, lambda r: r["experts"][0].__setitem__("size", 1 << 39), "size 549755813888 but its tensors end at")
    bad(good, lambda r: r["experts"][0].__setitem__("size", 12288 + 4096), "so the file is 12288 bytes")
    bad(good, lambda r: r["dense"].__setitem__("size", 1 << 60), "dense: size")
    bad(good, lambda r: r["dense"].__setitem__("size", -1), "dense: size")
    bad(good, set_tensor("gate", "offset", -4096), "offset -4096 is outside")
    bad(good, set_tensor("gate", "nbytes", 0), "nbytes 0 is outside")


def test_experts_inside_the_model(good):
    bad(good, lambda r: r.__setitem__("experts", []), "lists no experts")
    bad(good, lambda r: r["experts"][0].__setitem__("layer", 3), "layer 3 is outside 0..2")
    bad(good, lambda r: r["experts"][0].__setitem__("expert", 4), "expert 4 is outside 0..3")
    bad(good, lambda r: r["experts"][0].__setitem__("expert", -1), "expert -1 is outside")
    bad(good, set_model("n_experts_used", 5), "n_experts_used 5 is outside 0..4")
    bad(good, set_model("moe_layers", [1, 99]), "moe_layers")


def test_fields_consumers_format_or_iterate(good):
    """Values that a consumer formats or iterates: a router template with other fields, source files not a list."""
    bad(good, set_model("router", {"weight": "blk.{layer}.{0}"}), "router")
    bad(good, set_model("router", {"weight": 5}), "router")
    bad(good, lambda r: r["source"].__setitem__("files", "x.gguf"), "files must be a list")
    bad(good, lambda r: r["source"].__setitem__("files", [{"name": 1}]), "files must be a list")


def test_nbytes_is_gguf_formula(good):
    """nbytes comes from gguf's quant_shape_to_byte_shape, checked here against the block table by hand."""
    from mer_runtime.manifest import nbytes_for

    assert nbytes_for("Q4_0", (96, 64)) == 96 * 2 * 18
    assert nbytes_for("Q6_K", (256, 512)) == 256 * 2 * 210
    assert nbytes_for("MXFP4", (8, 64)) == 8 * 2 * 17
    assert nbytes_for("F16", (3,)) == 6
    with pytest.raises(ManifestError, match="not a multiple of Q4_0 block size"):
        nbytes_for("Q4_0", (96, 48))


def test_unreadable_manifest(tmp_path):
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_nesting_that_json_can_parse_but_consumers_cannot_print(good):
    """500 levels parse (below Python's recursion limit) but `inspect --json` would recurse printing them."""
    nested = {}
    for _ in range(500):
        nested = {"x": [nested]}
    bad(good, set_model("extra", nested), "field 'model' is nested more than 32 deep")


@pytest.mark.parametrize("key", ["activation", "moe_layers"])
def test_fields_inspect_prints_are_required(good, key):
    bad(good, lambda r: r["model"].pop(key), f"missing field '{key}'")
