"""ShardSet.moe: a routed layer step (sum of k weighted experts) in one call, against the float64 outputs shipped
with the real fixtures (fixtures/real/*.ref.npz, made with gguf's dequantization and NumPy float64) and against a
float64 oracle from the source tensors for batched inputs."""

from __future__ import annotations

import threading
from contextlib import ExitStack

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize

from mer_runtime import kernels, open_shards
from mer_runtime.errors import MerError
from mer_runtime.kernels import KernelError

from conftest import REAL, reader_tensors, reference_slice

TOL = 1e-5
FIXTURES = sorted(REAL.glob("*.gguf"))
SIMD = [-1, 0] if kernels._LIB is not None else [-1]


def rel(got, ref) -> float:
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


def shared_ref(src):
    ref = np.load(src.with_suffix(".ref.npz"), allow_pickle=True)
    y = ref["y_gptoss_native"] if "y_gptoss_native" in ref else ref["y"]
    return ref["x"], [int(v) for v in ref["layers"]], y


@pytest.mark.parametrize("src", FIXTURES, ids=lambda p: p.name)
def test_moe_equals_weighted_sum_of_shared_references(src, extracted):
    x, layers, y_ref = shared_ref(src)
    rng = np.random.default_rng(1)
    with open_shards(extracted(src), cache_slots=5) as s:
        n_exp = y_ref.shape[1]
        for li, layer in enumerate(layers):
            for k in (1, 2, n_exp):
                experts = rng.choice(n_exp, size=k, replace=False)
                w = rng.dirichlet(np.ones(k)).astype(np.float32)
                want = sum(float(wi) * y_ref[li, e] for wi, e in zip(w, experts))
                got = s.moe(layer, experts, w, x)
                assert got.dtype == np.float32 and got.shape == x.shape
                assert rel(got, want) < TOL, (src.name, layer, list(experts))


