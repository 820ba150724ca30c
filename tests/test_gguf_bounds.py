"""Hostile GGUF headers and tensor tables: every one is refused with one line naming the file and what is wrong,
quickly and without a traceback; per-expert `.scale` companions are carried and applied exactly."""

from __future__ import annotations

import json
import os
import struct

import gguf
import numpy as np
import pytest
from gguf.constants import GGUFValueType as VT

from conftest import GEN, REAL, run_cli
from mertools.errors import SourceError
from mertools.gguf_header import MAX_DEPTH, scan_header
from mertools.gguf_source import open_source
from mer_runtime.errors import MerError
from mer_runtime.manifest import load_manifest
from mer_runtime.shards import open_shards

BASE = GEN / "moe-merged-q8_0.gguf"


# -- a raw GGUF builder (struct only: nothing of the code under test) ------------------------------------------
def s(b: str | bytes) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tinfo(name: str | bytes, ne: list[int], ttype: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) + struct.pack("<IQ", ttype, offset)


def gguf_bytes(kvs: list[bytes], infos: list[bytes], data: bytes = b"", n_kv: int | None = None,
               n_tensors: int | None = None, align: int = 32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos)
    head += bytes(-len(head) % align)
    return head + data


def refuse(tmp_path, blob: bytes, *needles: str, name: str = "bad.gguf", cli: bool = False) -> str:
    """The library refuses the file with one SourceError line; with `cli`, so does `mertools inspect` (exit 2)."""
    f = tmp_path / name
    f.write_bytes(blob)
    with pytest.raises(SourceError) as ei:
        open_source(f)
    msg = str(ei.value)
    assert name in msg and "\n" not in msg
    for n in needles:
        assert n in msg, msg
    if not cli:
        return msg
    p = run_cli("inspect", f)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    return msg


ARCH = kv("general.architecture", VT.STRING, s("llama"))


def test_array_count_far_past_the_end(tmp_path):
    arr = kv("tokenizer.ggml.scores", VT.ARRAY, struct.pack("<IQ", VT.FLOAT32, 1 << 62) + b"\0" * 64)
    refuse(tmp_path, gguf_bytes([ARCH, arr], []), "'tokenizer.ggml.scores'", "elements of FLOAT32", cli=True)


def test_string_array_count_past_the_end(tmp_path):
    arr = kv("tokenizer.ggml.tokens", VT.ARRAY, struct.pack("<IQ", VT.STRING, 10_000) + s("a") * 3)
    refuse(tmp_path, gguf_bytes([ARCH, arr], []), "'tokenizer.ggml.tokens'")


def test_arrays_nested_thousands_deep(tmp_path):
    payload = struct.pack("<IQ", VT.ARRAY, 1) * 5000 + struct.pack("<IQ", VT.UINT8, 1) + b"\x01"
    refuse(tmp_path, gguf_bytes([ARCH, kv("deep", VT.ARRAY, payload)], []), "'deep'", f"more than {MAX_DEPTH} deep", cli=True)


def test_string_length_past_the_end(tmp_path):
    bad = s("general.name") + struct.pack("<I", VT.STRING) + struct.pack("<Q", 1 << 63) + b"abc"
    refuse(tmp_path, gguf_bytes([ARCH, bad], []), "'general.name'")


@pytest.mark.parametrize("n_kv,n_tensors,needle", [(1 << 60, 0, "metadata pairs"), (1, 1 << 60, "tensors")])
def test_counts_past_the_end(tmp_path, n_kv, n_tensors, needle):
    refuse(tmp_path, gguf_bytes([ARCH], [], n_kv=n_kv, n_tensors=n_tensors), needle)


def test_unknown_value_type_and_invalid_utf8_key(tmp_path):
    refuse(tmp_path, gguf_bytes([ARCH, kv("odd", 77, b"\0" * 8)], []), "'odd'", "value type id 77")
    refuse(tmp_path, gguf_bytes([ARCH, s(b"\xff\xfe") + struct.pack("<I", VT.UINT8) + b"\1"], []), "not valid UTF-8")


