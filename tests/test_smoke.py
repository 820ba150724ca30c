"""smoke, golden outputs and demo, through the real command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mer_runtime import load_manifest

from conftest import REAL, extract_fixture, run_cli, smoke_json


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return extract_fixture(tmp_path_factory, "smoke")


smoke = smoke_json


@pytest.mark.parametrize("workload", ["zipf", "markov", "uniform", "router"])
def test_smoke_reports_everything(out, workload):
    r = smoke(out, "--tokens", "200", "--cache-slots", "3", "--workload", workload)
    assert r["tokens"] == 200 and r["layer_steps"] == 400 and r["expert_calls"] == 800
    assert r["hits"] + r["misses"] == 800
    # every miss and every issued prefetch reads one whole shard (plus the 4 KiB probe at open)
    m = load_manifest(out)
    sizes = [e.size for e in m.experts]
    loads = r["misses"] + r["prefetch_issued"]
    assert min(sizes) * loads + 4096 <= r["bytes_read"] <= max(sizes) * loads + 4096
    assert r["prefetch_used"] + r["prefetch_wasted"] <= r["prefetch_issued"]
    assert r["hits"] >= r["prefetch_used"]
    # every read the gate admitted was started or failed to open (prefetch_failed also counts reads that failed
    # after they started): nothing is read that it did not weigh, and nothing it admitted is lost uncounted
    g = r["prefetch_gate"]
    assert r["prefetch_issued"] <= g["admitted"] <= r["prefetch_issued"] + r["prefetch_failed"]
    for key in ("io_latency_ms_misses", "compute_ms_per_expert"):
        assert set(r[key]) == {"p50", "p95", "p99"}
    assert r["layer_steps_per_s"] == pytest.approx(2 * r["tokens_per_s"], rel=1e-3)
    pol = r["hit_rate_by_policy"]
    assert set(pol) == {"none", "markov", "markov_ungated", "oracle"}
    assert pol["oracle"]["hit_rate"] > pol["none"]["hit_rate"]  # knowing the next step must help on 3 slots
    assert pol["none"]["prefetch_issued"] == 0 and pol["markov"]["hits"] + pol["markov"]["misses"] == 800
    if workload == "markov":  # the policy replay is seeded and I/O-free: the same again, whatever the disk did
        assert smoke(out, "--tokens", "200", "--cache-slots", "3", "--workload", workload)["hit_rate_by_policy"] == pol
    assert "token" in r["token_definition"]
    # the step driver's own time is measured (no bound: a figure, not a test of speed); a dormant step is a step
    assert r["driver_ms_per_step"] > 0 and 0 <= r["prefetch_dormant_steps"] <= r["layer_steps"]
    if workload == "uniform":  # nothing to learn: the stream sleeps from its 32nd step on
        assert r["prefetch_dormant_steps"] > 0


def test_no_prefetch_and_backends_agree(out):
    base = smoke(out, "--tokens", "100", "--cache-slots", "3", "--no-prefetch", "--io", "buffered")
    assert base["prefetch_issued"] == 0 and base["hit_rate"] == base["hit_rate_by_policy"]["none"]["hit_rate"]
    for io in ("pread", "io_uring"):
        r = smoke(out, "--tokens", "100", "--cache-slots", "3", "--no-prefetch", "--io", io)
        assert (r["hits"], r["misses"], r["backend"]) == (base["hits"], base["misses"], io)


@pytest.mark.parametrize("io", ["pread", "io_uring"])
def test_guesses_go_a_token_ahead_only_where_the_loader_keeps_them_to_idle_time(out, io):
    """io_uring has the speculative window (a foreground read waits behind at most spec_window chunks): guesses a
    token ahead when asked; pread has none: the one-step guesses, as before. Nothing is lost or double-counted."""
    from mer_runtime import uring
    from mer_runtime.smoke import SmokeConfig, run_smoke

    if io == "io_uring" and uring.probe():
        pytest.skip(uring.probe())
    r = run_smoke(out, SmokeConfig(tokens=60, cache_slots=4, workload="markov", io=io, prefetch_ahead="token"))
    g = r["prefetch_gate"]
    assert g["ahead"] == ("token" if io == "io_uring" else "step")
    assert (g["read_ms"] is not None) == (io == "io_uring")
    assert r["hits"] + r["misses"] == r["expert_calls"] and r["prefetch_issued"] <= g["admitted"]
    assert smoke(out, "--tokens", "10", "--cache-slots", "3")["prefetch_gate"]["ahead"] == "step"  # the default


def test_token_ahead_smoke_learns_a_reads_price_only_beside_its_guesses_within_its_budget(out):
    """A real token-ahead run on the tiny fixture: the price of a read comes only from computations with a guess
    under way (none admitted: none measured), the guesses admitted before it was known were exploration, and what
    exploring was charged stays within 1% of the time observed (I/O wait plus compute)."""
    from mer_runtime import uring
    from mer_runtime.smoke import SmokeConfig, run_smoke

    if uring.probe():
        pytest.skip(uring.probe())
    r = run_smoke(out, SmokeConfig(tokens=120, cache_slots=4, workload="markov", io="io_uring",
                                   prefetch_ahead="token"))
    g = r["prefetch_gate"]
    assert g["ahead"] == "token" and g["explored"] <= g["admitted"] and r["prefetch_issued"] <= g["admitted"]
    assert g["admitted"] > 0 or g["read_samples"] == 0
    assert g["read_samples"] <= r["expert_calls"] and g["read_ms_per_mib"] >= 0
    assert g["explore_spent_ms"] <= 10 * (r["io_wait_s"] + r["compute_s"]) + 0.01


def test_pin_top_keeps_the_hottest_experts(out):
    r = smoke(out, "--tokens", "100", "--cache-slots", "4", "--workload", "zipf", "--pin-top", "3", "--no-prefetch")
    assert len(r["pinned"]) == 3
    p = run_cli("smoke", out, "--cache-slots", "3", "--pin-top", "3")
    assert p.returncode == 2 and "one stays for loads" in p.stderr


def test_replay_trace(out, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"experts": [[t % 4, (t + 1) % 4], [3, 0]]}) for t in range(50)) + "\n")
    r = smoke(out, "--workload", "replay", "--trace", trace, "--cache-slots", "4")
    assert r["tokens"] == 50 and r["workload"] == "replay"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"experts": [[0, 9], [1, 2]]}\n')
    p = run_cli("smoke", out, "--workload", "replay", "--trace", bad)
    assert p.returncode == 2 and "bad.jsonl:1" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("smoke", out, "--workload", "replay")
    assert p.returncode == 2 and "--trace" in p.stderr
    # the golden written over the trace it was made from would lose the trace: refused before the run
    before = trace.read_bytes()
    p = run_cli("smoke", out, "--workload", "replay", "--trace", trace, "--emit-golden", trace, "--overwrite")
    assert p.returncode == 2 and "is the --trace file" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert trace.read_bytes() == before


def test_text_summary(out):
    p = run_cli("smoke", out, "--tokens", "50", "--cache-slots", "4", "-q", check=True)
    for needle in ("tokens/s (whole model)", "layer-steps/s", "hit rate", "prefetch on", "I/O latency",
                   "compute ms/expert", "I/O share", "oracle", "dormant steps", "ms a layer step (its own work"):
        assert needle in p.stdout


def first_principles_ffn(tensors, layer, e, x):
    """down @ (silu(gate @ x) * (up @ x)) in float64, from the SOURCE model's tensors (gguf reader + gguf
    dequantize), written here without any of the project's code."""
    from gguf.quants import dequantize

    from conftest import reference_slice

    def w(role):
        t, data = reference_slice(tensors, layer, e, role)
        return dequantize(np.asarray(data), t.tensor_type).astype(np.float64)

    x = np.asarray(x, np.float64)
    g, u = w("gate") @ x, w("up") @ x
    return w("down") @ (g / (1.0 + np.exp(-g)) * u)


