"""verify --deep runs every expert through the runtime against an independent float64 reference, and catches a
single changed byte even when every checksum in the manifest was rewritten to match it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import xxhash

from mertools import verify
from mertools.deep import SAMPLE_ROWS, SourceReference, _map_shard, _shard_tensors, _source_tensors, reference_ffn64
from mer_runtime import load_manifest, open_shards
from mer_runtime.manifest import manifest_bytes

from conftest import ALL_MOE, REAL, parts_of, run_cli


@pytest.mark.parametrize("src", ALL_MOE, ids=lambda p: p.name)
def test_deep_verify_passes_on_every_fixture(src, extracted):
    r = verify(extracted(src), deep=True, against=src)
    assert r.ok, [str(p) for p in r.problems]
    assert r.deep["experts_run"] == r.experts_checked and r.deep["worst_rel_err"] < 1e-4
    assert r.deep["reference"].startswith("source")


def forge(folder, path, at):
    """Change one byte and rewrite the file and projection checksums (and the manifest's own) so that the shallow
    checks pass."""
    p = folder / path
    data = bytearray(p.read_bytes())
    data[at] = (data[at] + 0x55) & 0xFF
    p.write_bytes(bytes(data))
    mpath = folder / "manifest.json"
    raw = json.loads(mpath.read_text())
    for e in raw["experts"]:
        if e["path"] == path:
            e["xxh3_64"] = xxhash.xxh3_64_hexdigest(bytes(data))
            for t in e["tensors"].values():
                t["xxh3_64"] = xxhash.xxh3_64_hexdigest(bytes(data[t["offset"]:t["offset"] + t["nbytes"]]))
    mpath.write_bytes(manifest_bytes(raw))


@pytest.mark.parametrize("src_name, role", [("mixtral-q4_0.gguf", "gate"), ("mixtral-q4_k_m.gguf", "down"),
                                            ("gptoss-mxfp4_moe.gguf", "up"), ("mixtral-f16.gguf", "down")])
def test_one_changed_byte_with_rewritten_checksums(tmp_path, extracted, src_name, role):
    src = REAL / src_name
    out = tmp_path / "forged"
    shutil.copytree(extracted(src), out)
    m = load_manifest(out)
    e = m.expert(1, 2)
    t = e.tensors[role]
    forge(out, e.path, t.offset + t.nbytes // 2 + 1)
    assert verify(out).ok  # checksums alone no longer see it
    r = verify(out, deep=True, against=src)
    assert not r.ok
    whats = [p.what for p in r.problems if p.path == e.path]
    assert any("does not match the source bytes" in w for w in whats)
    assert any(w.startswith("output differs from the source reference") and w.endswith(
        "its bytes differ from the source's: re-extract it") for w in whats), whats
    assert {p.path for p in r.problems} == {e.path}  # the other experts are fine


REF_FIXTURES = ["mixtral-q4_0", "mixtral-q4_k_m", "mixtral-f16", "mixtral-perexpert-q8_0", "qwen2moe-q4_k_m",
                "gptoss-mxfp4_moe"]


@pytest.mark.parametrize("stem", REF_FIXTURES)
def test_deep_references_equal_the_fixture_outputs(extracted, stem):
    """The float64 references deep verify compares with (from the shard bytes, and from the source) equal the
    fixture's own float64 outputs (computed by its author with numpy and gguf, outside this project), and so does
    the runtime, to the deep tolerance. GPT-OSS is checked with its real activation and biases (y_gptoss_native)
    and, without them, against the plain formula (y)."""
    src = REAL / f"{stem}.gguf"
    z = np.load(REAL / f"{stem}.ref.npz")
    out = extracted(src)
    m = load_manifest(out)
    source = SourceReference(src)
    x = z["x"][None].astype(np.float32)
    act = m.model.get("activation", {"kind": "swiglu"})
    with open_shards(out, cache_slots=2) as s:
        for li, layer in enumerate(z["layers"]):
            for e in range(int(z["n_experts"])):
                entry = m.expert(int(layer), e)
                want = z["y_gptoss_native"][li, e] if "y_gptoss_native" in z.files else z["y"][li, e]
                probs = []
                blob, _ = _map_shard(m, entry)
                for tensors in (_shard_tensors(blob, entry), _source_tensors(source, entry, blob, probs)):
                    w = {r: t.values() for r, t in tensors.items()}
                    got = reference_ffn64(w, x, act)[0]
                    assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max(), (layer, e)
                    plain = {r: v for r, v in w.items() if not r.endswith("_bias")}
                    got = reference_ffn64(plain, x, {"kind": "swiglu"})[0]
                    assert np.abs(got - z["y"][li, e]).max() <= 1e-9 * np.abs(z["y"][li, e]).max(), (layer, e)
                assert not probs
                y = s.ffn(int(layer), e, x[0])
                assert np.abs(y - want).max() <= 1e-4 * np.abs(want).max(), (layer, e)


def test_deep_without_source_checks_the_runtime_against_shard_bytes(extracted):
    """Without --against the reference is computed from the shard bytes (shown equal to the fixture's outputs
    above); the runtime's outputs must match it."""
    r = verify(extracted(REAL / "qwen2moe-q4_k_m.gguf"), deep=True)
    assert r.ok and r.deep["reference"].startswith("shard bytes")
    assert r.deep["experts_run"] == 8 and 0 < r.deep["worst_rel_err"] < 1e-4


def test_deep_without_source_sees_a_changed_byte_whose_checksums_were_not_rewritten(tmp_path, extracted):
    out = tmp_path / "o"
    shutil.copytree(extracted(REAL / "qwen2moe-q4_k_m.gguf"), out)
    e = load_manifest(out).expert(1, 3)
    p = out / e.path
    data = bytearray(p.read_bytes())
    data[e.tensors["up"].offset + 100] ^= 0x40
    p.write_bytes(bytes(data))
    r = verify(out, deep=True)
    assert [x.path for x in r.problems] == [e.path] * 2 and r.deep["experts_run"] == 7  # reported, not run


def test_cli_deep_json_and_failure_exit(tmp_path, extracted):
    src = REAL / "mixtral-q4_0.gguf"
    out = tmp_path / "o"
    shutil.copytree(extracted(src), out)
    p = run_cli("verify", out, "--deep", "--against", src, "--json", check=True)
    j = json.loads(p.stdout)
    assert j["ok"] and len(j["deep"]["per_expert"]) == 8 and j["deep"]["tolerance"] == 1e-4
    e = load_manifest(out).expert(0, 0)
    forge(out, e.path, e.tensors["down"].offset + 3)
    p = run_cli("verify", out, "--deep", "--against", src, "-q")
    assert p.returncode == 1 and f"FAIL {e.path}: output differs from the source reference" in p.stdout
    p = run_cli("verify", out, "--against", src)
    assert p.returncode == 2 and "--against needs --deep" in p.stderr


def test_deep_with_every_backend(extracted):
    out = extracted(REAL / "mixtral-perexpert-q8_0.gguf")
    for io in ("pread", "buffered"):
        r = verify(out, deep=True, against=REAL / "mixtral-perexpert-q8_0.gguf", io=io)
        assert r.ok and r.deep["io"].startswith(io)


def test_split_source_as_reference(extracted):
    from conftest import GEN

    src = GEN / "moe-split-q4_0-00001-of-00006.gguf"
    assert len(parts_of(src)) == 6
    assert verify(extracted(src), deep=True, against=src).ok


def deep_report(out, src=None, **kw):
    from mertools.deep import deep_verify
    from mertools.report import VerifyReport

    r = VerifyReport(out)
    deep_verify(r, load_manifest(out), against=src, **kw)
    return r


@pytest.mark.parametrize("src_name", ["mixtral-q4_k_m.gguf", "gptoss-mxfp4_moe.gguf"])
def test_sampled_rows_pass_on_clean_folders(extracted, src_name):
    """Sampled mode (every expert, SAMPLE_ROWS rows of each kernel against banded float64 rows) passes; the whole
    output is compared for nobody here, as for the bulk of a big model's experts."""
    src = REAL / src_name
    r = deep_report(extracted(src), src, whole_budget=0, runtime_experts=0)
    assert r.ok, [str(p) for p in r.problems]
    assert r.deep["experts_whole_output"] == 0 and r.deep["experts_run"] == 8
    assert {x["checked"] for x in r.deep["per_expert"]} == {f"{SAMPLE_ROWS} sampled rows"}
    # the default: the first one through the loader, and one more per type signature it does not share
    r = deep_report(extracted(src), src, whole_budget=0)
    sigs = {tuple(sorted((k, t.dtype, t.shape) for k, t in e.tensors.items()))
            for e in load_manifest(extracted(src)).experts}
    assert r.ok and r.deep["experts_through_loader"] == len(sigs) and r.deep["experts_whole_output"] == 0


def test_bands_bound_the_reference(monkeypatch, extracted):
    """References built a few rows at a time give the same answer as whole matrices (the band is a memory bound,
    not a change of result)."""
    import mertools.deep as deep

    src = REAL / "mixtral-q4_0.gguf"
    whole = deep_report(extracted(src), src)
    monkeypatch.setattr(deep, "BAND_BYTES", 256 * 8 * 3)  # 3 rows of 256 float64 at a time
    banded = deep_report(extracted(src), src)
    assert banded.ok and [x["max_rel_err"] for x in banded.deep["per_expert"]] == pytest.approx(
        [x["max_rel_err"] for x in whole.deep["per_expert"]], rel=1e-6)


@pytest.mark.parametrize("mode", ["whole", "loader", "rows"])
def test_a_kernel_that_misreads_a_type_fails(monkeypatch, extracted, mode):
    """Fault injection into the runtime (not the verifier): Q4_0 blocks read with IQ4_NL's value table (same 18-byte
    blocks, other values). Deep verify must report every expert, whole-output or sampled."""
    import mer_runtime.kernels as kernels
    import mer_runtime.shards as shards
    import mertools.deep as deep

    real, real_ffn = kernels.matvec, kernels.expert_ffn

    def misread(dtype, raw, shape, x, **kw):
        return real("IQ4_NL" if dtype == "Q4_0" else dtype, raw, shape, x, **kw)

    def misread_ffn(tensors, x, activation, **kw):  # the whole-expert path (one C call) reads them the same way
        relabel = {r: ("IQ4_NL" if d == "Q4_0" else d, s, raw) for r, (d, s, raw) in tensors.items()}
        return real_ffn(relabel, x, activation, **kw)

    monkeypatch.setattr(kernels, "matvec", misread)
    monkeypatch.setattr(deep, "matvec", misread)
    monkeypatch.setattr(shards, "expert_ffn", misread_ffn)
    src = REAL / "mixtral-q4_0.gguf"
    kw = {"whole": {}, "loader": {"whole_budget": 0, "runtime_experts": 8},
          "rows": {"whole_budget": 0, "runtime_experts": 0}}[mode]
    for against in (src, None):
        r = deep_report(extracted(src), against, **kw)
        assert len(r.problems) == 8 and all("output differs" in p.what for p in r.problems), r.problems
        # what to do: the bytes are the source's, so it is the kernel; without a source, how to tell
        hint = "its bytes equal the source's, so the runtime computes Q4_0 wrongly" if against else \
            "verify it --against the source model"
        assert all(hint in p.what for p in r.problems), r.problems[0]
        want = {"whole": "whole output", "loader": f"{SAMPLE_ROWS} sampled rows, loader and fused call",
                "rows": f"{SAMPLE_ROWS} sampled rows"}
        assert {x["checked"] for x in r.deep["per_expert"]} == {want[mode]}


@pytest.mark.parametrize("role, where", [("gate", "first"), ("up", "last"), ("down", "middle")])
@pytest.mark.parametrize("mode", ["cli", "sampled"])
def test_one_changed_byte_anywhere_is_named(tmp_path, extracted, role, where, mode):
    """A byte changed at the first, last or a middle byte of a projection, with every checksum rewritten: only the
    comparison with the source can see it, in verify's checksum pass (the CLI) and in deep_verify alone with sampled
    rows only (whose rows may well miss it). The problem names the file, the projection and the source tensor."""
    src = REAL / "mixtral-q4_k_m.gguf"
    out = tmp_path / "forged"
    shutil.copytree(extracted(src), out)
    e = load_manifest(out).experts[-1]
    t = e.tensors[role]
    at = {"first": 0, "last": t.nbytes - 1, "middle": t.nbytes // 3}[where]
    forge(out, e.path, t.offset + at)
    assert verify(out).ok
    want = f"{role}: byte {at} of {t.nbytes} does not match the source bytes " \
           f"(blk.{e.layer}.ffn_{role}_exps.weight[{e.expert}] in {src.name}, "
    if mode == "cli":
        p = run_cli("verify", out, "--deep", "--against", src, "-q")
        assert p.returncode == 1 and f"FAIL {e.path}: {want}" in p.stdout, p.stdout
    else:
        r = deep_report(out, src, whole_budget=0, runtime_experts=0)
        assert {p.path for p in r.problems} == {e.path} and r.problems[0].what.startswith(want), r.problems


def test_scan_releases_both_mappings_band_by_band(monkeypatch, extracted):
    """Memory is bounded by the band, not by the file: scan_shard drops every source region in consecutive spans of
    at most RELEASE_BYTES + PIECE that cover it all (the shard itself is read into a buffer), whatever the sizes. Run
    with tiny bands on a real shard so that every projection takes many."""
    import os

    import mertools.deep as deep
    from mer_runtime.safeopen import open_regular

    monkeypatch.setattr(deep, "PIECE", 4096)
    monkeypatch.setattr(deep, "RELEASE_BYTES", 3 * 4096)
    src = REAL / "mixtral-q4_0.gguf"
    m = load_manifest(extracted(src))
    e = m.expert(1, 3)
    ref = SourceReference(src, m)
    spans: dict[str, list] = {}
    try:
        regions = deep.source_regions(ref, e, [])
        assert set(regions) == {"gate", "up", "down"} and all(r.size > 8 * 4096 for r in regions.values())

        def recorder(role, real):
            def release(lo, hi):
                spans.setdefault(role, []).append((lo, hi))
                real(lo, hi)
            return release

        regions = {role: r._replace(release=recorder(role, r.release)) for role, r in regions.items()}
        fd, _ = open_regular(m.path_of(e))
        try:
            whole, parts, n, probs = deep.scan_shard(fd, e, regions)
        finally:
            os.close(fd)
    finally:
        ref.close()
    assert not probs and n == e.size and whole == e.xxh3_64
    assert all(parts[r] == t.xxh3_64 for r, t in e.tensors.items())
    for role, r in regions.items():
        got = spans[role]
        assert got[0][0] == 0 and got[-1][1] == r.size
        assert all(a[1] == b[0] for a, b in zip(got, got[1:]))  # consecutive, nothing held back
        assert max(hi - lo for lo, hi in got) <= deep.RELEASE_BYTES + deep.PIECE


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps), whatever the page cache holds."""
    total, mine = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            mine = line.rstrip().endswith(str(path))
        elif mine and head[0] == "Rss:":
            total += int(head[1])
    return total


def test_mapped_source_pages_are_dropped(extracted):
    """The pages a comparison or a reference touched in our own mapping of the source are dropped by the region's
    release (resident size from /proc/self/smaps): they do not pile up over a folder."""
    src = REAL / "mixtral-f16.gguf"
    m = load_manifest(extracted(src))
    ref = SourceReference(src, m)
    try:
        regs = [ref.region(0, e, "down") for e in range(m.model["n_experts"])]
        kib = sum(r.size for r in regs) // 1024
        assert kib >= 512
        before = _mapped_kib(src.resolve())
        assert sum(int(r.read(0, r.size).astype(np.uint64).sum()) for r in regs) >= 0  # touch every page
        touched = _mapped_kib(src.resolve())
        assert touched - before >= kib - 8
        for r in regs:
            r.release(0, r.size)
        after = _mapped_kib(src.resolve())
        # all of it goes but each region's two partial end pages; the kernel's fault-around may have mapped up to
        # 64 KiB on either side, which is not ours to drop
        assert touched - after >= kib - 8 * len(regs) - 8 and after <= before + 2 * 64 + 8 * len(regs) + 8, (
            before, touched, after)
    finally:
        ref.close()


def test_a_source_without_the_folders_expert_is_a_problem_not_a_crash(extracted):
    """--against a model with fewer experts than the folder: the missing one is a problem naming the tensor (exit 1
    through the CLI), not an IndexError from the slice."""
    from mertools.deep import source_regions
    from mertools.errors import SourceError

    src = REAL / "mixtral-q4_0.gguf"
    ref = SourceReference(src)
    try:
        with pytest.raises(SourceError, match="has 4 experts, the folder has expert 99"):
            ref.region(0, 99, "gate")
        import dataclasses

        e = dataclasses.replace(load_manifest(extracted(src)).experts[0], expert=99)
        found: list = []
        assert source_regions(ref, e, found) == {}
        assert [p.path for p in found] == [e.path] * 3 and all("expert 99" in p.what for p in found)
    finally:
        ref.close()


def test_every_type_signature_goes_through_the_fused_path(extracted):
    """Q4_K_M puts Q6_K on some layers' down and Q4_K on others: beyond runtime_experts, one expert of each signature
    not yet covered is loaded, so no (type, shape) pair is checked by sampled rows alone."""
    from mertools.deep import plan_experts

    m = load_manifest(extracted(REAL / "mixtral-q4_k_m.gguf"))

    def sig(e):
        return tuple(sorted((r, t.dtype, tuple(t.shape)) for r, t in e.tensors.items()))

    plan = plan_experts(m.experts, 0, 1)
    loaded = [e for e in m.experts if plan[e.path] == "loaded"]
    assert {sig(e) for e in loaded} == {sig(e) for e in m.experts}
    assert len({sig(e) for e in m.experts}) >= 2 and len(loaded) == len({sig(e) for e in m.experts})


ST_REAL = REAL.parent / "safetensors" / "real"


def _mapped_kib_all(paths) -> int:
    return sum(_mapped_kib(p.resolve()) for p in paths)


def test_safetensors_source_pages_are_dropped(extracted):
    """A SafeTensors source (the Source protocol): a projection that is a plain byte range is dropped from our
    mapping by its region's release, as for GGUF; one made by a transform (GPT-OSS' fused, transposed gate_up) has
    the source pages the transform read dropped as soon as its copy is made. Resident sizes from smaps."""
    src = ST_REAL / "mixtral-bf16-sharded"
    files = sorted(src.glob("*.safetensors"))
    m = load_manifest(extracted(src))
    ref = SourceReference(src, m)
    try:
        regs = [ref.region(e.layer, e.expert, role) for e in m.experts for role in ("gate", "up", "down")]
        kib = sum(r.size for r in regs) // 1024
        assert kib >= 1024
        before = _mapped_kib_all(files)
        assert sum(int(r.read(0, r.size).astype(np.uint64).sum()) for r in regs) >= 0  # touch every page
        touched = _mapped_kib_all(files)
        assert touched - before >= kib - 8 * len(regs)
        for r in regs:
            r.release(0, r.size)
        after = _mapped_kib_all(files)
        # each region's partial end pages stay, and what the kernel's fault-around mapped beside them
        assert after <= before + 8 * len(regs) + 64 * len(files), (before, touched, after)
    finally:
        ref.close()

    src = ST_REAL / "gptoss-bf16"
    m = load_manifest(extracted(src))
    ref = SourceReference(src, m)
    try:
        regs = [ref.region(e.layer, e.expert, role) for e in m.experts for role in ("gate", "up", "down")]
        kib = sum(r.size for r in regs) // 1024
        for r in regs:  # each transform runs as it is read, and what it read of the source goes at its end
            for lo in range(0, r.size, 1 << 16):
                r.read(lo, min(r.size, lo + (1 << 16)))
            r.release(0, r.size)
        left = _mapped_kib_all(list(src.glob("*.safetensors")))
        # the transforms read it all; what stays is the header's page and, at each end of the two stacked tensors
        # of a layer, what the kernel's fault-around (64 KiB windows) mapped of their neighbours, and partial pages
        n_layers = len({e.layer for e in m.experts})
        assert kib >= 1024 and left <= 64 * (4 * n_layers + 1) + 4 * len(regs), (kib, left)
    finally:
        ref.close()


@pytest.mark.parametrize("name", ["gptoss-bf16", "mixtral-bf16-sharded"])
def test_each_source_transform_runs_once_per_expert(monkeypatch, extracted, name):
    """verify --deep --against a SafeTensors checkpoint reads (and, for fused or transposed layouts, transforms)
    each expert's source projections once: in the checksum pass, which compares the bytes; the numeric checks then
    use the shard's bytes, found equal. Counted by wrapping the reference's one source read, from several threads."""
    import threading
    from collections import Counter

    import mertools.deep as deep

    calls: Counter = Counter()
    lock = threading.Lock()
    real = deep.SourceReference._read_source

    def counted(self, layer, expert, role):
        with lock:
            calls[(layer, expert, role)] += 1
        return real(self, layer, expert, role)

    monkeypatch.setattr(deep.SourceReference, "_read_source", counted)
    src = ST_REAL / name
    out = extracted(src)
    m = load_manifest(out)
    r = verify(out, deep=True, against=src)
    assert r.ok, r.problems
    assert r.deep["experts_run"] == len(m.experts) and r.deep["bytes_compared"] > 0
    assert r.deep["experts_whole_output"] >= 1  # the small model: whole outputs too, from the shard's bytes
    want = {(e.layer, e.expert, role) for e in m.experts for role in e.tensors}
    assert set(calls) == want and set(calls.values()) == {1}, calls


def test_damaged_expert_still_gets_a_source_reference(tmp_path, extracted):
    """An expert whose bytes differ from the source's is run against the source's bytes (not its own): its numbers
    are reported as differing too."""
    src = ST_REAL / "mixtral-bf16-sharded"
    out = tmp_path / "f"
    shutil.copytree(extracted(src), out)
    m = load_manifest(out)
    e = m.experts[1]
    t = e.tensors["down"]
    p = out / e.path
    raw = bytearray(p.read_bytes())
    raw[t.offset + 2 * 1 + 1] ^= 0x40  # the high byte of a BF16 weight: a large change
    p.write_bytes(bytes(raw))
    mf = json.loads((out / "manifest.json").read_text())
    ent = next(x for x in mf["experts"] if x["path"] == e.path)
    ent["xxh3_64"] = xxhash.xxh3_64_hexdigest(bytes(raw))
    ent["tensors"]["down"]["xxh3_64"] = xxhash.xxh3_64_hexdigest(bytes(raw[t.offset:t.offset + t.nbytes]))
    (out / "manifest.json").write_bytes(manifest_bytes(mf))
    r = verify(out, deep=True, against=src)
    whats = [pr.what for pr in r.problems if pr.path == e.path]
    assert any("does not match the source bytes" in w for w in whats), r.problems
    assert any("output differs from the source reference" in w for w in whats), r.problems
    # deep_verify alone compares the bytes itself, and so names the projections that differ
    r = deep_report(out, src)
    assert r.problems[-1].what.endswith("its down bytes differ from the source's: re-extract it"), r.problems


def _write_safetensors(path, tensors):
    """A .safetensors file written by hand (header JSON, then the raw bytes): {name: (dtype, array)}."""
    header, off = {}, 0
    for name, (dtype, arr) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + arr.nbytes]}
        off += arr.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        for _, arr in tensors.values():
            fh.write(arr.tobytes())


def _bf16(shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape, np.float32) * 0.05
    return (x.view(np.uint32) >> 16).astype(np.uint16)


@pytest.fixture(scope="module")
def llama4_wide(tmp_path_factory):
    """A Llama-4-layout checkpoint (gate_up [E, H, 2F] input-major, down [E, F, H]: every projection transposed, gate
    and up fused) with one expert of 16 MiB projections (BF16, H 512, F 16384), and its extracted folder: each
    projection is four of the transform's 4 MiB bands, so a copy of one is plainly more than the bands."""
    from mertools import extract

    root = tmp_path_factory.mktemp("l4w")
    h, f = 512, 16384
    p = "model.layers.0.feed_forward."
    _write_safetensors(root / "model.safetensors", {
        "model.embed_tokens.weight": ("BF16", _bf16((8, h), 1)),
        p + "router.weight": ("BF16", _bf16((1, h), 2)),
        p + "experts.gate_up_proj": ("BF16", _bf16((1, h, 2 * f), 3)),
        p + "experts.down_proj": ("BF16", _bf16((1, f, h), 4))})
    (root / "config.json").write_text(json.dumps({
        "model_type": "llama4_text", "hidden_size": h, "num_hidden_layers": 1, "num_local_experts": 1,
        "num_experts_per_tok": 1, "intermediate_size": f}))
    extract(root, root / "out", fsync=False)
    return root, root / "out"


