"""`mertools inspect` (text and --json) says how many MTP layers a SafeTensors checkpoint or a shard folder has and
which blocks they are: Qwen-style (a separate mtp.layers.{i} block, Qwen3-Next / Qwen3.5 / Qwen3.6) and
DeepSeek-style (decoder block model.layers.{num_hidden_layers + i}). Checkpoints are written with the safetensors
library by the builder of tests/test_st_mtp_fp8.py."""

from __future__ import annotations

import json

import pytest
from safetensors.numpy import save_file

from conftest import run_cli
from mertools import extract
from mertools.describe import describe
from test_st_mtp_fp8 import _load, _mtp_checkpoint

QWEN = [("qwen3_next", "per_expert", "per_expert", False, "mtp.layers.0."),
        ("qwen3_5_moe", "fused", "fused", True, "mtp.layers.0.")]  # Qwen3.6: fused experts in the MTP block too


def _deepseek_style(root):
    """Three decoder blocks, num_hidden_layers 2: block 2 is the MTP layer under model.layers.2."""
    ck = _mtp_checkpoint(root, "qwen3_next", "per_expert", "per_expert", False, n_layers=3)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (ck / "config.json").write_text(json.dumps(cfg))
    t = {k: v for k, v in _load(ck).items() if not k.startswith("mtp.")}
    (ck / "model.safetensors").unlink()
    save_file(t, ck / "model.safetensors")
    return ck


def _inspect(path):
    text = run_cli("inspect", str(path))
    js = run_cli("inspect", "--json", str(path))
    assert text.returncode == 0 and js.returncode == 0, text.stderr + js.stderr
    return text.stdout, json.loads(js.stdout)["mtp"]


@pytest.mark.parametrize("model_type,main,mtp,wrap,prefix", QWEN)
def test_qwen_style_mtp_block(tmp_path, model_type, main, mtp, wrap, prefix):
    ck = _mtp_checkpoint(tmp_path / "ck", model_type, main, mtp, wrap)
    want = {"n_layers": 1, "layers": [2], "style": "qwen", "prefixes": [prefix]}
    extract(ck, tmp_path / "out", fsync=False)
    for path in (ck, tmp_path / "out"):  # the checkpoint, and the folder extracted from it
        assert describe(path)["mtp"] == want
        text, js = _inspect(path)
        assert js == want
        assert "MTP layers: 1 (block 2 = mtp.layers.0; Qwen-style separate MTP block)" in text


def _gguf_nextn(root, layers=1):
    """llama.cpp writes DeepSeek-V3's / GLM-4.5's MTP layer as the last block, counted in block_count, with
    `{arch}.nextn_predict_layers` (here block 2 of 3)."""
    from gguf import GGUFValueType as VT
    from test_gguf_bounds import rewrite

    root.mkdir(exist_ok=True)
    return rewrite(root / "nextn.gguf", kv_override={"llama.nextn_predict_layers": (layers, VT.UINT32)})


@pytest.mark.parametrize("kind,prefix", [("safetensors", "model.layers.2."), ("gguf", "blk.2.")])
def test_deepseek_style_mtp_layer(tmp_path, kind, prefix):
    src = _deepseek_style(tmp_path / "ck") if kind == "safetensors" else _gguf_nextn(tmp_path / "ck")
    want = {"n_layers": 1, "layers": [2], "style": "deepseek", "prefixes": [prefix]}
    extract(src, tmp_path / "out", fsync=False)
    for path in (src, tmp_path / "out"):  # the source, and the folder extracted from it
        text, js = _inspect(path)
        assert js == want
        assert f"MTP layers: 1 (block 2 = {prefix[:-1]}; DeepSeek-style, after the decoder blocks)" in text


def test_no_mtp_layers(tmp_path):
    ck = _mtp_checkpoint(tmp_path / "ck", "qwen3_next", "per_expert", "per_expert", False)
    t = {k: v for k, v in _load(ck).items() if not k.startswith("mtp.")}
    (ck / "model.safetensors").unlink()
    save_file(t, ck / "model.safetensors")
    text, js = _inspect(ck)
    assert js == {"n_layers": 0, "layers": []} and "MTP" not in text


@pytest.mark.parametrize("value", [3, 7])
def test_gguf_nextn_layers_leaving_no_decoder_block_are_refused(tmp_path, value):
    p = run_cli("inspect", str(_gguf_nextn(tmp_path, value)))
    assert p.returncode == 2 and "nextn_predict_layers" in p.stderr, p.stderr
