"""Runtime FFN results against float64 references computed independently (gguf dequantization of the SOURCE
tensors found by name, NumPy float64), for every fixture and type; and against the shared reference outputs."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from mer_runtime import load_manifest, open_shards
from mer_runtime.kernels import expert_ffn, kernel_for, matvec

from conftest import ALL_MOE, REAL, reader_tensors, reference_slice

TOL = 1e-4


def silu(v):
    return v / (1 + np.exp(-v))


def source_weights(tensors, layer, expert, role):
    t, d = reference_slice(tensors, layer, expert, role)
    return dequantize(np.asarray(d), t.tensor_type).astype(np.float64)


def oracle(tensors, layer, expert, x, biases, oai):
    w = {r: source_weights(tensors, layer, expert, r) for r in ("gate", "up", "down")}
    x = x.astype(np.float64)
    g, u = w["gate"] @ x, w["up"] @ x
    if biases:
        g += source_weights(tensors, layer, expert, "gate_bias")
        u += source_weights(tensors, layer, expert, "up_bias")
    if oai:
        g = np.minimum(g, 7.0)
        u = np.clip(u, -7.0, 7.0)
        h = (u + 1) * g / (1 + np.exp(-1.702 * g))
    else:
        h = silu(g) * u
    y = w["down"] @ h
    return y + source_weights(tensors, layer, expert, "down_bias") if biases else y


@pytest.mark.parametrize("src", ALL_MOE, ids=lambda p: p.name)
def test_ffn_matches_float64_reference_from_source(src, extracted):
    out = extracted(src)
    tensors = reader_tensors(src)
    m = load_manifest(out)
    x = np.random.default_rng(3).standard_normal(m.model["d_model"]).astype(np.float32)
    oai = m.model["activation"]["kind"] == "swiglu_oai"
    with open_shards(out, cache_slots=3) as s:
        for e in m.experts:
            y = s.ffn(e.layer, e.expert, x)
            ref = oracle(tensors, e.layer, e.expert, x, m.model["has_expert_biases"], oai)
            assert y.dtype == np.float32 and y.shape == ref.shape
            assert np.abs(y - ref).max() / np.abs(ref).max() < TOL, (e.path, e.tensors["gate"].dtype)


@pytest.mark.parametrize("src", sorted(REAL.glob("*.gguf")), ids=lambda p: p.name)
def test_ffn_matches_shared_reference_outputs(src, extracted):
    ref = np.load(src.with_suffix(".ref.npz"), allow_pickle=True)
    y_ref = ref["y_gptoss_native"] if "y_gptoss_native" in ref else ref["y"]
    layers = [int(v) for v in ref["layers"]]
    with open_shards(extracted(src), cache_slots=4) as s:
        for e in s.manifest.experts:
            y = s.ffn(e.layer, e.expert, ref["x"])
            want = y_ref[layers.index(e.layer), e.expert]
            assert np.abs(y - want).max() / np.abs(want).max() < TOL


def test_batched_input_equals_row_by_row(extracted):
    out = extracted(REAL / "mixtral-q4_k_m.gguf")
    xs = np.random.default_rng(9).standard_normal((5, 256)).astype(np.float32)
    with open_shards(out, cache_slots=2) as s:
        batch = s.ffn(1, 2, xs)
        assert batch.shape == (5, 256)
        for i in range(5):
            np.testing.assert_allclose(batch[i], s.ffn(1, 2, xs[i]), rtol=1e-6, atol=1e-7)
        with pytest.raises(ValueError, match=r"x must have shape \[256\]"):
            s.ffn(1, 2, np.ones(100, np.float32))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.F16, T.BF16, T.F32, T.Q5_0, T.MXFP4])
@pytest.mark.parametrize("rows, cols", [(1, 32), (37, 64), (300, 1024)])
def test_matvec_every_type_against_float64(qtype, rows, cols):
    rng = np.random.default_rng(rows * cols)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    raw = quantize(w, qtype) if qtype not in (T.F32, T.F16) else w.astype(np.float16 if qtype == T.F16 else np.float32)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    x = rng.standard_normal(cols).astype(np.float32)
    ref = dequantize(raw.reshape(rows, -1), qtype).astype(np.float64) @ x.astype(np.float64)
    got = matvec(qtype.name, raw, (rows, cols), x)
    assert np.abs(got - ref).max() / np.abs(ref).max() < TOL


def test_q4_0_extreme_scales_and_nibbles():
    """Every nibble value and large, tiny and negative f16 scales decode exactly as gguf does."""
    rows, cols = 16, 64
    blocks = np.zeros((rows, cols // 32, 18), np.uint8)
    scales = np.array([1.0, -2.5, 6.1e-5, 65504.0, -0.001, 3.0, 0.5, -8.0] * 4, np.float16).reshape(rows, 2)
    blocks[..., :2] = scales.view(np.uint8).reshape(rows, 2, 2)
    blocks[..., 2:] = np.arange(16 * 2 * rows, dtype=np.uint32).reshape(rows, 2, 16) * 37 % 256
    raw = blocks.reshape(-1)
    x = np.linspace(-1, 1, cols).astype(np.float32)
    ref = dequantize(raw.reshape(rows, -1), T.Q4_0).astype(np.float64) @ x.astype(np.float64)
    got = matvec("Q4_0", raw, (rows, cols), x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3 * np.abs(ref).max())


def test_kernel_paths_are_named():
    from mer_runtime import kernels

    assert kernels._LIB is not None, "the C kernel was not built: pip install -e . needs a C compiler"
    assert "C, " in kernel_for("Q4_0") and "block kernel" in kernel_for("Q8_0")
    assert kernel_for("F16").startswith("numpy") and "slower" in kernel_for("Q4_K")
    assert kernel_for("NOPE") == "unsupported"


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0])
def test_portable_and_simd_paths_agree(qtype):
    rng = np.random.default_rng(11)
    rows, cols = 2048, 1024  # large enough to be split across threads
    raw = quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype).reshape(-1)
    x = rng.standard_normal(cols).astype(np.float32)
    fast, portable = matvec(qtype.name, raw, (rows, cols), x), matvec(qtype.name, raw, (rows, cols), x, simd=0)
    ref = dequantize(raw.reshape(rows, -1), qtype).astype(np.float64) @ x.astype(np.float64)
    for got in (fast, portable):
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


def test_without_the_c_kernel_results_are_the_same(tmp_path):
    """MER_KERNELS=numpy: the fallback an install without a compiler gets."""
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    raw = quantize(rng.standard_normal((64, 256)).astype(np.float32), T.Q4_0).reshape(-1)
    x = rng.standard_normal(256).astype(np.float32)
    np.save(tmp_path / "raw.npy", raw)
    np.save(tmp_path / "x.npy", x)
    code = ("import numpy as np, sys; from mer_runtime.kernels import matvec, kernel_for; "
            f"d = {str(tmp_path)!r}; print(kernel_for('Q4_0')); "
            "np.save(d + '/y.npy', matvec('Q4_0', np.load(d + '/raw.npy'), (64, 256), np.load(d + '/x.npy')))")
    p = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "MER_KERNELS": "numpy"},
                       capture_output=True, text=True, check=True)
    assert "gguf dequantize" in p.stdout
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), matvec("Q4_0", raw, (64, 256), x), rtol=1e-5, atol=1e-6)


def test_activation_kinds():
    tensors = {r: ("F32", s, np.eye(*s, dtype=np.float32).view(np.uint8).reshape(-1))
               for r, s in (("gate", (4, 4)), ("up", (4, 4)), ("down", (4, 4)))}
    x = np.array([10.0, -10.0, 1.0, 0.0], np.float32)
    y = expert_ffn(tensors, x, {"kind": "swiglu"})
    np.testing.assert_allclose(y, silu(x.astype(np.float64)) * x, rtol=1e-6)
    y = expert_ffn(tensors, x, {"kind": "swiglu_oai", "alpha": 1.702, "limit": 7.0})
    g = np.minimum(x, 7.0).astype(np.float64)
    u = np.clip(x, -7, 7).astype(np.float64)
    np.testing.assert_allclose(y, (u + 1) * g / (1 + np.exp(-1.702 * g)), rtol=1e-6)
    with pytest.raises(ValueError, match="geglu"):
        expert_ffn(tensors, x, {"kind": "geglu"})
