"""SafeTensors: a separate MTP block's experts (Qwen3-Next, Qwen3.5 per expert, Qwen3.6 fused) become expert shards at
block num_hidden_layers + i, and FP8 experts fused into one tensor convert with --dtype as per-expert FP8 does.

Checkpoints are written here, tiny, with the safetensors library. Expected bytes come from plain NumPy slicing and
float64/ml_dtypes arithmetic stated in this file, never from mertools' layout table or its dequantization.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from conftest import run_cli, shard_bytes as _shard
from mer_runtime import load_manifest
from mer_runtime.smoke import SmokeConfig, run_smoke
from mertools import extract
from mertools.export_mer import export_mer
from mertools.errors import SourceError
from mertools.sources.safetensors import SafeTensorsSource
from mertools.verify import verify

BF16, FP8 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn
H, F, E = 64, 32, 4
ROLES = ("gate", "up", "down")


def _w(rng: np.random.Generator, shape: tuple[int, ...], dtype=BF16) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.02).astype(np.float32).astype(dtype)


def _save(root: Path, config: dict, tensors: dict[str, np.ndarray], shards: list[set[str]] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    if not shards:
        save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
        return root
    wm = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in names}, root / fname, metadata={"format": "pt"})
        wm.update({k: fname for k in names})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return root


def _load(root: Path) -> dict[str, np.ndarray]:
    """Every tensor as the safetensors library reads it (FP8 straight from the header's offsets as ml_dtypes)."""
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        blob = f.read_bytes()
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + n])
        with safe_open(f, framework="np") as fh:
            for k in fh.keys():
                if header[k]["dtype"] == "F8_E4M3":
                    b, e = header[k]["data_offsets"]
                    out[k] = np.frombuffer(blob[8 + n + b:8 + n + e], FP8).reshape(header[k]["shape"])
                else:
                    out[k] = fh.get_tensor(k)
    return out




# -- Qwen3-Next / Qwen3.5 / Qwen3.6 with their MTP block -----------------------------------------------------------
def _mtp_checkpoint(root: Path, model_type: str, main: str, mtp: str, wrap: bool, n_layers: int = 2) -> Path:
    """Decoder layers `main` (per_expert | fused) under model.layers / model.language_model.layers (`wrap`), and one
    MTP layer `mtp` (per_expert | fused) under mtp.layers.0 with its router, shared expert and the MTP block's own
    dense tensors, as the Qwen3-Next (per expert), Qwen3.5 (fused + per-expert MTP) and Qwen3.6 (fused + fused MTP)
    checkpoints name them."""
    rng = np.random.default_rng([7, n_layers, len(model_type), wrap])
    lp = "model.language_model." if wrap else "model."
    t = {lp + "embed_tokens.weight": _w(rng, (16, H)), lp + "norm.weight": np.ones(H, BF16),
         "mtp.fc.weight": _w(rng, (H, 2 * H)), "mtp.norm.weight": np.ones(H, BF16),
         "mtp.pre_fc_norm_embedding.weight": np.ones(H, BF16), "mtp.pre_fc_norm_hidden.weight": np.ones(H, BF16)}
    blocks = [(f"{lp}layers.{i}.", main) for i in range(n_layers)] + [("mtp.layers.0.", mtp)]
    for p, kind in blocks:
        t[p + "input_layernorm.weight"] = np.ones(H, BF16)
        t[p + "self_attn.q_proj.weight"] = _w(rng, (8, H))
        t[p + "mlp.gate.weight"] = _w(rng, (E, H))
        for name, shape in zip(ROLES, ((F, H), (F, H), (H, F))):
            t[p + f"mlp.shared_expert.{name}_proj.weight"] = _w(rng, shape)
        t[p + "mlp.shared_expert_gate.weight"] = _w(rng, (1, H))
        if kind == "fused":
            t[p + "mlp.experts.gate_up_proj"] = _w(rng, (E, 2 * F, H))
            t[p + "mlp.experts.down_proj"] = _w(rng, (E, H, F))
        else:
            for e in range(E):
                for name, shape in zip(ROLES, ((F, H), (F, H), (H, F))):
                    t[p + f"mlp.experts.{e}.{name}_proj.weight"] = _w(rng, shape)
    text = {"model_type": model_type if not wrap else model_type + "_text", "hidden_size": H,
            "num_hidden_layers": n_layers, "num_experts": E, "num_experts_per_tok": 2, "moe_intermediate_size": F,
            "shared_expert_intermediate_size": F, "mtp_num_hidden_layers": 1}
    config = {"model_type": model_type, "text_config": text} if wrap else text
    return _save(root, config, t)


