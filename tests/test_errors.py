"""Bad input: one clear line naming the file (and tensor) and what to do, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import shutil
import struct

import gguf
import pytest

from conftest import GEN, REAL, run_cli


def expect_error(tmp_path, src, *needles, out=None):
    out = out or tmp_path / "out"
    p = run_cli("extract", src, out, "-q")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())
    assert not [x for x in out.parent.iterdir() if "staging" in x.name]
    return lines[0]


def test_non_moe_model(tmp_path):
    expect_error(tmp_path, GEN / "dense-llama-q8_0.gguf", "dense-llama-q8_0.gguf", "not a Mixture-of-Experts")


def test_not_a_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_text("hello, I am a text file\n")
    expect_error(tmp_path, f, "model.gguf", "not a GGUF file")


def test_empty_file(tmp_path):
    f = tmp_path / "empty.gguf"
    f.write_bytes(b"")
    expect_error(tmp_path, f, "empty.gguf", "empty")


def test_missing_file(tmp_path):
    expect_error(tmp_path, tmp_path / "nope.gguf", "nope.gguf", "no such file")


def test_folder_as_source(tmp_path):
    expect_error(tmp_path, GEN, "is a folder")


@pytest.mark.parametrize("keep", [24, 300, 5000])
def test_truncated_header(tmp_path, keep):
    f = tmp_path / "cut.gguf"
    f.write_bytes((REAL / "mixtral-q4_0.gguf").read_bytes()[:keep])
    expect_error(tmp_path, f, "cut.gguf", "truncated or corrupt")


def test_truncated_tensor_data_names_the_tensor(tmp_path):
    f = tmp_path / "cut.gguf"
    data = (REAL / "mixtral-q4_0.gguf").read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    line = expect_error(tmp_path, f, "cut.gguf", "runs past the end of the file", "truncated")
    assert "blk.1.ffn_up_exps.weight" in line  # the last tensor in the file


def patch_tensor_info(dst, name, field, value):
    """Copy the merged Q4_0 fixture to dst, with `field` ("type" or "offset") of tensor `name`'s info set to value."""
    src = GEN / "moe-merged-q4_0.gguf"
    t = next(t for t in gguf.GGUFReader(src).tensors if t.name == name)
    type_at = t.field.offset + 8 + len(name.encode()) + 4 + 8 * len(t.shape)  # name, n_dims, dims, then type
    shutil.copy(src, dst)
    with open(dst, "r+b") as fh:
        fh.seek(type_at if field == "type" else type_at + 4)
        fh.write(struct.pack("<I" if field == "type" else "<Q", value))
    return dst


def test_unknown_tensor_type(tmp_path):
    f = patch_tensor_info(tmp_path / "odd.gguf", "blk.2.ffn_down_exps.weight", "type", 250)
    expect_error(tmp_path, f, "odd.gguf", "blk.2.ffn_down_exps.weight", "type id 250", "upgrade the gguf package")


def test_tensor_offset_past_end(tmp_path):
    f = patch_tensor_info(tmp_path / "far.gguf", "blk.1.ffn_gate_exps.weight", "offset", 1 << 30)
    expect_error(tmp_path, f, "far.gguf", "blk.1.ffn_gate_exps.weight", "runs past the end")


def test_split_set_missing_part(tmp_path):
    for i in (1, 2, 3, 4, 6):
        shutil.copy(GEN / f"moe-split-q4_0-{i:05d}-of-00006.gguf", tmp_path)
    expect_error(tmp_path, tmp_path / "moe-split-q4_0-00001-of-00006.gguf",
                 "moe-split-q4_0-00005-of-00006.gguf missing", "put every part beside the first", out=tmp_path / "o")


def test_split_set_not_first_part(tmp_path):
    expect_error(tmp_path, GEN / "moe-split-q4_0-00003-of-00006.gguf", "part 3 of a 6-part split set",
                 "moe-split-q4_0-00001-of-00006.gguf")


