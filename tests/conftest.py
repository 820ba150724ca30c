"""Shared helpers. Expected bytes come straight from the gguf package's reader, never from mertools' own plan."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
GEN = FIX / "generated"
REAL = FIX / "real"

GENERATED_MOE = sorted(
    p for p in GEN.glob("moe-*.gguf") if "-of-" not in p.name or p.name.endswith("-00001-of-00006.gguf")
)
REAL_MOE = sorted(REAL.glob("*.gguf"))
ALL_MOE = GENERATED_MOE + REAL_MOE


def parts_of(path: Path) -> list[Path]:
    if "-00001-of-" in path.name:
        n = int(path.name.split("-of-")[1][:5])
        return [path.with_name(path.name.replace("-00001-of-", f"-{i:05d}-of-")) for i in range(1, n + 1)]
    return [path]


def is_expert_tensor(name: str) -> bool:
    return re.match(r"^blk\.\d+\.ffn_(gate_up|gate|up|down)(_exps|\.\d+)\.(weight|bias)$", name) is not None


def reader_tensors(path: Path) -> dict[str, object]:
    return {t.name: t for p in parts_of(path) for t in gguf.GGUFReader(p).tensors}


def reference_slice(tensors: dict, layer: int, expert: int, role: str):
    """(source tensor, the expert's slice of it as the gguf package's reader holds it), found by GGUF name."""
    kind = "bias" if role.endswith("_bias") else "weight"
    base = role.removesuffix("_bias")
    if (t := tensors.get(f"blk.{layer}.ffn_{base}_exps.{kind}")) is not None:
        return t, t.data[expert]
    if (t := tensors.get(f"blk.{layer}.ffn_gate_up_exps.{kind}")) is not None:
        d = t.data[expert]
        half = d.shape[0] // 2
        return t, d[:half] if base == "gate" else d[half:]
    t = tensors[f"blk.{layer}.ffn_{base}.{expert}.{kind}"]
    return t, t.data


def reference_bytes(tensors: dict, layer: int, expert: int, role: str) -> bytes:
    """The expert's projection bytes as the gguf package's reader sees them in the source."""
    return reference_slice(tensors, layer, expert, role)[1].tobytes()


def run_cli(*args: str, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command in a real process (exit codes, stderr and the absence of tracebacks are what's tested)."""
    p = subprocess.run(
        [sys.executable, "-m", "mertools.cli", *map(str, args)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"mertools {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def start_cli(*args, **env) -> subprocess.Popen:
    """The real command, started: a test stops or kills it at a test point (MERTOOLS_TEST_STOP_AT, mertools/commit.py)."""
    return subprocess.Popen([sys.executable, "-m", "mertools.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def wait_stopped(p: subprocess.Popen) -> None:
    """Block until the child has SIGSTOPped itself at its test point (or fail if it exited instead)."""
    _, status = os.waitpid(p.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"child exited before its test point: {status}"


def appears_midway(target: Path, mine: bytes, stop_at: str, *args) -> None:
    """Run the command ARGS, stopped at its test point STOP_AT while it writes; meanwhile another writer puts MINE at
    TARGET. Without --overwrite the command must leave TARGET as it is and fail in one line saying so."""
    import signal

    p = start_cli(*args, MERTOOLS_TEST_STOP_AT=stop_at)
    try:
        wait_stopped(p)
        target.write_bytes(mine)
    finally:
        os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.strip().splitlines() == [
        f"error: {target}: appeared while this run wrote it and was left as it is; pass --overwrite to replace it, "
        "or choose another name"], err
    assert target.read_bytes() == mine


def extract_fixture(tmp_path_factory, name: str, src: str = "mixtral-q4_k_m.gguf") -> Path:
    """A fresh extraction of a real fixture (not the session's shared one: the caller may write into it)."""
    from mertools import extract

    o = tmp_path_factory.mktemp(name) / "mx"
    extract(REAL / src, o, fsync=False)
    return o


def smoke_json(out: Path, *args: str) -> dict:
    """`mertools smoke OUT --json ARGS`, which must succeed; its JSON."""
    import json

    p = run_cli("smoke", out, "--json", *args)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.fixture(scope="session")
def extracted(tmp_path_factory):
    """Extract each MoE fixture once per session: {fixture path: output folder}."""
    from mertools import extract

    cache: dict[Path, Path] = {}

    def get(src: Path) -> Path:
        if src not in cache:
            out = tmp_path_factory.mktemp("x") / src.stem
            extract(src, out, fsync=False)
            cache[src] = out
        return cache[src]

    return get


@pytest.fixture
def hub():
    """A hub-compatible HTTP server on loopback (tests/hubserver.py), for the pull/push/inspect hf:// tests."""
    from hubserver import HubServer

    with HubServer() as h:
        yield h


@pytest.fixture
def env(hub, tmp_path):
    """The environment that points huggingface_hub (in-process or in a CLI subprocess) at `hub`."""
    return hub.env(tmp_path / "hf-home")


def st_folder(name: str) -> Path:
    """A SafeTensors fixture checkpoint: "real/NAME" (made by transformers) or a generated one."""
    st = FIX / "safetensors"
    return st / name if name.startswith("real/") else st / "gen" / name


@pytest.fixture(scope="module")
def st_extracted(tmp_path_factory):
    """get(name, dtype=None): the fixture checkpoint `name` extracted once per module (no fsync)."""
    from mertools import extract

    cache: dict[tuple[str, str | None], Path] = {}

    def get(name: str, dtype: str | None = None) -> Path:
        if (name, dtype) not in cache:
            out = tmp_path_factory.mktemp("st") / name.replace("/", "_")
            extract(st_folder(name), out, fsync=False, dtype=dtype)
            cache[(name, dtype)] = out
        return cache[(name, dtype)]

    return get


def shard_bytes(out: Path, entry, role: str) -> bytes:
    """The bytes of projection `role` of manifest entry `entry` in the shard folder `out`."""
    t = entry.tensors[role]
    with open(out / entry.path, "rb") as fh:
        fh.seek(t.offset)
        return fh.read(t.nbytes)

# Test modules none of whose tests reaches a kernel: CI's second pass (`MER_KERNELS=numpy`: the NumPy kernels that
# users without a C compiler get) deselects them with `-m "not kernel_free"`, as they would run the very same code
# twice. Found by tracing every call of mer_runtime.kernels' entry points (matvec, moe, expert_ffn,
# dequantize_tensor, reference_ffn, reference_weights, activate), CLI subprocesses included, through a whole run
# (2026-11-30); test_file_changed, test_hub_pull_record and test_st_reassemble left it when extract's transposed
# SafeTensors projections (GPT-OSS BF16, Llama 4) began to be copied by kernels.strided_copy, and test_companions
# and test_hub_stream (both extract real/gptoss-bf16; found by wrapping kernels.strided_copy through a run of every
# module of this set that names a SafeTensors fixture). A module that gains a test computing through the kernels
# must leave this set; a new module runs in both passes until it is shown to be kernel-free.
KERNEL_FREE = frozenset({
    "test_close_waiters", "test_commit", "test_companions_review", "test_errors",
    "test_export_mer", "test_extract", "test_fixtures", "test_flush", "test_gguf_canary",
    "test_hub_hostile", "test_hub_pull", "test_hub_push",
    "test_manifest", "test_manifest_mutations", "test_pack", "test_prefetch_price", "test_quiet_threads",
    "test_ranges", "test_reassemble", "test_runtime_isolation", "test_safety", "test_spec_thread",
    "test_startup", "test_uring", "test_verify",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rpartition(".")[2] in KERNEL_FREE:
            item.add_marker(pytest.mark.kernel_free)
