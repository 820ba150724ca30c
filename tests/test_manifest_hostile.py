"""Hostile shard folders: every consumer gives one clean error, never a traceback or a hang.

`verify` exits 1 with the problem listed (the folder is damaged); `smoke` exits 2 with one line; `open_shards` and
`load_manifest` raise a MerError. Every CLI run has a timeout, so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from mer_runtime import ManifestError, MerError, load_manifest, open_shards
from mer_runtime.manifest import MAX_MANIFEST_BYTES, manifest_bytes
from mertools import verify

from conftest import GEN, REAL

HANG = 60  # seconds; a consumer that blocks on a FIFO would never return


def cli(*args, timeout=HANG):
    try:
        return subprocess.run([sys.executable, "-m", "mertools.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mertools {' '.join(map(str, args))} hung")


def one_clean_line(p):
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p.stderr


def open_in_child(folder):
    """open_shards + one ffn in a child process: (exit code, stderr); the child prints the MerError it got."""
    code = ("import sys, numpy as np\nfrom mer_runtime import open_shards, MerError\n"
            "try:\n    s = open_shards(sys.argv[1], cache_slots=2)\n"
            "    x = np.ones(s.manifest.model['d_model'], np.float32)\n"
            "    [s.ffn(e.layer, e.expert, x) for e in s.manifest.experts]\n"
            "except MerError as exc:\n    print(exc, file=sys.stderr); sys.exit(2)\n")
    try:
        p = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=HANG)
    except subprocess.TimeoutExpired:
        pytest.fail("open_shards hung")
    return p


@pytest.fixture
def out(tmp_path, extracted):
    dst = tmp_path / "copy"
    shutil.copytree(extracted(REAL / "mixtral-q4_0.gguf"), dst)
    return dst


FULL = {"fifo", "dev-zero", "deep-nesting", "huge-int", "no-experts", "terabyte-size"}


def check_all_consumers(folder, needle, full):
    """verify (API; CLI exit 1 with the problem listed), open_shards (MerError), smoke (exit 2, one line).

    The cases in FULL also go through the commands and open_shards in a child process; the others share their
    reading path, so they run in-process only.
    """
    r = verify(folder)
    assert not r.ok and any(needle in str(p) for p in r.problems), r.problems
    with pytest.raises(MerError, match=re.escape(needle)):
        open_shards(folder, cache_slots=2)
    if not full:
        return
    assert needle in one_clean_line(cli("smoke", folder, "--tokens", "3", "-q"))
    p = cli("verify", folder, "-q")
    assert p.returncode == 1 and "Traceback" not in p.stderr and needle in p.stdout, (p.stdout, p.stderr)
    p = cli("verify", folder, "--deep", "-q")
    assert p.returncode == 1 and "Traceback" not in p.stderr and needle in p.stdout, (p.stdout, p.stderr)
    p = open_in_child(folder)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr


# -- manifest.json itself ------------------------------------------------------------------------------------
def replace_manifest(folder, make):
    mp = folder / "manifest.json"
    mp.unlink()
    make(mp)


@pytest.mark.parametrize("case, make, needle", [
    ("directory", lambda p: p.mkdir(), "is a directory, not a regular file"),
    ("fifo", lambda p: os.mkfifo(p), "is a FIFO, not a regular file"),
    ("dev-zero", lambda p: p.symlink_to("/dev/zero"), "is a character device, not a regular file"),
    ("dangling-link", lambda p: p.symlink_to("/nonexistent/x"), "manifest.json: missing"),
    ("not-utf8", lambda p: p.write_bytes(b'{"format_version": 1, "x": "\xff\xfe"}'), "not UTF-8 (byte 28)"),
    ("deep-nesting", lambda p: p.write_text('{"format_version": ' + "[" * 200000 + "]" * 200000 + "}"),
     "nested too deeply"),
    ("huge-int", lambda p: p.write_text('{"format_version": ' + "9" * 5000 + "}"), "an integer of 5000 digits"),
    ("nan", lambda p: p.write_text('{"format_version": NaN}'), "NaN is not a number a manifest may hold"),
    ("infinity", lambda p: p.write_text('{"format_version": 1, "alignment": -Infinity}'), "-Infinity is not"),
    ("float-overflow", lambda p: p.write_text('{"format_version": 1e999}'), "1e999 overflows"),
    ("duplicate-key", lambda p: p.write_text('{"format_version": 1, "format_version": 1}'), "appears twice"),
    ("not-an-object", lambda p: p.write_text("[1, 2]"), "top level must be an object"),
    ("empty", lambda p: p.write_text(""), "not valid JSON"),
    ("too-big", lambda p: os.truncate(p.write_text("") or p, MAX_MANIFEST_BYTES + 1), "more than the 67108864-byte"),
])
def test_hostile_manifest_file(out, case, make, needle):
    replace_manifest(out, make)
    with pytest.raises(ManifestError, match=re.escape(needle)):
        load_manifest(out)
    check_all_consumers(out, needle, case in FULL)


def rewrite(folder, mutate):
    """An edit by someone who also rewrites manifest_xxh3: only the semantic checks can catch it."""
    mp = folder / "manifest.json"
    raw = json.loads(mp.read_bytes())
    mutate(raw)
    mp.write_bytes(manifest_bytes(raw))


@pytest.mark.parametrize("case, mutate, needle", [
    ("no-experts", lambda r: r.__setitem__("experts", []), "lists no experts"),
    ("shape-vs-d_model", lambda r: r["model"].__setitem__("d_model", 128), "but d_model 128"),
    ("unknown-activation", lambda r: r["model"].__setitem__("activation", {"kind": "relu2"}), "'relu2' is not one"),
    ("terabyte-size", lambda r: r["experts"][0].__setitem__("size", 1 << 41), "size 2199023255552 is outside"),
    ("padded-size", lambda r: r["experts"][0].__setitem__("size", 1 << 30), "but its tensors end at"),
    ("expert-past-n_experts", lambda r: r["experts"][0].__setitem__("expert", 4), "expert 4 is outside 0..3"),
    # two shards that are one file on macOS (case, or NFC "é" vs NFD "e" + U+0301): unpack and pull wrote one over
    # the other; the dense file given as a shard's path was not refused at all
    ("expert-path-case-twin", lambda r: r["experts"][1].__setitem__("path", r["experts"][0]["path"].upper()),
     "differ only in case or Unicode normalization"),
    ("expert-path-nfd-twin", lambda r: [r["experts"][i].__setitem__("path", f"experts/caf{e}.bin")
                                        for i, e in enumerate(("\u00e9", "e\u0301"))],
     "layer 0 expert 0 'experts/caf\u00e9.bin' and layer 0 expert 1 'experts/cafe\u0301.bin' differ only in case"),
    ("dense-is-a-shard", lambda r: r["dense"].__setitem__("path", r["experts"][0]["path"]),
     "layer 0 expert 0 and dense both give the path"),
    # the manifest's own name, and the reassembly record's, are files of the folder too
    ("expert-is-the-manifest", lambda r: r["experts"][0].__setitem__("path", "MANIFEST.JSON"),
     "the manifest itself 'manifest.json' and layer 0 expert 0 'MANIFEST.JSON' differ only in case"),
    ("record-is-the-dense", lambda r: r.__setitem__("reassembly", {**r.get("reassembly", {}), "path": "DENSE.GGUF"}),
     "dense 'dense.gguf' and the reassembly record 'DENSE.GGUF' differ only in case"),
])
def test_hostile_manifest_content(out, case, mutate, needle):
    rewrite(out, mutate)
    check_all_consumers(out, needle, case in FULL)


def test_edited_field_is_noticed(out):
    """An edit of a field no check reads (here `source`) without rewriting manifest_xxh3: verify exits 1."""
    mp = out / "manifest.json"
    data = mp.read_bytes()
    mp.write_bytes(data.replace(b'"layout": "merged"', b'"layout": "mergef"'))
    p = cli("verify", out, "-q")
    assert p.returncode == 1 and "manifest.json" in p.stdout and "changed after it was written" in p.stdout
    with pytest.raises(ManifestError, match="changed after it was written"):
        load_manifest(out)


@pytest.mark.parametrize("old, new", [(b"\n ", b"\t "), (b"}\n", b"} "), (b'"manifest_xxh3"', b'"manifest_xxh4"')])
def test_changes_json_does_not_see(out, old, new):
    """Whitespace is part of the hashed bytes; renaming the hash field does not make the folder look old."""
    mp = out / "manifest.json"
    data = mp.read_bytes()
    i = data.rindex(old) if old == b"}\n" else data.index(old)
    mp.write_bytes(data[:i] + new + data[i + len(old):])
    json.loads(mp.read_bytes())  # still the same JSON (or one field renamed)
    r = verify(out)
    assert not r.ok and r.problems[0].path == "manifest.json"


def test_folder_older_than_manifest_xxh3_is_a_warning(out):
    mp = out / "manifest.json"
    raw = json.loads(mp.read_bytes())
    del raw["manifest_xxh3"]
    mp.write_text(json.dumps(raw, indent=1))
    r = verify(out)
    assert r.ok and [w.path for w in r.warnings] == ["manifest.json"] and "older mertools" in r.warnings[0].what
    assert load_manifest(out).integrity == "absent"  # other consumers accept it
    with open_shards(out, cache_slots=2) as s:
        assert s.manifest.experts


# -- expert files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["fifo", "directory", "link-outside", "dev-zero"])
def test_hostile_expert_file(out, tmp_path, case):
    m = load_manifest(out)
    e = m.expert(1, 2)
    p = out / e.path
    keep = tmp_path / "outside.bin"
    shutil.copy(p, keep)
    p.unlink()
    if case == "fifo":
        os.mkfifo(p)
        needle = "is a FIFO, not a regular file"
    elif case == "directory":
        p.mkdir()
        needle = "is a directory, not a regular file"
    elif case == "link-outside":
        p.symlink_to(keep)  # the right bytes, but outside the folder
        needle = "resolves outside the output folder"
    else:
        p.symlink_to("/dev/zero")
        needle = "resolves outside the output folder"
    r = verify(out)
    assert [(x.path, needle in x.what) for x in r.problems] == [(e.path, True)]
    p2 = cli("verify", out, "--deep", "-q")
    assert p2.returncode == 1 and f"FAIL {e.path}: " in p2.stdout and "Traceback" not in p2.stderr
    assert "deep: 7 experts run" in p2.stdout  # the other experts are still checked; the damaged one never runs
    one_clean_line(cli("smoke", out, "--tokens", "20", "--workload", "uniform", "-q"))
    p3 = open_in_child(out)
    assert p3.returncode == 2 and needle in p3.stderr


def test_missing_shard_under_deep_exits_1(out):
    m = load_manifest(out)
    (out / m.experts[0].path).unlink()  # the first: the one the runtime probes its backend with
    p = cli("verify", out, "--deep", "-q")
    assert p.returncode == 1 and f"FAIL {m.experts[0].path}: missing" in p.stdout, (p.stdout, p.stderr)
    (out / m.experts[0].path).write_bytes(b"")
    p = cli("verify", out, "--deep", "--json")
    j = json.loads(p.stdout)
    want = {"path": m.experts[0].path, "problem": f"truncated: 0 bytes, manifest says {m.experts[0].size}"}
    assert p.returncode == 1 and j["problems"][0] == want


def test_dense_replaced_by_fifo(out, tmp_path):
    (out / "dense.gguf").unlink()
    os.mkfifo(out / "dense.gguf")
    p = cli("verify", out, "-q")
    assert p.returncode == 1 and "FAIL dense.gguf: is a FIFO, not a regular file" in p.stdout
    p = cli("reassemble", out, tmp_path / "back.gguf", "-q")  # said "missing"
    want = f"error: {out / 'dense.gguf'}: is a FIFO, not a regular file; the folder is damaged (run `mertools verify`)"
    assert p.returncode == 2 and p.stderr == want + "\n", p.stderr


def test_hash_file_refuses_a_fifo(tmp_path):
    from mer_runtime.checksum import hash_file
    from mer_runtime.errors import ShardIOError

    os.mkfifo(tmp_path / "f")
    with pytest.raises(ShardIOError, match="is a FIFO"):
        hash_file(tmp_path / "f")


# -- the size limit holds a DeepSeek-V3-sized manifest -------------------------------------------------------
def test_deepseek_sized_manifest_fits(extracted):
    """58 MoE layers x 256 experts (DeepSeek-V3), entries as extract writes them, well under MAX_MANIFEST_BYTES."""
    raw = json.loads((extracted(GEN / "moe-merged-q4_0.gguf") / "manifest.json").read_bytes())
    proto = raw["experts"][0]
    raw["experts"] = [
        {**proto, "layer": layer, "expert": e, "path": f"experts/L{layer:03d}/E{e:04d}.bin",
         "tensors": {r: {**t, "source": f"blk.{layer}.ffn_{r}_exps.weight[{e}]"} for r, t in proto["tensors"].items()}}
        for layer in range(3, 61) for e in range(256)]
    size = len(manifest_bytes(raw))
    assert len(raw["experts"]) == 14848 and size < MAX_MANIFEST_BYTES / 3, size


@pytest.mark.parametrize("name", ["dense.gguf", "reassembly.dat"])
def test_a_folder_file_linked_outside_is_refused_as_shards_are(out, tmp_path, name):
    """verify refused a shard or dense.gguf that is a link out of the folder but passed reassembly.dat, and
    reassemble read both through such a link; each file of the folder now gets the same refusal everywhere."""
    from mertools.reassemble import reassemble

    keep = tmp_path / name
    shutil.move(out / name, keep)
    (out / name).symlink_to(keep)  # the right bytes, but outside the folder
    r = verify(out)
    assert [(x.path, "resolves outside the output folder" in x.what) for x in r.problems] == [(name, True)]
    with pytest.raises(MerError, match="resolves outside the output folder"):
        reassemble(out, tmp_path / "back.gguf", fsync=False)
    assert not (tmp_path / "back.gguf").exists()