def _mtp_expected(t: dict[str, np.ndarray], layer: int, e: int, role: str, n_layers: int, wrap: bool) -> np.ndarray:
    p = "mtp.layers.0." if layer == n_layers else f"model.{'language_model.' if wrap else ''}layers.{layer}."
    if p + "mlp.experts.gate_up_proj" in t:  # [E, 2F, H] gate rows first; [E, H, F]
        if role == "down":
            return t[p + "mlp.experts.down_proj"][e]
        gu = t[p + "mlp.experts.gate_up_proj"][e]
        return gu[:F] if role == "gate" else gu[F:]
    return t[p + f"mlp.experts.{e}.{role}_proj.weight"]


MTP_CASES = [  # (model_type, main layers, MTP layer, multimodal wrapper)
    ("qwen3_next", "per_expert", "per_expert", False),
    ("qwen3_5_moe", "fused", "per_expert", True),  # Qwen3.5 as released
    ("qwen3_5_moe", "fused", "fused", True),  # Qwen3.6 (same model_type)
]


@pytest.mark.parametrize("model_type,main,mtp,wrap", MTP_CASES)
def test_mtp_block_experts_are_shards_at_num_hidden_layers(tmp_path, model_type, main, mtp, wrap):
    ck = _mtp_checkpoint(tmp_path / "ck", model_type, main, mtp, wrap)
    out = tmp_path / "out"
    extract(ck, out, fsync=False)
    m = load_manifest(out)
    assert m.model["moe_layers"] == [0, 1, 2] and m.model["n_layers"] == 3 and m.model["n_mtp_layers"] == 1
    assert "mtp_expert_tensors_in_dense" not in m.source
    t = _load(ck)
    seen = set()
    for e in m.experts:
        for role in ROLES:
            want = np.ascontiguousarray(_mtp_expected(t, e.layer, e.expert, role, 2, wrap))
            assert list(want.shape) == list(e.tensors[role].shape)
            assert _shard(out, e, role) == want.tobytes(), (e.layer, e.expert, role)
        seen.add((e.layer, e.expert))
    assert seen == {(layer, x) for layer in range(3) for x in range(E)}
    mtp_sources = {e["tensors"][r]["source"] for e in m.raw["experts"] if e["layer"] == 2 for r in ROLES}
    assert all(s.startswith("mtp.layers.0.mlp.experts.") for s in mtp_sources), mtp_sources
    # the MTP block's router, shared expert and own tensors stay in dense.gguf; none of its experts do
    names = {x.name for x in gguf.GGUFReader(out / "dense.gguf").tensors}
    assert names == {k for k in t if ".mlp.experts." not in k}
    assert {"mtp.layers.0.mlp.gate.weight", "mtp.layers.0.mlp.shared_expert.up_proj.weight", "mtp.fc.weight"} <= names
    assert verify(out, deep=True, against=ck).ok
    # the MTP block's router has its own template ({layer} = its index), which the router workload follows
    assert m.model["router"]["weight"] == ("model.language_model." if wrap else "model.") + "layers.{layer}.mlp.gate.weight"
    assert m.model["router"]["mtp_weight"] == "mtp.layers.{layer}.mlp.gate.weight"
    s = run_smoke(out, SmokeConfig(tokens=20, cache_slots=4, workload="router", compute=False))
    assert s["tokens"] == 20
    # and so does MER export's gate file of the MTP layer (it looked for model.layers.2.mlp.gate.weight)
    export_mer(out, tmp_path / "mer", router=True, fsync=False)
    for li in range(3):
        name = "mtp.layers.0.mlp.gate.weight" if li == 2 else f"{'model.language_model.' if wrap else 'model.'}layers.{li}.mlp.gate.weight"
        gate = np.frombuffer((tmp_path / "mer" / f"gate_{li}.bin").read_bytes(), "<f4").reshape(E, H)
        assert np.array_equal(gate, t[name].astype(np.float32)), li


