"""reassemble on a folder extracted from a SafeTensors checkpoint: the checkpoint's own shards come back, every
tensor checked independently with safetensors' safe_open against the source files (and each file byte for byte);
damage is caught; folders that cannot give the source back (converted with --dtype, or extracted before the
SafeTensors record existed) are refused through the real CLI with one line (exit 2), nothing written, no temp left."""

from __future__ import annotations

import filecmp
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import FIX, run_cli, st_folder
from mer_runtime.manifest import manifest_bytes
from mertools.errors import MertoolsError
from mertools.reassemble import RECORD_NAME, reassemble

ST = FIX / "safetensors"
GEN_ALL = sorted(p.name for p in (ST / "gen").iterdir() if p.is_dir())
FP8 = "deepseek_v3_fp8"
REAL = ["real/mixtral-bf16-sharded", "real/gptoss-bf16"]
NATIVE = [n for n in GEN_ALL if n != FP8] + REAL





def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _all_tensors(files: list[Path]) -> dict[str, tuple[str, list[int], bytes | None]]:
    """Every tensor's type and shape as safetensors itself reads them, and its bytes where numpy has its type
    (BF16 and FP8 have none: their bytes are compared through the header's ranges, `_all_tensors_raw`)."""
    out = {}
    for f in files:
        with safe_open(f, framework="numpy") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                dt = sl.get_dtype()
                data = None if dt == "BF16" or dt.startswith("F8") else sf.get_tensor(k).tobytes()
                out[k] = (dt, list(sl.get_shape()), data)
    return out


def _all_tensors_raw(files: list[Path]) -> dict[str, tuple[str, list[int], bytes]]:
    """The same from the header and byte ranges (safe_open's numpy has no FP8 or BF16 arrays to read)."""
    out = {}
    for f in files:
        data = f.read_bytes()
        n = int.from_bytes(data[:8], "little")
        for k, v in json.loads(data[8:8 + n]).items():
            if k != "__metadata__":
                b, e = v["data_offsets"]
                out[k] = (v["dtype"], v["shape"], data[8 + n + b:8 + n + e])
    return out


@pytest.mark.parametrize("name", NATIVE)
def test_checkpoint_comes_back_tensor_for_tensor_and_byte_for_byte(name, st_extracted, tmp_path):
    src = st_folder(name)
    back = tmp_path / "back"
    r = reassemble(st_extracted(name), back, fsync=False)
    assert r.exact
    want, got = _shards(src), _shards(back)
    assert [p.name for p in got] == [p.name for p in want]
    # independent of mertools: safetensors' own reader of both, and every tensor's byte range
    assert _all_tensors(got) == _all_tensors(want)
    assert _all_tensors_raw(got) == _all_tensors_raw(want)
    # the source folder file for file: shards (their header bytes too), config.json, the index, and the
    # companion files (the real checkpoints' tokenizer.json, tokenizer.model, generation_config.json, ...)
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert filecmp.cmp(p, back / p.name, shallow=False), p.name
    assert r.notes == []


def test_safe_open_reads_every_reassembled_tensor_like_the_source(st_extracted, tmp_path):
    back = tmp_path / "back"
    reassemble(st_extracted("real/mixtral-bf16-sharded"), back, fsync=False)
    want = _shards(st_folder("real/mixtral-bf16-sharded"))
    for a, b in zip(want, _shards(back)):
        with safe_open(a, framework="numpy") as fa, safe_open(b, framework="numpy") as fb:
            assert list(fa.keys()) == list(fb.keys()) and fa.metadata() == fb.metadata()
            for k in fa.keys():
                sa, sb = fa.get_slice(k), fb.get_slice(k)
                assert (sa.get_dtype(), sa.get_shape()) == (sb.get_dtype(), sb.get_shape())


def test_cli_writes_the_checkpoint(st_extracted, tmp_path):
    p = run_cli("reassemble", st_extracted("qwen3_5_moe"), tmp_path / "back", "--json", "--no-fsync")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["exact"] and [Path(x).name for x in r["out"]] == ["model.safetensors", "config.json"]
    assert filecmp.cmp(st_folder("qwen3_5_moe") / "model.safetensors", tmp_path / "back" / "model.safetensors",
                       shallow=False)


