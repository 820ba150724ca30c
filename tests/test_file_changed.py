"""A file we read through a memory map shrinks meanwhile (a download being rewritten, a ``truncate``): the process
raises one clear FileChangedError naming the file (the CLI exits 2 with one line), cleans up, and never dies of
SIGBUS. Real files truncated at real moments: from a progress callback between pieces, or while the real CLI is
stopped at a test point. Every case runs in a child process, since a failure here kills the process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mer_runtime import checksum, guard
from mertools.commit import STAGING_MARK

from conftest import FIX

GGUF = FIX / "real" / "mixtral-f16.gguf"
ST = FIX / "safetensors" / "real" / "mixtral-bf16-sharded"
CHANGED = "changed size while being read"
MODES = ["guard", "fallback"] if guard.GUARDED else ["fallback"]
# extract's two writer threads: when the process stops at a test point, the other one may be in the middle of a
# piece, which only the C handler can survive (the fallback checks between pieces)
NEEDS_HANDLER = pytest.mark.skipif(not guard.GUARDED, reason="needs the compiled SIGBUS guard")


def _env(mode: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MERTOOLS_TEST_STOP_AT", None)
    if mode == "fallback":
        env["MER_SIGBUS_GUARD"] = "off"
    return env


def _python(code: str, mode: str = "guard", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**_env(mode), **env}, timeout=120)


def _cli_stopped(args: list[str], stop_at: str, while_stopped, mode: str = "guard") -> subprocess.CompletedProcess:
    """Run `mertools ARGS`, let it stop itself at test point `stop_at`, call while_stopped(), let it go on."""
    env = {**_env(mode), "MERTOOLS_TEST_STOP_AT": stop_at}
    p = subprocess.Popen([sys.executable, "-m", "mertools.cli", *map(str, args), "--quiet"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, status = os.waitpid(p.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"exited before {stop_at}: {p.stderr.read()}"
        while_stopped()
        os.kill(p.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _one_line_error(p: subprocess.CompletedProcess, name: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])  # -7 would be SIGBUS: the old behaviour
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert CHANGED in lines[0] and name in lines[0] and "re-run when it is complete" in lines[0], lines[0]


def _no_staging(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if STAGING_MARK in p.name]


@pytest.mark.parametrize("mode", MODES)
def test_hash_file_truncated_between_pieces(tmp_path, mode):
    """verify's checksum pass (mer_runtime.checksum): the file shrinks after its first piece."""
    p = _python(f"""
        import os
        from mer_runtime.checksum import hash_file, PIECE
        from mer_runtime.guard import FileChangedError
        p = {str(tmp_path / 'f.bin')!r}
        open(p, "wb").write(os.urandom(8 * PIECE))
        def tick(n):
            os.truncate(p, PIECE + 4096)  # mid-file: later pieces are past the end
        try:
            hash_file(p, [(0, 8 * PIECE, "all")], tick)
        except FileChangedError as e:
            print("RAISED", e)
        else:
            print("NOT RAISED")
    """, mode)
    assert p.returncode == 0, p.stderr[-2000:]
    piece = checksum.PIECE
    assert f"RAISED {tmp_path / 'f.bin'} {CHANGED} (was {8 * piece} bytes, now {piece + 4096})" in p.stdout


@pytest.mark.parametrize("mode", MODES)
def test_shrunk_after_its_size_was_taken(tmp_path, mode):
    """The file shrinks after the caller took its size (verify opens and checks a shard, then hashes it): refused
    when it is mapped, with the same clear error (not mmap's ValueError, which verify would report as unreadable)."""
    p = _python(f"""
        import os
        import mer_runtime.checksum as c
        from mer_runtime.guard import FileChangedError
        c.PIECE = 8 << 20
        p = {str(tmp_path / 'f.bin')!r}
        open(p, "wb").write(os.urandom(8 << 20))
        fd = os.open(p, os.O_RDONLY)
        size = os.fstat(fd).st_size
        os.truncate(p, 3 << 20)
        try:
            c.hash_fd(fd, size)
        except FileChangedError as e:
            print("RAISED", e)
    """, mode)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith(f"RAISED {tmp_path / 'f.bin'} {CHANGED} (was {8 << 20} bytes, now {3 << 20})"), p.stdout


