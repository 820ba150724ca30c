"""Every projection written equals the source bytes, as the gguf package reads them; layout and checksums hold."""

from __future__ import annotations

import json

import gguf
import pytest
import xxhash

from mertools import extract
from mer_runtime import load_manifest

from conftest import ALL_MOE, is_expert_tensor, GEN, REAL, parts_of, reader_tensors, reference_bytes, run_cli


@pytest.mark.parametrize("src", ALL_MOE, ids=lambda p: p.name)
def test_every_projection_is_the_source_bytes(src, extracted):
    out = extracted(src)
    m = load_manifest(out)
    tensors = reader_tensors(src)
    n_layers = {int(n.split(".")[1]) for n in tensors if is_expert_tensor(n)}
    assert m.layers == sorted(n_layers)
    assert len(m.experts) == len(m.layers) * m.model["n_experts"]
    for e in m.experts:
        blob = (out / e.path).read_bytes()
        assert len(blob) == e.size and e.size % 4096 == 0
        assert xxhash.xxh3_64_hexdigest(blob) == e.xxh3_64
        assert list(e.tensors)[:3] == ["gate", "up", "down"]
        prev_end = 0
        for role, t in e.tensors.items():
            assert t.offset % 4096 == 0 and t.offset >= prev_end
            got = blob[t.offset:t.offset + t.nbytes]
            assert got == reference_bytes(tensors, e.layer, e.expert, role), (e.path, role)
            assert xxhash.xxh3_64_hexdigest(got) == t.xxh3_64
            assert not any(blob[prev_end:t.offset]), "padding must be zeros"
            prev_end = t.offset + t.nbytes
        assert not any(blob[prev_end:])


@pytest.mark.parametrize("src", sorted(REAL.glob("*.gguf")), ids=lambda p: p.name)
def test_real_fixtures_match_their_reference_hashes(src, extracted):
    """The shared reference data was hashed by an independent script; types per projection must match it too."""
    import numpy as np

    ref = np.load(src.with_suffix(".ref.npz"), allow_pickle=True)
    m = load_manifest(extracted(src))
    layers = [int(x) for x in ref["layers"]]
    for e in m.experts:
        li = layers.index(e.layer)
        for role in ("gate", "up", "down"):
            assert e.tensors[role].xxh3_64 == str(ref[f"{role}_xxh3"][li, e.expert])
            assert e.tensors[role].dtype == str(ref[f"{role}_type"][li, e.expert])
            assert e.tensors[role].nbytes == int(ref[f"{role}_nbytes"][li, e.expert])


def test_q4_k_m_keeps_per_layer_types(extracted):
    m = load_manifest(extracted(REAL / "mixtral-q4_k_m.gguf"))
    assert {e.tensors["down"].dtype for e in m.experts if e.layer == 0} == {"Q4_K"}
    assert {e.tensors["down"].dtype for e in m.experts if e.layer == 1} == {"Q6_K"}
    assert {e.tensors["gate"].dtype for e in m.experts} == {"Q4_K"}


def test_gptoss_biases_and_activation(extracted):
    m = load_manifest(extracted(REAL / "gptoss-mxfp4_moe.gguf"))
    e = m.expert(1, 3)
    assert set(e.tensors) == {"gate", "up", "down", "gate_bias", "up_bias", "down_bias"}
    assert e.tensors["gate"].dtype == "MXFP4" and e.tensors["down_bias"].dtype == "F32"
    assert e.tensors["down_bias"].shape == (256,)
    assert m.model["activation"]["kind"] == "swiglu_oai" and m.model["has_expert_biases"]
    assert m.model["router"]["bias"] == "blk.{layer}.ffn_gate_inp.bias"


def test_shared_expert_stays_dense(extracted):
    out = extracted(REAL / "qwen2moe-q4_k_m.gguf")
    m = load_manifest(out)
    assert m.model["n_shared_experts"] == 1 and m.model["d_ff_shared"] == 256
    names = {t.name for t in gguf.GGUFReader(out / "dense.gguf").tensors}
    assert {"blk.0.ffn_gate_shexp.weight", "blk.1.ffn_down_shexp.weight", "blk.0.ffn_gate_inp_shexp.weight"} <= names


