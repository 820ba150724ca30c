"""export --to mer: every byte offset of ../shared/notes/mer-layout.md, read back here by the note's offsets with
struct (independently of the writer), payload bytes compared with gguf's reader of the source fixture."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from mer_runtime.manifest import manifest_bytes
from mertools import extract
from mertools.errors import MertoolsError
from mertools.export_mer import export_mer

from conftest import ALL_MOE, reader_tensors, reference_bytes, run_cli

REAL = {p.name: p for p in ALL_MOE}
# the note's dtype ids
IDS = {"F32": 0, "F16": 1, "Q4_K": 3, "Q4_0": 4, "Q8_0": 5, "BF16": 6, "MXFP4": 7, "Q5_K": 8, "Q6_K": 9}
NOTE_KEYS = ["format_version", "conversion_mode", "model", "architecture", "layer", "num_experts", "top_k", "d_model",
             "d_ff", "expert_size", "maximum_payload_bytes", "block_align", "dtype", "weight_layout", "num_layers",
             "num_experts_per_layer"]


def _moe_layers(src: Path) -> list[int]:
    ts = reader_tensors(src)
    return sorted({int(n.split(".")[1]) for n in ts if "_exps." in n})


def _export(extracted, tmp_path, name, **kw) -> tuple[Path, Path, dict]:
    src = REAL[name]
    out = tmp_path / "mer"
    export_mer(extracted(src), out, fsync=False, **kw)
    return src, out, json.loads((out / "metadata.json").read_text())


def test_q4_0_uth1_every_offset(extracted, tmp_path):
    src, out, meta = _export(extracted, tmp_path, "mixtral-q4_0.gguf", router=True)
    ts = reader_tensors(src)
    layers = _moe_layers(src)
    E = 4
    d_model, d_ff = 256, 256
    payload = 3 * (d_model * d_ff // 32 * 18)
    size = (payload + 4095) // 4096 * 4096 + 4096
    assert list(meta)[: len(NOTE_KEYS)] == NOTE_KEYS
    assert list(meta)[len(NOTE_KEYS):] == ["q4_0_layout", "experts_written", "dense_tensors_written"]
    assert meta["format_version"] == 2 and meta["block_align"] == 4096 and meta["dtype"] == "q4_0"
    assert meta["q4_0_layout"] == "ggml-standard-v1" and meta["layer"] == -1
    assert meta["num_experts"] == len(layers) * E and meta["num_layers"] == len(layers)
    assert meta["num_experts_per_layer"] == E and meta["top_k"] == 2
    assert meta["expert_size"] == size and meta["maximum_payload_bytes"] == payload
    assert meta["weight_layout"] == "gate_proj || up_proj || down_proj (row-major)"
    assert meta["experts_written"] == len(layers) * E and meta["dense_tensors_written"] == len(layers)
    files = sorted(p.name for p in out.glob("expert_*.bin"))
    assert files == sorted(f"expert_{g}.bin" for g in range(len(layers) * E))
    for li, layer in enumerate(layers):
        for e in range(E):
            b = (out / f"expert_{li * E + e}.bin").read_bytes()
            assert len(b) == size and size % 4096 == 0
            assert b[0:4] == b"UTH1"
            assert struct.unpack_from("<H", b, 4)[0] == 1
            assert b[6] == IDS["Q4_0"] and b[7] == 3
            assert struct.unpack_from("<4I", b, 8) == (d_ff, d_model, 3, 0)
            assert struct.unpack_from("<I", b, 24)[0] == 0 and struct.unpack_from("<I", b, 28)[0] == 0
            assert struct.unpack_from("<3I", b, 32) == (16, 16, 64)
            assert struct.unpack_from("<I", b, 44)[0] & 1 == 1
            assert b[48:4096] == bytes(4096 - 48)
            want = b"".join(reference_bytes(ts, layer, e, r) for r in ("gate", "up", "down"))
            assert b[4096:4096 + payload] == want
            assert b[4096 + payload:] == bytes(size - 4096 - payload)
        gate = np.frombuffer((out / f"gate_{li}.bin").read_bytes(), "<f4").reshape(E, d_model)
        router = ts[f"blk.{layer}.ffn_gate_inp.weight"]
        assert np.array_equal(gate, np.asarray(router.data, dtype=np.float32).reshape(E, d_model))


def test_q4_k_m_uth2_every_offset(extracted, tmp_path):
    src, out, meta = _export(extracted, tmp_path, "mixtral-q4_k_m.gguf")
    ts = reader_tensors(src)
    layers = _moe_layers(src)
    E, d_model, d_ff = 4, 256, 256
    assert meta["dtype"] == "mixed" and meta["expert_layout_version"] == 2
    assert list(meta) == [*NOTE_KEYS, "expert_layout_version", "projection_dtype_histogram", "experts_written",
                          "dense_tensors_written"]
    hist: dict[str, int] = {}
    sizes = []
    for li, layer in enumerate(layers):
        types = [ts[f"blk.{layer}.ffn_{r}_exps.weight"].tensor_type.name for r in ("gate", "up", "down")]
        hist["/".join(t.lower() for t in types)] = hist.get("/".join(t.lower() for t in types), 0) + E
        for e in range(E):
            b = (out / f"expert_{li * E + e}.bin").read_bytes()
            sizes.append(len(b))
            assert b[0:4] == b"UTH2"
            assert struct.unpack_from("<HH", b, 4) == (2, 3)
            assert struct.unpack_from("<III", b, 8) == (d_model, d_ff, 1)
            off = 0
            payload = b""
            for i, (role, at) in enumerate(zip(("gate", "up", "down"), (24, 48, 72))):
                want = reference_bytes(ts, layer, e, role)
                dtype_id, role_id = b[at], b[at + 1]
                assert dtype_id == IDS[types[i]] and role_id == i and b[at + 2:at + 4] == b"\0\0"
                o, n, count = struct.unpack_from("<QQI", b, at + 4)
                assert (o, n, count) == (off, len(want), d_model * d_ff)
                assert b[4096 + o:4096 + o + n] == want
                off += n
                payload += want
            assert b[96:4096] == bytes(4096 - 96)
            assert b[4096 + off:] == bytes(len(b) - 4096 - off)
    assert meta["projection_dtype_histogram"] == hist and sum(hist.values()) == len(layers) * E
    assert len(set(sizes)) == 1 and sizes[0] == meta["expert_size"] and sizes[0] % 4096 == 0
    assert sizes[0] == (meta["maximum_payload_bytes"] + 4095) // 4096 * 4096 + 4096
    assert "q4_0_layout" not in meta


@pytest.mark.parametrize("name, why", [
    ("moe-merged-mxfp4.gguf", "MXFP4: MER's header has an id for it"),
    ("moe-gptoss-mxfp4-bias.gguf", "not plain SwiGLU"),
])
def test_unsupported_is_refused_not_converted(name, why, extracted, tmp_path):
    with pytest.raises(MertoolsError, match=why):
        export_mer(extracted(REAL[name]), tmp_path / "mer", fsync=False)
    assert list(tmp_path.iterdir()) == []


def test_biases_are_refused(extracted, tmp_path):
    # GPT-OSS's activation is refused first; a manifest that claims SwiGLU still has biases MER cannot hold
    import shutil

    f = tmp_path / "f"
    shutil.copytree(extracted(REAL["moe-gptoss-mxfp4-bias.gguf"]), f)
    m = json.loads((f / "manifest.json").read_text())
    m["model"]["activation"] = {"kind": "swiglu"}
    (f / "manifest.json").write_bytes(manifest_bytes(m))  # a consistent manifest_xxh3
    with pytest.raises(MertoolsError, match="no place for expert biases"):
        export_mer(f, tmp_path / "mer", fsync=False)
    assert not (tmp_path / "mer").exists()


def test_partial_folder_is_refused(tmp_path):
    extract(REAL["mixtral-q4_0.gguf"], tmp_path / "part", experts={0, 1}, fsync=False)
    with pytest.raises(MertoolsError, match="--layers/--experts"):
        export_mer(tmp_path / "part", tmp_path / "mer", fsync=False)


def test_damaged_shard_is_refused(extracted, tmp_path):
    import shutil

    f = tmp_path / "f"
    shutil.copytree(extracted(REAL["mixtral-q4_0.gguf"]), f)
    m = json.loads((f / "manifest.json").read_text())
    p = f / m["experts"][2]["path"]
    b = bytearray(p.read_bytes())
    b[m["experts"][2]["tensors"]["up"]["offset"] + 3] ^= 1
    p.write_bytes(bytes(b))
    with pytest.raises(MertoolsError, match="checksum"):
        export_mer(f, tmp_path / "mer", fsync=False)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f"]


def test_other_types_and_layers(extracted, tmp_path):
    # block 0 is a dense FFN here: global ids count MoE layers only, from 0
    src = REAL["moe-merged-f16.gguf"]
    export_mer(extracted(src), tmp_path / "mer", fsync=False)
    meta = json.loads((tmp_path / "mer" / "metadata.json").read_text())
    assert meta["dtype"] == "f16" and meta["num_layers"] == 2 and meta["num_experts"] == 8
    b = (tmp_path / "mer" / "expert_4.bin").read_bytes()
    assert b[6] == IDS["F16"]
    ts = reader_tensors(src)
    assert b[4096:4096 + 64 * 96 * 2] == reference_bytes(ts, 2, 0, "gate")


def test_cli(extracted, tmp_path):
    folder = extracted(REAL["mixtral-q4_0.gguf"])
    p = run_cli("export", folder, "--to", "mer", tmp_path / "mer", "--json", "--no-fsync", check=True)
    d = json.loads(p.stdout)
    assert d["experts"] == 8 and d["dtype"] == "q4_0"
    p = run_cli("export", extracted(REAL["moe-merged-mxfp4.gguf"]), "--to", "mer", tmp_path / "m2")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "MXFP4" in p.stderr and not (tmp_path / "m2").exists()


def test_router_of_a_folder_without_dense_is_refused_in_one_line(extracted, tmp_path):
    """The reader accepts a manifest without `dense`; --router then had nothing to read and raised a TypeError."""
    import shutil

    f = tmp_path / "f"
    shutil.copytree(extracted(REAL["mixtral-q4_0.gguf"]), f)
    m = json.loads((f / "manifest.json").read_text())
    m["dense"] = None
    (f / "manifest.json").write_bytes(manifest_bytes(m))  # a consistent manifest_xxh3
    p = run_cli("export", f, "--to", "mer", tmp_path / "mer", "--router", "--no-fsync")
    assert p.returncode == 2 and "lists no dense.gguf" in p.stderr and "without --router" in p.stderr
    assert p.stderr.count("\n") == 1 and not (tmp_path / "mer").exists()
    export_mer(f, tmp_path / "mer", fsync=False)  # without --router: nothing it needs is missing


def test_router_of_a_dense_gguf_cut_while_it_is_read_is_an_error_not_sigbus(extracted, tmp_path):
    """dense.gguf cut after its checksum was checked (another process truncating it) made the router read touch
    pages past the file's end: SIGBUS ended the process with no message. Run in a subprocess, which that would kill."""
    import shutil
    import subprocess
    import sys
    import textwrap

    f = tmp_path / "f"
    shutil.copytree(extracted(REAL["mixtral-q4_0.gguf"]), f)
    code = textwrap.dedent(f"""
        import os, sys
        import gguf
        from mertools.errors import MertoolsError
        from mer_runtime.errors import MerError
        from mertools.export_mer import export_mer
        real = gguf.GGUFReader.__init__
        def cut_after_open(self, path, *a, **kw):
            real(self, path, *a, **kw)
            if str(path).endswith("dense.gguf"):
                os.truncate(path, 4096)  # the tensors' pages are now past the end
        gguf.GGUFReader.__init__ = cut_after_open
        try:
            export_mer({str(f)!r}, {str(tmp_path / "mer")!r}, router=True, fsync=False)
        except (MertoolsError, MerError) as exc:
            print("refused:", exc)
            sys.exit(2)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "refused:" in p.stdout and "dense.gguf" in p.stdout, (p.returncode, p.stderr[-1500:])
    assert not (tmp_path / "mer").exists()