def test_emit_golden(out, tmp_path):
    """Golden outputs equal a float64 computation from first principles on the source model's tensors; that
    computation is itself checked against the fixture's published outputs (ref.npz, made outside the project)."""
    from conftest import reader_tensors

    g = tmp_path / "golden.npz"
    smoke(out, "--tokens", "10", "--emit-golden", g)
    z = np.load(g)
    m = load_manifest(out)
    assert z["x"].shape == (8, 256) and z["y"].shape == (8, 256) and z["y"].dtype == np.float64
    assert json.loads(str(z["meta"]))["seed"] == 12648430
    assert [tuple(v) for v in z["layer_expert"]] == [(e.layer, e.expert) for e in m.experts]
    tensors = reader_tensors(REAL / "mixtral-q4_k_m.gguf")
    ref = np.load(REAL / "mixtral-q4_k_m.ref.npz")
    for li, layer in enumerate(ref["layers"]):
        for e in range(int(ref["n_experts"])):
            want = ref["y"][li, e]
            got = first_principles_ffn(tensors, int(layer), e, ref["x"])
            assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max()
    assert len(set(map(bytes, z["x"]))) == 8  # a different input per expert
    for (layer, e), x, y in zip(z["layer_expert"], z["x"], z["y"]):
        want = first_principles_ffn(tensors, int(layer), int(e), x)
        assert np.abs(y - want).max() <= 1e-9 * np.abs(want).max(), (layer, e)