@pytest.mark.parametrize(
    "a, b",
    [
        ("moe-merged-q4_0.gguf", "moe-perexpert-q4_0.gguf"),
        ("moe-merged-f16.gguf", "moe-perexpert-f16.gguf"),
        ("moe-merged-q8_0.gguf", "moe-fused-q8_0.gguf"),
        ("moe-merged-q4_0.gguf", "moe-split-q4_0-00001-of-00006.gguf"),
    ],
)
def test_layouts_of_the_same_weights_give_identical_shards(a, b, extracted):
    ma, mb = load_manifest(extracted(GEN / a)), load_manifest(extracted(GEN / b))
    assert [(e.layer, e.expert, e.path, e.size) for e in ma.experts] == [
        (e.layer, e.expert, e.path, e.size) for e in mb.experts
    ]
    for ea, eb in zip(ma.experts, mb.experts):
        assert (ma.root / ea.path).read_bytes() == (mb.root / eb.path).read_bytes()
    assert ma.source["layout"] != mb.source["layout"] or len(mb.source["files"]) > 1


def test_split_set_spreads_experts_over_parts_and_records_every_part(extracted):
    src = GEN / "moe-split-q4_0-00001-of-00006.gguf"
    holders = {p.name for p in parts_of(src) for t in gguf.GGUFReader(p).tensors if "_exps" in t.name}
    assert len(holders) >= 2
    m = load_manifest(extracted(src))
    assert [f["name"] for f in m.source["files"]] == [p.name for p in parts_of(src)]


@pytest.mark.parametrize("src", [REAL / "mixtral-q4_k_m.gguf", GEN / "moe-split-q4_0-00001-of-00006.gguf",
                                 REAL / "mixtral-perexpert-q8_0.gguf"], ids=lambda p: p.name)
def test_dense_gguf_keeps_every_key_and_non_expert_tensor(src, extracted):
    out = extracted(src)
    dense = gguf.GGUFReader(out / "dense.gguf")
    src_tensors = reader_tensors(src)
    dense_tensors = {t.name: t for t in dense.tensors}
    expected = {n for n in src_tensors if not is_expert_tensor(n)}
    assert set(dense_tensors) == expected
    for name, t in dense_tensors.items():
        s = src_tensors[name]
        assert t.tensor_type == s.tensor_type and list(t.shape) == list(s.shape)
        assert t.data.tobytes() == s.data.tobytes(), name
    first = gguf.GGUFReader(parts_of(src)[0])
    for key, f in first.fields.items():
        if key.startswith(("GGUF.", "split.")):
            continue
        g = dense.fields[key]
        assert g.types == f.types, key
        assert [bytes(p) for p in g.parts[1:]] == [bytes(p) for p in f.parts[1:]], key  # raw value bytes
    assert "mertools.experts_removed_from" in dense.fields
    assert not any(k.startswith("split.") for k in dense.fields)


def test_non_utf8_token_survives_in_dense(extracted):
    dense = gguf.GGUFReader(extracted(GEN / "moe-merged-q4_0.gguf") / "dense.gguf")
    f = dense.fields["tokenizer.ggml.tokens"]
    assert b"\xff\xfe not utf-8" in [bytes(f.parts[i]) for i in f.data]


def test_model_summary_for_leading_dense_layer(extracted):
    m = load_manifest(extracted(GEN / "moe-merged-q4_0.gguf"))
    assert m.model["moe_layers"] == [1, 2] and m.model["n_dense_layers"] == 1
    assert (m.model["d_model"], m.model["d_ff"], m.model["n_experts"], m.model["n_experts_used"]) == (64, 96, 4, 2)
    assert m.expert(1, 0).tensors["gate"].shape == (96, 64) and m.expert(1, 0).tensors["down"].shape == (64, 96)


def test_layer_and_expert_selection(tmp_path):
    out = tmp_path / "o"
    r = run_cli("extract", GEN / "moe-merged-q8_0.gguf", out, "--layers", "2", "--experts", "1-2", "--json", check=True)
    summary = json.loads(r.stdout)
    assert summary["experts"] == 2 and summary["layers"] == 1
    m = load_manifest(out)
    assert [(e.layer, e.expert) for e in m.experts] == [(2, 1), (2, 2)]
    assert m.raw["selection"] == {"complete": False, "layers": [2], "experts": [1, 2]}
    assert run_cli("verify", out, "-q").returncode == 0
    bad = run_cli("extract", GEN / "moe-merged-q8_0.gguf", tmp_path / "p", "--layers", "0")
    assert bad.returncode == 2 and "--layers: [0] not in the model" in bad.stderr