def _copy(st_extracted, name: str, tmp_path: Path) -> Path:
    to = tmp_path / "copy"
    shutil.copytree(st_extracted(name), to)
    return to


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["gpt_oss_bf16", "mixtral", "gpt_oss_mxfp4"])
def test_a_changed_shard_byte_is_caught_and_nothing_left(name, st_extracted, tmp_path):
    f = _copy(st_extracted, name, tmp_path)
    _flip(sorted((f / "experts").rglob("*.bin"))[-1], 5)
    with pytest.raises(MertoolsError, match="do not match their manifest checksum"):
        reassemble(f, tmp_path / "back", fsync=False)
    assert not (tmp_path / "back").exists()  # the folder it made is gone with its temporary files
    (tmp_path / "dest").mkdir()
    p = run_cli("reassemble", f, tmp_path / "dest", "-q")  # without -q, tqdm draws (and erases) its bar
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "checksum" in p.stderr
    assert list((tmp_path / "dest").iterdir()) == []


def test_a_changed_dense_or_record_byte_is_caught(st_extracted, tmp_path):
    f = _copy(st_extracted, "qwen3_moe", tmp_path)
    _flip(f / "dense.gguf", (f / "dense.gguf").stat().st_size - 3)
    with pytest.raises(MertoolsError, match="checksum mismatch"):
        reassemble(f, tmp_path / "back", fsync=False)
    shutil.rmtree(f)
    f = _copy(st_extracted, "qwen3_moe", tmp_path)
    _flip(f / RECORD_NAME, 20)
    with pytest.raises(MertoolsError, match="reassembly record is damaged"):
        reassemble(f, tmp_path / "back", fsync=False)
    assert not (tmp_path / "back").exists()


def test_existing_files_need_overwrite_and_a_file_is_not_a_folder(st_extracted, tmp_path):
    folder = st_extracted("olmoe")
    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "model.safetensors").write_bytes(b"old")
    with pytest.raises(MertoolsError, match="--overwrite"):
        reassemble(folder, tmp_path / "back", fsync=False)
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == b"old"
    reassemble(folder, tmp_path / "back", fsync=False, overwrite=True)
    assert filecmp.cmp(st_folder("olmoe") / "model.safetensors", tmp_path / "back" / "model.safetensors", shallow=False)
    with pytest.raises(MertoolsError, match="comes back as a folder"):
        reassemble(folder, tmp_path / "back" / "config.json", fsync=False, overwrite=True)
    with pytest.raises(MertoolsError, match="--split is for GGUF"):
        reassemble(folder, tmp_path / "other", split=True, fsync=False)


def test_the_next_run_removes_a_killed_runs_new_folder_and_keeps_a_live_ones(st_extracted, tmp_path):
    """SIGKILL (the OOM killer, kill -9) while writing into a new folder left its hidden sibling
    .DIR.mertools-tmp-PID-RANDOM, as large as the checkpoint, for good. The next reassemble of DIR removes it; a
    live process's stays, and so do a link of that name (and the folder it leads to) and another target's own."""

    from conftest import start_cli, wait_stopped

    folder, back = st_extracted("olmoe"), tmp_path / "back"
    p = start_cli("reassemble", folder, back, "-q", "--no-fsync", MERTOOLS_TEST_STOP_AT="writing")
    wait_stopped(p)
    dead = [x for x in tmp_path.iterdir() if x.name.startswith(".back.mertools-tmp-")]
    assert len(dead) == 1 and dead[0].is_dir() and any(dead[0].iterdir())  # really mid-write
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    live = tmp_path / f".back.mertools-tmp-{os.getpid()}-0123abcd"  # this test's own process: alive
    kept = tmp_path / "kept"
    for d in (live, kept, tmp_path / f".back.mertools-tmp-{p.pid}-0badf00d.mertools-tmp-{p.pid}-0badf00d"):
        d.mkdir()
        (d / "precious").write_bytes(b"not a dead run's")
    (tmp_path / f".back.mertools-tmp-{p.pid}-89abcdef").symlink_to(kept)  # a dead PID, but a link
    before = sorted(x.name for x in tmp_path.iterdir() if x != dead[0])
    run_cli("reassemble", folder, back, "-q", "--no-fsync", check=True)
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted([*before, "back"])
    assert all((d / "precious").read_bytes() == b"not a dead run's" for d in tmp_path.iterdir() if d.name != "back")
    assert filecmp.cmp(st_folder("olmoe") / "model.safetensors", back / "model.safetensors", shallow=False)