@NEEDS_HANDLER
def test_truncated_inside_a_piece_is_caught():
    """With the C handler even a page that vanishes in the middle of xxhash's pass is caught (the file is cut
    by another thread while one huge piece is hashed, many times over)."""
    p = _python("""
        import os, tempfile, threading
        import mer_runtime.checksum as c
        from mer_runtime.guard import FileChangedError
        c.PIECE = 64 << 20  # one piece: the cut lands inside it
        import xxhash
        d = tempfile.mkdtemp()
        raised = 0
        for i in range(6):
            p = os.path.join(d, f"f{i}")
            data = os.urandom(48 << 20)
            open(p, "wb").write(data)
            t = threading.Timer(0.002, os.truncate, args=(p, 4096))  # most land inside the piece
            t.start()
            try:
                got = c.hash_file(p)[0]
            except FileChangedError as e:
                raised += 1
                assert "changed size" in str(e)
            else:  # the pass ended before the cut (the whole file's hash) or began after it, on a loaded machine
                # (the 4096 bytes left): never a hash over the vanished pages
                assert got in (xxhash.xxh3_64_hexdigest(data), xxhash.xxh3_64_hexdigest(data[:4096])), \
                    "a hash over vanished pages passed"
            t.join()
            os.unlink(p)
        print("DONE", raised)
    """)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("DONE ")


@NEEDS_HANDLER
def test_fault_inside_a_piece_is_counted(tmp_path):
    """Pages touched past the new end between two checks (inside one piece) are counted by the C handler, and the
    next check raises naming the file (deterministic twin of the test above)."""
    p = _python(f"""
        import os
        import numpy as np
        from mer_runtime.guard import map_file, FileChangedError
        p = {str(tmp_path / 'f')!r}
        open(p, "wb").write(b"\\xff" * (1 << 20))
        fd = os.open(p, os.O_RDONLY)
        mm, g = map_file(fd, 1 << 20, p)
        a = np.frombuffer(mm, np.uint8)
        os.truncate(p, 0)
        print("SUM", int(a[::4096].sum()), "FAULTED", g.faulted())
        try:
            g.check()
        except FileChangedError as e:
            print("RAISED", e)
    """)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert "SUM 0 FAULTED True" in p.stdout, p.stdout
    assert f"RAISED {tmp_path / 'f'} {CHANGED} (was {1 << 20} bytes, now 0)" in p.stdout, p.stdout


def test_guard_is_loaded_where_it_was_built():
    """The compiled handler, where the build made it, is the one in use: a .so that is built but fails to load
    (a missing symbol, a wrong name) must not silently leave every mapping on the weaker fallback."""
    here = Path(guard.__file__).parent
    built = [p for p in here.iterdir() if p.name.startswith("_sigbus_guard") and p.suffix in (".so", ".pyd")]
    if not built:
        pytest.skip("no compiled _sigbus_guard here (no C compiler at install): the size-check fallback is in use")
    if os.environ.get("MER_SIGBUS_GUARD") == "off":
        pytest.skip("MER_SIGBUS_GUARD=off asks for the fallback")
    assert guard.GUARDED, f"{built[0]} exists but mer_runtime.guard did not load it"


@pytest.mark.parametrize("mode", MODES)
def test_cut_in_the_middle_of_a_page(tmp_path, mode):
    """A file cut inside a page raises no SIGBUS (the kernel zero-fills the rest of the page): check() must still
    see it, by the size, in both modes."""
    p = _python(f"""
        import os
        from mer_runtime.guard import map_file, FileChangedError
        p = {str(tmp_path / 'f')!r}
        open(p, "wb").write(b"\\xff" * 10000)
        fd = os.open(p, os.O_RDONLY)
        mm, g = map_file(fd, 10000, p)
        os.truncate(p, 5000)
        b = bytes(mm[4096:8192])  # the page holding the new end: no fault
        print("ZEROS", b[5000 - 4096:].count(0))
        try:
            g.check()
        except FileChangedError as e:
            print("RAISED", e)
        else:
            print("NOT RAISED")
    """, mode)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert f"ZEROS {8192 - 5000}" in p.stdout, p.stdout
    assert f"RAISED {tmp_path / 'f'} {CHANGED} (was 10000 bytes, now 5000)" in p.stdout, p.stdout