def test_deepseek_mtp_layer_has_no_mtp_router_template(tmp_path):
    """DeepSeek's MTP layer is model.layers.{num_hidden_layers}: the one template names its router too."""
    ck = _mtp_checkpoint(tmp_path / "ck", "qwen3_next", "per_expert", "per_expert", False, n_layers=3)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (ck / "config.json").write_text(json.dumps(cfg))
    for f in ck.glob("*.safetensors"):  # drop the separate MTP block: block 2 is the MTP layer, DeepSeek-style
        t = {k: v for k, v in _load(ck).items() if not k.startswith("mtp.")}
        f.unlink()
        save_file(t, f)
    extract(ck, tmp_path / "out", fsync=False)
    m = load_manifest(tmp_path / "out")
    assert m.model["moe_layers"] == [0, 1, 2] and m.model["n_mtp_layers"] == 1
    assert set(m.model["router"]) == {"weight"}
    assert run_smoke(tmp_path / "out", SmokeConfig(tokens=10, cache_slots=4, workload="router",
                                                   compute=False))["tokens"] == 10


def test_reassemble_gives_back_the_mtp_experts(tmp_path):
    """A per-expert checkpoint's tensors all come back from the folder, the MTP block's experts among them (as the
    checkpoint's own shards: reassemble writes a SafeTensors source back as SafeTensors)."""
    from mertools.reassemble import reassemble

    ck = _mtp_checkpoint(tmp_path / "ck", "qwen3_next", "per_expert", "per_expert", False)
    extract(ck, tmp_path / "out", fsync=False)
    reassemble(tmp_path / "out", tmp_path / "back", fsync=False)
    got = {k: np.ascontiguousarray(v).view(np.uint8).tobytes() for k, v in _load(tmp_path / "back").items()}
    t = _load(ck)
    assert set(got) == set(t) and any(k.startswith("mtp.layers.0.mlp.experts.") for k in got)
    for k, v in t.items():
        assert got[k] == np.ascontiguousarray(v).view(np.uint8).tobytes(), k


def test_mtp_layer_needs_num_hidden_layers(tmp_path):
    ck = _mtp_checkpoint(tmp_path / "ck", "qwen3_next", "per_expert", "per_expert", False)
    cfg = json.loads((ck / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match=r"mtp\.layers\.0\.mlp\.experts\..*no num_hidden_layers"):
        SafeTensorsSource(ck)


def test_an_mtp_layer_after_a_gap_is_refused_naming_its_tensor(tmp_path):
    """Only mtp.layers.1: its block (num_hidden_layers + 1) would lie past n_layers (decoder + MTP layers), which
    the manifest check refused late, after staging, naming no tensor."""
    ck = _mtp_checkpoint(tmp_path / "ck", "qwen3_next", "per_expert", "per_expert", False)
    t = {k.replace("mtp.layers.0.", "mtp.layers.1."): v for k, v in _load(ck).items()}
    gap = _save(tmp_path / "gap", json.loads((ck / "config.json").read_text()), t)
    with pytest.raises(SourceError, match=r"mtp\.layers\.1\.mlp\.experts\..*is of block 3, an MTP layer .*no expert "
                                          r"tensors of block 2"):
        SafeTensorsSource(gap)
    p = run_cli("extract", str(gap), str(tmp_path / "o"))
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_mtp_layer_claimed_twice_is_refused(tmp_path):
    """model.layers.{num_hidden_layers} (DeepSeek's MTP naming) and mtp.layers.0 are the same block: not both."""
    ck = _mtp_checkpoint(tmp_path / "ck", "qwen3_next", "per_expert", "per_expert", False, n_layers=3)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_hidden_layers"] = 2  # block 2 now holds experts under both names
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match=r"is of MTP layer 2 .*'model\.layers\.2\.mlp\.experts\.0\.\w+_proj\.weight' "
                                          r"also claims"):
        SafeTensorsSource(ck)
    p = run_cli("extract", str(ck), str(tmp_path / "o"))
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


# -- FP8 experts fused into one tensor -----------------------------------------------------------------------------
FH, FE = 160, 2  # d_model spans two 128-wide scale blocks, the second partial


def _fp8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.clip(rng.standard_normal(shape) * 100, -448, 448).astype(np.float32).astype(FP8)


def _scale(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.random(shape) * 1e-3 + 1e-4).astype(np.float32)


