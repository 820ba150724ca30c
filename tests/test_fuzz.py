"""The fuzzer that stays: a few hundred seeded cases of scripts/fuzz.py, each in a forked child with time and
memory limits. Any traceback, hang or crash fails the test and prints the seed to replay with
`python scripts/fuzz.py --replay SEED --target TARGET`."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("mertools_fuzz", ROOT / "scripts" / "fuzz.py")
fuzz = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = fuzz  # dataclasses look their module up there
spec.loader.exec_module(fuzz)

# Folder attacks that the manifest reader and the runtime of THIS branch do not survive yet (tracebacks or hangs,
# found by this fuzzer); they are hardened on other branches. After merging those, empty this set: every class
# is then generated and must give a clean outcome.
KNOWN_FAILING_ON_THIS_BRANCH: set[str] = set()  # every folder attack class is expected to pass
TIMEOUT = 60.0  # generous: a loaded 2-core machine; a real hang is caught all the same


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    return work, fuzz.build_corpus(work, fuzz.TARGETS)


def _check(summary):
    bad = [f"seed {f['seed']} ({f['target']}, {f['class']}): {f['outcome']}\n{f['detail']}" for f in summary.failures]
    assert not bad, "\n\n".join(bad[:5])


def test_gguf_reader_path(corpus):
    work, c = corpus
    s = fuzz.fuzz(list(range(1, 241)), ("gguf",), c, work, timeout=TIMEOUT, jobs=2)
    _check(s)
    assert s.cases == 240 and s.outcomes["error"] > 100 and s.outcomes["ok"] > 0  # it reaches both outcomes


def test_manifest_and_folder_consumers(corpus):
    work, c = corpus
    s = fuzz.fuzz(list(range(1, 121)), ("manifest", "folder"), c, work, timeout=TIMEOUT, jobs=2,
                  skip_classes=KNOWN_FAILING_ON_THIS_BRANCH)
    _check(s)
    assert s.cases > 20


def test_safetensors_checkpoints(corpus):
    """Attacked SafeTensors checkpoint folders through describe (open_source + plan), and extract + verify (and
    deep verify against the attacked folder) on some: one clean outcome each, nothing written outside OUT."""
    work, c = corpus
    s = fuzz.fuzz(list(range(1, 301)), ("safetensors",), c, work, timeout=TIMEOUT, jobs=2)
    _check(s)
    assert s.cases == 300 and s.outcomes["error"] > 150 and s.outcomes["ok"] > 20  # it reaches both outcomes


def test_safetensors_attack_classes_are_all_generated(corpus):
    _, c = corpus
    fuzz._CLASS_CACHE.clear()
    seen = {fuzz._case_class(seed, "safetensors", c).split("+")[0] for seed in range(1, 301)}
    assert {"hlen-huge", "hdr-huge-int", "off-overlap", "shape-zero", "dtype-unknown", "index-traversal",
            "config-count", "shard-fifo", "tensor-reshape"} <= seen


def test_same_seed_same_case(corpus):
    _, c = corpus
    fuzz._CLASS_CACHE.clear()
    first = [fuzz._case_class(seed, "gguf", c) for seed in range(50, 60)]
    fuzz._CLASS_CACHE.clear()
    assert first == [fuzz._case_class(seed, "gguf", c) for seed in range(50, 60)]


def test_harness_classifies_every_outcome(corpus, monkeypatch):
    """The harness itself: a traceback, a hang, an allocation past the memory limit and a signal are each seen."""
    work, c = corpus

    def case(seed, target, corpus, work, on_class=lambda cl: None, **kw):
        on_class(f"selftest-{seed}")
        if seed == 1:
            raise KeyError("not our error")
        if seed == 2:
            time.sleep(60)
        if seed == 3:
            bytearray(8 << 30)
        if seed == 4:
            os.kill(os.getpid(), 11)
        if seed == 5:
            from mer_runtime.errors import MerError
            raise MerError("ours")
        return "fine"

    monkeypatch.setattr(fuzz, "run_case", case)
    s = fuzz.fuzz([1, 2, 3, 4, 5, 6], ("gguf",), c, work, timeout=3.0, mem_mb=2048, jobs=2)
    got = {f["seed"]: f["outcome"] for f in s.failures}
    assert got == {1: "traceback", 2: "hang", 3: "crash", 4: "crash"}
    assert s.outcomes["error"] == 1 and s.outcomes["ok"] == 1
    assert "KeyError" in next(f["detail"] for f in s.failures if f["seed"] == 1)


def _seed_corpus(c):
    """The corpus with only the generated MTP / fused-FP8 checkpoints (what `--st-corpus seeds` runs)."""
    seeds = [p for p in c.checkpoints if p.name in fuzz.ST_SEED_NAMES]
    assert sorted(p.name for p in seeds) == sorted(fuzz.ST_SEED_NAMES)
    return dataclasses.replace(c, checkpoints=seeds)


def test_safetensors_mtp_and_fused_fp8_seeds(corpus):
    """MTP blocks (per expert, fused, DeepSeek-style) and fused FP8 with block scales (in the same shard and in
    another), attacked in their scales, MTP numbering and num_hidden_layers, then describe and (on most cases)
    extract with --dtype for FP8 + verify: one clean outcome each."""
    work, c = corpus
    s = fuzz.fuzz(list(range(1, 161)), ("safetensors",), _seed_corpus(c), work, timeout=TIMEOUT, jobs=2)
    _check(s)
    assert s.cases == 160 and s.outcomes["error"] > 60 and s.outcomes["ok"] > 15


def test_mtp_and_scale_attack_classes_are_all_generated(corpus):
    _, c = corpus
    sc = _seed_corpus(c)
    fuzz._CLASS_CACHE.clear()
    seen = {fuzz._case_class(seed, "safetensors", sc).split("+")[0] for seed in range(1, 241)}
    fuzz._CLASS_CACHE.clear()
    assert set(fuzz.ST_NEW_CLASSES) <= {x.rsplit("-", 1)[0] if x[-1].isdigit() else x for x in seen}
    assert {"scale-missing-0", "scale-missing-1", "scale-missing-2", "mtp-index-0", "mtp-index-2"} <= seen


def test_mtp_block_numbered_past_a_gap_is_refused(tmp_path):
    """Found by the fuzzer (mtp-index): mtp.layers.5 alone after 2 decoder blocks was planned as block 7 with
    n_layers 3, and extract failed on its own staging manifest (moe_layers past n_layers); now the source refuses
    it, naming the tensor."""
    from conftest import run_cli
    from mertools.errors import SourceError
    from mertools.sources.safetensors import SafeTensorsSource

    ck = fuzz.build_st_seeds(tmp_path / "seeds")[fuzz.ST_SEED_NAMES.index("mtp-qwen3next-perexpert")]
    shards = fuzz._all_entries(ck)
    for p, (ent, meta) in shards.items():
        shards[p] = ({k.replace("mtp.layers.0.", "mtp.layers.5."): v for k, v in ent.items()}, meta)
    fuzz._write_entries(shards, ck)
    with pytest.raises(SourceError, match=r"'mtp\.layers\.5\.mlp\.experts\.0\.gate_proj\.weight' is of block 7, .*"
                                          r"no expert tensors of block 2"):
        SafeTensorsSource(ck)
    p = run_cli("extract", str(ck), str(tmp_path / "o"))
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "mtp.layers.5." in p.stderr and not (tmp_path / "o").exists()


def test_more_experts_used_than_held_is_refused(tmp_path):
    """Found by the fuzzer (config-count, seed 6006424): num_experts_per_tok 1000 with 2 experts per layer passed
    the source and extract failed on its own staging manifest (n_experts_used outside 0..n_experts); now the source
    refuses it, naming config.json and the key."""
    from conftest import run_cli
    from mertools.errors import SourceError
    from mertools.sources.safetensors import SafeTensorsSource

    ck = fuzz.build_st_seeds(tmp_path / "seeds")[fuzz.ST_SEED_NAMES.index("fp8-fused-mtp")]
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_experts_per_tok"] = 1000
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match=r"config\.json: num_experts_per_tok is 1000, more than the 2 experts"):
        SafeTensorsSource(ck)
    p = run_cli("extract", "--dtype", "bf16", str(ck), str(tmp_path / "o"))
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "num_experts_per_tok" in p.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("limit", [2.0 ** 64, 0, -7.0])
def test_swiglu_limit_out_of_range_is_refused(tmp_path, limit):
    """Found by the fuzzer (config-count, test seed 257): GPT-OSS's swiglu_limit 2**64 passed the source and
    extract failed on its own staging manifest (limit outside (0, 1e6]); now the source refuses it."""
    import shutil

    from mertools.errors import SourceError
    from mertools.sources.safetensors import SafeTensorsSource

    ck = tmp_path / "ck"
    shutil.copytree(fuzz.ST_GEN / "gpt_oss_bf16", ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["swiglu_limit"] = limit
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match=r"config\.json: swiglu_limit is .*expected a number in \(0, 1e6\]"):
        SafeTensorsSource(ck)