def test_too_many_dimensions_and_zero_dims(tmp_path):
    refuse(tmp_path, gguf_bytes([ARCH], [tinfo("t", [1] * 5000, 0, 0)]), "'t'", "dimensions")
    # a zero-sized dimension and a huge expert dimension: refused at once, never planned expert by expert
    blob = gguf_bytes([ARCH], [tinfo("blk.0.ffn_gate_exps.weight", [0, 32, 1 << 40], 0, 0)], b"\0" * 64)
    refuse(tmp_path, blob, "'blk.0.ffn_gate_exps.weight'", "zero-sized", cli=True)


def test_element_count_that_would_wrap(tmp_path):
    blob = gguf_bytes([ARCH], [tinfo("w", [1 << 32, 1 << 32, 1 << 32], 0, 0)], b"\0" * 64)
    refuse(tmp_path, blob, "'w'", "runs past the end")


def _moe_tensor_table(offsets: dict[str, int] | None = None, names: list[str] | None = None,
                      align: int = 32, extra_kv: list[bytes] = ()) -> bytes:
    """A tiny F32 MoE (d_model 32, d_ff 32, 2 experts, one layer) with tensor offsets that can be forged."""
    names = names or [f"blk.0.ffn_{r}_exps.weight" for r in ("gate", "up", "down")]
    nbytes = 32 * 32 * 2 * 4
    offsets = offsets or {}
    infos, pos = [], 0
    for n in names:
        infos.append(tinfo(n, [32, 32, 2], 0, offsets.get(n, pos)))
        pos += nbytes
    kvs = [ARCH, *extra_kv]
    if align != 32:
        kvs.append(kv("general.alignment", VT.UINT32, struct.pack("<I", align)))
    weights = np.random.default_rng(0).standard_normal(pos // 4).astype(np.float32) * 0.1
    return gguf_bytes(kvs, infos, weights.tobytes(), align=align)


def test_forged_table_is_fine_when_honest(tmp_path):
    f = tmp_path / "ok.gguf"
    f.write_bytes(_moe_tensor_table())
    assert open_source(f).model["n_experts"] == 2


def test_overlapping_tensors_are_refused(tmp_path):
    blob = _moe_tensor_table({"blk.0.ffn_up_exps.weight": 4096})  # inside gate's 8192 bytes
    refuse(tmp_path, blob, "'blk.0.ffn_gate_exps.weight'", "'blk.0.ffn_up_exps.weight'", "overlap", cli=True)


def test_misaligned_tensor_is_refused(tmp_path):
    blob = _moe_tensor_table({"blk.0.ffn_down_exps.weight": 2 * 8192 + 4})
    refuse(tmp_path, blob, "'blk.0.ffn_down_exps.weight'", "alignment 32")


def test_custom_alignment_is_honoured(tmp_path):
    f = tmp_path / "a64.gguf"
    f.write_bytes(_moe_tensor_table(align=64))
    src = open_source(f)
    assert src.alignment == 64 and src.tensors["blk.0.ffn_up_exps.weight"].offset % 64 == 0
    out = tmp_path / "o"
    run_cli("extract", f, out, "-q", check=True)
    run_cli("verify", out, "--deep", "--against", f, check=True)
    assert gguf.GGUFReader(out / "dense.gguf").alignment == 64
    blob = _moe_tensor_table({"blk.0.ffn_up_exps.weight": 8192 + 32}, align=64)  # aligned to 32, not to 64
    refuse(tmp_path, blob, "'blk.0.ffn_up_exps.weight'", "alignment 64")


@pytest.mark.parametrize("value,needle", [(struct.pack("<I", 48), "not a power of two"),
                                          (struct.pack("<I", 1 << 30), "not a power of two")])
def test_bad_alignment(tmp_path, value, needle):
    blob = gguf_bytes([ARCH, kv("general.alignment", VT.UINT32, value)], [])
    refuse(tmp_path, blob, "general.alignment", needle)


def test_alignment_of_the_wrong_type(tmp_path):
    blob = gguf_bytes([ARCH, kv("general.alignment", VT.STRING, s("32"))], [])
    refuse(tmp_path, blob, "general.alignment", "UINT32")


@pytest.mark.parametrize("number", ["99999999999", "7" * 4000])
def test_huge_expert_numbers(tmp_path, number):
    names = [f"blk.0.ffn_{r}.{number}.weight" for r in ("gate", "up", "down")]
    refuse(tmp_path, _moe_tensor_table(names=names), "out of range")


def test_expert_numbers_with_a_gap(tmp_path):
    names = [f"blk.0.ffn_{r}.{e}.weight" for r in ("gate", "up", "down") for e in (0, 5)]
    nbytes = 32 * 32 * 4
    infos = [tinfo(n, [32, 32], 0, i * nbytes) for i, n in enumerate(names)]
    blob = gguf_bytes([ARCH], infos, bytes(nbytes * len(names)))
    refuse(tmp_path, blob, "missing for experts [1, 2, 3, 4]")


@pytest.mark.parametrize("digits,needles", [(4000, ("block number", "out of range")), (5000, ("limit 4096",))])
def test_huge_block_number(tmp_path, digits, needles):
    """Numbers too long for int() (Python refuses > 4300 digits) never reach it."""
    names = [f"blk.{'9' * digits}.ffn_{r}_exps.weight" for r in ("gate", "up", "down")]
    refuse(tmp_path, _moe_tensor_table(names=names), *needles)


def test_hostile_tensor_name_stays_on_one_line(tmp_path):
    name = "blk.0.ffn_gate_exps.weight\n" + "x" * 3000
    msg = refuse(tmp_path, _moe_tensor_table(names=[name, "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"]),
                 "routed-expert", cli=True)
    assert len(msg) < 2000


@pytest.mark.parametrize("name", ["blk.1.ffn_gate_exps.input_scale", "blk.1.ffn_norm_exps.weight",
                                  "blk.1.ffn_gate_up_exps.scale", "blk.1.ffn_gate.0.scale", "blk.1.ffn_gate_chexps.weight"])
def test_unknown_expert_tensor_is_refused_not_sent_to_dense(tmp_path, name):
    extra = {name: np.ones((4, 96) if "chexps" in name or "norm" in name else (4,), np.float32)}
    f = rewrite(tmp_path / "x.gguf", extra=extra)
    p = run_cli("extract", f, tmp_path / "out", "-q")
    assert p.returncode == 2 and name in p.stderr and "does not know how to carry" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


# -- wrong metadata types (written with the gguf package's writer) -----------------------------------------------
def rewrite(dst, extra=None, kv_override=None, drop=()):
    """BASE rewritten with extra tensors and metadata values of forced types: {key: (value, GGUFValueType)}."""
    r = gguf.GGUFReader(BASE)
    w = gguf.GGUFWriter(dst, "llama")
    base = {"llama.block_count": (3, VT.UINT32), "llama.embedding_length": (64, VT.UINT32),
            "llama.expert_count": (4, VT.UINT32), "llama.expert_used_count": (2, VT.UINT32)}
    for k, (v, t) in {**base, **(kv_override or {})}.items():
        if k in drop:
            continue
        sub = None
        if t == VT.ARRAY:
            sub = VT.UINT32
        w.add_key_value(k, v, t, sub)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return dst


@pytest.mark.parametrize("key,value,vtype", [
    ("llama.expert_count", float("nan"), VT.FLOAT32),
    ("llama.expert_count", "4", VT.STRING),
    ("llama.expert_count", [4], VT.ARRAY),
    ("llama.block_count", float("inf"), VT.FLOAT64),
    ("llama.embedding_length", "64", VT.STRING),
    ("llama.expert_used_count", -1.0, VT.FLOAT32),
    ("llama.expert_used_count", 99, VT.UINT32),
    ("llama.expert_count", 1 << 40, VT.UINT64),
])
def test_metadata_of_the_wrong_type(tmp_path, key, value, vtype):
    f = rewrite(tmp_path / "t.gguf", kv_override={key: (value, vtype)})
    with pytest.raises(SourceError) as ei:
        open_source(f)
    assert key in str(ei.value) and "t.gguf" in str(ei.value) and "\n" not in str(ei.value)
    if vtype == VT.STRING:  # and through the CLI: exit 2, one line
        p = run_cli("extract", f, tmp_path / "out", "-q")
        assert p.returncode == 2 and key in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


def test_nested_array_metadata_is_named_when_dense_cannot_copy_it(tmp_path):
    blob = _moe_tensor_table(extra_kv=[kv("odd.nested", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 1)
                                          + struct.pack("<IQ", VT.UINT8, 2) + b"\1\2")])
    f = tmp_path / "n.gguf"
    f.write_bytes(blob)
    p = run_cli("extract", f, tmp_path / "out", "-q")
    assert p.returncode == 2 and "odd.nested" in p.stderr and "array of arrays" in p.stderr, p.stderr