def _blocks(n: int) -> int:
    return -(-n // 128)


def _fp8_fused(root: Path, f: int, form: str = "fused", layout: str = "rows", dense_3d: bool = False,
               split_scales: bool = False) -> Path:
    """A qwen3_5_moe FP8 checkpoint (two decoder layers and an MTP layer, block-scaled as DeepSeek/transformers
    FP8 checkpoints are). `form` fused: gate_up [E, 2f, H] + gate_up_proj_scale_inv [E, ceil(2f/128),
    ceil(H/128)] and down [E, H, f] + [E, ceil(H/128), ceil(f/128)]; per_expert: the same values and scales, written
    one tensor per expert (needs f a multiple of 128, so that each half has its own scale rows). `layout` input_major:
    Qwen3-VL-MoE's [E, H, 2f] / [E, f, H] instead (fused only)."""
    rng = np.random.default_rng([8, f])
    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": _w(rng, (16, FH)), "model.norm.weight": np.ones(FH, BF16)}
    if dense_3d:  # a dense 3-D FP8 tensor: widened to BF16 with one scale grid per leading index
        t["model.layers.0.self_attn.conv.weight"] = _fp8(rng, (2, FH, 130))
        t["model.layers.0.self_attn.conv.weight_scale_inv"] = _scale(rng, (2, 2, 2))
    pre = "model.language_model.layers.{}." if layout == "input_major" else "model.layers.{}."
    blocks = [pre.format(i) for i in range(2)] + ([] if layout == "input_major" else ["mtp.layers.0."])
    for p in blocks:
        t[p + "mlp.gate.weight"] = _w(rng, (FE, FH))
        if layout == "input_major":
            gu, gus = _fp8(rng, (FE, FH, 2 * f)), _scale(rng, (FE, _blocks(FH), _blocks(2 * f)))
            dn, dns = _fp8(rng, (FE, f, FH)), _scale(rng, (FE, _blocks(f), _blocks(FH)))
        else:
            gu, gus = _fp8(rng, (FE, 2 * f, FH)), _scale(rng, (FE, _blocks(2 * f), _blocks(FH)))
            dn, dns = _fp8(rng, (FE, FH, f)), _scale(rng, (FE, _blocks(FH), _blocks(f)))
        if form == "fused":
            t[p + "mlp.experts.gate_up_proj"], t[p + "mlp.experts.gate_up_proj_scale_inv"] = gu, gus
            t[p + "mlp.experts.down_proj"], t[p + "mlp.experts.down_proj_scale_inv"] = dn, dns
            continue
        assert f % 128 == 0
        for e in range(FE):
            x = p + f"mlp.experts.{e}."
            hb = f // 128
            t[x + "gate_proj.weight"], t[x + "gate_proj.weight_scale_inv"] = gu[e][:f].copy(), gus[e][:hb].copy()
            t[x + "up_proj.weight"], t[x + "up_proj.weight_scale_inv"] = gu[e][f:].copy(), gus[e][hb:].copy()
            t[x + "down_proj.weight"], t[x + "down_proj.weight_scale_inv"] = dn[e].copy(), dns[e].copy()
    text = {"hidden_size": FH, "num_hidden_layers": 2, "num_experts": FE, "num_experts_per_tok": 2,
            "moe_intermediate_size": f, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                "weight_block_size": [128, 128]}}
    if layout == "input_major":
        config = {"model_type": "qwen3_vl_moe", "text_config": {"model_type": "qwen3_vl_moe_text", **text}}
    else:
        config = {"model_type": "qwen3_5_moe", **text}
    shards = None
    if split_scales:  # every block scale in a shard of its own: a projection needs both files
        scales = {k for k in t if k.endswith("_scale_inv")}
        shards = [set(t) - scales, scales]
    return _save(root, config, t, shards)