def test_emit_golden_refuses_an_existing_file_before_the_run(out, tmp_path):
    """--emit-golden replaced an existing file silently, unlike every other writer; now it is refused as they refuse
    theirs, before the run (the bad trace below is read by the run: its error would come first otherwise)."""
    g = tmp_path / "g.npz"
    g.write_bytes(b"an earlier golden")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    p = run_cli("smoke", out, "--workload", "replay", "--trace", bad, "--emit-golden", g)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"error: {g}: exists; pass --overwrite to replace it, or choose another "
                                             "name"]
    assert g.read_bytes() == b"an earlier golden"
    smoke(out, "--tokens", "5", "--emit-golden", g, "--overwrite")
    assert np.load(g)["y"].shape == (8, 256)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.jsonl", "g.npz"]
    p = run_cli("smoke", out, "--tokens", "5", "--overwrite")
    assert p.returncode == 2 and p.stderr.strip() == "error: --overwrite needs --emit-golden"


def test_emit_golden_refuses_a_fifo(out, tmp_path):
    """A FIFO (or a device: /dev/null as root) at PATH was written into, or renamed over; refused before the run.
    The test holds the FIFO's read end open, so that a writer would not block but succeed."""
    import os

    fifo = tmp_path / "g.npz"
    os.mkfifo(fifo)
    rd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        for extra in ((), ("--overwrite",)):
            p = run_cli("smoke", out, "--tokens", "5", "--emit-golden", fifo, *extra)
            assert p.returncode == 2 and p.stderr.strip().splitlines() == [
                f"error: {fifo}: exists and is not a file; choose another name"], p.stderr
    finally:
        os.close(rd)
    assert fifo.is_fifo() and [x.name for x in tmp_path.iterdir()] == ["g.npz"]