# -- per-expert scales -----------------------------------------------------------------------------------------
SCALES = {"gate": [0.5, 2.0, -1.5, 3.0], "up": [1.25, -0.75, 4.0, 0.125], "down": [2.0, 0.5, -3.0, 1.5]}


def scaled_model(tmp_path):
    extra = {f"blk.{b}.ffn_{r}_exps.scale": np.array(v, np.float32) * (b + 1) for b in (1, 2) for r, v in SCALES.items()}
    return rewrite(tmp_path / "scaled.gguf", extra=extra)


def _silu(v):
    return v / (1.0 + np.exp(-v))


def test_scales_are_carried_checked_and_applied(tmp_path):
    f = scaled_model(tmp_path)
    out = tmp_path / "o"
    run_cli("extract", f, out, "-q", check=True)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format_version"] == 2  # a version-1 reader refuses it instead of ignoring the scales
    m = load_manifest(out)
    src = {t.name: t for t in gguf.GGUFReader(f).tensors}
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    with open_shards(out, io="buffered", cache_slots=2) as shards:
        for e in m.experts:
            blob = (out / e.path).read_bytes()
            for r in ("gate", "up", "down"):
                t = e.tensors[f"{r}_scale"]
                assert t.offset % 4096 == 0 and t.shape == (1,) and t.dtype == "F32"
                assert blob[t.offset:t.offset + 4] == src[f"blk.{e.layer}.ffn_{r}_exps.scale"].data[e.expert].tobytes()
            # the reference, from first principles: gguf dequantizes the source slices, float64 everywhere else
            w = {r: gguf.dequantize(src[f"blk.{e.layer}.ffn_{r}_exps.weight"].data[e.expert],
                                    gguf.GGMLQuantizationType.Q8_0).astype(np.float64) for r in ("gate", "up", "down")}
            sc = {r: float(SCALES[r][e.expert]) * (e.layer + 1) for r in SCALES}
            xd = x.astype(np.float64)
            h = _silu(sc["gate"] * xd @ w["gate"].T) * (sc["up"] * xd @ w["up"].T)
            want = sc["down"] * h @ w["down"].T
            got = shards.ffn(e.layer, e.expert, x)
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    run_cli("verify", out, check=True)
    run_cli("verify", out, "--deep", "--against", f, check=True)
    run_cli("verify", out, "--deep", check=True)