def test_incomplete_expert_set(tmp_path):
    """A merged model missing one projection tensor is refused, not half-extracted."""
    r = gguf.GGUFReader(GEN / "moe-merged-q8_0.gguf")
    w = gguf.GGUFWriter(tmp_path / "partial.gguf", "llama")
    w.add_expert_count(4)
    for t in r.tensors:
        if t.name != "blk.2.ffn_up_exps.weight":
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    expect_error(tmp_path, tmp_path / "partial.gguf", "layer 2 lacks blk.2.ffn_up_exps.weight")


def test_bad_range_option(tmp_path):
    p = run_cli("extract", GEN / "moe-merged-q4_0.gguf", tmp_path / "o", "--layers", "x-y")
    assert p.returncode == 2 and "--layers 'x-y'" in p.stderr and "Traceback" not in p.stderr


def test_inspect_and_verify_bad_input(tmp_path):
    p = run_cli("inspect", GEN / "dense-llama-q8_0.gguf")
    assert p.returncode == 2 and "not a Mixture-of-Experts" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("verify", tmp_path / "nothing")
    assert p.returncode == 2 and "not a folder" in p.stderr


# -- the CLI's one error path: every case is the real command in a real process -----------------------------------
def one_line(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from mertools import extract

    out = tmp_path_factory.mktemp("cli") / "out"
    extract(GEN / "moe-merged-q4_0.gguf", out, fsync=False)
    return out


def test_emit_golden_into_a_missing_folder(tmp_path, shards):
    target = tmp_path / "missing" / "dir" / "g.npz"
    one_line(run_cli("smoke", shards, "--tokens", "3", "-q", "--emit-golden", target), str(target.parent),
             "does not exist")
    assert not (tmp_path / "missing").exists()


def test_cache_slots_too_large_for_memory(shards):
    one_line(run_cli("smoke", shards, "--tokens", "3", "-q", "--cache-slots", "100000000"), "--cache-slots 100000000",
             "of memory", "is available", "use fewer slots")


def test_bad_mer_threads(shards):
    for value in ("abc", "-2", "99999999999"):
        one_line(run_cli("smoke", shards, "--tokens", "3", "-q", env={"MER_THREADS": value}), "MER_THREADS",
                 repr(value))


def test_bad_mer_threads_is_refused_before_any_work_not_for_help(tmp_path):
    """Checked once a command's arguments are parsed (`CMD --help` needs no kernels), before it writes anything."""
    one_line(run_cli("extract", GEN / "moe-merged-q4_0.gguf", tmp_path / "o", env={"MER_THREADS": "abc"}),
             "MER_THREADS='abc'")
    assert not (tmp_path / "o").exists()
    p = run_cli("extract", "--help", env={"MER_THREADS": "abc"})
    assert p.returncode == 0 and p.stdout.startswith("Usage: "), p.stderr


@pytest.mark.parametrize("option", ["--layers", "--experts"])
def test_huge_ranges_are_never_built(tmp_path, option):
    """0-99999999999 would take terabytes as a list; it is two integers, and the missing ones are named as ranges."""
    line = one_line(run_cli("extract", GEN / "moe-merged-q4_0.gguf", tmp_path / "o", option, "0-99999999999"),
                    f"{option}: [", "99999999999] not in the model")
    assert line.count(",") < 5
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(tmp_path):
    p = run_cli("extract", tmp_path / "nope.gguf", tmp_path / "o", env={"MERTOOLS_DEBUG": "1"})
    assert p.returncode == 2 and "Traceback" in p.stderr and p.stderr.strip().splitlines()[-1].startswith("error: ")


def test_version_comes_from_package_metadata():
    from importlib.metadata import version

    import mertools

    assert mertools.__version__ == version("mertools")
    p = run_cli("--version")
    assert p.returncode == 0 and version("mertools") in p.stdout