@pytest.mark.parametrize("mode", MODES)
def test_extract_gguf_cut_in_the_middle_of_its_last_page(tmp_path, mode):
    """The source GGUF loses the tail of its last page (output_norm's bytes, copied into dense.gguf) once the
    first shard is written: extract refuses; no OUT with a dense.gguf of zeros."""
    src = tmp_path / GGUF.name
    shutil.copyfile(GGUF, src)
    cut = src.stat().st_size - 912
    assert cut % 4096 and cut // 4096 == (src.stat().st_size - 1) // 4096  # inside the last page
    out = tmp_path / "out"
    p = _python(f"""
        import os
        from mertools import extract
        from mer_runtime.guard import FileChangedError
        src = {str(src)!r}
        def progress(total, n):
            def tick(k):
                if os.path.getsize(src) != {cut}:
                    os.truncate(src, {cut})
            return tick
        try:
            extract(src, {str(out)!r}, fsync=False, progress=progress)
        except FileChangedError as e:
            print("RAISED", e)
        else:
            print("NOT RAISED")
    """, mode)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert p.stdout.startswith(f"RAISED {src} {CHANGED}"), p.stdout
    assert not out.exists()
    _no_staging(tmp_path)


@NEEDS_HANDLER
def test_many_faults_in_one_mapping(tmp_path):
    """A 600 MB (sparse) file truncated to 0, then every other page read: one fault, not tens of thousands of
    zero pages that would split the mapping past vm.max_map_count and kill the process."""
    p = _python(f"""
        import os
        import numpy as np
        from mer_runtime import guard
        p = {str(tmp_path / 'sparse')!r}
        with open(p, "wb") as f:
            f.truncate(600 << 20)
        fd = os.open(p, os.O_RDONLY)
        mm, g = guard.map_file(fd, 600 << 20, p)
        a = np.frombuffer(mm, np.uint8)
        os.truncate(p, 0)
        print("SUM", int(a[::8192].sum()), "FAULTS", guard._FAULTS[g.slot])
        try:
            g.check()
        except guard.FileChangedError:
            print("RAISED")
    """)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert p.stdout.split() == ["SUM", "0", "FAULTS", "1", "RAISED"], p.stdout


def test_sources_unregister_before_their_mappings_go():
    """CPython unmaps an mmap before it runs its weak references: a guard left to the finalizer stays registered
    over memory that is gone (a new mapping there would have its SIGBUS swallowed). Closing a GGUF source, and
    deep verify's reference, unregisters their readers' guards while the mappings are still alive."""
    from mertools.deep import SourceReference
    from mertools.sources import open_source

    src = open_source(GGUF)
    src.view(0)
    held = [(r.guard, r.data) for r in src.inner.readers]  # the memmaps stay alive through `held`
    src.close()
    assert held and all(not g._fin.alive for g, _ in held)
    ref = SourceReference(GGUF)
    held = [(r.guard, r.data) for r in ref._readers]
    ref.close()
    assert held and all(not g._fin.alive for g, _ in held)


@NEEDS_HANDLER
def test_slot_table_full_warns_once(tmp_path):
    """More live guarded mappings than the handler has slots: one RuntimeWarning, and the rest still checked (by
    size)."""
    p = _python(f"""
        import mmap, os, warnings
        from mer_runtime import guard
        p = {str(tmp_path / 'f')!r}
        open(p, "wb").write(b"x" * 8192)
        fd = os.open(p, os.O_RDONLY)
        mm = mmap.mmap(fd, 8192, prot=mmap.PROT_READ)
        addr = guard._address(mm)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            gs = [guard.Guard(mm, addr, 8192, 8192, p) for _ in range(guard._LIB.mer_guard_slots() + 5)]
        print("WARNINGS", len(w), "UNGUARDED", sum(g.slot < 0 for g in gs))
        os.truncate(p, 100)
        try:
            gs[-1].check()
        except guard.FileChangedError:
            print("RAISED")
        for g in gs:
            g.close()
    """)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert p.stdout.split() == ["WARNINGS", "1", "UNGUARDED", "5", "RAISED"], p.stdout