def test_changed_scale_byte_fails_verify(tmp_path):
    f = scaled_model(tmp_path)
    out = tmp_path / "o"
    run_cli("extract", f, out, "-q", check=True)
    e = load_manifest(out).experts[0]
    path = out / e.path
    data = bytearray(path.read_bytes())
    data[e.tensors["down_scale"].offset + 3] ^= 0x40
    path.write_bytes(bytes(data))
    assert run_cli("verify", out).returncode == 1


def test_scale_roles_in_a_version_1_manifest_are_refused(tmp_path):
    f = scaled_model(tmp_path)
    out = tmp_path / "o"
    run_cli("extract", f, out, "-q", check=True)
    raw = json.loads((out / "manifest.json").read_text())
    raw["format_version"] = 1
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(MerError, match="needs format_version 2"):
        load_manifest(out)


def test_folders_without_scales_stay_version_1(extracted):
    assert json.loads((extracted(REAL / "mixtral-q4_0.gguf") / "manifest.json").read_text())["format_version"] == 1


def test_walk_agrees_with_the_gguf_reader_on_every_fixture():
    """The bounded walk and the gguf package parse every committed fixture identically (types, tensor ranges)."""
    for p in sorted(REAL.glob("*.gguf")) + sorted(GEN.glob("*.gguf")):
        r = gguf.GGUFReader(p)
        h = scan_header(p, p.read_bytes())
        assert h.alignment == r.alignment and h.data_offset == r.data_offset, p
        assert {k: f.types for k, f in r.fields.items() if not k.startswith("GGUF.")} == h.kv_types, p
        assert [(t.name, t.data_offset, t.n_bytes) for t in r.tensors] == [(t.name, t.start, t.nbytes) for t in h.tensors]