def test_emit_golden_killed_before_its_rename_keeps_the_old_file(out, tmp_path):
    """The golden is written under a temporary and renamed: a run killed before the rename leaves the old file whole
    (not a half-written one), and the next run removes the dead run's temporary. The file has the name given (np.savez
    added .npz to a name without it)."""
    import signal

    g = tmp_path / "golden"
    g.write_bytes(b"an earlier golden")
    p = run_cli("smoke", out, "--tokens", "5", "-q", "--emit-golden", g, "--overwrite",
                env={"MERTOOLS_TEST_KILL_AT": "before-commit"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert g.read_bytes() == b"an earlier golden"
    left = [x.name for x in tmp_path.iterdir() if x.name != "golden"]
    assert len(left) == 1 and left[0].startswith(".golden.mertools-tmp-")  # the dead run's, complete but unnamed
    smoke(out, "--tokens", "5", "--emit-golden", g, "--overwrite")
    assert [x.name for x in tmp_path.iterdir()] == ["golden"]
    assert np.load(g)["x"].shape == (8, 256)


def test_demo_runs_the_whole_path(tmp_path):
    p = run_cli("demo", "--out", tmp_path / "d", "--tokens", "50", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["verify"]["ok"] and r["verify"]["deep"]["experts_run"] == 8 and r["smoke"]["tokens"] == 50


def test_token_ahead_smoke_weighs_a_chunk_as_at_most_one_expert(out):
    """The tiny fixture's experts are smaller than one 1 MiB chunk: a chunk's share of an expert, as the run's gate
    and the replay's (hit_rate_by_policy) weigh it, is 1, not 1 MiB / 108 KiB = 9.48."""
    from mer_runtime import uring
    from mer_runtime.smoke import SmokeConfig, run_smoke

    if uring.probe():
        pytest.skip(uring.probe())
    r = run_smoke(out, SmokeConfig(tokens=20, cache_slots=4, workload="markov", io="io_uring", prefetch_ahead="token"))
    assert r["prefetch_gate"]["ahead"] == "token"
    assert max(e.size for e in load_manifest(out).experts) < 1 << 20  # the case in question
    assert r["prefetch_gate"]["chunk_frac"] == 1.0
    assert run_smoke(out, SmokeConfig(tokens=5, cache_slots=4))["prefetch_gate"]["chunk_frac"] is None  # step ahead


@pytest.mark.parametrize("target", ["dense.gguf", "manifest.json"])
def test_emit_golden_overwrite_never_replaces_a_file_of_the_folder_being_read(tmp_path_factory, target):
    """`smoke OUT --emit-golden OUT/dense.gguf --overwrite` renamed the golden over the folder's only copy of its
    dense weights (or its manifest): --overwrite replaces an earlier output, never a source (docs/format.md,
    guarantee 4), as pack and reassemble refuse theirs. Refused, in one line, before the run; the folder intact."""
    own = extract_fixture(tmp_path_factory, "smoke-golden-own")
    before = (own / target).read_bytes()
    for extra in (("--overwrite",), ()):  # without it too: not "pass --overwrite", which would not help
        p = run_cli("smoke", own, "--tokens", "5", "-q", "--emit-golden", own / target, *extra)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and f"is {target} of the folder" in lines[0], p.stderr
    assert (own / target).read_bytes() == before
    assert run_cli("verify", own).returncode == 0


def test_emit_golden_that_appears_before_the_rename_is_not_replaced_without_overwrite(out, tmp_path):
    """file_output checked the target and then renamed over it: a golden written there in between (another run)
    was replaced although --overwrite was not given."""
    from conftest import appears_midway

    g = tmp_path / "g.npz"
    appears_midway(g, b"another run's golden", "before-commit", "smoke", out, "--tokens", "5", "-q", "--emit-golden", g)
    assert [x.name for x in tmp_path.iterdir()] == ["g.npz"]


@pytest.mark.parametrize("line, needle", [
    ('{"experts": [[0.9, 1.7], [2, 3]]}', "expert ids must be integers"),  # were cut to 0 and 1
    ('{"experts": [[true, 1], [2, 3]]}', "expert ids must be integers"),  # was expert 1
    ('{"experts": [["1", 2], [2, 3]]}', "expert ids must be integers"),
    ('{"experts": [[0, 0], [2, 3]]}', "names expert 0 twice in layer"),  # a top-k step never picks one twice
    (b'\xff{"experts": [[0, 1], [2, 3]]}', "not UTF-8 text"),  # was "invalid value: 'utf-8' codec...", no file
])
def test_a_trace_whose_expert_ids_are_not_a_top_k_choice_is_refused(out, tmp_path, line, needle):
    """The replay trace took any value int() takes (1.7 became 1, true became 1, "1" became 1) and repeated ids;
    the replay then ran routes that were not the trace's. One line naming the file and its line, exit 2."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes((line if isinstance(line, bytes) else line.encode()) + b"\n")
    p = run_cli("smoke", out, "--workload", "replay", "--trace", bad, "-q")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"{bad}:1: " in p.stderr and needle in p.stderr, p.stderr


@pytest.mark.parametrize("extra, newline, ok", [(0, b"\n", True), (0, b"", True), (1, b"\n", False)])
def test_a_trace_line_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(out, tmp_path, extra, newline, ok):
    """MAX_TRACE_LINE is the most bytes a trace line may hold: a line of exactly that many (its newline not counted,
    or the file's last line without one) was refused as "longer than" the limit; one byte more must be."""
    from mer_runtime.smoke import MAX_TRACE_LINE

    rec = json.dumps({"experts": [[0, 1], [2, 3]]}).encode()
    trace = tmp_path / "edge.jsonl"
    trace.write_bytes(rec.ljust(MAX_TRACE_LINE + extra, b" ") + newline)  # JSON allows the trailing spaces
    p = run_cli("smoke", out, "--workload", "replay", "--trace", trace, "--cache-slots", "4", "--json")
    if ok:
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["tokens"] == 1
    else:
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert f"{trace}:1: a line longer than {MAX_TRACE_LINE} bytes" in p.stderr