def test_threads_only_the_shrunk_file_fails(tmp_path):
    """Four threads hash four files at once; one shrinks under its reader. Only that one raises, naming it; the
    other three get their right hashes (the handler's record is per mapping, and thread-safe)."""
    p = _python(f"""
        import os, xxhash
        from concurrent.futures import ThreadPoolExecutor
        from mer_runtime.checksum import hash_file, PIECE
        from mer_runtime.guard import FileChangedError
        d = {str(tmp_path)!r}
        paths = [os.path.join(d, f"f{{i}}") for i in range(4)]
        want = []
        for p in paths:
            b = os.urandom(12 * PIECE)
            open(p, "wb").write(b)
            want.append(xxhash.xxh3_64_hexdigest(b))
        def run(i):
            cut = [False]
            def tick(n):
                if i == 2 and not cut[0]:
                    cut[0] = True
                    os.truncate(paths[2], 3 * PIECE)
            try:
                return hash_file(paths[i], (), tick)[0]
            except FileChangedError as e:
                return "ERR " + str(e)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(run, range(4)))
        for i, g in enumerate(got):
            print(i, g == want[i], g[:60] if g.startswith("ERR") else "")
    """)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0] == "0 True " and lines[1] == "1 True " and lines[3] == "3 True ", p.stdout
    assert lines[2].startswith(f"2 False ERR {tmp_path / 'f2'} {CHANGED}"[:62]), p.stdout