def _dequant(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """float64 values of a 2-D FP8 matrix times its 128 x 128 block scales."""
    full = np.repeat(np.repeat(s.astype(np.float64), 128, 0), 128, 1)[:w.shape[0], :w.shape[1]]
    return w.astype(np.float64) * full


def _fp8_expected(t: dict[str, np.ndarray], layer: int, e: int, role: str, f: int, layout: str) -> np.ndarray:
    """The expert's [out, in] values: the whole stored expert slice dequantized with its own scale grid, then cut."""
    if layout == "input_major":
        p = f"model.language_model.layers.{layer}.mlp.experts."
        if role == "down":
            return _dequant(t[p + "down_proj"][e], t[p + "down_proj_scale_inv"][e]).T
        full = _dequant(t[p + "gate_up_proj"][e], t[p + "gate_up_proj_scale_inv"][e])  # [H, 2f]
        return (full[:, :f] if role == "gate" else full[:, f:]).T
    p = ("mtp.layers.0." if layer == 2 else f"model.layers.{layer}.") + "mlp.experts."
    if role == "down":
        return _dequant(t[p + "down_proj"][e], t[p + "down_proj_scale_inv"][e])
    full = _dequant(t[p + "gate_up_proj"][e], t[p + "gate_up_proj_scale_inv"][e])  # [2f, H]
    return full[:f] if role == "gate" else full[f:]


@pytest.mark.parametrize("f,layout", [(128, "rows"), (96, "rows"), (96, "input_major")])
def test_fused_fp8_converts_with_each_experts_own_block_scales(tmp_path, f, layout):
    """f=96: the gate/up split falls inside a 128-row block, whose one scale covers the end of gate and the start
    of up (the block grid is the stored tensor's)."""
    ck = _fp8_fused(tmp_path / "ck", f, layout=layout, dense_3d=True)
    out = tmp_path / "out"
    extract(ck, out, fsync=False, dtype="bf16")
    m = load_manifest(out)
    t = _load(ck)
    n_layers = 2 if layout == "input_major" else 3
    assert sorted({e.layer for e in m.experts}) == list(range(n_layers))
    for e in m.experts:
        for role in ROLES:
            assert e.tensors[role].dtype == "BF16"
            want = _fp8_expected(t, e.layer, e.expert, role, f, layout).astype(np.float32).astype(BF16)
            assert _shard(out, e, role) == np.ascontiguousarray(want).tobytes(), (e.layer, e.expert, role)
    # the dense 3-D FP8 tensor: one grid per leading index, widened to BF16
    r = {x.name: x for x in gguf.GGUFReader(out / "dense.gguf").tensors}
    name = "model.layers.0.self_attn.conv.weight"
    w, s = t[name], t[name + "_scale_inv"]
    want = np.stack([_dequant(w[i], s[i]) for i in range(2)]).astype(np.float32).astype(BF16)
    assert bytes(r[name].data.view(np.uint8)) == want.tobytes()
    assert name + "_scale_inv" not in r and not any("experts" in n for n in r)
    assert verify(out, deep=True, against=ck).ok


@pytest.mark.parametrize("dtype", ["bf16", "q8_0"])
def test_fused_fp8_gives_the_shards_of_its_per_expert_form(tmp_path, dtype):
    fused = _fp8_fused(tmp_path / "fused", 128)
    per = _fp8_fused(tmp_path / "per", 128, form="per_expert")
    a, b = load_manifest(_extracted(fused, tmp_path / "a", dtype)), load_manifest(_extracted(per, tmp_path / "b", dtype))
    assert SafeTensorsSource(per).layer_layouts[2].kind == "per_expert"
    assert SafeTensorsSource(fused).layer_layouts[2].kind == "fused"
    pairs = {(e.layer, e.expert): e for e in b.experts}
    assert len(a.experts) == len(pairs) == 3 * FE
    for e in a.experts:
        other = pairs[(e.layer, e.expert)]
        for role in ROLES:
            assert e.tensors[role].dtype == dtype.upper()
            assert _shard(tmp_path / "a", e, role) == _shard(tmp_path / "b", other, role), (e.layer, e.expert, role)


def _extracted(ck: Path, out: Path, dtype: str) -> Path:
    extract(ck, out, fsync=False, dtype=dtype)
    return out


def test_fused_fp8_without_dtype_is_refused_as_per_expert_fp8_is(tmp_path):
    msgs = []
    for form in ("fused", "per_expert"):
        ck = _fp8_fused(tmp_path / form, 128, form=form)
        p = run_cli("extract", str(ck), str(tmp_path / f"o-{form}"))
        assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
        assert not (tmp_path / f"o-{form}").exists()
        assert "F8_E4M3" in p.stderr and "--dtype" in p.stderr
        msgs.append(p.stderr.strip().split(": is F8_E4M3", 1))
    assert "mlp.experts.gate_up_proj" in msgs[0][0] and "mlp.experts.0.gate_proj.weight" in msgs[1][0]
    assert msgs[0][1] == msgs[1][1]  # the same message apart from the tensor it names


def test_fused_fp8_scales_in_another_shard(tmp_path):
    ck = _fp8_fused(tmp_path / "ck", 96, split_scales=True)
    src = SafeTensorsSource(ck)
    assert all(p.file_indices == {0, 1} for p in src.experts)  # pull waits for both files
    out = tmp_path / "out"
    extract(ck, out, fsync=False, dtype="bf16")
    t = _load(ck)
    for e in load_manifest(out).experts:
        want = _fp8_expected(t, e.layer, e.expert, "up", 96, "rows").astype(np.float32).astype(BF16)
        assert _shard(out, e, "up") == want.tobytes()
    assert verify(out, deep=True, against=ck).ok


HOSTILE_SCALES = [  # shape of model.layers.1.mlp.experts.gate_up_proj_scale_inv; the weight is [2, 256, 160]
    [FE, 2],  # one grid for all experts (a 2-D scale on a 3-D weight)
    [FE, 3, 2],  # a block too many
    [FE + 1, 2, 2],  # an expert too many
    [FE, 2, 2, 1],  # rank 4
    [FE * 2 * 2],  # flattened
]


@pytest.mark.parametrize("shape", HOSTILE_SCALES, ids=lambda s: "x".join(map(str, s)))
def test_fused_fp8_with_another_scale_shape_is_refused(tmp_path, shape):
    ck = _fp8_fused(tmp_path / "ck", 128)
    t = _load(ck)
    k = "model.layers.1.mlp.experts.gate_up_proj_scale_inv"
    t[k] = _scale(np.random.default_rng(3), tuple(shape))
    (ck / "model.safetensors").unlink()
    save_file(t, ck / "model.safetensors")
    pattern = re.escape(f"'{k}' (F32 {shape}) is not the block scale of 'model.layers.1.mlp.experts.gate_up_proj' "
                        "[2, 256, 160] (expected [2, 2, 2]")
    with pytest.raises(SourceError, match=pattern):
        extract(ck, tmp_path / "out", fsync=False, dtype="bf16")
    assert not (tmp_path / "out").exists()
    p = run_cli("extract", "--dtype", "bf16", str(ck), str(tmp_path / "o"))
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "not the block scale" in p.stderr


def test_fused_fp8_bias_is_refused(tmp_path):
    """GPT-OSS's fused biases in FP8 with a scale: no model saves them, and they could not be converted."""
    rng = np.random.default_rng(5)
    t = {"model.embed_tokens.weight": _w(rng, (16, H))}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        t[p + "router.weight"] = _w(rng, (E, H))
        t[p + "experts.gate_up_proj"] = _w(rng, (E, H, 2 * F))
        t[p + "experts.down_proj"] = _w(rng, (E, F, H))
        t[p + "experts.gate_up_proj_bias"] = _fp8(rng, (E, 2 * F))
        t[p + "experts.gate_up_proj_bias_scale_inv"] = _scale(rng, (1, 1))
    ck = _save(tmp_path / "ck", {"model_type": "gpt_oss", "hidden_size": H, "num_hidden_layers": 2,
                                 "num_local_experts": E, "num_experts_per_tok": 2, "intermediate_size": F}, t)
    with pytest.raises(SourceError, match=r"gate_up_proj_bias' is an FP8 bias with block scales"):
        SafeTensorsSource(ck)


def test_pull_of_a_fused_fp8_repo_with_mtp_experts_matches_a_local_extract(hub, env, tmp_path):
    """The hub path plans from headers alone: MTP experts and fused FP8 whose scales sit in another shard come out
    as a local extract of the same folder gives them."""
    ck = _fp8_fused(tmp_path / "ck", 96, split_scales=True)
    hub.add_revision("org/q35-fp8", {p.name: p for p in ck.iterdir()})
    out = tmp_path / "out"
    p = run_cli("pull", "org/q35-fp8", str(out), "--dtype", "bf16", "--quiet", env=env)
    assert p.returncode == 0, p.stderr
    local = tmp_path / "local"
    extract(ck, local, fsync=False, dtype="bf16")
    files = sorted(x.relative_to(local).as_posix() for x in local.rglob("*") if x.is_file())
    assert files == sorted(x.relative_to(out).as_posix() for x in out.rglob("*") if x.is_file())
    for rel in files:
        if rel != "manifest.json":
            assert (out / rel).read_bytes() == (local / rel).read_bytes(), rel
    assert load_manifest(out).model["n_mtp_layers"] == 1
