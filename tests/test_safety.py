"""Interrupted runs, failures mid-write and full disks never leave an output that looks complete."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import gguf
import pytest

from mertools import MertoolsError, extract
from mer_runtime import ManifestError, load_manifest

from conftest import GEN, REAL, run_cli

KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from mertools import extract
    calls = [0]
    def progress(total, items):
        def tick(n):
            calls[0] += 1
            if calls[0] == int(sys.argv[3]):
                os.kill(os.getpid(), signal.SIGKILL)
        return tick
    extract(sys.argv[1], sys.argv[2], progress=progress)
    """
)


def test_killed_run_leaves_no_output_and_next_run_cleans_up(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", KILLER, str(REAL / "mixtral-f16.gguf"), str(out), "5"])
    assert p.returncode == -9
    assert not out.exists()
    leftovers = sorted(x.name for x in tmp_path.iterdir())  # hidden, clearly not the output
    assert leftovers[0] == ".out.mertools-lock" and len(leftovers) == 2  # a dead process's lock holds nothing
    assert leftovers[1].startswith(".out.mertools-staging-")
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(tmp_path / leftovers[1])  # no manifest: never mistaken for a complete folder
    run_cli("extract", REAL / "mixtral-f16.gguf", out, "-q", check=True)
    assert [x.name for x in tmp_path.iterdir()] == ["out"]
    assert run_cli("verify", out, "-q").returncode == 0


def test_exception_mid_write_removes_staging_and_keeps_old_output(tmp_path):
    out = tmp_path / "out"
    extract(GEN / "moe-merged-q4_0.gguf", out)
    before = (out / "manifest.json").read_bytes()

    def progress(total, items):
        def tick(n):
            raise KeyboardInterrupt

        return tick

    with pytest.raises(KeyboardInterrupt):
        extract(GEN / "moe-merged-f16.gguf", out, overwrite=True, progress=progress)
    assert [x.name for x in tmp_path.iterdir()] == ["out"]
    assert (out / "manifest.json").read_bytes() == before


def test_hostile_tensor_names_never_become_paths(tmp_path):
    """A tensor called '../../evil' lands in dense.gguf, not on disk; shard paths come from integers only."""
    r = gguf.GGUFReader(GEN / "moe-merged-q4_0.gguf")
    w = gguf.GGUFWriter(tmp_path / "hostile.gguf", "llama")
    w.add_expert_count(4)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    import numpy as np

    w.add_tensor("../../evil", np.ones(32, np.float32))
    w.add_tensor("/tmp/evil.weight", np.ones(32, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    sandbox = tmp_path / "a" / "b"
    sandbox.mkdir(parents=True)
    extract(tmp_path / "hostile.gguf", sandbox / "out")
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted(
        ["hostile.gguf", "a/b/out/manifest.json", "a/b/out/dense.gguf", "a/b/out/reassembly.dat"]
        + [f"a/b/out/experts/L00{layer}/E000{e}.bin" for layer in (1, 2) for e in range(4)]
    )
    names = {t.name for t in gguf.GGUFReader(sandbox / "out" / "dense.gguf").tensors}
    assert {"../../evil", "/tmp/evil.weight"} <= names


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {p.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_not_enough_space_is_refused_before_writing(tiny_fs):
    p = run_cli("extract", REAL / "mixtral-f16.gguf", tiny_fs / "out", "-q")
    assert p.returncode == 2 and "MiB free but only" in p.stderr and "Traceback" not in p.stderr
    assert list(tiny_fs.iterdir()) == []


def test_disk_filling_up_mid_write(tiny_fs):
    """Something else fills the disk while we write: a clear error, and the staging folder is gone."""
    filled = []

    def progress(total, items):
        def tick(n):
            if not filled:
                filled.append(1)
                with open(tiny_fs / "filler", "wb", buffering=0) as fh:  # take every last block
                    try:
                        while fh.write(b"\0" * 4096):
                            pass
                    except OSError:
                        pass

        return tick

    with pytest.raises(MertoolsError, match="disk filled up"):
        extract(GEN / "moe-merged-q4_0.gguf", tiny_fs / "out", progress=progress)
    assert sorted(x.name for x in tiny_fs.iterdir()) == ["filler"]