@NEEDS_HANDLER
def test_extract_cli_gguf_source_truncated(tmp_path):
    """The source GGUF shrinks after the first shard is written: exit 2 with one line naming it; OUT never
    appears and the staging folder is gone."""
    src = tmp_path / "src" / GGUF.name
    src.parent.mkdir()
    shutil.copyfile(GGUF, src)
    out = tmp_path / "o" / "out"
    out.parent.mkdir()
    p = _cli_stopped(["extract", src, out], "writing", lambda: os.truncate(src, src.stat().st_size // 3))
    _one_line_error(p, str(src))
    assert not out.exists()
    _no_staging(out.parent)


@NEEDS_HANDLER
def test_extract_cli_safetensors_source_truncated(tmp_path):
    """A SafeTensors checkpoint whose mapped files shrink mid-extract (those not yet mapped are refused when
    mapped, by their header's size)."""
    src = tmp_path / "src"
    shutil.copytree(ST, src)
    out = tmp_path / "o" / "out"
    out.parent.mkdir()

    def cut() -> None:
        for f in src.glob("*.safetensors"):
            os.truncate(f, 4096 * 2)

    p = _cli_stopped(["extract", src, out], "writing", cut)
    assert p.returncode == 2, p.stderr[-2000:]
    line, = p.stderr.strip().splitlines()
    assert ".safetensors" in line and (CHANGED in line or "but its header said" in line), line
    assert not out.exists()
    _no_staging(out.parent)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from mertools import extract

    out = tmp_path_factory.mktemp("fc") / "out"
    extract(GGUF, out, fsync=False)
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cut", ["start", "mid-page"])
def test_verify_deep_against_source_truncated(folder, tmp_path, mode, cut):
    """verify --deep --against: the source shrinks after deep verify mapped it, before the bytes are compared;
    also when cut in the middle of a page of expert bytes (no SIGBUS: the page's rest reads as zeros), which must
    not be reported as a good shard that does not match."""
    src = tmp_path / GGUF.name
    shutil.copyfile(GGUF, src)
    at = 8192 if cut == "start" else src.stat().st_size - 4912
    assert cut == "start" or at % 4096
    p = _cli_stopped(["verify", folder, "--deep", "--against", src], "reference-mapped",
                     lambda: os.truncate(src, at), mode)
    _one_line_error(p, str(src))


@pytest.mark.parametrize("mode", MODES)
def test_verify_dense_truncated_while_hashed(folder, tmp_path, mode):
    """verify's checksum pass over dense.gguf (several pieces): the file shrinks after its first piece."""
    f = tmp_path / "f"
    shutil.copytree(folder, f)
    dense = f / "dense.gguf"
    assert dense.stat().st_size > 2 * 65536
    p = _python(f"""
        from pathlib import Path
        import os
        import mer_runtime.checksum
        mer_runtime.checksum.PIECE = 65536  # dense.gguf in several pieces, whatever the default
        from mertools.verify import verify
        from mer_runtime.guard import FileChangedError
        dense = Path({str(dense)!r})
        experts = sum(p.stat().st_size for p in Path({str(f)!r}).glob("experts/**/*.bin"))
        def progress(total, n):
            seen = [0]
            def tick(k):
                seen[0] += k
                if seen[0] > experts and dense.stat().st_size > 4096:
                    os.truncate(dense, 4096)
            return tick
        try:
            verify({str(f)!r}, progress=progress)
        except FileChangedError as e:
            print("RAISED", e)
    """, mode)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith(f"RAISED {dense} {CHANGED}"), p.stdout


@pytest.mark.parametrize("mode", MODES)
def test_reassemble_shard_truncated(folder, tmp_path, mode):
    """reassemble reads shards with pread (a short read is refused by name) and dense.gguf's header through the
    guarded reader: a shard cut while the output is written leaves no output and no temporary."""
    f = tmp_path / "f"
    shutil.copytree(folder, f)
    last = sorted(f.glob("experts/**/*.bin"))[-1]
    out = tmp_path / "back.gguf"
    p = _python(f"""
        import os
        from mertools.reassemble import reassemble
        from mertools.errors import MertoolsError
        def progress(total, n):
            def tick(k):
                if os.stat({str(last)!r}).st_size:
                    os.truncate({str(last)!r}, 0)
            return tick
        try:
            reassemble({str(f)!r}, {str(out)!r}, progress=progress, fsync=False)
        except MertoolsError as e:
            print("RAISED", e)
    """, mode)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith(f"RAISED {last}: shorter than the manifest says"), p.stdout
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f"]  # no output, no temporary


def test_fault_outside_guarded_mappings_still_kills(tmp_path):
    """A SIGBUS the guard does not own goes to the handler installed before it (here faulthandler, which names
    the fault) and then the default action."""
    p = _python(f"""
        import faulthandler, mmap, os
        faulthandler.enable()
        from mer_runtime.checksum import hash_file
        p = {str(tmp_path / 'g')!r}
        open(p, "wb").write(os.urandom(1 << 20))
        hash_file(p)  # installs the guard
        fd = os.open(p, os.O_RDONLY)
        m = mmap.mmap(fd, 1 << 20, prot=mmap.PROT_READ)  # not registered
        os.truncate(p, 0)
        print(m[900000])
    """)
    assert p.returncode == -signal.SIGBUS, (p.returncode, p.stderr)
    assert "Bus error" in p.stderr


@NEEDS_HANDLER
@pytest.mark.parametrize("how", ["scan", "read"])
@pytest.mark.parametrize("name", ["mixtral-f16.gguf", "gptoss-bf16"])
def test_deep_compare_checks_a_source_the_full_slot_table_left_unguarded(folder, tmp_path, name, how):
    """The handler is loaded (GUARDED) but its slot table is full when deep verify maps the source: that mapping is
    not covered, so its region says so (Region.guarded False) and every read of it checks the size before it
    touches the mapping: the byte scan ("scan") and any other reader, such as the float64 reference of an expert
    found different ("read"). A source cut meanwhile is a FileChangedError naming it, not a process dead of SIGBUS
    (the old code went by GUARDED alone and touched the gone pages; then only the scan checked). A GGUF (views of
    the mapping) and a SafeTensors checkpoint whose projections are made by a transform (GPT-OSS' fused, transposed
    gate_up)."""
    from mertools import extract

    if name.endswith(".gguf"):
        src, out = tmp_path / name, folder
        shutil.copyfile(GGUF, src)
    else:
        src, out = tmp_path / name, tmp_path / "out"
        shutil.copytree(ST.parent / name, src)
        extract(src, out, fsync=False)
    cut = src if src.is_file() else src / "model.safetensors"
    p = _python(f"""
        import mmap, os, warnings
        from mer_runtime import guard, load_manifest
        from mer_runtime.safeopen import open_regular
        from mertools.deep import SourceReference, scan_shard, source_regions
        src, out, cut = {str(src)!r}, {str(out)!r}, {str(cut)!r}
        m = load_manifest(out)
        e = m.experts[-1]
        ref = SourceReference(src, m)
        print("COVERED", all(r.guarded for r in source_regions(ref, e, []).values()))
        ref.close()
        filler = os.path.join(os.path.dirname(cut), "filler")
        open(filler, "wb").write(b"x" * 8192)
        fd = os.open(filler, os.O_RDONLY)
        mm = mmap.mmap(fd, 8192, prot=mmap.PROT_READ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gs = [guard.Guard(mm, guard._address(mm), 8192, 8192, filler) for _ in range(guard._LIB.mer_guard_slots())]
            ref = SourceReference(src, m)
            regions = source_regions(ref, e, [])
        print("UNCOVERED", not any(r.guarded for r in regions.values()) and len(regions) >= 3)
        os.truncate(cut, 8192)
        sfd, _ = open_regular(m.path_of(e))
        try:
            if {how!r} == "scan":
                scan_shard(sfd, e, regions)
            else:
                for r in regions.values():
                    r.read(r.size - 1, r.size).sum()
        except guard.FileChangedError as exc:
            print("RAISED", cut in str(exc))
    """)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])  # -7: SIGBUS, the old behaviour
    assert p.stdout.split() == ["COVERED", "True", "UNCOVERED", "True", "RAISED", "True"], p.stdout


