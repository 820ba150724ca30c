"""A source whose scales are NaN or infinite is refused by `extract` before anything is written.

The scales: GGUF's per-expert ``blk.N.ffn_*_exps.scale`` (carried as ``*_scale`` roles) and SafeTensors FP8's
``weight_scale_inv`` block scales. A folder made from such a source used to be written, and then failed
``verify --deep`` (deep.scale_problems). Now: one SourceError naming the file, the tensor and the value (the CLI exits
2 with one line), no output folder and no staging folder. ``inspect`` reads headers only and says the same of a
damaged source as of the good one. Quantized blocks' own scales (a Q8_0 block's ``d``) are the weights themselves
and are not scanned. Checkpoints are the generated fixtures, damaged in place with the value's bytes at the
offset their own header gives.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import FIX, GEN, run_cli
from mertools.errors import SourceError
from test_gguf_bounds import SCALES, rewrite

FP8 = FIX / "safetensors" / "gen" / "deepseek_v3_fp8"
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _header(f: Path) -> tuple[int, dict]:
    b = f.read_bytes()
    n = int.from_bytes(b[:8], "little")
    return 8 + n, json.loads(b[8:8 + n])


def damaged_fp8(tmp_path: Path, tensor: str, index: int, value: float) -> Path:
    """A copy of the FP8 checkpoint with element `index` of F32 tensor `tensor` set to `value`."""
    ck = tmp_path / "ck"
    shutil.copytree(FP8, ck)
    f = ck / "model.safetensors"
    base, h = _header(f)
    assert h[tensor]["dtype"] == "F32"
    data = bytearray(f.read_bytes())
    at = base + h[tensor]["data_offsets"][0] + 4 * index
    data[at:at + 4] = struct.pack("<f", value)
    f.write_bytes(bytes(data))
    return ck


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != "ck" and not p.name.endswith(".gguf"))


@pytest.mark.parametrize("value", list(BAD))
@pytest.mark.parametrize("tensor, index", [("model.layers.1.mlp.experts.1.down_proj.weight_scale_inv", 1),
                                           ("model.layers.0.self_attn.q_proj.weight_scale_inv", 3)])
def test_a_non_finite_fp8_block_scale_is_refused_before_anything_is_written(tmp_path, tensor, index, value):
    from mertools import extract

    ck = damaged_fp8(tmp_path, tensor, index, BAD[value])
    with pytest.raises(SourceError) as raised:
        extract(ck, tmp_path / "out", dtype="bf16", fsync=False)
    msg = str(raised.value)
    assert msg.startswith(f"{ck / 'model.safetensors'}: tensor {tensor!r}"), msg
    assert value in msg and tensor.removesuffix("_scale_inv") in msg and "download" in msg, msg
    assert leftovers(tmp_path) == []  # neither the output nor a staging folder


def test_the_good_fp8_checkpoint_still_extracts(tmp_path):
    from mertools import extract

    extract(FP8, tmp_path / "out", dtype="bf16", fsync=False)
    assert (tmp_path / "out" / "manifest.json").exists()


def scaled(tmp_path: Path, layer: int, role: str, expert: int, value: float, dtype=np.float32) -> Path:
    extra = {f"blk.{b}.ffn_{r}_exps.scale": (np.array(v, np.float32) * (b + 1)).astype(dtype)
             for b in (1, 2) for r, v in SCALES.items()}
    extra[f"blk.{layer}.ffn_{role}_exps.scale"][expert] = value
    return rewrite(tmp_path / "scaled.gguf", extra=extra)


@pytest.mark.parametrize("value", list(BAD))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_non_finite_per_expert_scale_is_refused_before_anything_is_written(tmp_path, value, dtype):
    from mertools import extract

    f = scaled(tmp_path, 2, "down", 3, BAD[value], dtype)
    with pytest.raises(SourceError) as raised:
        extract(f, tmp_path / "out", fsync=False)
    msg = str(raised.value)
    assert msg.startswith(f"{f}: tensor blk.2.ffn_down_exps.scale[3] (layer 2, expert 3) is {value}"), msg
    assert leftovers(tmp_path) == []


def test_experts_not_extracted_are_not_judged(tmp_path):
    """--experts without the damaged one: what is written has only finite scales, and deep verify passes."""
    f = scaled(tmp_path, 2, "down", 3, float("nan"))
    out = tmp_path / "out"
    run_cli("extract", f, out, "-q", "--experts", "0-2", check=True)
    run_cli("verify", out, "--deep", check=True)


def test_the_cli_exits_2_with_one_line_and_no_output(tmp_path):
    ck = damaged_fp8(tmp_path, "model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv", 0, float("inf"))
    p = run_cli("extract", ck, tmp_path / "out", "--dtype", "bf16")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv" in p.stderr and "inf" in p.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    f = scaled(tmp_path, 1, "gate", 0, float("-inf"))
    p = run_cli("extract", f, tmp_path / "out2", "--json")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "blk.1.ffn_gate_exps.scale[0]" in p.stderr
    assert not (tmp_path / "out2").exists()


def test_inspect_says_the_same_of_a_damaged_source(tmp_path):
    """inspect reads headers only: a NaN scale is not its business (and costs it no read)."""
    ck = damaged_fp8(tmp_path, "model.layers.1.mlp.experts.0.up_proj.weight_scale_inv", 0, float("nan"))
    good = run_cli("inspect", FP8, "--json", check=True).stdout.replace(str(FP8), "SRC")
    bad = run_cli("inspect", ck, "--json", check=True).stdout.replace(str(ck), "SRC")
    assert good == bad
    g = scaled(tmp_path, 1, "up", 2, 1.0)
    good = run_cli("inspect", g, "--json", check=True).stdout
    g.rename(tmp_path / "good.gguf")
    b = scaled(tmp_path, 1, "up", 2, float("nan"))
    assert run_cli("inspect", b, "--json", check=True).stdout == good


def test_a_quantized_blocks_own_scale_is_the_sources_content_and_is_copied(tmp_path):
    """A Q8_0 block whose f16 scale `d` is NaN: the weights themselves, not a scale tensor; extract copies it
    byte for byte (scanning every block would cost a read of the whole model)."""
    import gguf

    from mertools import extract
    from mer_runtime.manifest import load_manifest

    src = tmp_path / "q.gguf"
    shutil.copy(GEN / "moe-merged-q8_0.gguf", src)
    t = next(t for t in gguf.GGUFReader(src).tensors if t.name == "blk.1.ffn_up_exps.weight")
    at = int(t.data_offset)
    data = bytearray(src.read_bytes())
    data[at:at + 2] = np.array([np.nan], np.float16).tobytes()  # the first block's d, of expert 0
    src.write_bytes(bytes(data))
    out = tmp_path / "out"
    extract(src, out, fsync=False)
    e = next(e for e in load_manifest(out).experts if (e.layer, e.expert) == (1, 0))
    r = e.tensors["up"]
    assert (out / e.path).read_bytes()[r.offset:r.offset + r.nbytes] == bytes(data[at:at + r.nbytes])


def test_a_pull_refuses_a_non_finite_scale_before_converting_from_its_shard(tmp_path, hub, env):
    """A pull converts shard by shard as files arrive (hub/stream.py), not through extract: each shard's scales
    are checked when it arrives, before anything is converted from it."""
    ck = damaged_fp8(tmp_path, "model.layers.1.mlp.experts.1.down_proj.weight_scale_inv", 1, float("nan"))
    hub.add_revision("org/fp8-nan", {p.name: p for p in ck.iterdir()})
    out = tmp_path / "out"
    p = run_cli("pull", "org/fp8-nan", str(out), "--dtype", "bf16", "--quiet", env=env)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "model.layers.1.mlp.experts.1.down_proj.weight_scale_inv" in p.stderr and "nan" in p.stderr, p.stderr
    assert not out.exists()
    good = tmp_path / "good"
    hub.add_revision("org/fp8-good", {p.name: p for p in FP8.iterdir()})
    run_cli("pull", "org/fp8-good", str(good), "--dtype", "bf16", "--quiet", env=env, check=True)
