"""Kernels against references that share nothing with them: the gguf package's dequantization of the SOURCE
tensors (found by name) with NumPy float64, the float64 outputs in fixtures/real/*.ref.npz, and, for the types that
go through gguf's own dequantization in the runtime, a decoder written here from the block layout.

Every C kernel is checked on both paths (AVX2 and portable, forced with simd=0) on every real fixture and on random
valid blocks. With MER_KERNELS=numpy (no C kernel) the same tests check the fallback; C-only tests skip."""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from mer_runtime import kernels, load_manifest, open_shards
from mer_runtime.kernels import KernelError, dequantize_tensor, expert_ffn, kernel_for, matvec

from conftest import ALL_MOE, REAL, reader_tensors, reference_slice

TOL = 1e-5  # float32 activations: rounding stays near 1e-7..1e-6 of the output's scale
C_TYPES = [T.Q4_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4, T.F16, T.BF16, T.F32]
needs_c = pytest.mark.skipif(kernels._LIB is None, reason="C kernel not built or MER_KERNELS=numpy")
SIMD = [-1, 0] if kernels._LIB is not None else [-1]


def silu(v):
    return v / (1 + np.exp(-v))


def rel(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


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


def random_blocks(qt: T, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes with sane scales: every quant value and every scale/min code appears."""
    blk, bb = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(rows, cols // blk, bb), dtype=np.uint8)
    lead = raw.shape[:2]

    def f16(lo, hi, k=1):
        return rng.uniform(lo, hi, lead + (k,)).astype(np.float16).view(np.uint8).reshape(lead + (2 * k,))

    if qt in (T.Q4_0, T.Q8_0):
        raw[..., :2] = f16(-0.05, 0.05)
    elif qt in (T.Q4_K, T.Q5_K):
        raw[..., :4] = f16(0.001, 0.05, 2)
    elif qt == T.Q6_K:
        raw[..., 208:210] = f16(-0.05, 0.05)
    elif qt == T.MXFP4:
        raw[..., 0] = rng.integers(110, 140, lead)
    return raw.reshape(-1)


def random_matrix(qt: T, rows: int, cols: int, rng) -> np.ndarray:
    if qt in (T.F32, T.F16):
        w = rng.standard_normal((rows, cols)).astype(np.float32 if qt == T.F32 else np.float16)
        return w.view(np.uint8).reshape(-1)
    if qt == T.BF16:
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32), T.BF16).reshape(-1)
    return random_blocks(qt, rows, cols, rng)


# -- whole experts on every fixture ------------------------------------------------------------------------------
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
            assert rel(y, ref) < TOL, (e.path, e.tensors["gate"].dtype)


@pytest.mark.parametrize("src", sorted(REAL.glob("*.gguf")), ids=lambda p: p.name)
def test_ffn_matches_shared_reference_outputs(src, extracted):
    ref = np.load(src.with_suffix(".ref.npz"), allow_pickle=True)
    y_ref = ref["y_gptoss_native"] if "y_gptoss_native" in ref else ref["y"]
    layers = [int(v) for v in ref["layers"]]
    with open_shards(extracted(src), cache_slots=4) as s:
        for e in s.manifest.experts:
            y = s.ffn(e.layer, e.expert, ref["x"])
            assert rel(y, y_ref[layers.index(e.layer), e.expert]) < TOL, e.path


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("src", sorted(REAL.glob("*.gguf")), ids=lambda p: p.name)
def test_every_projection_of_every_real_fixture(src, extracted, simd):
    """Each kernel (AVX2 and portable) on each projection the fixtures hold, against gguf's dequantize in float64."""
    xs = np.random.default_rng(4).standard_normal((2, 256)).astype(np.float32)
    with open_shards(extracted(src), cache_slots=3) as s:
        for e in s.manifest.experts:
            with s.load(e.layer, e.expert) as ex:
                for role in ("gate", "up", "down"):
                    p = ex.tensors[role]
                    ref = dequantize_tensor(p.dtype, p.shape, p.raw) @ xs.T.astype(np.float64)
                    got = matvec(p.dtype, p.raw, p.shape, xs, simd=simd)
                    assert got.shape == (2, p.shape[0])
                    assert rel(got.T, ref) < TOL, (e.path, role, p.dtype, simd)


# -- every type on random data -----------------------------------------------------------------------------------
@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("qtype", C_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows, cols", [(1, 256), (7, 512), (37, 1280)])
def test_c_types_on_random_valid_blocks(qtype, rows, cols, simd):
    """Row counts that are not multiples of the 4 rows a pass, single and batched inputs."""
    rng = np.random.default_rng(rows * cols + qtype)
    raw = random_matrix(qtype, rows, cols, rng)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    ref = dequantize(raw.reshape(rows, -1), qtype).astype(np.float64) @ x.T.astype(np.float64)
    assert rel(matvec(qtype.name, raw, (rows, cols), x, simd=simd).T, ref) < TOL
    assert rel(matvec(qtype.name, raw, (rows, cols), x[1], simd=simd), ref[:, 1]) < TOL


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16])
@pytest.mark.parametrize("cols", [1, 13, 42])
def test_float_types_with_odd_widths(qtype, cols):
    rng = np.random.default_rng(cols)
    raw = random_matrix(qtype, 9, cols, rng)
    x = rng.standard_normal(cols).astype(np.float32)
    ref = dequantize(raw.reshape(9, -1), qtype).astype(np.float64) @ x.astype(np.float64)
    for simd in SIMD:
        assert rel(matvec(qtype.name, raw, (9, cols), x, simd=simd), ref) < TOL


def decode_q5_0(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q5_0 from its layout (formats.md 2.2), written here: f16 d; u32 qh (bit j = 5th bit of element j);
    16 bytes of nibbles (element j low nibble of byte j, element j+16 the high one); value d * (q - 16)."""
    b = raw.reshape(rows, cols // 32, 22)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)
    qh = b[..., 2:6].copy().view("<u4")[..., 0]
    qs = b[..., 6:22].astype(np.int64)
    q = np.concatenate([qs & 15, qs >> 4], axis=-1)
    q |= ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int64) << 4
    return (d[..., None] * (q - 16)).reshape(rows, cols)


@pytest.mark.parametrize("rows, cols", [(1, 32), (37, 64), (300, 1024)])
def test_q5_0_against_a_decoder_written_from_the_layout(rows, cols):
    """Q5_0 goes through gguf's dequantize in the runtime, so the reference must not: it is decoded here."""
    rng = np.random.default_rng(rows + cols)
    raw = quantize(rng.standard_normal((rows, cols)).astype(np.float32), T.Q5_0).reshape(-1)
    x = rng.standard_normal(cols).astype(np.float32)
    assert rel(matvec("Q5_0", raw, (rows, cols), x), decode_q5_0(raw, rows, cols) @ x.astype(np.float64)) < TOL


@pytest.mark.parametrize("rows, cols", [(1, 32), (37, 64), (300, 1024)])
def test_mxfp4_against_e2m1_from_first_principles(rows, cols):
    """MXFP4 decoded here: e2m1 (sign, 2-bit exponent, 1-bit mantissa) times 2^(e - 127)."""
    rng = np.random.default_rng(rows * 7 + cols)
    raw = random_blocks(T.MXFP4, rows, cols, rng)
    b = raw.reshape(rows, cols // 32, 17)
    nib = np.concatenate([b[..., 1:] & 15, b[..., 1:] >> 4], axis=-1).astype(np.int64)
    ex, man, sign = (nib >> 1) & 3, nib & 1, np.where(nib & 8, -1.0, 1.0)
    mag = np.where(ex == 0, 0.5 * man, (1 + 0.5 * man) * 2.0 ** (ex - 1))
    w = (sign * mag * 2.0 ** (b[..., :1].astype(np.float64) - 127)).reshape(rows, cols)
    x = rng.standard_normal(cols).astype(np.float32)
    for simd in SIMD:
        assert rel(matvec("MXFP4", raw, (rows, cols), x, simd=simd), w @ x.astype(np.float64)) < TOL


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
    for simd in SIMD:
        np.testing.assert_allclose(matvec("Q4_0", raw, (rows, cols), x, simd=simd), ref, rtol=1e-5,
                                   atol=1e-3 * np.abs(ref).max())


def _hand_over_inputs(raw, cols, rng, thr):
    """Vectors whose every |value| lies in [1, 2) x 2^e, at the pre-scaled kernels' hand-over (e = thr: the smallest
    exponent still pre-scaled, every product exact), one below (the unscaled kernel) and eight below (where a
    threshold set too low would leave values subnormal and lose bits)."""
    mant = (rng.choice([-1.0, 1.0], cols) * (1 + rng.uniform(0, 1, cols)))
    for e in (thr, thr - 1, thr - 8):
        yield f"x in [1, 2) x 2^{e}", raw, (mant * 2.0 ** e).astype(np.float32)
    # below the hand-over a vector is scaled up by 2^E, unless its largest value would then pass 2^64: this one
    # (range 2^170) is read as it is
    wide = (mant * 2.0 ** (thr - 8)).astype(np.float32)
    wide[1] = 2.0 ** 60
    yield f"one value 2^60, the rest at 2^{thr - 8}", raw, wide


def _adversarial_q4_0_inputs(raw, rows, cols, rng):
    """(name, raw, x): activations that break a kernel which is not exact per product: one outlier per block on a
    column whose weights are all 0 (a kernel that takes the nibbles unsigned and subtracts 8 * sum(x) afterwards
    loses the other values of the block to cancellation: 8e-5 at 1e4), values over 17 orders of magnitude within
    a block, exact cancellation (x and -x under equal weights), and whole vectors near float32's ends (the exact
    kernel pre-scales x by powers of two; an x holding any nonzero value below 2^-98 goes to the kernel that reads x
    as it is)."""
    x = rng.standard_normal(cols).astype(np.float32)
    zero_col = raw.reshape(rows, cols // 32, 18).copy()
    zero_col[:, :, 2] = (zero_col[:, :, 2] & 0xF0) | 8  # element 0 of every block: nibble 8, weight 0
    for r in (1e3, 1e4, 1e6):
        xo = x.copy()
        xo[::32] *= r
        yield f"outlier {r:g} on a zero column", zero_col.reshape(-1), xo
        yield f"outlier {r:g}", raw, xo
    yield "wide range", raw, (x * np.exp(rng.uniform(-20, 20, cols))).astype(np.float32)
    pair = raw.reshape(rows, cols // 32, 18).copy()
    pair[:, :, 3] = pair[:, :, 2]  # elements 0/1 and 16/17 share their weights
    xc = x.copy()
    xc[1::32], xc[17::32] = -xc[0::32], -xc[16::32]
    xc[0::32] *= 1e5
    xc[1::32] *= 1e5
    yield "cancelling pairs", pair.reshape(-1), xc
    for scale in (2.0 ** -120, 2.0 ** -100, 2.0 ** -80, 1e30):
        yield f"x * {scale:g}", raw, (x * scale).astype(np.float32)
    yield from _hand_over_inputs(raw, cols, rng, -98)  # 2^-126 / 2^-28, the deepest pre-scaling of Q4_0
    # one large value on a weight-0 column and the rest about 1e-35: the largest |x| is 1, but the rest would turn
    # subnormal under the 2^-28 pre-scaling (a guard that tests only the largest value let this lose 4e-3)
    tiny = (x * np.float32(1e-35)).astype(np.float32)
    tiny[0] = 1.0
    yield "large value on a zero column, the rest 1e-35", zero_col.reshape(-1), tiny


@pytest.mark.parametrize("simd", SIMD)
def test_q4_0_exact_on_adversarial_activations(simd):
    """Exact means per product: the float64 reference within 1e-5 of the output's largest value on activations
    chosen to expose a kernel that trades exactness for speed (see _adversarial_q4_0_inputs)."""
    _check_exact_on_adversarial(T.Q4_0, _adversarial_q4_0_inputs, 808, simd)


def _check_exact_on_adversarial(qtype, inputs, seed, simd):
    rng = np.random.default_rng(seed)
    rows, cols = 64, 1024
    raw = random_matrix(qtype, rows, cols, rng)
    for name, r, x in inputs(raw, rows, cols, rng):
        w = dequantize(r.reshape(rows, -1), qtype).astype(np.float64)
        ref = w @ x.astype(np.float64)
        got = matvec(qtype.name, r, (rows, cols), x, simd=simd)
        assert np.all(np.isfinite(got)), name
        # float32 products summed: each row within a few roundings of the sum of |w x| (the weight-0 outliers do not
        # count); cancelling pairs 1e5 above the rest lose what float32 cannot hold, so the plain ratio skips them
        err = np.abs(got - ref)
        bound = np.abs(w) @ np.abs(x.astype(np.float64))
        if os.environ.get("MER_SHOW_ADVERSARIAL"):
            print(f"{qtype.name} simd={simd} {name}: err/bound {np.max(err / bound):.2e} rel {rel(got, ref):.2e}")
        assert np.all(err <= 1e-6 * bound), (name, err.max())
        if name != "cancelling pairs":
            assert rel(got, ref) < 1e-6, (name, rel(got, ref))


@pytest.mark.parametrize("simd", SIMD)
def test_q4_0_exact_batch_with_a_tiny_token(simd):
    """Each token of a batch is exact on its own scale: a token 1e-33 the size of its neighbour (whose values keep
    the batch's largest far from the pre-scaling guard) is judged against its own reference, not the batch's."""
    rng = np.random.default_rng(809)
    rows, cols = 64, 1024
    raw = random_matrix(T.Q4_0, rows, cols, rng)
    xb = rng.standard_normal((2, cols)).astype(np.float32)
    xb[1] *= np.float32(1e-33)
    ref = xb.astype(np.float64) @ dequantize(raw.reshape(rows, -1), T.Q4_0).astype(np.float64).T
    got = matvec("Q4_0", raw, (rows, cols), xb, simd=simd).reshape(2, rows)
    for t in range(2):
        assert rel(got[t], ref[t]) < 1e-6, (t, rel(got[t], ref[t]))


def _prescaled_adversarial(raw, zero_col, pair, x, cols, rng):
    """The inputs every pre-scaled exact kernel (Q4_K, Q5_K, Q6_K) is tried on, given its zero column and its
    cancelling pairs (type-specific): outliers, a wide range, scales around the hand-over, one large value beside
    values that would go subnormal once scaled."""
    for r in (1e3, 1e4, 1e6):
        xo = x.copy()
        xo[::32] *= r
        yield f"outlier {r:g} on a zero column", zero_col, xo
        yield f"outlier {r:g}", raw, xo
    yield "wide range", raw, (x * np.exp(rng.uniform(-20, 20, cols))).astype(np.float32)
    xc = x.copy()
    xc[1::32] = -xc[0::32]
    xc[0::32] *= 1e5
    xc[1::32] *= 1e5
    yield "cancelling pairs", pair, xc
    for scale in (2.0 ** -120, 2.0 ** -100, 2.0 ** -92, 2.0 ** -88, 2.0 ** -80, 1e30):
        yield f"x * {scale:g}", raw, (x * scale).astype(np.float32)
    yield from _hand_over_inputs(raw, cols, rng, -102)  # 2^-126 / 2^-24, the deepest pre-scaling
    tiny = (x * np.float32(1e-35)).astype(np.float32)  # the largest |x| is 1, the rest would go subnormal scaled
    tiny[0] = 1.0
    yield "large value on a zero column, the rest 1e-35", zero_col, tiny


def _adversarial_qk45_inputs(qtype, raw, rows, cols, rng):
    """(name, raw, x) as _adversarial_q4_0_inputs for Q4_K/Q5_K (their exact kernel pre-scales x by 2^-8k):
    the zero column is element 0 of every 32-element sub-block (quant 0, every min of the super-block 0), the
    cancelling pairs are elements 0/1 of every sub-block (byte 1 of each chunk's quants, and of qh, = byte 0)."""
    bb, qs = (144, 16) if qtype == T.Q4_K else (176, 48)
    x = rng.standard_normal(cols).astype(np.float32)
    zero_col = raw.reshape(rows, cols // 256, bb).copy()
    zero_col[:, :, 8:12] = 0  # mins 0..3 and the high bits of mins 4..7
    zero_col[:, :, 12:16] &= 0x0F  # the low bits of mins 4..7 (scales untouched)
    zero_col[:, :, qs:qs + 128:32] = 0  # elements 64c and 64c + 32: both nibbles of each chunk's byte 0
    if qtype == T.Q5_K:
        zero_col[:, :, 16] = 0  # their fifth bits
    zero_col = zero_col.reshape(-1)
    assert not dequantize(zero_col.reshape(rows, -1), qtype)[:, ::32].any()
    pair = raw.reshape(rows, cols // 256, bb).copy()
    pair[:, :, qs + 1:qs + 128:32] = pair[:, :, qs:qs + 128:32]
    if qtype == T.Q5_K:
        pair[:, :, 17] = pair[:, :, 16]
    yield from _prescaled_adversarial(raw, zero_col, pair.reshape(-1), x, cols, rng)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K], ids=lambda t: t.name)
def test_qk45_exact_on_adversarial_activations(qtype, simd):
    """As test_q4_0_exact_on_adversarial_activations, for the K-quants whose exact kernel reads pre-scaled x."""
    _check_exact_on_adversarial(qtype, functools.partial(_adversarial_qk45_inputs, qtype), 809, simd)


def _adversarial_q6k_inputs(raw, rows, cols, rng):
    """(name, raw, x) as _adversarial_q4_0_inputs for Q6_K (its exact kernel pre-scales x by 2^-8k): the zero column
    is element 0 of every 32 (both nibbles of ql bytes 0 and 32 of each half are 0 and their qh byte 0b10101010:
    quant 32, weight 0), the cancelling pairs are elements 0/1 of every 32 (ql bytes 1 and 33, qh byte 1 = bytes 0
    and 32, 0), which share a sub-block scale."""
    x = rng.standard_normal(cols).astype(np.float32)
    zero_col = raw.reshape(rows, cols // 256, 210).copy()
    for n in range(2):
        zero_col[:, :, 64 * n] = 0
        zero_col[:, :, 64 * n + 32] = 0
        zero_col[:, :, 128 + 32 * n] = 0xAA
    zero_col = zero_col.reshape(-1)
    assert not dequantize(zero_col.reshape(rows, -1), T.Q6_K)[:, ::32].any()
    pair = raw.reshape(rows, cols // 256, 210).copy()
    for n in range(2):
        for o in (64 * n, 64 * n + 32, 128 + 32 * n):
            pair[:, :, o + 1] = pair[:, :, o]
    yield from _prescaled_adversarial(raw, zero_col, pair.reshape(-1), x, cols, rng)


@pytest.mark.parametrize("simd", SIMD)
def test_q6k_exact_on_adversarial_activations(simd):
    """As test_q4_0_exact_on_adversarial_activations, for Q6_K, whose exact kernel reads pre-scaled x."""
    _check_exact_on_adversarial(T.Q6_K, _adversarial_q6k_inputs, 810, simd)


@needs_c
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q6_K], ids=lambda t: t.name)
def test_q8_activations_round_half_away_from_zero(qtype):
    """Activations exactly halfway between two steps round away from zero (roundf, ggml's rule), on the SIMD
    quantizer as on the scalar one: round-half-to-even (the vector unit's default) is 8e-3 off here."""
    rng = np.random.default_rng(32)
    rows, cols = 16, 512
    blk = 256 if qtype == T.Q6_K else 32
    raw = random_matrix(qtype, rows, cols, rng)
    w = dequantize(raw.reshape(rows, -1), qtype).astype(np.float64)
    x = (rng.integers(-120, 120, cols) + 0.5).astype(np.float32)
    x[::blk] = 127  # each block's scale is 1: every other value is a tie
    q = np.where(x >= 0, np.floor(x + 0.5), np.ceil(x - 0.5)).astype(np.float64)
    assert rel(w @ np.round(x.astype(np.float64)), w @ q) > 1e-3  # the test can tell the two rules apart
    for simd in SIMD:
        assert rel(matvec(qtype.name, raw, (rows, cols), x, act="q8", simd=simd), w @ q) < 1e-6, simd


def _inf_case(qtype, rows: int, cols: int, seed: int, tiny: bool = False):
    """A random matrix and 3 vectors: +inf in the first, -inf in the second (with a tiny value beside it if `tiny`:
    the pre-scaled kernels' other branch), the third finite; and the float64 reference on the dequantized weights,
    checked to hold both +-inf and finite rows (so a test can tell NaN from +-inf)."""
    rng = np.random.default_rng(seed)
    raw = random_matrix(qtype, rows, cols, rng)
    w = dequantize(raw.reshape(rows, -1), qtype).astype(np.float64)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    x[0, 7] = np.inf
    x[1, 300] = -np.inf
    if tiny:
        x[1, 40] = 1e-38
    with np.errstate(invalid="ignore"):
        ref = (w[None, :, :] * x.astype(np.float64)[:, None, :]).sum(-1)
    assert np.isinf(ref[:2]).any() and np.isfinite(ref[2]).all()
    return raw, x, ref


def _nonfinite_pattern(a):
    a = np.asarray(a, np.float64)
    return np.isnan(a), np.isposinf(a), np.isneginf(a)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.MXFP4, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_q8_activations_propagate_nan(qtype):
    """A NaN in x makes every output of its vector NaN, as in float64, on the SIMD and the portable quantizer: the
    block holding it gets scale NaN (the AVX2 conversion turned NaN into -128, which broke the sign trick, the
    scalar cast gave 0; both paths returned finite numbers that disagreed). The other vector of the batch, and
    the blocks of a vector without NaN, stay as they were."""
    rng = np.random.default_rng(44)
    rows, cols = 8, 512
    raw = random_matrix(qtype, rows, cols, rng)
    w = dequantize(raw.reshape(rows, -1), qtype).astype(np.float64)
    x = rng.standard_normal((2, cols)).astype(np.float32)
    x[0, 5] = np.nan
    with np.errstate(invalid="ignore"):
        ref = (w[None, :, :] * x.astype(np.float64)[:, None, :]).sum(-1)
    assert np.isnan(ref[0]).all() and np.isfinite(ref[1]).all()
    for simd in SIMD:
        got = matvec(qtype.name, raw, (rows, cols), x, act="q8", simd=simd)
        assert (np.isnan(got) == np.isnan(ref)).all(), (simd, got)
        assert rel(got[1], ref[1]) < 0.05, simd


@pytest.mark.parametrize("qtype", C_TYPES, ids=lambda t: t.name)
def test_exact_paths_follow_float64_on_inf(qtype):
    """A single +inf in x (and a -inf in another vector) gives the float64 reference's pattern of +inf, -inf and
    NaN on every exact path: the K-quant SIMD kernels subtract dmin * m * sum(x) apart from d * sc * sum(q * x),
    which is inf - inf = NaN where the reference has w * inf = +-inf, so such a call takes the unfactored path."""
    rows, cols = 16, 512
    raw, x, ref = _inf_case(qtype, rows, cols, seed=45, tiny=True)
    variants = [(simd, 0) for simd in SIMD]
    if kernels._LIB is not None:
        variants.append((-1, kernels.FLAG_NO_PERM))
    for simd, flags in variants:
        got = matvec(qtype.name, raw, (rows, cols), x, simd=simd, flags=flags)
        for g, r in zip(_nonfinite_pattern(got), _nonfinite_pattern(ref)):
            assert (g == r).all(), (simd, flags, got[:2], ref[:2])
        assert rel(got[2], ref[2]) < TOL, (simd, flags)


Q8_VARIANTS = [(simd, 0) for simd in SIMD] + ([(-1, kernels.FLAG_NO_VNNI), (-1, kernels.FLAG_NO_PERM)]
                                              if kernels._LIB is not None else [])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # MER_KERNELS=numpy: inf x 0, as float64
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.MXFP4, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_q8_activations_follow_float64_on_inf(qtype):
    """act="q8" with an infinity in x used to give NaN for every output of its vector (the block's scale inf, its
    quants 0, inf * 0), where the float64 reference on the dequantized weights gives +inf, -inf or NaN row by row,
    as the exact path does. Now such a call computes with float32 activations, as act="f32" (the rule of
    docs/runtime.md), on the SIMD and the portable quantizer: the same pattern as float64, the finite vector close
    to it. With MER_KERNELS=numpy, act="q8" is float32 already: the same assertions hold."""
    rows, cols = 16, 512
    raw, x, ref = _inf_case(qtype, rows, cols, seed=46)
    for simd, flags in Q8_VARIANTS:
        for xs in (x, x[0]):  # a batch, and one vector
            got = matvec(qtype.name, raw, (rows, cols), xs, act="q8", simd=simd, flags=flags)
            want = ref if xs.ndim == 2 else ref[0]
            for g, r in zip(_nonfinite_pattern(got), _nonfinite_pattern(want)):
                assert (g == r).all(), (simd, flags, got, want)
        assert rel(got := matvec(qtype.name, raw, (rows, cols), x, act="q8", simd=simd, flags=flags)[2], ref[2]) \
            < TOL, (simd, flags, got)  # float32 activations for the whole call


def _signed_rows_q6_k(signs, cols: int, rng) -> np.ndarray:
    """Q6_K rows whose every weight is nonzero and has its row's sign: q - 32 in 1..15 (qh's 2 bits set to 2, ql's
    nibbles 1..15), positive scales, d = sign * 0.01 (block layout: ql[128], qh[64], scales[16], d f16)."""
    out = np.zeros((len(signs), cols // 256, 210), np.uint8)
    lo = rng.integers(1, 16, out.shape[:2] + (128, 2))
    out[..., :128] = lo[..., 0] | lo[..., 1] << 4
    out[..., 128:192] = 0xAA
    out[..., 192:208] = rng.integers(1, 64, out.shape[:2] + (16,))
    out[..., 208:210] = (np.asarray(signs, np.float16)[:, None, None] * np.float16(0.01)).view(np.uint8)
    return out.reshape(-1)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # MER_KERNELS=numpy: inf x 0, as float64
@pytest.mark.parametrize("down", [T.Q8_0, T.Q6_K], ids=lambda t: t.name)
def test_q8_moe_follows_float64_on_inf(down):
    """The same in one moe() call, where an infinity in x also makes h infinite before `down`: gate and up have
    positive weights in x's infinite column, so h is +inf on every row, and each down row has one sign, so the
    float64 reference is +inf or -inf row by row (NaN where both experts disagree). act="q8" used to give NaN
    everywhere (x's block, then h's blocks, quantized with an infinite scale); the finite vector stays close."""
    rng = np.random.default_rng(47)
    d_model, d_ff = 256, 256
    signs = np.where(rng.random(d_model) < 0.5, -1.0, 1.0)

    def q8_0(m):
        return quantize(m.astype(np.float32), T.Q8_0).reshape(-1)

    experts, refw = [], []
    for e in range(2):
        gu = []
        for _ in range(2):
            m = rng.standard_normal((d_ff, d_model)) * 0.05
            m[:, 3] = rng.uniform(0.2, 0.5, d_ff)  # x[0, 3] = +inf: every row of gate and up is +inf
            gu.append(q8_0(m))
        if down == T.Q8_0:
            dn = q8_0(signs[:, None] * rng.uniform(0.01, 0.05, (d_model, d_ff)))
        else:
            dn = _signed_rows_q6_k(signs if e == 0 else np.where(np.arange(d_model) < 8, -signs, signs), d_ff, rng)
        t = {"gate": ("Q8_0", (d_ff, d_model), gu[0]), "up": ("Q8_0", (d_ff, d_model), gu[1]),
             "down": (down.name, (d_model, d_ff), dn)}
        experts.append(t)
        refw.append({r: dequantize_tensor(*t[r]) for r in kernels.ROLES})
    x = (rng.standard_normal((2, d_model)) * 0.5).astype(np.float32)
    x[0, 3] = np.inf
    wk = np.array([0.6, 0.4], np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = sum(float(k) * kernels.reference_ffn(w, x, {"kind": "swiglu"}) for k, w in zip(wk, refw))
    assert np.isposinf(ref[0]).any() and np.isneginf(ref[0]).any() and np.isfinite(ref[1]).all()
    for simd, flags in Q8_VARIANTS:
        if flags:
            continue  # moe() takes no extra flags; the one-projection variants are checked above
        got = kernels.moe(experts, wk, x, {"kind": "swiglu"}, act="q8", simd=simd)
        for g, r in zip(_nonfinite_pattern(got), _nonfinite_pattern(ref)):
            assert (g == r).all(), (simd, got[0], ref[0])
        assert rel(got[1], ref[1]) < 0.05, simd  # q8 activations for the finite vector... or float32 ones


@needs_c
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.MXFP4], ids=lambda t: t.name)
def test_q8_activations_on_an_odd_number_of_blocks(qtype):
    """The one-row q8 kernels take blocks two at a time: a row of 7 blocks ends with one alone. On the activation
    grid the result is exact."""
    rng = np.random.default_rng(31)
    rows, cols = 9, 224
    raw = random_matrix(qtype, rows, cols, rng)
    q = rng.integers(-127, 128, (cols // 32, 32))
    q[:, 0] = 127
    xq = (q * 2.0 ** rng.integers(-8, 0, (cols // 32, 1))).astype(np.float32).reshape(-1)
    exact = dequantize(raw.reshape(rows, -1), qtype).astype(np.float64) @ xq.astype(np.float64)
    for simd in SIMD:
        assert rel(matvec(qtype.name, raw, (rows, cols), xq, act="q8", simd=simd), exact) < TOL, simd


@needs_c
def test_q8_activations_with_huge_mxfp4_scales():
    """MXFP4 scales reach 2^127: the weight scale must meet the activation scale before the integer dot (a kernel
    that multiplied weight scale x dot first overflowed to inf, then NaN, where every other path is finite)."""
    rng = np.random.default_rng(2)
    rows, cols = 8, 256
    raw = random_matrix(T.MXFP4, rows, cols, rng).reshape(rows, cols // 32, 17)
    raw[:, :, 0] = 245  # E8M0 2^118: weights up to 6 * 2^118, finite float32
    raw = raw.reshape(-1)
    x = (rng.standard_normal(cols) * 2.0 ** -100).astype(np.float32)
    ref = dequantize(raw.reshape(rows, -1), T.MXFP4).astype(np.float64) @ x.astype(np.float64)
    for simd in SIMD:
        got = matvec("MXFP4", raw, (rows, cols), x, act="q8", simd=simd)
        assert np.all(np.isfinite(got)), simd
        assert rel(got, ref) < 0.05, (simd, rel(got, ref))


@needs_c
@pytest.mark.parametrize("qtype", C_TYPES, ids=lambda t: t.name)
def test_c_block_decoder_equals_gguf(qtype):
    """The portable C decoder, block by block, against gguf's dequantize (random blocks, every byte value)."""
    rng = np.random.default_rng(int(qtype))
    cols = 1024
    raw = random_matrix(qtype, 1, cols, rng)
    out = np.empty(cols, np.float32)
    assert kernels._LIB.mer_dequantize(int(qtype), raw.ctypes.data, raw.nbytes, cols, out.ctypes.data, cols) == 0
    np.testing.assert_allclose(out, dequantize(raw.reshape(1, -1), qtype).reshape(-1), rtol=2e-7, atol=0)


# -- the registry, paths and their names -------------------------------------------------------------------------
def test_registry_is_the_one_source_of_type_facts():
    for qt, (block, tsize) in GGML_QUANT_SIZES.items():
        info = kernels.DTYPES[qt.name]
        assert (info.block, info.block_bytes, info.ggml_id) == (block, tsize, int(qt))
        assert kernel_for(qt.name) == info.describe()
    assert kernels.DTYPES["Q4_K"].nbytes(3, 512) == 3 * 2 * 144
    with pytest.raises(KernelError, match="not a whole number"):
        kernels.DTYPES["Q4_0"].nbytes(1, 33)
    assert kernel_for("NOPE") == "unsupported"
    with pytest.raises(KernelError, match="NOPE"):
        matvec("NOPE", np.zeros(4, np.uint8), (1, 1), np.zeros(1, np.float32))


def test_kernel_paths_are_named():
    if kernels._LIB is None:
        assert "slower" in kernel_for("Q4_K") and kernel_for("F16").startswith("numpy")
        pytest.skip("C kernel not built or MER_KERNELS=numpy: only the fallback names are checked")
    for qt in C_TYPES:
        assert "C kernel" in kernel_for(qt.name) and f"{kernels.threads()} threads" in kernel_for(qt.name)
    assert "slower" in kernel_for("Q5_0") and "slower" in kernel_for("IQ2_XXS")
    # where the AVX-512 kernels run, inspect says so, for the types that have them and no other
    for name in ("Q4_0", "MXFP4", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16"):
        assert ("AVX-512" in kernel_for(name)) == (kernels.AVX512 and name != "F16"), name


@needs_c
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q5_K, T.MXFP4], ids=lambda t: t.name)
def test_byte_widening_kernels_too(qtype):
    """The AVX2 kernels that widen bytes in registers (used when the permuted copy of x cannot be allocated)."""
    rng = np.random.default_rng(21)
    raw = random_matrix(qtype, 37, 1024, rng)
    x = rng.standard_normal((2, 1024)).astype(np.float32)
    ref = dequantize(raw.reshape(37, -1), qtype).astype(np.float64) @ x.T.astype(np.float64)
    assert rel(matvec(qtype.name, raw, (37, 1024), x, flags=kernels.FLAG_NO_PERM).T, ref) < TOL


@needs_c
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.Q4_K, T.MXFP4])
def test_portable_and_simd_paths_agree_when_split_across_threads(qtype):
    rng = np.random.default_rng(11)
    rows, cols = 2048, 1024  # past the size below which the pool is not used
    raw = random_matrix(qtype, rows, cols, rng)
    x = rng.standard_normal(cols).astype(np.float32)
    ref = dequantize(raw.reshape(rows, -1), qtype).astype(np.float64) @ x.astype(np.float64)
    for simd in (-1, 0):
        assert rel(matvec(qtype.name, raw, (rows, cols), x, simd=simd), ref) < TOL


# -- q8 activations (opt-in) ---------------------------------------------------------------------------------------
@needs_c
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.MXFP4, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_q8_activations_are_close_not_exact(qtype):
    """act="q8" quantizes x to 8-bit blocks (Q8_0: 32 values a scale; for K-quant weights Q8_K: 256 values a scale):
    the error is that of an 8-bit x (bounded, documented), and it is really used (the result differs from the exact
    one); SIMD and portable agree on the integer sums."""
    rng = np.random.default_rng(12)
    rows, cols = 512, 2048
    raw = random_matrix(qtype, rows, cols, rng)
    x = rng.standard_normal(cols).astype(np.float32)
    ref = dequantize(raw.reshape(rows, -1), qtype).astype(np.float64) @ x.astype(np.float64)
    q8 = matvec(qtype.name, raw, (rows, cols), x, act="q8")
    assert 1e-5 < rel(q8, ref) < 2e-2
    np.testing.assert_allclose(q8, matvec(qtype.name, raw, (rows, cols), x, act="q8", simd=0), rtol=1e-4,
                               atol=1e-5 * np.abs(ref).max())
    # x already on the activation grid (power-of-two scales, +-127 in every block): quantizing it loses nothing
    ablk = 256 if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 32
    q = rng.integers(-127, 128, (cols // ablk, ablk))
    q[:, 0] = 127
    xq = (q * 2.0 ** rng.integers(-8, 0, (cols // ablk, 1))).astype(np.float32).reshape(-1)
    exact = dequantize(raw.reshape(rows, -1), qtype).astype(np.float64) @ xq.astype(np.float64)
    assert rel(matvec(qtype.name, raw, (rows, cols), xq, act="q8"), exact) < TOL


@needs_c
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.MXFP4, T.Q4_K, T.Q5_K, T.Q6_K, T.F16], ids=lambda t: t.name)
def test_one_and_four_rows_per_pass_agree(qtype):
    """The AVX2 kernels walk one row per pass by default; the four-row walk (mer_set_rows(4), kept for sweeps)
    must give the same results: exact within TOL of float64, q8 within float rounding of the one-row walk, on a
    row count that leaves a partial group of four and with a batch of 3 vectors."""
    rng = np.random.default_rng(21)
    rows, cols = 1030, 512
    raw = random_matrix(qtype, rows, cols, rng)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ dequantize(raw.reshape(rows, -1), qtype).astype(np.float64).T
    got = {}
    try:
        for n in (1, 4):
            kernels._LIB.mer_set_rows(n)
            got[n] = [matvec(qtype.name, raw, (rows, cols), x, act=a)
                      for a in (("f32", "q8") if qtype.name in kernels.Q8_ACT_TYPES else ("f32",))]
    finally:
        kernels._LIB.mer_set_rows(0)
    for n in (1, 4):
        assert rel(got[n][0], ref) < TOL
    if len(got[1]) > 1:
        np.testing.assert_allclose(got[4][1], got[1][1], rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@needs_c
@pytest.mark.skipif(not kernels.VNNI, reason="this CPU has no AVX-VNNI: the maddubs path is what runs here")
@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0, T.MXFP4], ids=lambda t: t.name)
@pytest.mark.parametrize("walk", [1, 4])
def test_vnni_equals_maddubs(qt, walk):
    """A result does not depend on whether the CPU has AVX-VNNI (or AVX-512), to the bit: every path sums the same
    integers in the same order, one row a pass (the default) and four (an odd row count leaves a short last pass;
    the four-row walk keeps even and odd blocks apart, as the one-row walk does)."""
    rng = np.random.default_rng(13)
    raw = random_matrix(qt, 255, 1024, rng)
    x = rng.standard_normal(1024).astype(np.float32)
    variants = (0, kernels.FLAG_NO_AVX512, kernels.FLAG_NO_VNNI)
    out = [np.empty(255, np.float32) for _ in variants]
    kernels._LIB.mer_set_rows(walk)
    try:
        for o, flags in zip(out, variants):
            assert kernels._LIB.mer_matvec(int(qt), raw.ctypes.data, raw.nbytes, 255, 1024, x.ctypes.data, 1024, 1,
                                           o.ctypes.data, 255, kernels.FLAG_ACT_Q8 | flags) == 0
    finally:
        kernels._LIB.mer_set_rows(0)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


# -- AVX-512 -------------------------------------------------------------------------------------------------------
needs_avx512 = pytest.mark.skipif(not kernels.AVX512, reason="this CPU lacks AVX-512 F/BW/VL/DQ/VNNI (or the C kernel "
                                  "is not built): the AVX2 kernels are what runs here, and the other tests cover them")


def _matvec_walk(qt, raw, rows, cols, x, walk, act, flags=0):
    kernels._LIB.mer_set_rows(walk)
    try:
        return matvec(qt.name, raw, (rows, cols), x, act=act, flags=flags)
    finally:
        kernels._LIB.mer_set_rows(0)


@needs_avx512
@pytest.mark.parametrize("qt", [T.Q4_0, T.MXFP4], ids=lambda t: t.name)
@pytest.mark.parametrize("walk", [1, 4])
@pytest.mark.parametrize("cols", [1056, 1120, 1184])
def test_avx512_q8_equals_avx2_to_the_bit(qt, walk, cols):
    """The AVX-512 q8 kernels (512-bit vpdpbusd, two blocks an instruction) sum the same integers as the AVX2 ones
    and add the blocks' products in the AVX2 walks' order: equal to the bit to the AVX-VNNI and maddubs kernels,
    one row a pass and four, on an odd row count (a short last pass), an odd number of blocks (a
    last block alone) and a batch of 3; within the documented q8 error of float64, and exact on the activation grid.
    33 blocks are four groups of eight (Q4_0's scales eight at a time) and a last block; 35 leave a pair between;
    37 two pairs (the four-block loop after the groups of eight) and a last block."""
    rng = np.random.default_rng(51)
    rows = 255
    raw = random_matrix(qt, rows, cols, rng)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ dequantize(raw.reshape(rows, -1), qt).astype(np.float64).T
    got = _matvec_walk(qt, raw, rows, cols, x, walk, "q8")
    for flags in (kernels.FLAG_NO_AVX512, kernels.FLAG_NO_AVX512 | kernels.FLAG_NO_VNNI, kernels.FLAG_NO_VNNI):
        for w in (1, 4):
            np.testing.assert_array_equal(got, _matvec_walk(qt, raw, rows, cols, x, w, "q8", flags))
    assert 1e-5 < rel(got, ref) < 2e-2
    q = rng.integers(-127, 128, (3, cols // 32, 32))
    q[..., 0] = 127
    xq = (q * 2.0 ** rng.integers(-8, 0, (3, cols // 32, 1))).astype(np.float32).reshape(3, cols)
    exact = xq.astype(np.float64) @ dequantize(raw.reshape(rows, -1), qt).astype(np.float64).T
    assert rel(_matvec_walk(qt, raw, rows, cols, xq, walk, "q8"), exact) < TOL


@needs_avx512
@pytest.mark.parametrize("qt", [T.Q4_0, T.MXFP4, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("walk", [1, 4])
def test_avx512_exact(qt, walk):
    """The 16-lane exact kernels (Q4_0 and MXFP4: each nibble through a 16-value table, Q4_0's high one by a float
    mask; Q8_0: each half block widened; the K-quants: two groups side by side): within float32 rounding of float64
    and of the AVX2 kernel (the sums are grouped differently), the default walk (walk 1: two rows a pass for Q4_0
    and MXFP4, one for the others) and four rows a pass, odd rows and blocks, a batch; exact per product on the
    adversarial activations of the AVX2 kernels' tests (outliers on zero columns, 17 decades in a block, float32's
    ends, the pre-scaling hand-over)."""
    rng = np.random.default_rng(52)
    rows, cols = 255, 1056 if qt in (T.Q4_0, T.MXFP4, T.Q8_0) else 1280
    raw = random_matrix(qt, rows, cols, rng)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ dequantize(raw.reshape(rows, -1), qt).astype(np.float64).T
    got = _matvec_walk(qt, raw, rows, cols, x, walk, "f32")
    assert rel(got, ref) < TOL
    avx2 = _matvec_walk(qt, raw, rows, cols, x, walk, "f32", kernels.FLAG_NO_AVX512)
    np.testing.assert_allclose(got, avx2, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert not np.array_equal(got, avx2)  # the AVX-512 kernel really ran (its sums are grouped otherwise)
    adversarial = {T.Q4_0: (_adversarial_q4_0_inputs, 808), T.Q6_K: (_adversarial_q6k_inputs, 810),
                   T.Q4_K: (functools.partial(_adversarial_qk45_inputs, T.Q4_K), 809),
                   T.Q5_K: (functools.partial(_adversarial_qk45_inputs, T.Q5_K), 809)}
    if qt in adversarial:
        kernels._LIB.mer_set_rows(walk)
        try:
            _check_exact_on_adversarial(qt, *adversarial[qt], -1)
        finally:
            kernels._LIB.mer_set_rows(0)


@needs_avx512
@pytest.mark.parametrize("qt,cols", [(T.Q4_0, 8224), (T.MXFP4, 8224), (T.Q4_K, 6656), (T.Q5_K, 6656), (T.Q6_K, 8448)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_avx512_exact_wide_x_walks_in_tiles(qt, cols):
    """One vector over 32 KB of float32 (a down projection's) is walked in column tiles, each row's accumulators kept
    between tiles: the same sums in the same order as the untiled walk (which a batch of two takes), to the bit, and
    within float32 rounding of float64; a task of 131 rows (past one group of 64; Q4_0's and MXFP4's untiled walk
    takes rows two a pass, so its last pass has one), a last tile of an odd number of blocks (Q4_0, MXFP4: 65,
    Q6_K: 9) or an even one (Q4_K, Q5_K: 8)."""
    rng = np.random.default_rng(56)
    rows = 131
    raw = random_matrix(qt, rows, cols, rng)
    x = rng.standard_normal((2, cols)).astype(np.float32)
    ref = x[0].astype(np.float64) @ dequantize(raw.reshape(rows, -1), qt).astype(np.float64).T
    kernels._LIB.mer_set_chunk(rows + 2)
    try:
        one = matvec(qt.name, raw, (rows, cols), x[0])
        two = matvec(qt.name, raw, (rows, cols), x)
    finally:
        kernels._LIB.mer_set_chunk(64)
    np.testing.assert_array_equal(one, two[0])
    assert rel(one, ref) < TOL


@needs_avx512
def test_avx512_q8_0_wide_x_takes_avx2_on_plain_x():
    """Q8_0 has no column-tiled AVX-512 walk: x over 32 KB of float32 (a down projection's) goes to the AVX2 kernel on
    x as it is (faster there, docs/runtime.md), the same floats as FLAG_NO_AVX512 | FLAG_NO_PERM, to the bit; x of
    32 KB or less takes the AVX-512 kernel (its sums grouped otherwise)."""
    rng = np.random.default_rng(57)
    for cols, wide in ((8224, True), (8192, False)):
        raw = random_matrix(T.Q8_0, 67, cols, rng)
        x = rng.standard_normal(cols).astype(np.float32)
        got = matvec("Q8_0", raw, (67, cols), x)
        plain = matvec("Q8_0", raw, (67, cols), x, flags=kernels.FLAG_NO_AVX512 | kernels.FLAG_NO_PERM)
        assert np.array_equal(got, plain) == wide, cols
        ref = x.astype(np.float64) @ dequantize(raw.reshape(67, -1), T.Q8_0).astype(np.float64).T
        assert rel(got, ref) < TOL


@needs_avx512
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("qt,act", [(T.Q4_0, "f32"), (T.Q4_0, "q8"), (T.MXFP4, "f32"), (T.MXFP4, "q8"), (T.Q8_0, "f32"),
                                    (T.Q4_K, "f32"), (T.Q5_K, "f32"), (T.Q6_K, "f32")], ids=str)
def test_avx512_nan_and_inf_as_float64(qt, act):
    """NaN and +-inf in x give the float64 reference's pattern on the AVX-512 kernels as on the AVX2 ones (q8: a NaN
    block makes its vector NaN; an infinity sends the call to float32 activations)."""
    rows, cols = 16, 512
    raw, x, ref = _inf_case(qt, rows, cols, seed=53, tiny=True)
    for flags in (0, kernels.FLAG_NO_AVX512):
        got = matvec(qt.name, raw, (rows, cols), x, act=act, flags=flags)
        for g, r in zip(_nonfinite_pattern(got), _nonfinite_pattern(ref)):
            assert (g == r).all(), (flags, got[:2], ref[:2])
        assert rel(got[2], ref[2]) < (2e-2 if act == "q8" else TOL), flags
    xn = np.random.default_rng(54).standard_normal((2, cols)).astype(np.float32)
    xn[0, 37] = np.nan
    got = matvec(qt.name, raw, (rows, cols), xn, act=act)
    assert np.isnan(got[0]).all() and np.isfinite(got[1]).all()


@needs_avx512
def test_avx512_entry_points_check_lengths():
    """The AVX-512 kernels sit behind the same length checks: -3 for short weights, x or out, before any read."""
    lib = kernels._LIB
    for qt in (T.Q4_0, T.MXFP4, T.Q8_0, T.Q4_K, T.Q6_K):
        raw = random_blocks(qt, 4, 256, np.random.default_rng(55))
        x, out = np.ones(256, np.float32), np.empty(4, np.float32)
        for flags in (0, kernels.FLAG_ACT_Q8):
            ok = (int(qt), raw.ctypes.data, raw.nbytes, 4, 256, x.ctypes.data, 256, 1, out.ctypes.data, 4, flags)
            assert lib.mer_matvec(*ok) == 0
            assert lib.mer_matvec(int(qt), raw.ctypes.data, raw.nbytes - 1, *ok[3:]) == -3
            assert lib.mer_matvec(*ok[:6], 255, *ok[7:]) == -3
            assert lib.mer_matvec(*ok[:9], 3, flags) == -3


def _every_byte_blocks(qt: T, rows: int) -> np.ndarray:
    """rows x 16 blocks whose quant bytes run through all 256 values (Q4_0: 16 a block, MXFP4: 16, Q8_0: 32, so
    Q8_0's 16 blocks hold them twice), each row with its own scale: the format's extremes and a few plain ones."""
    blk, bb = GGML_QUANT_SIZES[qt]
    raw = np.zeros((rows, 16, bb), np.uint8)
    nq = bb - (1 if qt == T.MXFP4 else 2)
    raw[..., bb - nq:] = (np.arange(16 * nq) % 256).astype(np.uint8).reshape(16, nq)
    if qt == T.MXFP4:  # e8m0 exponents from the subnormal ones (0, 1) to 2^124 (12 x 2^124 stays finite)
        raw[..., 0] = np.array([0, 1, 2, 100, 127, 128, 129, 200, 250, 252])[np.arange(rows) % 10, None]
    else:  # f16: +-1, -0, the smallest subnormal, the smallest normal, the largest, and plain ones
        d = np.array([1, -1, -0.0, 2 ** -24, 2 ** -14, 65504, -65504, 0.0078, 0.05, -3.5])[np.arange(rows) % 10]
        raw[..., :2] = d.astype(np.float16).view(np.uint8).reshape(rows, 1, 2)
    return raw.reshape(-1)


@needs_avx512
@pytest.mark.parametrize("qt", [T.Q4_0, T.MXFP4, T.Q8_0], ids=lambda t: t.name)
def test_avx512_exact_decodes_every_byte_exactly(qt):
    """Every quant byte (Q4_0's high nibble through the float mask, 2^19 + q less 2^19 + 8, its low one and MXFP4's
    through the table, Q8_0's widened) under the formats' extreme scales, read back one column at a time (x the
    identity: each output is one product d * q * 1, exact in float32): gguf's dequantization to the bit, and the
    AVX2 and portable paths', one row a pass or four, on an odd row count (a short last pass)."""
    rows, cols = 11, 512
    raw = _every_byte_blocks(qt, rows)
    eye = np.eye(cols, dtype=np.float32)
    want = dequantize(raw.reshape(rows, -1), qt).astype(np.float64).T
    assert np.isfinite(want).all()
    for walk in (0, 4):
        got = _matvec_walk(qt, raw, rows, cols, eye, walk, "f32")
        np.testing.assert_array_equal(got, want)
        for flags in (kernels.FLAG_NO_AVX512, kernels.FLAG_PORTABLE):
            np.testing.assert_array_equal(got, _matvec_walk(qt, raw, rows, cols, eye, walk, "f32", flags))


@needs_avx512
@pytest.mark.parametrize("qt", [T.Q4_0, T.MXFP4, T.Q8_0], ids=lambda t: t.name)
def test_avx512_exact_any_rows_blocks_and_band(qt):
    """The x-in-registers walk (two rows a pass for Q4_0 and MXFP4, one for Q8_0, four when set): 1 to 9 rows, 1, 3
    or 5 blocks (an odd last block alone), a batch, tasks of 4 rows (bands that start inside the matrix): every row
    the same float as that row alone and as its vector alone, to the bit, and within float32 rounding of float64."""
    rng = np.random.default_rng(58)
    for rows in range(1, 10):
        for nb in (1, 3, 5):
            cols = 32 * nb
            raw = random_matrix(qt, rows, cols, rng)
            w = dequantize(raw.reshape(rows, -1), qt).astype(np.float64)
            x = rng.standard_normal((3, cols)).astype(np.float32)
            kernels._LIB.mer_set_chunk(4)
            try:
                got = [_matvec_walk(qt, raw, rows, cols, x, walk, "f32") for walk in (0, 4)]
            finally:
                kernels._LIB.mer_set_chunk(64)
            np.testing.assert_array_equal(got[0], got[1])
            rb = raw.size // rows
            for r in range(rows):
                np.testing.assert_array_equal(matvec(qt.name, raw[r * rb:(r + 1) * rb], (1, cols), x)[:, 0],
                                              got[0][:, r])
            for v in range(3):
                np.testing.assert_array_equal(matvec(qt.name, raw, (rows, cols), x[v]), got[0][v])
            bound = np.abs(x.astype(np.float64)) @ np.abs(w).T
            assert np.all(np.abs(got[0] - x.astype(np.float64) @ w.T) <= 1e-6 * bound), (rows, nb)


@needs_avx512
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("qt", [T.Q4_0, T.MXFP4, T.Q8_0], ids=lambda t: t.name)
def test_avx512_nonfinite_x_in_every_lane_of_a_block(qt):
    """+inf, -inf or NaN in either half of a block (lanes 0 and 15 meet x's first register, 16 and 31 the second)
    of the first pair of blocks and of an odd last block: the float64 reference's pattern of NaN and +-inf, as the
    AVX2 and portable paths give it."""
    rng = np.random.default_rng(59)
    rows, cols = 7, 96
    raw = random_matrix(qt, rows, cols, rng)
    w = dequantize(raw.reshape(rows, -1), qt).astype(np.float64)
    w[0, :] = 0.0  # a row of zero weights: 0 * inf is NaN in every path
    raw = raw.reshape(rows, -1).copy()
    raw[0, :] = quantize(np.zeros((1, cols), np.float32), qt).reshape(-1)
    raw = raw.reshape(-1)
    xs = []
    for pos in (0, 15, 16, 31, 33, 64, 79, 80, 95):
        for val in (np.inf, -np.inf, np.nan):
            x = rng.standard_normal(cols).astype(np.float32)
            x[pos] = val
            xs.append(x)
    x = np.stack(xs)
    with np.errstate(invalid="ignore"):
        ref = (w[None, :, :] * x.astype(np.float64)[:, None, :]).sum(-1)
    for flags in (0, kernels.FLAG_NO_AVX512, kernels.FLAG_PORTABLE):
        got = matvec(qt.name, raw, (rows, cols), x, flags=flags)
        for g, r in zip(_nonfinite_pattern(got), _nonfinite_pattern(ref)):
            np.testing.assert_array_equal(g, r, err_msg=str(flags))


# -- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", C_TYPES + [T.Q5_0], ids=lambda t: t.name)
def test_short_buffers_are_refused(qtype):
    rng = np.random.default_rng(1)
    raw = random_matrix(qtype, 4, 256, rng) if qtype != T.Q5_0 else quantize(
        rng.standard_normal((4, 256)).astype(np.float32), T.Q5_0).reshape(-1)
    x = np.ones(256, np.float32)
    with pytest.raises(KernelError, match="bytes given"):
        matvec(qtype.name, raw[:-1], (4, 256), x)
    with pytest.raises(KernelError, match=r"input has shape \[255\]"):
        matvec(qtype.name, raw, (4, 256), x[:-1])


@needs_c
def test_c_entry_points_check_lengths_themselves():
    """Called directly (no Python check in front), the C library refuses rather than reading past an end."""
    lib = kernels._LIB
    raw = random_blocks(T.Q4_0, 4, 256, np.random.default_rng(2))
    x, out = np.ones(256, np.float32), np.empty(4, np.float32)
    ok = (2, raw.ctypes.data, raw.nbytes, 4, 256, x.ctypes.data, 256, 1, out.ctypes.data, 4, 0)
    assert lib.mer_matvec(*ok) == 0
    assert lib.mer_matvec(2, raw.ctypes.data, raw.nbytes - 1, *ok[3:]) == -3  # weights short
    assert lib.mer_matvec(*ok[:6], 255, *ok[7:]) == -3  # x short
    assert lib.mer_matvec(*ok[:9], 3, 0) == -3  # out short
    assert lib.mer_matvec(*ok[:4], 250, *ok[5:]) == -2  # not whole blocks
    assert lib.mer_matvec(5, *ok[1:]) == -1  # Q4_2: retired, no kernel
    out1 = np.empty(1, np.float32)
    assert lib.mer_dequantize(2, raw.ctypes.data, 17, 32, out1.ctypes.data, 32) == -3
    assert lib.mer_dequantize(2, raw.ctypes.data, 18, 32, out1.ctypes.data, 1) == -3


def test_mer_threads_is_validated_without_a_traceback_at_import():
    code = ("import numpy as np\nimport mer_runtime.kernels as k\nfrom mer_runtime import MerError\n"
            "try:\n    k.matvec('Q4_0', np.zeros(18, np.uint8), (1, 32), np.zeros(32, np.float32)); print('ran')\n"
            "except MerError as e:\n    print('MerError:', e)\n")
    for bad in ("abc", "0", "-3", "1.5", "99999"):
        p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MER_THREADS": bad},
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        if kernels._LIB is not None:
            assert p.stdout.startswith("MerError: MER_THREADS=") and "whole number" in p.stdout, p.stdout
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MER_THREADS": " 3 "},
                       capture_output=True, text=True, timeout=60)
    assert p.stdout == "ran\n", p.stderr


def test_without_the_c_kernel_results_are_the_same(tmp_path):
    """MER_KERNELS=numpy: the fallback an install without a compiler gets, against gguf's float64 reference."""
    rng = np.random.default_rng(5)
    raw = random_blocks(T.Q4_K, 64, 256, rng)
    x = rng.standard_normal(256).astype(np.float32)
    np.save(tmp_path / "raw.npy", raw)
    np.save(tmp_path / "x.npy", x)
    code = ("import numpy as np, sys; from mer_runtime.kernels import matvec, kernel_for; "
            f"d = {str(tmp_path)!r}; print(kernel_for('Q4_K')); "
            "np.save(d + '/y.npy', matvec('Q4_K', np.load(d + '/raw.npy'), (64, 256), np.load(d + '/x.npy')))")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MER_KERNELS": "numpy"},
                       capture_output=True, text=True, check=True)
    assert "gguf dequantize" in p.stdout
    ref = dequantize(raw.reshape(64, -1), T.Q4_K).astype(np.float64) @ x.astype(np.float64)
    assert rel(np.load(tmp_path / "y.npy"), ref) < TOL


def test_activation_kinds():
    tensors = {r: ("F32", s, np.eye(*s, dtype=np.float32).view(np.uint8).reshape(-1))
               for r, s in (("gate", (4, 4)), ("up", (4, 4)), ("down", (4, 4)))}
    x = np.array([10.0, -10.0, 1.0, 0.0], np.float32)
    for simd in SIMD:
        y = expert_ffn(tensors, x, {"kind": "swiglu"}, simd=simd)
        np.testing.assert_allclose(y, silu(x.astype(np.float64)) * x, rtol=1e-6)
        y = expert_ffn(tensors, x, {"kind": "swiglu_oai", "alpha": 1.702, "limit": 7.0}, simd=simd)
        g = np.minimum(x, 7.0).astype(np.float64)
        u = np.clip(x, -7, 7).astype(np.float64)
        np.testing.assert_allclose(y, (u + 1) * g / (1 + np.exp(-1.702 * g)), rtol=1e-6)
    with pytest.raises(ValueError, match="geglu"):
        expert_ffn(tensors, x, {"kind": "geglu"})


@pytest.mark.skipif(not __import__("shutil").which("cc"), reason="no C compiler here to build the portable library")
def test_the_library_built_without_x86_paths_computes_the_same(tmp_path):
    """-DMER_NO_X86 builds what a non-x86 machine gets (no SIMD, the portable code only): every type against gguf
    in float64, and the portable Q8-activation path within its bound."""
    src = Path(kernels.__file__).with_name("_kernels.c")
    lib_path = tmp_path / "portable.so"
    subprocess.run(["cc", "-DMER_NO_X86", "-O2", "-shared", "-fPIC", "-pthread", "-o", str(lib_path), str(src), "-lm"],
                   check=True, capture_output=True, timeout=120)
    lib = ctypes.CDLL(str(lib_path))
    lib.mer_matvec.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_int]
    assert lib.mer_has_avx2() == 0
    rng = np.random.default_rng(31)
    for qt in C_TYPES:
        rows, cols = 37, 512
        raw = random_matrix(qt, rows, cols, rng)
        x = rng.standard_normal((2, cols)).astype(np.float32)
        out = np.empty((2, rows), np.float32)
        assert lib.mer_matvec(int(qt), raw.ctypes.data, raw.nbytes, rows, cols, x.ctypes.data, x.size, 2,
                              out.ctypes.data, out.size, kernels.FLAG_ACT_Q8 if qt == T.Q4_0 else 0) == 0
        ref = dequantize(raw.reshape(rows, -1), qt).astype(np.float64) @ x.T.astype(np.float64)
        assert rel(out.T, ref) < (2e-2 if qt == T.Q4_0 else TOL), qt.name
    lib.mer_shutdown()


@needs_c
def test_pool_survives_fork_and_thread_count_changes():
    """A forked child has none of its parent's pool threads: its first parallel call must start a new pool, not
    wait forever on threads that do not exist. Changing the thread count restarts the pool between calls."""
    code = r"""
import os, signal, sys
import numpy as np
from mer_runtime import kernels
rng = np.random.default_rng(0)
raw = rng.integers(0, 256, (2048, 1024 // 32, 18), dtype=np.uint8)
raw[..., :2] = rng.uniform(-0.01, 0.01, (2048, 32, 1)).astype(np.float16).view(np.uint8)
raw = raw.reshape(-1)
x = rng.standard_normal(1024).astype(np.float32)
want = kernels.matvec("Q4_0", raw, (2048, 1024), x)
pid = os.fork()
if pid == 0:
    signal.alarm(20)
    got = kernels.matvec("Q4_0", raw, (2048, 1024), x)
    os._exit(0 if np.array_equal(got, want) else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
for n in (1, 3, 2):
    kernels._LIB.mer_set_threads(n)
    assert kernels._LIB.mer_threads() == n
    assert np.array_equal(kernels.matvec("Q4_0", raw, (2048, 1024), x), want)
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout == "ok\n", p.stderr