def test_overwrite_rules(tmp_path):
    out = tmp_path / "o"
    run_cli("extract", GEN / "moe-merged-q4_0.gguf", out, "-q", check=True)
    again = run_cli("extract", GEN / "moe-merged-f16.gguf", out, "-q")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert load_manifest(out).expert(1, 0).tensors["gate"].dtype == "Q4_0"  # untouched
    run_cli("extract", GEN / "moe-merged-f16.gguf", out, "-q", "--overwrite", check=True)
    assert load_manifest(out).expert(1, 0).tensors["gate"].dtype == "F16"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no staging or old copy left behind


def test_empty_existing_out_is_fine(tmp_path):
    (tmp_path / "o").mkdir()
    extract(GEN / "moe-merged-q4_0.gguf", tmp_path / "o", fsync=True)
    assert load_manifest(tmp_path / "o").experts


def test_cli_json_and_inspect(tmp_path):
    src = REAL / "mixtral-q4_k_m.gguf"
    info = json.loads(run_cli("inspect", src, "--json", check=True).stdout)
    assert info["kind"] == "gguf" and info["source"]["layout"] == "merged"
    assert info["layers"][1]["types"] == {"gate": "Q4_K", "up": "Q4_K", "down": "Q6_K"}
    assert info["would_write"]["shards"] == 8
    out = tmp_path / "o"
    s = json.loads(run_cli("extract", src, out, "--json", check=True).stdout)
    assert s["experts"] == 8 and s["bytes_written"] == info["would_write"]["expert_bytes"] + s["dense_bytes"]
    assert s["expert_bytes"] == info["would_write"]["expert_bytes"]
    folder = json.loads(run_cli("inspect", out, "--json", check=True).stdout)
    assert folder["kind"] == "shards" and folder["experts"] == 8
    text = run_cli("inspect", src, check=True).stdout
    assert "down=Q6_K" in text and "extract would write 8 shards" in text
    v = json.loads(run_cli("verify", out, "--json", check=True).stdout)
    assert v["ok"] and v["experts_checked"] == 8 and v["problems"] == []


# -- a split set whose parts do not belong together -----------------------------------------------------------------
SPLIT = GEN / "moe-split-q4_0-00001-of-00006.gguf"


def _split_copy(tmp_path, drop: str | None = None, swap: tuple[int, int] | None = None):
    """The split fixture copied into tmp_path: with tensor `drop` left out of the part holding it (its metadata,
    split.* included, kept: a part from another conversion), or with parts `swap` exchanging names."""
    import shutil

    from mertools.gguf_source import field_value

    parts = parts_of(SPLIT)
    for p in parts:
        shutil.copy(p, tmp_path / p.name)
    if swap:
        a, b = (tmp_path / parts[i].name for i in swap)
        a.rename(tmp_path / "x"), b.rename(a), (tmp_path / "x").rename(b)
    if drop:
        part = next(p for p in parts if drop in (t.name for t in gguf.GGUFReader(p).tensors))
        r = gguf.GGUFReader(part)
        w = gguf.GGUFWriter(tmp_path / part.name, "llama")  # (only the first part has general.architecture)
        for k, f in r.fields.items():
            if not k.startswith("GGUF.") and k != "general.architecture":
                t = f.types[0]
                w.add_key_value(k, field_value(f), t, f.types[-1] if t == gguf.GGUFValueType.ARRAY else None)
        for t in r.tensors:
            if t.name != drop:
                w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return tmp_path / parts[0].name


@pytest.mark.parametrize("case,needle", [
    ("drop", "split.tensors.count=22 but the parts of the set hold 21 tensors"),
    ("swap", "split.no=3 (part 4 of the set) but is named as part 3"),
])
def test_a_split_set_whose_parts_disagree_is_refused(tmp_path, case, needle):
    """A part from another conversion (a dense tensor missing: extract wrote a dense.gguf without it), or parts
    whose names were exchanged, went through; llama.cpp refuses both (split.tensors.count, split.no)."""
    first = _split_copy(tmp_path, drop="blk.2.attn_q.weight") if case == "drop" else _split_copy(tmp_path, swap=(2, 3))
    p = run_cli("extract", first, tmp_path / "out", "-q", "--no-fsync")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()