def test_fifo_as_source_is_refused_without_blocking(tmp_path):
    f = tmp_path / "pipe.gguf"
    os.mkfifo(f)
    with pytest.raises(SourceError, match="not a regular file"):
        open_source(f)


def test_walk_reads_big_endian_files_as_the_reader_does(tmp_path):
    f = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(f, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_expert_count(4)
    w.add_array("x.list", [1, 2, 3])
    w.add_tensor("t", np.arange(64, dtype=np.float32).byteswap())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    r = gguf.GGUFReader(f)
    h = scan_header(f, f.read_bytes())
    assert (r.byte_order, h.byte_order) == ("S", ">")
    assert h.kv_types == {k: v.types for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert [(t.name, t.start, t.nbytes) for t in h.tensors] == [(t.name, t.data_offset, t.n_bytes) for t in r.tensors]


def _set_scale(folder, e, role, value):
    """Write `value` (float32) as expert e's `role` and rewrite its file and projection checksums and the manifest's
    own, so that the shallow checks pass and only the numeric check can see it."""
    import xxhash
    from mer_runtime.manifest import manifest_bytes

    p = folder / e.path
    data = bytearray(p.read_bytes())
    t = e.tensors[role]
    data[t.offset:t.offset + 4] = np.float32(value).tobytes()
    p.write_bytes(bytes(data))
    mpath = folder / "manifest.json"
    raw = json.loads(mpath.read_text())
    ent = next(x for x in raw["experts"] if x["path"] == e.path)
    ent["xxh3_64"] = xxhash.xxh3_64_hexdigest(bytes(data))
    for r in ent["tensors"].values():
        r["xxh3_64"] = xxhash.xxh3_64_hexdigest(bytes(data[r["offset"]:r["offset"] + r["nbytes"]]))
    mpath.write_bytes(manifest_bytes(raw))


@pytest.mark.parametrize("role, value", [("down_scale", float("nan")), ("gate_scale", float("inf")),
                                         ("up_scale", float("-inf"))])
@pytest.mark.parametrize("mode", ["whole", "loader", "rows"])
def test_a_non_finite_scale_with_rewritten_checksums_fails_deep_verify(tmp_path, role, value, mode):
    """A NaN or inf per-expert scale makes every output of its projection (and so of the expert) NaN or inf on both
    sides of the comparison (the reference applies the same shard value), and the sampled rows never read the scale:
    deep verify without --against used to pass such a folder. It is now a problem naming the file and the role."""
    from mertools import verify
    from mertools.deep import deep_verify
    from mertools.report import VerifyReport

    f = scaled_model(tmp_path)
    out = tmp_path / "o"
    run_cli("extract", f, out, "-q", check=True)
    m = load_manifest(out)
    e = m.expert(1, 2)
    _set_scale(out, e, role, value)
    assert verify(out).ok  # the checksums no longer see it
    r = VerifyReport(out)
    kw = {"whole": {}, "loader": {"whole_budget": 0}, "rows": {"whole_budget": 0, "runtime_experts": 0}}[mode]
    deep_verify(r, load_manifest(out), **kw)
    assert not r.ok
    assert [p.path for p in r.problems] == [e.path], r.problems  # only that expert
    what = r.problems[0].what
    assert role in what and str(np.float32(value)) in what and "re-extract" in what, what
    assert r.deep["experts_run"] == len(m.experts) - 1  # reported, not counted as compared


def test_a_non_finite_scale_fails_verify_deep_on_the_command_line(tmp_path):
    f = scaled_model(tmp_path)
    out = tmp_path / "o"
    run_cli("extract", f, out, "-q", check=True)
    e = load_manifest(out).expert(2, 0)
    _set_scale(out, e, "down_scale", float("nan"))
    run_cli("verify", out, check=True)
    p = run_cli("verify", out, "--deep", "-q")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    fails = [ln for ln in p.stdout.splitlines() if ln.startswith("FAIL")]
    assert len(fails) == 1 and e.path in fails[0] and "down_scale" in fails[0] and "nan" in fails[0], p.stdout
    # with --against the byte comparison names it too, and the numeric check still says what the value does
    p = run_cli("verify", out, "--deep", "--against", f, "-q")
    assert p.returncode == 1 and "does not match the source bytes" in p.stdout and "down_scale is nan" in p.stdout, \
        p.stdout