def test_a_folder_another_run_made_meanwhile_is_named_and_kept(st_extracted, tmp_path):
    """Two reassembles into one new DIR: the one that finished second failed its final rename with
    "error: .back.mertools-tmp-PID-RAND: Directory not empty; nothing was left behind", naming its hidden temporary
    and not what to do. Now the line names DIR, which is kept as the other run made it, and says what to do."""
    from conftest import start_cli, wait_stopped

    folder, back = st_extracted("olmoe"), tmp_path / "back"
    p = start_cli("reassemble", folder, back, "-q", "--no-fsync", MERTOOLS_TEST_STOP_AT="writing")
    wait_stopped(p)
    run_cli("reassemble", folder, back, "-q", "--no-fsync", check=True)  # the other run, into the same DIR
    mine = {x.name: x.read_bytes() for x in back.iterdir()}
    os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {back}: appeared while this run wrote it") and "--overwrite" in err, err
    assert {x.name: x.read_bytes() for x in back.iterdir()} == mine
    assert sorted(x.name for x in tmp_path.iterdir()) == ["back"]  # the loser's temporary folder is gone


def test_a_shard_that_grows_while_extract_reads_it_is_refused_not_recorded(tmp_path):
    """Bytes appended to a shard after extract had opened and mapped it (a download still writing into the folder):
    extract succeeded, verify said OK, and the reassembly record kept the grown file's size and xxh3, so every
    reassemble failed with "the rebuilt shard's xxh3 ... is not the source's". The record is made after the shards
    were read (here: after the source was opened), and must refuse a shard that is no longer the one read."""
    from mertools.sources import open_source
    from mertools.st_reassemble import record_st

    src_dir = tmp_path / "src"
    shutil.copytree(st_folder("real/mixtral-bf16-sharded"), src_dir)
    src = open_source(src_dir)
    try:
        shard = src.files[2]
        with open(shard, "ab") as fh:
            fh.write(b"appended")
        (tmp_path / "staging").mkdir()
        with pytest.raises(MertoolsError) as err:
            record_st(src, tmp_path / "staging")
    finally:
        src.close()
    assert str(err.value).startswith(f"{shard}: changed while it was read"), err.value


def _refused(folder: Path, tmp_path: Path, *extra: str) -> str:
    dest = tmp_path / "dest"
    dest.mkdir()
    p = run_cli("reassemble", folder, dest / "back", *extra)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr and not p.stdout
    assert list(dest.iterdir()) == []  # no output, no hidden temporary file
    return lines[0]


@pytest.mark.parametrize("name", ["mixtral", "qwen3_5_moe", "gpt_oss_bf16", "llama4", "real/mixtral-bf16-sharded"])
def test_folder_without_the_safetensors_record_is_refused_in_one_line(name, st_extracted, tmp_path):
    f = _copy(st_extracted, name, tmp_path)  # as an older mertools wrote it
    m = json.loads((f / "manifest.json").read_text())
    del m["reassembly"]
    (f / "manifest.json").write_bytes(manifest_bytes(m))
    (f / RECORD_NAME).unlink()
    line = _refused(f, tmp_path)
    assert str(f) in line and "SafeTensors checkpoint" in line
    assert m["source"]["files"][0]["name"] in line  # the source the manifest records
    assert "extract it again" in line and "without a reassembly record" in line
    assert "older mertools)" not in line and "gguf's reader" not in line


def _st_file(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A SafeTensors file written by hand (numpy, and so safetensors' numpy writer, has no FP8 or BF16 type)."""
    header, pos = {}, 0
    for k, (dt, shape, data) in tensors.items():
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + len(data)]}
        pos += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(d for _, _, d in tensors.values()))


