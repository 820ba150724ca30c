"""Every single-byte change anywhere in a shard folder makes verify report a problem.

A tiny real folder (one expert of a generated Q4_0 fixture: manifest.json ~1.7 KB, one 12 KB shard, a 70 KB
dense.gguf). For every byte position of each file one bit (bit pos % 8) is flipped and the folder checked with the
same functions `verify` runs (in-process, hash only, so the sweep stays fast); every byte of manifest.json is also
replaced by a space (a change a JSON parser alone would not see). dense.gguf is swept at every byte of its first and
last 4 KiB and every 29th byte between; the `slow` variant sweeps all of it and all 8 bits of every manifest byte. A
sample of positions goes through the real `mertools verify` command, which must exit 1.
"""

from __future__ import annotations

import os

import pytest

from mertools.verify import check_dense, check_expert, check_manifest
from mer_runtime import load_manifest

from conftest import GEN, run_cli


def noop(n: int) -> None:
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mertools import extract

    out = tmp_path_factory.mktemp("every") / "tiny"
    extract(GEN / "moe-merged-q4_0.gguf", out, layers={1}, experts={0}, fsync=False)
    m = load_manifest(out)
    assert m.integrity == "ok" and len(m.experts) == 1
    m2, probs, warns = check_manifest(out)
    assert not probs and not warns
    return out


def clean(folder):
    m, probs, _ = check_manifest(folder)
    assert m is not None and not probs
    e = m.experts[0]
    return m, e


def flip_at(path, pos, mask):
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, pos)
        os.pwrite(fd, bytes([b[0] ^ mask]), pos)
    finally:
        os.close(fd)


def sweep_manifest(folder, all_bits):
    mp = folder / "manifest.json"
    data = mp.read_bytes()
    missed = []
    for pos in range(len(data)):
        masks = [1 << bit for bit in range(8)] if all_bits else [1 << (pos % 8)]
        if data[pos] != 0x20:
            masks.append(data[pos] ^ 0x20)  # the byte becomes a space
        for mask in masks:
            flip_at(mp, pos, mask)
            try:
                if not check_manifest(folder)[1]:
                    missed.append((pos, data[pos] ^ mask))
            finally:
                flip_at(mp, pos, mask)
    assert not missed, f"{len(missed)} changes not noticed, e.g. {missed[:5]} in {data[:80]!r}"
    assert mp.read_bytes() == data
    clean(folder)


def sweep_file(folder, which, positions):
    m, e = clean(folder)
    path = m.path_of(e) if which == "expert" else folder / m.dense["path"]
    size = os.path.getsize(path)
    assert size == (e.size if which == "expert" else m.dense["size"])
    check = (lambda: check_expert(m, e, noop)[0]) if which == "expert" else (lambda: check_dense(m, noop)[0])
    missed = []
    for pos in positions(size):
        mask = 1 << (pos % 8)
        flip_at(path, pos, mask)
        try:
            if not check():
                missed.append(pos)
        finally:
            flip_at(path, pos, mask)
    assert not missed, f"{len(missed)} flipped bytes not noticed in {path.name}, e.g. at {missed[:5]}"
    assert not check()  # restored: clean again


def every(size):
    return range(size)


def ends_and_stride(size, edge=4096, stride=29):
    return sorted(set(range(min(edge, size))) | set(range(max(0, size - edge), size)) | set(range(0, size, stride)))


def test_every_byte_of_the_manifest(tiny):
    sweep_manifest(tiny, all_bits=False)


def test_every_byte_of_the_shard(tiny):
    sweep_file(tiny, "expert", every)


def test_dense_ends_and_a_stride(tiny):
    sweep_file(tiny, "dense", ends_and_stride)


@pytest.mark.slow
def test_every_bit_of_the_manifest_and_every_byte_of_dense(tiny):
    sweep_manifest(tiny, all_bits=True)
    sweep_file(tiny, "dense", every)


def test_a_sample_through_the_command(tiny):
    m, e = clean(tiny)
    files = [tiny / "manifest.json", m.path_of(e), tiny / "dense.gguf"]
    for path in files:
        size = os.path.getsize(path)
        for pos in (size // 2,) if path.name != "manifest.json" else (0, size - 1):
            flip_at(path, pos, 0x10)
            try:
                p = run_cli("verify", tiny, "-q")
                assert p.returncode == 1 and "FAIL " in p.stdout and "Traceback" not in p.stderr, (path, pos, p.stdout,
                                                                                                   p.stderr)
            finally:
                flip_at(path, pos, 0x10)
    assert run_cli("verify", tiny, "-q").returncode == 0