def test_deep_compare_checks_only_the_files_a_projection_reads(tmp_path):
    """Without the handler every piece of a comparison is size-checked first; for a sharded SafeTensors checkpoint
    that check covers the files the projection reads, not every file mapped (hundreds for a big checkpoint, each an
    fstat per piece). A shard the expert does not read may shrink meanwhile without failing its comparison (the
    expert that reads it fails); its own shrinking still raises, naming it."""
    from mertools import extract

    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(ST, src)
    extract(src, out, fsync=False)
    p = _python(f"""
        import os
        from mer_runtime import guard, load_manifest
        from mer_runtime.safeopen import open_regular
        from mertools.deep import SourceReference, scan_shard, source_regions
        m = load_manifest({str(out)!r})
        ref = SourceReference({str(src)!r}, m)
        files = ref.source.files
        reads = {{e.path: {{ref._projection(e.layer, e.expert, r).file_index for r in e.tensors}} for e in m.experts}}
        e = next(x for x in m.experts if len(reads[x.path]) == 1)
        other = next(x for x in m.experts if not reads[x.path] & reads[e.path])
        source_regions(ref, other, [])  # maps the other expert's file too
        mine, = reads[e.path]
        theirs = min(reads[other.path])
        print("UNGUARDED", not any(r.guarded for r in source_regions(ref, e, []).values()))
        os.truncate(files[theirs], 8192)
        fd, _ = open_regular(m.path_of(e))
        print("PROBLEMS", len(scan_shard(fd, e, source_regions(ref, e, []))[3]))
        os.truncate(files[mine], 8192)
        try:
            scan_shard(fd, e, source_regions(ref, e, []))
        except guard.FileChangedError as exc:
            print("RAISED", str(files[mine]) in str(exc))
    """, "fallback")
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert p.stdout.split() == ["UNGUARDED", "True", "PROBLEMS", "0", "RAISED", "True"], p.stdout


@pytest.mark.parametrize("how", ["grown", "cut-after-the-last-piece"])
@pytest.mark.parametrize("reader", ["hash_file", "scan_shard"])
def test_file_changed_after_it_was_read_is_refused(tmp_path, how, reader):
    """verify's checksum pass and deep verify's byte scan read with pread: a file that grows while it is read, or is
    cut once its last piece is in, still ends in FileChangedError naming it (the mapping version's Guard.finish
    compared the size at the end), never a PASS on bytes that are no longer the file."""
    from types import SimpleNamespace

    from mer_runtime.checksum import PIECE, hash_file
    from mer_runtime.guard import FileChangedError
    from mer_runtime.safeopen import open_regular

    import mertools.deep as deep

    p = tmp_path / "f.bin"
    size = 3 * PIECE + 100
    p.write_bytes(os.urandom(size))
    seen = []

    def tick(n):
        seen.append(n)
        if how == "grown" and len(seen) == 1:
            with open(p, "ab") as fh:  # a writer appending (a download still running)
                fh.write(b"x" * 4096)
        elif how != "grown" and sum(seen) == size:
            os.truncate(p, size - 1)

    with pytest.raises(FileChangedError) as exc:
        if reader == "hash_file":
            hash_file(p, [(0, size, "all")], tick)
        else:
            fd, _ = open_regular(p)
            try:
                deep.scan_shard(fd, SimpleNamespace(size=size, tensors={}), {}, tick)
            finally:
                os.close(fd)
    now = size + 4096 if how == "grown" else size - 1
    assert f"{p} {CHANGED} (was {size} bytes, now {now})" in str(exc.value)


def test_read_pieces_refuses_a_buffer_smaller_than_its_pieces(tmp_path):
    """read_pieces(buf=...) with a buffer shorter than a piece: a clear ValueError, not a loop that preads into an
    empty slice for ever (0 bytes read of 0 wanted is no short read)."""
    from mer_runtime.checksum import read_pieces

    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 10000)
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(ValueError):
            for _ in read_pieces(fd, 10000, 4096, buf=bytearray(1000)):
                pass
        assert sum(e - s for s, e, _ in read_pieces(fd, 10000, 4096, buf=bytearray(4096))) == 10000
    finally:
        os.close(fd)