def test_a_checkpoint_with_fp8_dense_tensors_keeps_no_record_and_is_refused(tmp_path):
    # DeepSeek-V3's layout with BF16 experts but an FP8 attention weight: extract widens that one to BF16 in
    # dense.gguf, so the checkpoint cannot come back
    from mertools import extract

    src = tmp_path / "ck"
    shutil.copytree(st_folder(FP8), src)
    got = _all_tensors_raw([src / "model.safetensors"])
    out = {}
    for k, (dt, shape, data) in got.items():
        if ".experts." in k and k.endswith("weight_scale_inv"):
            continue
        if ".experts." in k and dt == "F8_E4M3":
            dt, data = "BF16", bytes(range(256)) * (len(data) * 2 // 256) + bytes(len(data) * 2 % 256)
        out[k] = (dt, shape, data)
    _st_file(src / "model.safetensors", out)
    extract(src, tmp_path / "o", fsync=False)
    assert "reassembly" not in json.loads((tmp_path / "o" / "manifest.json").read_text())
    line = _refused(tmp_path / "o", tmp_path)
    assert "FP8" in line and "without a reassembly record" in line


def test_a_pull_without_the_record_is_refused_naming_the_repo(st_extracted, tmp_path):
    # what a resumed pull writes when an earlier run's shard hashes were lost: the hub record, no reassembly
    f = _copy(st_extracted, "mixtral", tmp_path)
    m = json.loads((f / "manifest.json").read_text())
    del m["reassembly"]
    m["source"]["hub"] = {"repo": "org/mixtral-tiny", "revision": "main", "commit": "ab" * 20}
    (f / "manifest.json").write_bytes(manifest_bytes(m))
    (f / RECORD_NAME).unlink()
    line = _refused(f, tmp_path)
    assert "org/mixtral-tiny at abababababab" in line and "pulled" in line and "without a reassembly record" in line
    assert "--overwrite" in line


@pytest.mark.parametrize("name,dtype", [(FP8, "q8_0"), ("mixtral", "q4_0"), ("qwen3_5_moe", "bf16"),
                                        ("gpt_oss_mxfp4", "q8_0")])
def test_converted_safetensors_folder_can_never_give_the_source_back(name, dtype, st_extracted, tmp_path):
    folder = st_extracted(name, dtype)
    assert "reassembly" not in json.loads((folder / "manifest.json").read_text())
    line = _refused(folder, tmp_path, "--overwrite")
    assert str(folder) in line and "SafeTensors checkpoint" in line
    assert dtype.upper() in line and "lossy" in line and "never give the source back" in line


def test_converted_gguf_folder_is_refused(tmp_path):
    from mertools import extract

    out = tmp_path / "conv"
    extract(FIX / "generated" / "moe-merged-f16.gguf", out, fsync=False, dtype="q8_0")
    line = _refused(out, tmp_path)
    assert "GGUF source, moe-merged-f16.gguf" in line and "Q8_0" in line and "lossy" in line


def test_verify_checks_the_record(st_extracted, tmp_path):
    f = _copy(st_extracted, "real/gptoss-bf16", tmp_path)
    assert run_cli("verify", f).returncode == 0
    _flip(f / RECORD_NAME, 3)
    p = run_cli("verify", f)
    assert p.returncode != 0 and RECORD_NAME in p.stdout + p.stderr


def _cli_live(folder: Path, dest: Path, *extra: str) -> subprocess.CompletedProcess:
    """The real CLI, with a liveness bound (a read of /dev/zero or a FIFO must end, not wait) and an address-space
    limit, so that a regression fails the test instead of filling the machine's memory."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    return subprocess.run([sys.executable, "-m", "mertools.cli", "reassemble", str(folder), str(dest), "-q",
                           "--no-fsync", *extra], capture_output=True, text=True, timeout=120, preexec_fn=limit)


def _one_line_refusal(p: subprocess.CompletedProcess, dest: Path) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not dest.exists() or list(dest.iterdir()) == []
    return lines[0]


def _edit_record_field(folder: Path, key: str, value: object) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    m["reassembly"][key] = value
    (folder / "manifest.json").write_bytes(manifest_bytes(m))  # a consistent manifest_xxh3


@pytest.mark.parametrize("how", ["dev-zero", "dotdot", "fifo", "size-short", "size-huge", "size-not-int"])
def test_a_hostile_record_path_or_size_is_refused_without_reading_it(how, st_extracted, tmp_path):
    f = _copy(st_extracted, "mixtral", tmp_path)
    size = (f / RECORD_NAME).stat().st_size
    if how == "dev-zero":
        _edit_record_field(f, "path", "/dev/zero")
    elif how == "dotdot":
        shutil.copy(f / RECORD_NAME, tmp_path / RECORD_NAME)  # a valid record outside the folder is still refused
        _edit_record_field(f, "path", "../" + RECORD_NAME)
    elif how == "fifo":
        (f / RECORD_NAME).unlink()
        os.mkfifo(f / RECORD_NAME)
    elif how == "size-short":  # the file is longer than the manifest says: not read past that
        _edit_record_field(f, "size", size - 1)
    elif how == "size-huge":
        _edit_record_field(f, "size", 1 << 62)
    else:
        _edit_record_field(f, "size", float(size))
    dest = tmp_path / "dest"
    line = _one_line_refusal(_cli_live(f, dest), dest)
    assert "reassembly record" in line and ("verify" in line or "extract" in line)
    if how == "fifo":
        assert "FIFO" in line


def _dup_shard(rec: dict) -> None:
    rec["files"].append(dict(rec["files"][0]))


@pytest.mark.parametrize("edit", [
    _dup_shard,
    lambda r: r["extra"][0].__setitem__("name", r["files"][0]["name"]),   # config.json written as the shard's name
    lambda r: r["extra"].append(dict(r["extra"][0])),
    lambda r: r["extra"][0].__setitem__("name", "evil.py"),
    lambda r: r["files"][0].__setitem__("name", "model.bin"),
    lambda r: r["files"][0].__setitem__("name", ".hidden.safetensors"),
    lambda r: r["files"][0].__setitem__("name", "../evil.safetensors"),
], ids=["dup-shard", "extra-as-shard", "dup-extra", "unknown-extra", "not-safetensors", "hidden", "dotdot"])
def test_colliding_or_unexpected_names_in_the_record_are_refused(edit, st_extracted, tmp_path):
    f = _copy(st_extracted, "gpt_oss_bf16", tmp_path)
    m = json.loads((f / "manifest.json").read_text())
    edit(m["reassembly"])
    (f / "manifest.json").write_bytes(manifest_bytes(m))
    line = _refused(f, tmp_path, "--no-fsync", "-q")
    assert "malformed" in line and str(f) in line and "re-extract" in line


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss_mxfp4"])
def test_short_reads_are_repeated_and_large_tensors_copied_in_pieces(name, monkeypatch, st_extracted, tmp_path):
    """Linux returns at most 0x7ffff000 bytes from one pread (a dense tensor over 2 GiB came back short); a real file
    that large is too big for the suite, so every pread here returns at most 61 bytes, and pieces are 4 KiB + 3."""
    import mertools.st_reassemble as sr

    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: real(fd, min(n, 61), off))
    monkeypatch.setattr(sr, "SEGMENT", 4096 + 3)
    r = reassemble(st_extracted(name), tmp_path / "back", fsync=False)
    assert r.exact
    for f in _shards(st_folder(name)):
        assert filecmp.cmp(f, tmp_path / "back" / f.name, shallow=False)


def test_a_dense_gguf_that_ends_early_is_named(monkeypatch, st_extracted, tmp_path):
    real = os.pread
    f = _copy(st_extracted, "mixtral", tmp_path)
    dense = os.path.realpath(f / "dense.gguf")

    cut = (f / "dense.gguf").stat().st_size - 64

    def shrunk(fd, n, off):  # dense.gguf as if cut short after its checks: nothing past its last 64 bytes' start
        if os.path.realpath(f"/proc/self/fd/{fd}") == dense and off >= cut:
            return b""
        return real(fd, min(n, max(cut - off, 1)) if os.path.realpath(f"/proc/self/fd/{fd}") == dense else n, off)

    monkeypatch.setattr(os, "pread", shrunk)
    with pytest.raises(MertoolsError, match=r"dense\.gguf: ended at byte .*changed while being read"):
        reassemble(f, tmp_path / "back", fsync=False)
    assert not (tmp_path / "back").exists()


def _edit_recorded_header(folder: Path, edit) -> None:
    """Rewrite the first shard's recorded header (edit gets its JSON, or returns raw JSON bytes to store instead) and
    the record's size/xxh3, as a crafted folder would: only reassemble's own checks can catch it."""
    import xxhash

    m = json.loads((folder / "manifest.json").read_text())
    rec = m["reassembly"]
    blob = (folder / RECORD_NAME).read_bytes()
    h0, hn = rec["files"][0]["header"]
    n = int.from_bytes(blob[h0:h0 + 8], "little")
    h = json.loads(blob[h0 + 8:h0 + 8 + n])
    raw = edit(h) or json.dumps(h).encode()
    raw += b" " * (-len(raw) % 8)
    head = len(raw).to_bytes(8, "little") + raw
    blob = blob[:h0] + head + blob[h0 + hn:]
    rec["files"][0]["header"] = [h0, len(head)]
    for x in rec["extra"]:
        if x["at"][0] > h0:
            x["at"][0] += len(head) - hn
    (folder / RECORD_NAME).write_bytes(blob)
    rec["size"], rec["xxh3_64"] = len(blob), xxhash.xxh3_64_hexdigest(blob)
    (folder / "manifest.json").write_bytes(manifest_bytes(m))


def _experts_key(h: dict) -> str:
    return next(k for k in h if "experts.gate_up_proj" in k and "bias" not in k)


def _swap_offsets(h: dict) -> None:
    k = _experts_key(h)
    h[k]["data_offsets"] = h[k]["data_offsets"][::-1]


def _offsets_past_shape(h: dict) -> None:
    k = _experts_key(h)
    b = h[k]["data_offsets"][0]
    h[k]["data_offsets"] = [b, b + (1 << 46)]


def _huge_expert(h: dict) -> None:  # offsets and shape agree, but no shard holds anything of that size
    k = _experts_key(h)
    b = h[k]["data_offsets"][0]
    h[k]["shape"] = [h[k]["shape"][0], 1 << 22, 1 << 20]
    h[k]["data_offsets"] = [b, b + h[k]["shape"][0] * (1 << 42) * 2]


def _unknown_dtype(h: dict) -> None:
    h[_experts_key(h)]["dtype"] = "Q9"


@pytest.mark.parametrize("edit, says", [
    (_swap_offsets, "offsets do not match"),
    (_offsets_past_shape, "offsets do not match"),
    (_unknown_dtype, "offsets do not match"),
    (_huge_expert, "projections hold"),
    (lambda h: b'{"a": ' + b"[" * 200000 + b"]" * 200000 + b"}", "not a safetensors header"),
], ids=["b-after-e", "bytes-not-shape", "unknown-dtype", "huge-expert", "deep-json"])
def test_inconsistent_recorded_header_values_are_refused_in_one_line(edit, says, st_extracted, tmp_path):
    f = _copy(st_extracted, "gpt_oss_bf16", tmp_path)
    _edit_recorded_header(f, edit)
    dest = tmp_path / "dest"
    line = _one_line_refusal(_cli_live(f, dest), dest)
    assert says in line and str(f) in line and "extract the model again" in line


def _interrupt_second_rename(monkeypatch) -> None:
    real, calls = os.replace, []

    def replace(a, b):  # Ctrl-C after the first output has its final name
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)


def test_an_interrupt_while_renaming_into_a_new_folder_leaves_nothing(monkeypatch, st_extracted, tmp_path):
    folder = st_extracted("real/mixtral-bf16-sharded")
    assert len(reassemble(folder, tmp_path / "probe", fsync=False).out) >= 2
    (tmp_path / "dest").mkdir()
    _interrupt_second_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        reassemble(folder, tmp_path / "dest" / "back", fsync=False)
    assert list((tmp_path / "dest").iterdir()) == []  # neither a partial set nor the hidden staging folder
    monkeypatch.undo()
    r = reassemble(folder, tmp_path / "dest" / "back", fsync=False)
    assert all(p.parent == tmp_path / "dest" / "back" and p.is_file() for p in r.out)
    assert sorted(p.name for p in (tmp_path / "dest" / "back").iterdir()) == sorted(p.name for p in r.out)
    for f in _shards(st_folder("real/mixtral-bf16-sharded")):
        assert filecmp.cmp(f, tmp_path / "dest" / "back" / f.name, shallow=False)


def test_an_interrupt_while_renaming_over_an_existing_folder_leaves_complete_files(monkeypatch, st_extracted,
                                                                                      tmp_path):
    """The documented limit: old and new files may be mixed, each complete; no temporary file is left."""
    folder = st_extracted("real/mixtral-bf16-sharded")
    back = tmp_path / "back"
    r = reassemble(folder, back, fsync=False)
    before = {p.name: p.read_bytes() for p in r.out}
    _interrupt_second_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        reassemble(folder, back, fsync=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in back.iterdir()} == before  # same bytes: each file complete