def _peak_mib(fn):
    """(fn(), the peak of memory allocated meanwhile beyond what was allocated before, in MiB): tracemalloc sees
    NumPy's buffers, not mapped file pages (the page cache), which is what the bound is about."""
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, (tracemalloc.get_traced_memory()[1] - base) / 2**20
    finally:
        tracemalloc.stop()


def test_transformed_projections_are_compared_in_bands(llama4_wide, tmp_path, monkeypatch):
    """verify --deep --against a fused, transposed layout holds the transform's bands, not its matrices: the
    checksum pass's comparison of one expert, and deep_verify's comparison and float64 references from the source
    (sampled rows and whole outputs, for an expert whose three projections each differ by a byte), allocate less
    than one 16 MiB projection at their peak (the old code held transformed copies of all three: 64 MiB)."""
    import importlib

    import mertools.deep as deep

    verify_mod = importlib.import_module("mertools.verify")
    src, out = llama4_wide
    m = load_manifest(out)
    e = m.experts[0]
    proj = max(t.nbytes for t in e.tensors.values())
    assert proj == 16 << 20
    ref = SourceReference(src, m)
    try:
        found: list = []
        (probs, n), peak = _peak_mib(lambda: verify_mod.check_expert(m, e, lambda k: None, ref, found))
    finally:
        ref.close()
    assert not probs and not found and n == e.size
    assert peak < proj / 2**20, peak

    forged = tmp_path / "forged"
    shutil.copytree(out, forged)
    with open(forged / e.path, "r+b") as fh:
        for t in e.tensors.values():
            fh.seek(t.offset + t.nbytes // 2)
            b = fh.read(1)
            fh.seek(t.offset + t.nbytes // 2)
            fh.write(bytes([b[0] ^ 0x40]))
    monkeypatch.setattr(deep, "BAND_BYTES", 1 << 20)  # the float64 reference's band, for a bound this small
    for kw in ({"whole_budget": 0, "runtime_experts": 0}, {"whole_budget": 1 << 30}):
        r, peak = _peak_mib(lambda: deep_report(forged, src, **kw))
        assert peak < proj / 2**20, (kw, peak)
        whats = [p.what for p in r.problems]
        assert [w.split(":")[0] for w in whats if "does not match the source bytes" in w] == ["gate", "up", "down"]
        assert "(model.layers.0.feed_forward.experts.gate_up_proj[0][:, 16384:].T in model.safetensors" in whats[1]
        assert r.deep["experts_run"] == 1


def test_transformed_folder_verifies(llama4_wide):
    """The same folder passes verify --deep --against its checkpoint, whole output included."""
    src, out = llama4_wide
    r = verify(out, deep=True, against=src)
    assert r.ok, r.problems
    assert r.deep["bytes_compared"] == 3 * (16 << 20)


def test_converted_to_f16_verifies_against_its_checkpoint(extracted, tmp_path):
    """--dtype f16 from a SafeTensors checkpoint: the transform's bands are float16 arrays, whose bytes (not their
    values cast to bytes, as the old code did: every projection 'half the size of the shard's') are compared."""
    from mertools import extract

    src = ST_REAL / "gptoss-bf16"
    out = tmp_path / "o"
    extract(src, out, fsync=False, dtype="f16")
    r = verify(out, deep=True, against=src)
    assert r.ok, r.problems[:3]
    assert deep_report(out, src, whole_budget=0).ok


def test_hashing_a_big_shard_maps_none_of_it(llama4_wide):
    """verify's checksum pass (and deep verify's shard scan) reads each shard with pread into one buffer, never
    through a mapping (which measured 1.4-1.8x slower, and kept what it touched resident until dropped): none of a
    48 MiB shard is ever mapped, sampled every 4th piece (four threads hashing experts of hundreds of MiB hold four
    pieces)."""
    import os

    from mer_runtime import checksum
    from mer_runtime.safeopen import open_regular

    import mertools.deep as deep

    _, out = llama4_wide
    e = load_manifest(out).experts[0]
    path = (out / e.path).resolve()
    seen: list[int] = []
    ticks = iter(range(1 << 30))

    def tick(k):  # every 4th piece: reading smaps is slow
        if next(ticks) % 4 == 3:
            seen.append(_mapped_kib(path))

    whole, _, n = checksum.hash_file(path, (), tick)
    assert whole == e.xxh3_64 and n == e.size >= 32 * checksum.PIECE
    fd, _ = open_regular(path)
    try:
        assert deep.scan_shard(fd, e, {}, tick)[0] == e.xxh3_64
    finally:
        os.close(fd)
    assert len(seen) >= 2 * (e.size // checksum.PIECE // 4) and max(seen) == 0, seen


def test_bands_read_forward_and_say_when_a_transform_is_short():
    """_Bands (a transform's bytes made as they are read): reads inside a band, across bands and to the end give the
    bytes; only a read behind what is held starts the transform again; a transform that gives fewer or more bytes
    than planned is a SourceError naming the projection, not a short comparison."""
    from mertools.deep import _Bands
    from mertools.errors import SourceError

    data = np.arange(40, dtype=np.uint16)  # bands of any type: their bytes count (an F16 band is not cast)
    starts = []

    def start():
        starts.append(1)
        return iter([data[:7], data[7:20], data[20:]])

    b = _Bands(start, data.nbytes, "gate_up_proj[0].T")
    raw = data.view(np.uint8)
    for lo, hi in [(0, 3), (3, 20), (20, 41), (41, 80)]:  # within, across two, across two again, to the end
        assert b.read(lo, hi).tobytes() == raw[lo:hi].tobytes()
    assert len(starts) == 1 and b.read(80, 80).size == 0 and len(starts) == 1
    assert b.read(10, 12).tobytes() == raw[10:12].tobytes() and len(starts) == 2  # behind: made again
    with pytest.raises(SourceError, match=r"gate_up_proj\[0\]\.T: its transform gave 14 bytes where 80"):
        _Bands(lambda: iter([data[:7]]), data.nbytes, "gate_up_proj[0].T").read(0, 80)
    with pytest.raises(SourceError, match="more than the 10 bytes planned"):
        _Bands(lambda: iter([data[:7]]), 10, "x").read(0, 10)


def _with_non_finite(src, dst):
    """A copy of the small Mixtral-layout checkpoint with NaN, +inf and -inf in expert 0's gate (w1) of layer 0 (a
    bit-flipped BF16 does this): what a source holds is passed through, or quantized, as it is."""
    import struct

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    start, _ = json.loads(data[8:8 + n])["model.layers.0.block_sparse_moe.experts.0.w1.weight"]["data_offsets"]
    at = 8 + n + start
    for i, bits in enumerate((0x7FC0, 0x7F80, 0xFF80)):  # BF16 NaN, +inf, -inf, in rows 0, 1 and 2
        data[at + i * 64 * 2 + 6:at + i * 64 * 2 + 8] = bits.to_bytes(2, "little")
    f.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("dtype", [None, "f16", "q8_0"])
def test_a_source_holding_nan_and_inf_verifies_and_a_changed_byte_still_fails(tmp_path, dtype):
    """Non-finite weights come out of the runtime where the float64 reference has them: verify --deep --against used
    to say 'max relative error nan ... the runtime computes Q8_0 wrongly: report this bug' (found by the fuzzer).
    The finite rest is still compared, so one changed byte elsewhere is still named."""
    from mertools import extract

    src = _with_non_finite(REAL.parent.parent / "fixtures/safetensors/gen/mixtral", tmp_path / "ck")
    out = tmp_path / "o"
    extract(src, out, fsync=False, **({"dtype": dtype} if dtype else {}))
    assert deep_report(out, src).ok
    r = verify(out, deep=True, against=src)
    assert r.ok, r.problems[:3]
    e = next(e for e in json.loads((out / "manifest.json").read_text())["experts"]
             if e["layer"] == 0 and e["expert"] == 0)
    gate = e["tensors"]["gate"]
    forge(out, e["path"], gate["offset"] + gate["nbytes"] - 1)  # the poisoned projection's last (finite) row
    r = verify(out, deep=True, against=src)
    assert not r.ok and any(e["path"] in str(p) for p in r.problems), r.problems


@pytest.mark.parametrize("mode", ["whole", "loader", "rows"])
def test_a_wrong_kernel_is_caught_on_an_expert_whose_output_is_all_nan(monkeypatch, tmp_path, mode):
    """One NaN in expert 0's gate makes its whole output NaN on both sides, so the output comparison has nothing
    finite left: the kernel's rows are then checked one by one. A runtime 1% off (fault injected into the runtime,
    not the verifier) must be reported for every expert, the poisoned one included."""
    import mer_runtime.kernels as kernels
    import mer_runtime.shards as shards
    import mertools.deep as deep
    from mertools import extract

    src = _with_non_finite(REAL.parent.parent / "fixtures/safetensors/gen/mixtral", tmp_path / "ck")
    out = tmp_path / "o"
    extract(src, out, fsync=False)
    real, real_ffn = kernels.matvec, kernels.expert_ffn
    monkeypatch.setattr(kernels, "matvec", lambda *a, **kw: real(*a, **kw) * np.float32(1.01))
    monkeypatch.setattr(deep, "matvec", kernels.matvec)
    monkeypatch.setattr(shards, "expert_ffn", lambda *a, **kw: real_ffn(*a, **kw) * np.float32(1.01))
    kw = {"whole": {}, "loader": {"whole_budget": 0}, "rows": {"whole_budget": 0, "runtime_experts": 0}}[mode]
    r = deep_report(out, src, **kw)
    n = len(json.loads((out / "manifest.json").read_text())["experts"])
    assert len(r.problems) == n, r.problems
    e0 = next(x for x in r.deep["per_expert"] if x["layer"] == 0 and x["expert"] == 0)
    assert e0["max_rel_err"] > 1e-3, e0


def test_rel_compares_the_finite_values_and_requires_the_same_non_finite_ones():
    from mertools.deep import _rel

    nan, inf = float("nan"), float("inf")
    want = np.array([[1.0, nan, inf, -inf, 4.0]])
    assert _rel(np.array([[1.0, nan, inf, -inf, 4.0]]), want) == 0.0
    assert _rel(np.array([[1.0, nan, inf, -inf, 4.4]]), want) == pytest.approx(0.1)  # over the finite part's max
    for got in ([1.0, 0.0, inf, -inf, 4.0], [1.0, nan, -inf, -inf, 4.0], [1.0, nan, inf, nan, 4.0],
                [nan, nan, inf, -inf, 4.0], [1.0, nan, inf, -inf, inf]):  # each one value off its class
        assert _rel(np.array([got]), want) == inf, got
    assert _rel(np.array([[2.0, 2.0], [2.0, 2.0]]), np.array([2.0, 2.0])) == 0.0  # a reference row broadcast
    assert _rel(np.array([[nan, nan]]), np.array([[nan, nan]])) == 0.0  # nothing finite: _or_rows_alone's case


def test_an_expert_whose_values_overflow_float32_is_reported_as_such_not_as_a_kernel_bug(tmp_path):
    """Finite BF16 weights of about 1e30 in gate and up: h = silu(g) * u reaches about 1e60 in the float64 reference,
    beyond float32's range, in which the runtime computes. Found by the fuzzer (a huge FP8 scale): deep verify said
    "the runtime computes BF16 wrongly: report this bug". It is the model's own values: a problem saying so."""
    import ml_dtypes

    from mertools import extract
    from test_st_mtp_fp8 import _load, _mtp_checkpoint, _save

    ck = _mtp_checkpoint(tmp_path / "ck", "qwen3_next", "per_expert", "per_expert", False)
    t = _load(ck)
    for e in range(4):  # every expert of the layer: deep verify runs the whole FFN of only some (the rest by rows,
        for role in ("gate", "up"):  # each projection alone, which stays within float32 here)
            w = t[f"model.layers.1.mlp.experts.{e}.{role}_proj.weight"]
            w[:] = (w.astype(np.float32) * 1e30).astype(ml_dtypes.bfloat16)
    huge = _save(tmp_path / "huge", json.loads((ck / "config.json").read_text()), t)
    out = tmp_path / "out"
    extract(huge, out, fsync=False)
    for against, hint in ((huge, "its bytes equal the source's"), (None, "verify it --against")):
        r = verify(out, deep=True, against=against)
        assert not r.ok and r.problems, [str(p) for p in r.problems]
        for p in r.problems:
            msg = str(p)
            assert "beyond float32's range" in msg and hint in msg and "wrongly" not in msg, msg
            assert msg.startswith("experts/L001/"), msg


def test_an_expert_whose_activations_overflow_float32_but_whose_output_does_not_is_not_called_a_kernel_bug(
        tmp_path):
    """gate and up weights of about 1e21 with down weights of about 1e-10: h = silu(g) * u reaches about 1e40,
    beyond float32's range, while the float64 output comes back to about 1e30. The runtime's h overflows, its output
    is NaN; only the output was compared with float32's range, so deep verify said "the runtime computes BF16
    wrongly: report this bug" (found by scripts/fuzz.py, seed 7771292: a bit flipped in a weight's exponent). What a
    float32 run meets on the way (each projection's sums, the activation) counts as the model's values too."""
    import ml_dtypes

    from mertools import extract
    from test_st_mtp_fp8 import _load, _mtp_checkpoint, _save

    ck = _mtp_checkpoint(tmp_path / "ck", "qwen3_next", "per_expert", "per_expert", False)
    t = _load(ck)
    for e in range(4):
        for role, k in (("gate", 1e21), ("up", 1e21), ("down", 1e-10)):
            w = t[f"model.layers.1.mlp.experts.{e}.{role}_proj.weight"]
            w[:] = (w.astype(np.float32) * k).astype(ml_dtypes.bfloat16)
    huge = _save(tmp_path / "huge", json.loads((ck / "config.json").read_text()), t)
    out = tmp_path / "out"
    extract(huge, out, fsync=False)
    r = verify(out, deep=True, against=huge)
    assert not r.ok and r.problems, [str(p) for p in r.problems]
    for p in r.problems:
        msg = str(p)
        assert "beyond float32's range" in msg and "wrongly" not in msg, msg
        assert msg.startswith("experts/L001/"), msg


ST_SHARDED = REAL.parent / "safetensors" / "real" / "mixtral-bf16-sharded"


@pytest.mark.parametrize("src", [REAL / "mixtral-q4_k_m.gguf", ST_SHARDED], ids=["gguf", "safetensors"])
def test_scan_with_pieces_that_straddle_projections_names_the_exact_byte(monkeypatch, tmp_path, extracted, src):
    """The byte scan reads the shard and the source (Region.into: pread) a PIECE at a time: with a piece size that
    is no page multiple, every projection starts and ends inside a piece and its bytes span several; the clean
    shard still compares equal with the right checksums, and a byte changed deep inside a projection (checksums
    rewritten) is named at its own offset, not one shifted by a piece or a span."""
    import os

    import mertools.deep as deep
    from mer_runtime.safeopen import open_regular

    monkeypatch.setattr(deep, "PIECE", 4099)
    out = tmp_path / "forged"
    shutil.copytree(extracted(src), out)
    m = load_manifest(out)
    e = m.experts[-1]
    ref = SourceReference(src, m)
    try:
        def scan(e):
            regions = deep.source_regions(ref, e, [])
            assert set(regions) == {"gate", "up", "down"} and all(r.into is not None for r in regions.values())
            fd, _ = open_regular(m.path_of(e))
            try:
                return deep.scan_shard(fd, e, regions)
            finally:
                os.close(fd)

        whole, parts, n, probs = scan(e)
        assert not probs and n == e.size and whole == e.xxh3_64
        assert all(parts[r] == t.xxh3_64 for r, t in e.tensors.items())
        t = e.tensors["down"]
        at = t.nbytes - 3 * 4099 - 5  # a few pieces before its end, inside a piece
        forge(out, e.path, t.offset + at)
        m = load_manifest(out)
        e = m.experts[-1]
        whole, parts, n, probs = scan(e)
        assert whole == e.xxh3_64
        assert [p.what.split(" does not")[0] for p in probs] == [f"down: byte {at} of {t.nbytes}"], probs
    finally:
        ref.close()


def _open_fds() -> set[str]:
    import os

    return {os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{n}")}


@pytest.mark.parametrize("how", ["split-gguf", "safetensors", "split-gguf-part-cut"])
def test_the_reference_closes_every_file_it_opened(tmp_path, extracted, how):
    """SourceReference keeps each source file open for the byte scan's preads (a split GGUF's parts, a checkpoint's
    files): verify --deep --against leaves none open, nor does a reference whose construction fails on a bad part."""
    from conftest import GEN

    if how == "safetensors":
        src = ST_SHARDED
        out = extracted(src)
    else:
        src = GEN / "moe-split-q4_0-00001-of-00006.gguf"
        out = extracted(src)
    if how == "split-gguf-part-cut":
        copy = tmp_path / "src"
        copy.mkdir()
        for p in parts_of(src):
            shutil.copy(p, copy / p.name)
        last = copy / parts_of(src)[-1].name
        last.write_bytes(last.read_bytes()[:100])  # a part the reader refuses, after the others were opened
        src = copy / src.name
    before = _open_fds()
    if how == "split-gguf-part-cut":
        from mertools.errors import MertoolsError
        from mer_runtime.errors import MerError

        with pytest.raises((MertoolsError, MerError)):
            SourceReference(src, load_manifest(out))
    else:
        assert verify(out, deep=True, against=src).ok
    leaked = {p for p in _open_fds() - before if str(src.parent if src.is_file() else src) in p}
    assert not leaked, leaked


@pytest.mark.parametrize("src", [REAL / "mixtral-q4_k_m.gguf", ST_SHARDED], ids=["gguf", "safetensors"])
def test_a_source_that_fails_to_read_is_not_blamed_on_the_shard(monkeypatch, extracted, src):
    """The byte scan preads the source (Region.into): an I/O error there (EIO on a failing disk or network file
    system) names the source and stops verify with one error, as a source the mapping faulted on did; it never
    becomes a "cannot read" FAIL of the shard being compared (whose re-extraction would fix nothing)."""
    import errno
    import os

    import mertools.deep as deep
    from mertools.errors import SourceError

    out = extracted(src)
    names = {p.name for p in (src.iterdir() if src.is_dir() else [src])}
    real = os.preadv

    def preadv(fd, bufs, at):
        try:
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            name = ""
        if name in names:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, at)

    monkeypatch.setattr(os, "preadv", preadv)
    with pytest.raises(SourceError) as exc:
        verify(out, deep=True, against=src)
    assert "Input/output error" in str(exc.value) and any(n in str(exc.value) for n in names), exc.value