def oracle_batch(tensors, layer, experts, w, xs, biases, oai):
    def wt(e, role):
        t, d = reference_slice(tensors, layer, e, role)
        return dequantize(np.asarray(d), t.tensor_type).astype(np.float64)

    y = np.zeros(xs.shape)
    for e, we in zip(experts, w):
        g, u = xs @ wt(e, "gate").T, xs @ wt(e, "up").T
        if biases:
            g, u = g + wt(e, "gate_bias"), u + wt(e, "up_bias")
        if oai:
            g, u = np.minimum(g, 7.0), np.clip(u, -7.0, 7.0)
            h = (u + 1) * g / (1 + np.exp(-1.702 * g))
        else:
            h = g / (1 + np.exp(-g)) * u
        ye = h @ wt(e, "down").T
        y += float(we) * (ye + wt(e, "down_bias") if biases else ye)
    return y


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("src", FIXTURES, ids=lambda p: p.name)
def test_batched_moe_against_float64_oracle_from_source(src, extracted, simd):
    tensors = reader_tensors(src)
    xs = np.random.default_rng(2).standard_normal((5, 256)).astype(np.float32)
    with open_shards(extracted(src), cache_slots=4) as s:
        m = s.manifest.model
        layer = s.manifest.experts[-1].layer
        experts, w = [3, 0], np.array([0.7, 0.3], np.float32)
        with s.load(layer, 3) as a, s.load(layer, 0) as b:
            got = kernels.moe([s._tensors(a), s._tensors(b)], w, xs, s.activation, simd=simd)
        ref = oracle_batch(tensors, layer, experts, w, xs.astype(np.float64), m["has_expert_biases"],
                           m["activation"]["kind"] == "swiglu_oai")
        assert got.shape == (5, 256) and rel(got, ref) < TOL
        np.testing.assert_allclose(s.moe(layer, experts, w, xs), got, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
        for i in range(5):  # a batch streams each weight once but must equal row-by-row calls
            np.testing.assert_allclose(got[i], s.moe(layer, experts, w, xs[i]), rtol=1e-5,
                                       atol=1e-6 * np.abs(ref).max())


def test_more_experts_than_the_cache_holds_at_once(extracted):
    """2 slots (one kept for foreground loads) and k = 4: computed in groups, same result."""
    src = REAL / "mixtral-q4_k_m.gguf"
    x, layers, y_ref = shared_ref(src)
    w = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    with open_shards(extracted(src), cache_slots=2) as s:
        got = s.moe(layers[1], [0, 1, 2, 3], w, x)
    assert rel(got, sum(float(w[e]) * y_ref[1, e] for e in range(4))) < TOL


def test_moe_kernel_from_many_threads_at_once(extracted):
    """8 threads share one C pool (a busy pool makes the caller compute alone): every output stays right.
    The experts are loaded first: ShardSet's own thread safety is tested with the cache, this is the kernel's."""
    src = REAL / "mixtral-q4_0.gguf"
    x, layers, y_ref = shared_ref(src)
    errors: list[str] = []
    with open_shards(extracted(src), cache_slots=9) as s, ExitStack() as held:
        tensors = {(li, e): s._tensors(held.enter_context(s.load(layer, e)))
                   for li, layer in enumerate(layers) for e in range(4)}
        xs = np.stack([x] * 3)

        def work(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for i in range(30):
                li = int(rng.integers(len(layers)))
                experts = rng.choice(4, size=2, replace=False)
                w = rng.dirichlet(np.ones(2)).astype(np.float32)
                want = sum(float(wi) * y_ref[li, e] for wi, e in zip(w, experts))
                got = kernels.moe([tensors[li, e] for e in experts], w, xs if i % 2 else x, s.activation)
                err = rel(got, want)
                if err >= TOL:
                    errors.append(f"seed {seed}: {err}")

        ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors


@pytest.mark.skipif(kernels._LIB is None, reason="C kernel not built or MER_KERNELS=numpy")
def test_q8_activations_error_on_the_mxfp4_and_q4_0_fixtures(extracted):
    """act="q8" (opt-in): within 2% of the float64 reference on the real fixtures (3% where the weights are K-quants,
    whose activations are Q8_K: one scale per 256 values; the figures docs/runtime.md gives), and really quantized
    (not exact); batched too, for the K-quants (Q4_K gate/up, Q6_K down)."""
    for name in ("mixtral-q4_0.gguf", "gptoss-mxfp4_moe.gguf", "mixtral-perexpert-q8_0.gguf", "mixtral-q4_k_m.gguf",
                 "qwen2moe-q4_k_m.gguf"):
        x, layers, y_ref = shared_ref(REAL / name)
        with open_shards(extracted(REAL / name), cache_slots=3) as s:
            got = s.moe(layers[-1], [2, 3], [0.5, 0.5], np.stack([x, x]), act="q8")
        want = 0.5 * (y_ref[-1, 2] + y_ref[-1, 3])
        assert 1e-6 < rel(got, want) < (3e-2 if "q4_k" in name else 2e-2), name
        np.testing.assert_array_equal(got[0], got[1])


def test_bad_calls_are_refused(extracted):
    src = REAL / "mixtral-q4_0.gguf"
    x, layers, _ = shared_ref(src)
    with open_shards(extracted(src), cache_slots=3) as s:
        with pytest.raises(ValueError, match="one weight per expert"):
            s.moe(layers[0], [0, 1], [1.0], x)
        with pytest.raises(ValueError, match=r"x must have shape \[256\]"):
            s.moe(layers[0], [0], [1.0], x[:100])
        with pytest.raises(KernelError, match="act must be"):
            s.moe(layers[0], [0], [1.0], x, act="int4")
        with pytest.raises(MerError):
            s.moe(layers[0], [99], [1.0], x)
        with s.load(layers[0], 0) as ex:
            t = s._tensors(ex)
            short = dict(t, down=(t["down"][0], t["down"][1], t["down"][2][:-1]))
            with pytest.raises(KernelError, match="expert 1 down .*bytes given"):
                kernels.moe([t, short], [0.5, 0.5], x, s.activation)
            wrong = dict(t, up=(t["up"][0], (128, 256), t["up"][2]))
            with pytest.raises(KernelError):
                kernels.moe([wrong], [1.0], x, s.activation)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("down", ["Q4_0", "Q4_K", "Q6_K"])
def test_moe_exact_when_h_is_tiny(down, simd):
    """Gates near -87.5 (float32's expf of 88 still fits) make every value of h about 2^-113, below the pre-scaled
    down kernels' hand-over (2^-98 for Q4_0, 2^-102 for the K-quants): h is scaled by a power of two for the down
    projection (pre-scaled as it is, it would be subnormal with 8-12 bits left) and the step equals the float64
    oracle."""
    from gguf.constants import GGMLQuantizationType as T

    rng = np.random.default_rng(85)
    d = 256
    eye = np.eye(d, dtype=np.float32).view(np.uint8).reshape(-1)
    experts, ws = [], []
    for _ in range(2):
        raw = rng.integers(0, 256, size=(d, d // 256 * {"Q4_0": 8, "Q4_K": 1, "Q6_K": 1}[down],
                                         {"Q4_0": 18, "Q4_K": 144, "Q6_K": 210}[down]), dtype=np.uint8)
        scale = rng.uniform(0.001, 0.05, raw.shape[:2] + (1,)).astype(np.float16).view(np.uint8)
        if down == "Q4_0":
            raw[..., :2] = scale
        elif down == "Q4_K":
            raw[..., :2], raw[..., 2:4] = scale, scale
        else:
            raw[..., 208:210] = scale
        raw = raw.reshape(-1)
        experts.append({"gate": ("F32", (d, d), eye), "up": ("F32", (d, d), eye), "down": (down, (d, d), raw)})
        ws.append(dequantize(raw.reshape(d, -1), T[down]).astype(np.float64))
    x = (-87.5 + rng.uniform(-0.5, 0.5, d)).astype(np.float32)
    g = x.astype(np.float64)
    h = g / (1 + np.exp(-g)) * g
    assert np.abs(h).max() < 2.0 ** -102
    want = sum(0.5 * (w @ h) for w in ws)
    got = kernels.moe(experts, [0.5, 0.5], x, {"kind": "swiglu"}, simd=simd)
    assert rel(got, want) < 1e-6, rel(got, want)



@pytest.mark.parametrize("simd", SIMD)
def test_moe_bands_of_more_rows_than_a_matvec_task(simd):
    """moe() hands out bands of up to 256 rows (at least 8 a thread; matvec's are 64): on 2 threads 228-row bands of
    gate and up (3 x 1216 rows, the last band 76) and 68-row bands of down (1056 rows, the last 36). Every row is
    computed once and right: exact within float32 rounding of the float64 oracle; act="q8" (its prefetch distance a
    row and a half ahead) to the bit of the AVX2 kernels and near the oracle."""
    rng = np.random.default_rng(91)
    d_model, d_ff, k = 1056, 1216, 3

    def q4_0(rows, cols):
        raw = rng.integers(0, 256, size=(rows, cols // 32, 18), dtype=np.uint8)
        raw[..., :2] = rng.uniform(0.001, 0.02, raw.shape[:2] + (1,)).astype(np.float16).view(np.uint8)
        raw = raw.reshape(-1)
        return raw, dequantize(raw.reshape(rows, -1), T.Q4_0).astype(np.float64)

    experts, want = [], 0.0
    x = rng.standard_normal(d_model).astype(np.float32)
    w = [0.5, 0.3, 0.2]
    for e in range(k):
        (gr, g), (ur, u), (dr, d) = q4_0(d_ff, d_model), q4_0(d_ff, d_model), q4_0(d_model, d_ff)
        experts.append({"gate": ("Q4_0", (d_ff, d_model), gr), "up": ("Q4_0", (d_ff, d_model), ur),
                        "down": ("Q4_0", (d_model, d_ff), dr)})
        gx, ux = g @ x.astype(np.float64), u @ x.astype(np.float64)
        want = want + w[e] * (d @ (gx / (1 + np.exp(-gx)) * ux))
    got = kernels.moe(experts, w, x, {"kind": "swiglu"}, simd=simd)
    assert rel(got, want) < TOL, rel(got, want)
    q8 = kernels.moe(experts, w, x, {"kind": "swiglu"}, simd=simd, act="q8")
    assert rel(q8, want) < 2e-2, rel(q8, want)
    if simd and kernels.AVX512:
        np.testing.assert_array_equal(
            q8, kernels.moe(experts, w, x, {"kind": "swiglu"}, act="q8", flags=kernels.FLAG_NO_AVX512))


def _positive_k_blocks(rng, qtype, rows, cols):
    """K-quant blocks whose every weight is positive (dmin 0, every scale and quant nonzero): one +inf in x makes
    every row +inf, never NaN."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.constants import GGMLQuantizationType as T

    bb = GGML_QUANT_SIZES[T[qtype]][1]
    raw = rng.integers(1, 16, size=(rows, cols // 256, bb), dtype=np.uint8) * np.uint8(17)
    raw[..., :2] = rng.uniform(0.001, 0.05, raw.shape[:2] + (1,)).astype(np.float16).view(np.uint8)
    raw[..., 2:4] = 0  # dmin
    raw[..., 4:16] = 0x11  # scales 17 and 1, all nonzero
    w = dequantize(raw.reshape(rows, -1), T[qtype]).astype(np.float64)
    assert (w > 0).all()
    return raw.reshape(-1), w


@pytest.mark.parametrize("act", ["f32", "q8"])
@pytest.mark.parametrize("simd", SIMD)
def test_moe_follows_float64_on_inf_and_nan(simd, act):
    """An inf in x gives the float64 oracle's outputs on the exact path: through Q4_K/Q5_K gate and up (+inf on
    every row, which the GPT-OSS clamp turns into 7: finite outputs; with SwiGLU, h is +inf) and through h into a
    Q4_K down (+inf on the rows of positive weights, NaN on those of mixed signs). The AVX2 Q4_K/Q5_K kernels
    subtract the minimums apart (inf - 0 * inf = NaN where the oracle has +inf): such a call takes the unfactored
    path. A NaN in x gives NaN outputs, with act="q8" too (its block's scale is NaN). The finite vector of the
    batch is unaffected."""
    rng = np.random.default_rng(86)
    d = 256
    gq, g64 = _positive_k_blocks(rng, "Q4_K", d, d)
    uq, u64 = _positive_k_blocks(rng, "Q5_K", d, d)
    dq, d64 = _positive_k_blocks(rng, "Q4_K", d, d)
    dq = dq.reshape(d, -1, 144)
    dq[::3, :, 2:4] = np.float16(0.3).reshape(1).view(np.uint8)  # a third of the down rows with mixed signs
    dq = dq.reshape(-1)
    d64 = dequantize(dq.reshape(d, -1), T.Q4_K).astype(np.float64)
    x = (rng.standard_normal((3, d)) * 0.01).astype(np.float32)
    x[0, 9] = np.inf
    x[1, 100] = np.nan
    xs = x.astype(np.float64)
    tol = 1e-5 if act == "f32" else 0.05
    with np.errstate(all="ignore"):
        def mv(w, v):  # elementwise, not BLAS: 0 * inf must stay NaN
            return (w[None] * v[:, None, :]).sum(-1)

        g, u = mv(g64, xs), mv(u64, xs)
        gc, uc = np.minimum(g, 7.0), np.clip(u, -7.0, 7.0)
        want = mv(d64, (uc + 1) * gc / (1 + np.exp(-1.702 * gc)))
        experts = [{"gate": ("Q4_K", (d, d), gq), "up": ("Q5_K", (d, d), uq), "down": ("Q4_K", (d, d), dq)}]
        oai = {"kind": "swiglu_oai", "alpha": 1.702, "limit": 7.0}
        got = kernels.moe(experts, [1.0], x, oai, simd=simd, act=act)
        assert np.isnan(got[1]).all() and np.isnan(want[1]).all()
        assert np.isfinite(want[0]).all() and rel(got[2], want[2]) < tol
        if act == "f32":  # q8: a block holding inf has scale inf and quants 0, so NaN (no float64 counterpart)
            assert rel(got[0], want[0]) < tol, got[0]

        want = mv(d64, g / (1 + np.exp(-g)) * u)
        got = kernels.moe(experts, [1.0], x, {"kind": "swiglu"}, simd=simd, act=act)
    assert np.isposinf(want[0]).any() and np.isnan(want[0]).any() and np.isnan(want[1]).all()
    assert np.isnan(got[1]).all()
    if act == "f32":
        for f in (np.isnan, np.isposinf, np.isneginf):
            assert (f(got[0]) == f(want[0])).all(), (f.__name__, got[0], want[0])
    assert rel(got[2], want[2]) < tol


@pytest.mark.skipif(not kernels.AVX512, reason="this CPU lacks AVX-512 F/BW/VL/DQ/VNNI (or the C kernel is not "
                    "built): the AVX2 kernels are what runs here, and the other tests cover them")
@pytest.mark.parametrize("name", ["mixtral-q4_0.gguf", "gptoss-mxfp4_moe.gguf", "mixtral-perexpert-q8_0.gguf"])
def test_moe_avx512_equals_avx2(name, extracted):
    """A layer step on the AVX-512 kernels (the default on such a CPU) against the AVX2 ones (FLAG_NO_AVX512), on a
    batch: act="q8" to the bit (the same integers, added in the same order), act="f32" within float32 rounding of
    them and of the float64 reference shipped with the fixture."""
    x, layers, y_ref = shared_ref(REAL / name)
    want = 0.5 * (y_ref[-1, 2] + y_ref[-1, 3])
    with open_shards(extracted(REAL / name), cache_slots=3) as s:
        with s.load(layers[-1], 2) as e2, s.load(layers[-1], 3) as e3:
            ts = [s._tensors(e2), s._tensors(e3)]
            xb = np.stack([x, x, 0.5 * x])
            for act in ("f32", "q8"):
                new = kernels.moe(ts, [0.5, 0.5], xb, s.activation, act=act)
                old = kernels.moe(ts, [0.5, 0.5], xb, s.activation, act=act, flags=kernels.FLAG_NO_AVX512)
                if act == "q8":
                    np.testing.assert_array_equal(new, old)
                    assert rel(new[0], want) < 2e-2
                else:
                    assert rel(new[0], want) < TOL and rel(old[0], want) < TOL
                    np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("checksums", ["first", "never"])
def test_a_folder_extracted_again_under_an_open_shardset_is_refused_not_computed_with(tmp_path, checksums):
    """`extract --overwrite` of another model into the folder a ShardSet serves: the next read of an expert no longer
    cached took the new shard's bytes under the old manifest's types and offsets (its checksum already passed once,
    or never asked for) and computed with them: NaN here, garbage in general. Now that read is refused in one line,
    and the experts still cached (the old folder's, checked) go on serving."""
    from mertools import extract
    from mer_runtime.errors import ShardIOError

    out = tmp_path / "out"
    extract(REAL / "mixtral-q4_0.gguf", out, fsync=False)
    with open_shards(out, cache_slots=2, checksums=checksums) as s:
        x = np.ones(s.manifest.model["d_model"], np.float32)
        before = s.ffn(0, 0, x)
        s.ffn(0, 1, x)
        cached = s.ffn(0, 2, x)  # (0, 0) is evicted, (0, 2) stays
        extract(REAL / "mixtral-q4_k_m.gguf", out, overwrite=True, fsync=False)
        assert np.array_equal(s.ffn(0, 2, x), cached)
        with pytest.raises(ShardIOError, match="was replaced since it was opened"):
            s.ffn(0, 0, x)
    with open_shards(out, cache_slots=2) as s:  # opened again: the new model, whole
        assert np.isfinite(s.ffn(0, 0, x)).all() and not np.array_equal(s.ffn(0, 0, x), before)


def test_a_folder_replaced_by_the_same_manifest_goes_on_serving(tmp_path):
    """The check above compares the folder's identity and, when it changed, the manifest's bytes: a copy of the
    same extraction put in its place (a restore, or a file system whose inode numbers are not stable) is no error."""
    import shutil

    from mertools import extract

    out = tmp_path / "out"
    extract(REAL / "mixtral-q4_0.gguf", out, fsync=False)
    shutil.copytree(out, tmp_path / "copy")
    with open_shards(out, cache_slots=2) as s:
        x = np.ones(s.manifest.model["d_model"], np.float32)
        want = [s.ffn(0, e, x) for e in range(4)]
        out.rename(tmp_path / "old")
        (tmp_path / "copy").rename(out)
        assert all(np.array_equal(s.ffn(0, e, x), w) for e, w in enumerate(want))


@pytest.mark.parametrize("how", ["removed and extracted again", "extracted with --overwrite twice"])
def test_a_replaced_folder_whose_new_inode_number_is_the_old_ones_is_still_refused(tmp_path, how):
    """The check above compared the folder's (st_dev, st_ino) with the one read at open, but a folder removed frees
    its inode number, and the next folder made (extract's staging folder, renamed to OUT) takes it again at once
    on ext4: `rm -rf OUT` and an extract, or two `extract --overwrite` (the second's staging folder takes the
    number the first freed), left the identity unchanged and the old manifest computed with the new shards."""
    import os
    import shutil

    from mertools import extract
    from mer_runtime.errors import ShardIOError

    out = tmp_path / "out"
    extract(REAL / "mixtral-q4_0.gguf", out, fsync=False)
    ino, fds = os.stat(out).st_ino, set(os.listdir("/proc/self/fd"))
    with open_shards(out, cache_slots=2) as s:
        x = np.ones(s.manifest.model["d_model"], np.float32)
        s.ffn(0, 0, x), s.ffn(0, 1, x), s.ffn(0, 2, x)  # (0, 0) is evicted
        if how == "removed and extracted again":
            shutil.rmtree(out)
            extract(REAL / "mixtral-q4_k_m.gguf", out, fsync=False)
        else:
            extract(REAL / "mixtral-q4_k_m.gguf", out, overwrite=True, fsync=False)
            extract(REAL / "mixtral-q4_k_m.gguf", out, overwrite=True, fsync=False)
        print("inode number reused:", os.stat(out).st_ino == ino)  # ext4: yes, the case at hand
        with pytest.raises(ShardIOError, match="was replaced since it was opened"):
            s.ffn(0, 0, x)
    assert set(os.listdir("/proc/self/fd")) == fds  # the folder held is let go at close
