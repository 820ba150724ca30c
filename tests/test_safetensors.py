"""SafeTensors sources: every layout of the table extracts exactly, passes verify --deep --against, and the real
transformers checkpoints give the reference outputs.

Expected bytes are computed here from the checkpoint as the `safetensors` library loads it (NumPy arrays, BF16/FP8
through ml_dtypes) with plain NumPy slicing that states each layout independently of mertools' layout table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import ml_dtypes  # noqa: F401  (lets safetensors' NumPy loader hand back BF16 and FP8 arrays)
import numpy as np
import pytest
import xxhash
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from safetensors import safe_open

from conftest import FIX, ROOT, run_cli, shard_bytes, st_folder
from mer_runtime import load_manifest, open_shards

ST = FIX / "safetensors"
GEN = ST / "gen"
REAL = ST / "real"
GEN_ALL = sorted(p.name for p in GEN.iterdir() if p.is_dir())
FP8 = "deepseek_v3_fp8"
NATIVE = [n for n in GEN_ALL if n != FP8] + ["real/mixtral-bf16-sharded", "real/gptoss-bf16"]


folder = st_folder


def load(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as the safetensors library loads it (FP8, which its NumPy loader cannot
    hand back, read straight from the header's offsets as ml_dtypes' float8_e4m3fn)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="np") as fh:
            for k in fh.keys():
                if fh.get_slice(k).get_dtype() == "F8_E4M3":
                    out[k] = _fp8(f, k)
                else:
                    out[k] = fh.get_tensor(k)
    return out


def _fp8(f: Path, name: str) -> np.ndarray:
    blob = f.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    h = json.loads(blob[8:8 + n])[name]
    b, e = h["data_offsets"]
    return np.frombuffer(blob[8 + n + b:8 + n + e], ml_dtypes.float8_e4m3fn).reshape(h["shape"])


# -- each layout stated on its own: (layer, expert, role) -> the projection as [out, in] (or [n]) -------------------
MIX = {"gate": "w1", "up": "w3", "down": "w2"}


def _per_expert(stem: str, names: dict[str, str] | None = None):
    def get(t, L, e, role):
        return t[f"model.layers.{L}.{stem}.{e}.{(names or {}).get(role, role + '_proj')}.weight"]
    return get


def _rows_fused(prefix: str, gate_up: str, down: str):  # [E, 2F, H] gate rows first, [E, H, F]
    def get(t, L, e, role):
        if role == "down":
            return t[prefix.format(L) + down][e]
        gu = t[prefix.format(L) + gate_up][e]
        f = gu.shape[0] // 2
        return gu[:f] if role == "gate" else gu[f:]
    return get


def _input_major(prefix: str):  # [E, H, 2F] gate = first F columns; [E, F, H]; both transposed
    def get(t, L, e, role):
        if role == "down":
            return t[prefix.format(L) + "experts.down_proj"][e].T
        gu = t[prefix.format(L) + "experts.gate_up_proj"][e]
        f = gu.shape[1] // 2
        return (gu[:, :f] if role == "gate" else gu[:, f:]).T
    return get


def _qwen35(t, L, e, role):
    if L == 0:
        return _rows_fused("model.layers.{}.", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")(t, L, e, role)
    return _per_expert("mlp.experts")(t, L, e, role)


def _dbrx(t, L, e, role):
    name = {"gate": "w1", "up": "v1", "down": "w2"}[role]
    a = t[f"transformer.blocks.{L}.ffn.experts.mlp.{name}"]
    n_exp = 2
    per = a.reshape(n_exp, a.shape[0] // n_exp, a.shape[1])[e]
    return per.T if role == "down" else per  # w2 holds [in, out]


def _gptoss_bf16(t, L, e, role):
    p = f"model.layers.{L}.mlp.experts."
    if role in ("gate", "up"):
        return t[p + "gate_up_proj"][e][:, slice(0 if role == "gate" else 1, None, 2)].T
    if role == "down":
        return t[p + "down_proj"][e].T
    if role in ("gate_bias", "up_bias"):
        return t[p + "gate_up_proj_bias"][e][slice(0 if role == "gate_bias" else 1, None, 2)]
    return t[p + "down_proj_bias"][e]


EXPECT = {
    "mixtral": _per_expert("block_sparse_moe.experts", MIX), "phimoe": _per_expert("block_sparse_moe.experts", MIX),
    "minimax": _per_expert("block_sparse_moe.experts", MIX),
    "minimax_m2": _per_expert("block_sparse_moe.experts", MIX),
    "real/mixtral-bf16-sharded": _per_expert("block_sparse_moe.experts", MIX),
    **{k: _per_expert("mlp.experts") for k in ("qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v2",
                                                "glm4_moe", "ernie4_5_moe")},
    "jamba": _per_expert("feed_forward.experts"),
    "qwen3_5_moe": _qwen35,
    "granitemoeshared": _rows_fused("model.layers.{}.", "block_sparse_moe.input_linear.weight",
                                    "block_sparse_moe.output_linear.weight"),
    "llama4": _input_major("language_model.model.layers.{}.feed_forward."),
    "qwen3_vl_moe": _input_major("model.language_model.layers.{}.mlp."),
    "dbrx": _dbrx,
    "gpt_oss_bf16": _gptoss_bf16, "real/gptoss-bf16": _gptoss_bf16,
}

MXFP4_LUT = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])


def _mxfp4_values(t, L, e, role):
    """GPT-OSS MXFP4 as transformers dequantizes it: lut[low nibble] = element 2i, lut[high] = 2i+1, x 2^(s-127)."""
    p = f"model.layers.{L}.mlp.experts."
    name = "down_proj" if role == "down" else "gate_up_proj"
    blocks, scales = t[p + name + "_blocks"][e], t[p + name + "_scales"][e]
    rows, nblk, _ = blocks.shape
    vals = np.empty((rows, nblk, 32))
    vals[..., 0::2] = MXFP4_LUT[blocks & 15]
    vals[..., 1::2] = MXFP4_LUT[blocks >> 4]
    vals *= 2.0 ** (scales.astype(np.float64) - 127)[..., None]
    vals = vals.reshape(rows, nblk * 32)
    return vals if role == "down" else vals[0::2] if role == "gate" else vals[1::2]





@pytest.mark.parametrize("name", [n for n in NATIVE if n != "gpt_oss_mxfp4"])
def test_every_projection_is_the_source_slice_after_its_transform(name, st_extracted):
    out = st_extracted(name)
    t = load(folder(name))
    m = load_manifest(out)
    assert m.experts
    for e in m.experts:
        for role, te in e.tensors.items():
            want = np.ascontiguousarray(EXPECT[name](t, e.layer, e.expert, role))
            assert list(want.shape) == list(te.shape), (name, e.path, role)
            assert shard_bytes(out, e, role) == want.tobytes(), (name, e.path, role)


def test_mxfp4_is_repacked_into_ggml_blocks_exactly(st_extracted):
    out = st_extracted("gpt_oss_mxfp4")
    t = load(GEN / "gpt_oss_mxfp4")
    m = load_manifest(out)
    for e in m.experts:
        for role in ("gate", "up", "down"):
            te = e.tensors[role]
            assert te.dtype == "MXFP4"
            raw = np.frombuffer(shard_bytes(out, e, role), np.uint8).reshape(te.shape[0], -1)
            got = dequantize(raw, T.MXFP4).astype(np.float64)
            np.testing.assert_array_equal(got, _mxfp4_values(t, e.layer, e.expert, role))
            # ggml block = scale byte, then 16 bytes: the E8M0 exponent is carried over unchanged
            p = f"model.layers.{e.layer}.mlp.experts.{'down_proj' if role == 'down' else 'gate_up_proj'}_scales"
            sc = t[p][e.expert]
            sc = sc if role == "down" else sc[0::2] if role == "gate" else sc[1::2]
            np.testing.assert_array_equal(raw.reshape(te.shape[0], -1, 17)[..., 0], sc)
            # and the nibbles byte for byte (values alone would not tell +0 from -0): element k of a block is
            # nibble k % 2 of source byte k // 2; ggml byte j holds element j low and element j + 16 high
            p = p.replace("_scales", "_blocks")
            blk = t[p][e.expert]
            blk = blk if role == "down" else blk[0::2] if role == "gate" else blk[1::2]
            codes = [(blk[..., k // 2] >> (4 * (k % 2))) & 15 for k in range(32)]
            for j in range(16):
                np.testing.assert_array_equal(raw.reshape(te.shape[0], -1, 17)[..., 1 + j],
                                              codes[j] | (codes[j + 16] << 4))
        for role in ("gate_bias", "up_bias", "down_bias"):
            want = np.ascontiguousarray(_gptoss_bf16(t, e.layer, e.expert, role))
            assert shard_bytes(out, e, role) == want.tobytes()


@pytest.mark.parametrize("name", NATIVE)
def test_verify_deep_against_the_checkpoint(name, st_extracted):
    from mertools.verify import verify

    r = verify(st_extracted(name), deep=True, against=folder(name))
    assert r.ok, [str(p) for p in r.problems]
    assert r.deep["experts_run"] == len(load_manifest(st_extracted(name)).experts)
    assert not r.warnings


def test_real_mixtral_outputs_and_hashes_match_the_reference(st_extracted):
    ref = np.load(REAL / "mixtral-bf16-sharded.ref.npz")
    out = st_extracted("real/mixtral-bf16-sharded")
    m = load_manifest(out)
    assert len(m.experts) == ref["y"].shape[0] * ref["y"].shape[1]
    with open_shards(out, cache_slots=2) as s:
        for li, layer in enumerate(ref["layers"]):
            for e in range(int(ref["n_experts"])):
                y = s.ffn(int(layer), e, ref["x"]).astype(np.float64)
                want = ref["y"][li, e]
                assert np.abs(y - want).max() <= 1e-5 * np.abs(want).max()
                entry = m.expert(int(layer), e)
                for role in ("gate", "up", "down"):
                    assert xxhash.xxh3_64_hexdigest(shard_bytes(out, entry, role)) == ref[f"{role}_xxh3"][li, e]


def test_real_gptoss_gives_the_native_gptoss_expert(st_extracted):
    ref = np.load(REAL / "gptoss-bf16.ref.npz")
    out = st_extracted("real/gptoss-bf16")
    m = load_manifest(out)
    assert m.model["activation"] == {"kind": "swiglu_oai", "alpha": 1.702, "limit": 7.0}
    with open_shards(out, cache_slots=2) as s:
        for li, layer in enumerate(ref["layers"]):
            for e in range(int(ref["n_experts"])):
                y = s.ffn(int(layer), e, ref["x"]).astype(np.float64)
                want = ref["y_gptoss_native"][li, e]
                assert np.abs(y - want).max() <= 1e-5 * np.abs(want).max()


def _gguf_expert_bytes(path: Path, layer: int, expert: int, role: str) -> bytes:
    r = gguf.GGUFReader(path)
    return {t.name: t for t in r.tensors}[f"blk.{layer}.ffn_{role}_exps.weight"].data[expert].tobytes()


def test_dtype_q4_0_gives_llama_cpp_bytes(tmp_path):
    """llama.cpp converted and quantized the same BF16 weights: the shards must be its expert bytes exactly."""
    out = tmp_path / "q4"
    p = run_cli("extract", REAL / "mixtral-bf16-sharded", out, "--dtype", "q4_0", "--json", "--no-fsync")
    assert p.returncode == 0, p.stderr
    reader = gguf.GGUFReader(FIX / "real" / "mixtral-q4_0.gguf")
    tensors = {t.name: t for t in reader.tensors}
    m = load_manifest(out)
    assert len(m.experts) == 8
    for e in m.experts:
        for role in ("gate", "up", "down"):
            assert e.tensors[role].dtype == "Q4_0"
            want = tensors[f"blk.{e.layer}.ffn_{role}_exps.weight"].data[e.expert].tobytes()
            assert shard_bytes(out, e, role) == want, (e.path, role)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["dtype"] == "q4_0"
    assert manifest["experts"][0]["tensors"]["gate"]["transform"] == "quantize"
    p = run_cli("verify", out, "--deep", "--against", REAL / "mixtral-bf16-sharded")
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("dtype,qtype", [("q8_0", T.Q8_0), ("f16", T.F16), ("bf16", T.BF16)])
def test_dtype_converts_with_ggufs_quantizer(dtype, qtype, st_extracted):
    out = st_extracted("gpt_oss_bf16", dtype)
    t = load(GEN / "gpt_oss_bf16")
    m = load_manifest(out)
    for e in m.experts:
        for role in ("gate", "up", "down"):
            vals = np.ascontiguousarray(_gptoss_bf16(t, e.layer, e.expert, role)).astype(np.float32)
            want = quantize(vals, qtype)
            assert e.tensors[role].dtype == qtype.name
            assert shard_bytes(out, e, role) == want.tobytes()
        assert e.tensors["gate_bias"].dtype == "BF16"  # biases keep their type


def test_fp8_needs_dtype_and_converts_with_its_block_scales(tmp_path, st_extracted):
    p = run_cli("extract", GEN / FP8, tmp_path / "o")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "--dtype" in p.stderr and "F8_E4M3" in p.stderr
    assert not (tmp_path / "o").exists()
    out = st_extracted(FP8, "bf16")
    t = load(GEN / FP8)
    m = load_manifest(out)
    for e in m.experts:
        for role in ("gate", "up", "down"):
            name = f"model.layers.{e.layer}.mlp.experts.{e.expert}.{role}_proj.weight"
            w, s = t[name].astype(np.float32), t[name + "_scale_inv"]
            full = np.repeat(np.repeat(s, 128, 0), 128, 1)[:w.shape[0], :w.shape[1]]
            want = (w * full).astype(ml_dtypes.bfloat16)
            assert shard_bytes(out, e, role) == want.tobytes()
    from mertools.verify import verify

    assert verify(out, deep=True, against=GEN / FP8).ok


def test_mtp_and_leading_dense_layers(st_extracted):
    m = load_manifest(st_extracted("glm4_moe"))
    assert m.model["moe_layers"] == [1, 2]  # block 0 dense, block 2 = num_hidden_layers is the MTP layer
    assert m.model["n_mtp_layers"] == 1 and m.model["n_dense_layers"] == 1 and m.model["n_shared_experts"] == 1
    assert m.model["router"]["selection_bias"] == "model.layers.{layer}.mlp.gate.e_score_correction_bias"
    assert load_manifest(st_extracted("jamba")).model["moe_layers"] == [1, 3]


def test_dense_gguf_holds_every_other_tensor_under_its_hf_name(st_extracted):
    out = st_extracted("qwen2_moe")
    r = gguf.GGUFReader(out / "dense.gguf")
    names = {t.name for t in r.tensors}
    t = load(GEN / "qwen2_moe")
    want = {k for k in t if ".mlp.experts." not in k}
    assert names == want
    for rt in r.tensors:
        src = t[rt.name]
        assert rt.tensor_type.name == {"bfloat16": "BF16", "float32": "F32"}[str(src.dtype)]
        assert np.asarray(rt.data).tobytes() == np.ascontiguousarray(src).tobytes()
    cfg = json.loads(bytes(r.fields["mertools.hf_config"].parts[-1]).decode())
    assert cfg["model_type"] == "qwen2_moe"


def test_inspect_a_checkpoint_folder():
    p = run_cli("inspect", GEN / "gpt_oss_mxfp4", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["kind"] == "safetensors" and d["model"]["n_experts"] == 2
    assert "gate: deinterleave+repack" in d["transforms"]
    p = run_cli("inspect", GEN / FP8)
    assert p.returncode == 0 and "needs --dtype" in p.stdout


def test_generator_is_deterministic(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_st_fixtures.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    committed = sorted(p.relative_to(GEN) for p in GEN.rglob("*") if p.is_file())
    assert committed == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in committed:
        assert (GEN / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


# -- the staged API pull uses: plan from headers, convert shard by shard ---------------------------------------------
@pytest.mark.parametrize("name", ["deepseek_v2", "real/mixtral-bf16-sharded"])
def test_convert_shard_by_shard_from_headers(tmp_path, st_extracted, name):
    from mertools.convert import build_manifest, open_dense, plan, write_experts, write_manifest
    from mertools.sources.safetensors import SafeTensorsSource, read_header

    src_dir = folder(name)
    cfg = json.loads((src_dir / "config.json").read_text())
    files = sorted(src_dir.glob("model-*.safetensors"))
    headers = {f.name: read_header(f) for f in files}
    dl = tmp_path / "dl"
    dl.mkdir()
    src = SafeTensorsSource.from_headers(dl, cfg, headers)  # no shard file on disk yet
    conv = plan(src)
    staging = tmp_path / "staging"
    staging.mkdir()
    dense = open_dense(conv, staging, fsync=False)
    assert conv.ready(set()) == []
    entries, present, most = [], set(), 0
    for i, f in enumerate(files):
        shutil.copy(f, dl / f.name)
        present.add(i)
        most = max(most, len(present))
        entries += write_experts(conv, staging, conv.ready(present), fsync=False)
        dense.write_ready(present)
        for j in present - conv.pending_files(dense):  # drop source files nothing pending needs any more
            src.release(j)
            (dl / files[j].name).unlink()
        present &= conv.pending_files(dense)
    assert len(entries) == len(conv.shards) and conv.ready(range(len(files))) == []
    assert not present and not list(dl.iterdir())  # every source file was deleted once converted
    if name.startswith("real/"):
        assert most < len(files)  # layer-ordered shards: files left before the last one arrived
    write_manifest(staging, build_manifest(conv, entries, dense.finish(), {"repo": "org/model"}))
    src.close()
    whole_dir = st_extracted(name)
    whole, staged = load_manifest(whole_dir), load_manifest(staging)
    assert [(e.layer, e.expert, e.xxh3_64) for e in staged.experts] == \
        [(e.layer, e.expert, e.xxh3_64) for e in whole.experts]
    assert (staging / "dense.gguf").read_bytes() == (whole_dir / "dense.gguf").read_bytes()
    assert staged.source["repo"] == "org/model"


def test_a_missing_shard_is_named(tmp_path):
    from mertools.convert import plan, write_experts
    from mertools.errors import SourceError
    from mertools.sources.safetensors import SafeTensorsSource, read_header

    src_dir = GEN / "deepseek_v2"
    files = sorted(src_dir.glob("model-*.safetensors"))
    src = SafeTensorsSource.from_headers(tmp_path, json.loads((src_dir / "config.json").read_text()),
                                         {f.name: read_header(f) for f in files})
    with pytest.raises(SourceError, match="missing"):
        write_experts(plan(src), tmp_path, fsync=False)


@pytest.mark.parametrize("damage,msg", [
    ("truncate", "truncated|header"),
    ("model_type", "not a Mixture-of-Experts layout"),
    ("lose_shard", "missing"),
    ("index_path", "not a plain .safetensors file name"),
    ("garbage_header", "not valid JSON|more than the file"),
    ("stale_index", "whose header does not hold it"),
    ("config_says_more_moe_layers", "holds no experts for them"),
    ("unknown_expert_tensor", "looks like a routed-expert tensor"),
])
def test_bad_checkpoints_give_one_line(tmp_path, damage, msg):
    src = tmp_path / "ck"
    shutil.copytree(GEN / "glm4_moe", src)
    shard = src / "model-00001-of-00002.safetensors"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "model_type":
        c = json.loads((src / "config.json").read_text())
        c["model_type"] = "llama"
        (src / "config.json").write_text(json.dumps(c))
    elif damage == "lose_shard":
        shard.unlink()
    elif damage == "index_path":
        idx = json.loads((src / "model.safetensors.index.json").read_text())
        k = next(iter(idx["weight_map"]))
        idx["weight_map"][k] = "../model-00001-of-00002.safetensors"
        (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    elif damage == "stale_index":
        idx = json.loads((src / "model.safetensors.index.json").read_text())
        k = next(k for k, v in idx["weight_map"].items() if v.startswith("model-00001"))
        idx["weight_map"][k] = "model-00002-of-00002.safetensors"
        (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    elif damage == "config_says_more_moe_layers":
        c = json.loads((src / "config.json").read_text())
        c["first_k_dense_replace"] = 0
        (src / "config.json").write_text(json.dumps(c))
    elif damage == "unknown_expert_tensor":
        from safetensors.numpy import save_file

        t = load(src)
        t["model.layers.1.mlp.experts.0.gate_proj.bias"] = np.zeros(4, np.float32)
        for f in src.glob("model*"):
            f.unlink()
        save_file(t, src / "model.safetensors")
    else:
        b = bytearray(shard.read_bytes())
        b[8:40] = b"\xff" * 32
        shard.write_bytes(bytes(b))
    p = run_cli("extract", src, tmp_path / "out")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    import re

    assert re.search(msg, p.stderr), p.stderr
    assert not (tmp_path / "out").exists()


def test_gguf_f16_with_dtype_matches_llama_cpp_q4_0(tmp_path):
    from mertools import extract

    out = tmp_path / "o"
    extract(FIX / "real" / "mixtral-f16.gguf", out, fsync=False, dtype="q4_0")
    m = load_manifest(out)
    for e in m.experts:
        for role in ("gate", "up", "down"):
            assert shard_bytes(out, e, role) == _gguf_expert_bytes(FIX / "real" / "mixtral-q4_0.gguf", e.layer,
                                                                   e.expert, role)


def test_dtype_refuses_an_already_quantized_gguf(tmp_path):
    p = run_cli("extract", FIX / "real" / "mixtral-q4_k_m.gguf", tmp_path / "o", "--dtype", "q8_0")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--dtype" in p.stderr


def _int_expert_gguf(path: Path) -> Path:
    """moe-merged-f32.gguf with its expert weights stored as I32 (a ggml type the runtime cannot compute with)."""
    r = gguf.GGUFReader(FIX / "generated" / "moe-merged-f32.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    for t in r.tensors:
        if "_exps" in t.name and t.name.endswith(".weight"):
            w.add_tensor(t.name, np.zeros([int(x) for x in reversed(t.shape)], np.int32))
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_experts_of_a_type_nothing_converts_are_not_sent_in_a_circle(tmp_path):
    """An I32 expert can neither be copied (the runtime cannot compute with it) nor converted: inspect says so
    instead of "needs --dtype", and extract --dtype does not advise dropping --dtype."""
    src = _int_expert_gguf(tmp_path / "int.gguf")
    p = run_cli("inspect", src)
    assert p.returncode == 0 and "not extractable" in p.stdout and "needs --dtype" not in p.stdout, p.stdout
    for extra in ((), ("--dtype", "q8_0")):
        p = run_cli("extract", src, tmp_path / "o", *extra)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert "cannot be extracted" in p.stderr and "drop --dtype" not in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name,role", [("gpt_oss_mxfp4", "up"), ("llama4", "down"),
                                       ("real/mixtral-bf16-sharded", "gate")])
def test_one_changed_byte_is_caught_against_the_checkpoint(tmp_path, st_extracted, name, role):
    from test_deep_verify import forge

    from mertools.verify import verify

    out = tmp_path / "forged"
    shutil.copytree(st_extracted(name), out)
    e = load_manifest(out).experts[-1]
    t = e.tensors[role]
    forge(out, e.path, t.offset + t.nbytes // 2 + 1)
    assert verify(out).ok  # checksums rewritten: the shallow check cannot see it
    r = verify(out, deep=True, against=folder(name))
    assert not r.ok
    assert any("does not match the source bytes" in p.what for p in r.problems if p.path == e.path)
    assert {p.path for p in r.problems} == {e.path}


def test_fp8_dense_tensors_are_widened_with_their_scales(st_extracted):
    out = st_extracted(FP8, "bf16")
    r = {t.name: t for t in gguf.GGUFReader(out / "dense.gguf").tensors}
    t = load(GEN / FP8)
    assert not any(n.endswith("_scale_inv") for n in r)
    name = "model.layers.1.self_attn.q_proj.weight"
    w, s = t[name].astype(np.float32), t[name + "_scale_inv"]
    full = np.repeat(np.repeat(s, 128, 0), 128, 1)[:w.shape[0], :w.shape[1]]
    assert r[name].tensor_type.name == "BF16"
    assert np.asarray(r[name].data).tobytes() == (w * full).astype(ml_dtypes.bfloat16).tobytes()


def test_remote_sources_plug_in_by_scheme(tmp_path):
    from mertools.errors import SourceError
    from mertools.sources import REMOTE_OPENERS, open_source
    from mertools.sources.safetensors import SafeTensorsSource

    with pytest.raises(SourceError, match="no reader for nope:// sources"):
        open_source("nope://org/repo")
    REMOTE_OPENERS["fixture"] = lambda url: SafeTensorsSource(GEN / url.split("://", 1)[1])
    try:
        src = open_source("fixture://olmoe")
        assert src.kind == "safetensors" and src.model["n_experts"] == 2
    finally:
        del REMOTE_OPENERS["fixture"]


def test_overlapping_tensors_in_a_header_are_refused(tmp_path):
    from mertools.errors import SourceError
    from mertools.sources.safetensors import SafeTensorsSource, read_header

    f = GEN / "olmoe" / "model.safetensors"
    n, h, _ = read_header(f)
    names = [k for k in h if k != "__metadata__"]
    a, b = h[names[0]], h[names[1]]
    if a["data_offsets"][1] - a["data_offsets"][0] == b["data_offsets"][1] - b["data_offsets"][0]:
        b["data_offsets"] = list(a["data_offsets"])
    else:
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]
    with pytest.raises(SourceError, match="share bytes"):
        SafeTensorsSource.from_headers(tmp_path, json.loads((GEN / "olmoe" / "config.json").read_text()),
                                       {f.name: (n, h, f.stat().st_size)})


# -- hostile checkpoints: each bug class the fuzzer (scripts/fuzz.py --target safetensors) found ------------------
def _split(f: Path) -> tuple[dict, bytes]:
    """(header JSON, data section) of a .safetensors file, read by hand (not by the code under test)."""
    blob = f.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _write(f: Path, header: dict | str | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    f.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _relayout(f: Path, edit) -> None:
    """Rewrite `f` with a header consistent with its bytes after `edit(entries)`, where entries maps
    name -> [dtype, shape, raw bytes] in file order (a dict `edit` may change)."""
    h, data = _split(f)
    ent = {k: [v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]]
           for k, v in h.items() if k != "__metadata__"}
    edit(ent)
    head, pos, parts = {}, 0, []
    for k, (dt, shape, raw) in ent.items():
        head[k] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
        parts.append(raw)
    _write(f, head, b"".join(parts))


def _config(ck: Path, **kv) -> None:
    c = json.loads((ck / "config.json").read_text())
    c.update(kv)
    (ck / "config.json").write_text(json.dumps(c))


def _h_huge_int(ck):  # a 5000-digit offset: json raises ValueError, not JSONDecodeError
    f = ck / "model.safetensors"
    h, data = _split(f)
    k = next(k for k in h if k != "__metadata__")
    h[k]["data_offsets"][1] = "@@"
    _write(f, json.dumps(h).replace('"@@"', "9" * 5000), data)


def _h_dtype_unhashable(ck):
    f = ck / "model.safetensors"
    h, data = _split(f)
    h[next(k for k in h if ".experts." in k)]["dtype"] = ["BF16"]
    _write(f, h, data)


def _h_duplicate_key(ck):  # Python keeps the last copy, other readers the first
    f = ck / "model.safetensors"
    h, data = _split(f)
    a, b = [k for k in h if ".experts." in k][:2]
    _write(f, json.dumps(h)[:-1] + ", " + json.dumps({a: h[b]})[1:], data)


def _h_hole(ck):
    f = ck / "model.safetensors"
    h, data = _split(f)
    _write(f, h, data + bytes(4096))


def _h_gap(ck):  # a real gap between two tensors (the last one moved 64 bytes on), the file's end still covered
    f = ck / "model.safetensors"
    h, data = _split(f)
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    b, e = h[last]["data_offsets"]
    h[last]["data_offsets"] = [b + 64, e + 64]
    _write(f, h, data[:b] + bytes(64) + data[b:])


def _h_overlap_behind_empty(ck):  # a zero-size tensor between two overlapping ones once hid the overlap
    f = ck / "model.safetensors"
    h, data = _split(f)
    first = min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    b, e = h[first]["data_offsets"]
    assert e - b > 8
    h["zz.empty"] = {"dtype": "U8", "shape": [0], "data_offsets": [b + 1, b + 1]}
    h["zz.inside"] = {"dtype": "U8", "shape": [4], "data_offsets": [b + 1, b + 5]}
    _write(f, h, data)


def _h_long_shape(ck):  # 160000 dimensions once hung inspect (the shape's product is quadratic in the rank)
    f = ck / "model.safetensors"
    h, data = _split(f)
    h[next(k for k in h if ".experts." in k)]["shape"] = [2 ** 47 - 1] * 3000
    _write(f, h, data)


def _h_surrogate_name(ck):
    f = ck / "model.safetensors"
    h, data = _split(f)
    k = next(k for k in h if k.endswith("norm.weight"))
    _write(f, json.dumps(h).replace(json.dumps(k), '"\\udcff"'), data)


def _h_zero_dim(ck):  # a stacked tensor with zero rows per expert: once a ZeroDivisionError
    def edit(ent):
        name = "language_model.model.layers.0.feed_forward.experts.down_proj"
        ent[name] = [ent[name][0], [2, 0, 64], b""]
    _relayout(ck / "model.safetensors", edit)


def _h_mxfp4_no_scales(ck):
    _relayout(ck / "model.safetensors", lambda ent: ent.pop("model.layers.1.mlp.experts.down_proj_scales"))


def _h_expert_huge_index(ck):  # once a set(range(n)) of every index up to it (hang or MemoryError for 10^11)
    def edit(ent):
        k = "model.layers.1.mlp.experts.1.up_proj.weight"
        ent[k.replace("experts.1.", "experts.99999999999.")] = ent.pop(k)
    _relayout(ck / "model.safetensors", edit)


def _h_expert_twice(ck):  # "experts.01." and "experts.1." are both expert 1
    def edit(ent):
        k = "model.layers.1.mlp.experts.1.up_proj.weight"
        ent[k.replace("experts.1.", "experts.01.")] = ent[k]
    _relayout(ck / "model.safetensors", edit)


def _h_int_expert(ck):  # an I32 expert: once extracted, then refused by every load of the folder
    def edit(ent):
        for k in ent:
            if k.startswith("model.layers.1.mlp.experts.") and k.endswith("gate_proj.weight"):
                ent[k][0], ent[k][2] = "I32", ent[k][2] * 2
    _relayout(ck / "model.safetensors", edit)


def _h_fp8_scale_shape(ck):  # a scale that does not cover its weight: once an IndexError under --dtype
    def edit(ent):
        k = "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"
        ent[k] = [ent[k][0], [1, 1], ent[k][2][:4]]
    _relayout(ck / "model.safetensors", edit)


def _h_shard_fifo(ck):
    (ck / "model.safetensors").unlink()
    os.mkfifo(ck / "model.safetensors")


def _h_index_nul(ck):
    idx = json.loads((ck / "model.safetensors.index.json").read_text())
    k = next(iter(idx["weight_map"]))
    idx["weight_map"][k] = "model-00001\x00.safetensors"
    (ck / "model.safetensors.index.json").write_text(json.dumps(idx))


def _h_index_dup(ck):  # one tensor mapped to two shards
    p = ck / "model.safetensors.index.json"
    text = p.read_text()
    idx = json.loads(text)
    k, v = next((k, v) for k, v in idx["weight_map"].items() if v != "model-00002-of-00003.safetensors")
    p.write_text(text.replace('"weight_map": {', '"weight_map": {' + json.dumps(k)
                              + ': "model-00002-of-00003.safetensors", ', 1))


HOSTILE = [
    ("olmoe", _h_huge_int, "not valid JSON"),
    ("olmoe", _h_dtype_unhashable, "malformed header entry"),
    ("olmoe", _h_duplicate_key, "twice"),
    ("olmoe", _h_hole, "belong to no tensor"),
    ("olmoe", _h_gap, "belong to no tensor \\(a hole before"),
    ("olmoe", _h_overlap_behind_empty, "'zz.inside' share bytes"),
    ("olmoe", _h_long_shape, "malformed header entry .{0,260}; the file"),
    ("olmoe", _h_surrogate_name, "not valid Unicode"),
    ("llama4", _h_zero_dim, "zero dimension"),
    ("gpt_oss_mxfp4", _h_mxfp4_no_scales, "without their scales"),
    ("qwen3_moe", _h_expert_huge_index, "past the 65536 experts"),
    ("qwen3_moe", _h_expert_twice, "are both up of layer 1 expert 1"),
    ("qwen3_moe", _h_int_expert, "is I32; expert weights must be"),
    (FP8, _h_fp8_scale_shape, "not the block scale"),
    ("olmoe", _h_shard_fifo, "not a regular file"),
    ("deepseek_v2", _h_index_nul, "not a plain .safetensors file name"),
    ("deepseek_v2", _h_index_dup, "twice"),
    ("mixtral", lambda ck: _config(ck, num_local_experts="2"), "num_local_experts is '2' \\(str\\)"),
    ("mixtral", lambda ck: _config(ck, hidden_size=""), "hidden_size is '' \\(str\\)"),
    ("mixtral", lambda ck: _config(ck, num_experts_per_tok=[2]), "num_experts_per_tok is '\\[2\\]' \\(list\\)"),
    ("mixtral", lambda ck: _config(ck, num_hidden_layers=1e308), "num_hidden_layers is '1e\\+308' \\(float\\)"),
    ("mixtral", lambda ck: _config(ck, model_type=["mixtral"]), "model_type \\['mixtral'\\] is not"),
    ("llama4", lambda ck: _config(ck, text_config=3.5), "text_config is '3.5' \\(float\\)"),
    ("real/gptoss-bf16", lambda ck: _config(ck, swiglu_limit="x"), "swiglu_limit is 'x' \\(str\\)"),
    ("deepseek_v2", lambda ck: _config(ck, norm_topk_prob="yes"), "norm_topk_prob is 'yes'"),
    ("mixtral", lambda ck: (ck / "config.json").write_text('{"model_type": "mixtral", "x": ' + "1" * 5000 + "}"),
     "config.json is not valid JSON"),
]


@pytest.mark.parametrize("name,damage,msg", HOSTILE, ids=[d.__name__.strip("_") if d.__name__ != "<lambda>"
                                                          else f"config-{i}" for i, (_n, d, _m) in enumerate(HOSTILE)])
def test_hostile_checkpoints_give_one_clear_error(tmp_path, name, damage, msg):
    """Each of these once gave a traceback, a hang, or a folder the runtime could not load; now `inspect` and
    `extract` refuse them with one SourceError/NotMoEError naming the file (and the tensor or key), and a refused
    extract leaves nothing behind."""
    from mertools import extract
    from mertools.describe import describe
    from mertools.errors import MertoolsError

    ck = tmp_path / "ck"
    shutil.copytree(folder(name), ck)
    damage(ck)
    with pytest.raises(MertoolsError, match=msg) as exc:
        describe(ck)
    assert str(ck) in str(exc.value)
    with pytest.raises(MertoolsError, match=msg):
        extract(ck, tmp_path / "out", fsync=False, dtype="bf16" if name == FP8 else None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no OUT, no staging folder, no lock file


def test_hostile_checkpoint_on_the_cli_is_one_line(tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(GEN / "mixtral", ck)
    _config(ck, num_local_experts="2")
    for cmd in (("inspect", ck), ("extract", ck, tmp_path / "out")):
        p = run_cli(*cmd)
        assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "num_local_experts" in p.stderr
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_linked_from_elsewhere_still_reads(tmp_path):
    """Hugging Face's cache links every file of a snapshot to a blob outside the folder: the regular-file check
    follows symlinks, so such a folder extracts as before."""
    from mertools.describe import describe

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    for f in (GEN / "deepseek_v2").iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("..") / "blobs" / f.name)
    assert describe(snap)["experts"] == describe(GEN / "deepseek_v2")["experts"]


def test_read_header_never_blocks_on_a_fifo(tmp_path):
    """read_header opens as the runtime opens untrusted files (non-blocking, fstat on the descriptor): a FIFO put
    where a shard was, even after any check on the name, is refused instead of blocking the open. (Before, the open
    waited for a writer: the thread below is that writer, so the old code got past the open and misread the FIFO.)"""
    import threading

    from mertools.errors import SourceError
    from mertools.sources.safetensors import read_header

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: os.close(os.open(fifo, os.O_WRONLY)), daemon=True)
    writer.start()
    try:
        with pytest.raises(SourceError, match="model.safetensors: is a FIFO, not a regular file"):
            read_header(fifo)
    finally:
        while writer.is_alive():  # a reader, so that the writer's open returns (it may not have begun yet)
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
            writer.join(0.05)



@pytest.mark.parametrize("dtype, value, ok", [("q4_0", 6e5, False), ("q8_0", 1e7, False), ("f16", 1e5, False),
                                              ("q8_0", 1e6, True), ("bf16", 1e30, True)])
def test_dtype_refuses_a_finite_value_its_16_bit_scale_cannot_hold(tmp_path, dtype, value, ok):
    """One weight of 6e5 with --dtype q4_0: its block's F16 scale (6e5 / 8) overflowed to inf, the value came out
    inf and the block's other 31 values NaN, and extract and verify --deep --against both said OK (the reference
    was the quantized bytes). A finite block that would come out non-finite is refused in one line naming the
    tensor and its row; values its scale can hold still convert."""
    import safetensors.numpy

    src = tmp_path / "src"
    shutil.copytree(REAL / "mixtral-bf16-sharded", src)
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    shard = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    t = safetensors.numpy.load_file(shard)
    t[name][7, 40] = value
    safetensors.numpy.save_file(t, shard, metadata={"format": "pt"})
    p = run_cli("extract", src, tmp_path / "o", "--dtype", dtype, "-q")
    if ok:
        assert p.returncode == 0, p.stderr
        return
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"{name}: row 7 holds" in p.stderr and f"more than {dtype.upper()} can store" in p.stderr, p.stderr
    assert "--dtype bf16" in p.stderr and not (tmp_path / "o").exists()
