#!/usr/bin/env python3
"""Benchmark `mertools pull` (download + verify + convert, streamed) against its parts (not a test).

Builds a repo on disk (a sharded SafeTensors Mixtral-shaped checkpoint, BF16, or a GGUF Q4_0 model), serves it from
the loopback hub (tests/hubserver.py, in its own process), and measures in the same run:
  - download-only: every file the pull needs, fetched and sha256-checked the same way, nothing converted;
  - convert-only: `extract` of the same files from local disk;
  - pull: the whole pipeline; a SafeTensors repo is converted shard by shard (download of shard i+1 overlapping the
    conversion of shard i, each shard deleted once converted: ``mertools.hub.stream``); wall time against the
    slower of the two (goal <= 1.15x), and peak disk use of the pull's staging folder plus its output, sampled
    every 50 ms, against output + the two largest source files (goal <= 1);
  - for SafeTensors, also the download-all-then-extract pull (``--no-whole`` skips it): the peak disk that
    streaming saves.

    python scripts/bench_pull.py --dir /tmp/mertools-bench-pull --size-gb 4 [--kind safetensors|gguf] [--keep]
    python scripts/bench_pull.py --size-gb 0.05 --d-model 256 --d-ff 512      # a smoke run

SafeTensors conversion needs the SafeTensors source (mertools.sources); without it the script reports the
download-only figure and says why the others are missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> None:
    """A BF16 SafeTensors file written by its documented layout, streaming (numpy has no bfloat16)."""
    header, off = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors:
            n = int(np.prod(shape))
            for s in range(0, n, 1 << 24):
                k = min(1 << 24, n - s)
                # small normal values as bf16: the top half of float32
                f = (rng.standard_normal(k, dtype=np.float32) * 0.02).view(np.uint32) >> 16
                fh.write(f.astype(np.uint16).tobytes())


def build_safetensors(repo: Path, size: float, d_model: int, d_ff: int, n_exp: int, shards: int) -> None:
    per_layer = 3 * n_exp * d_model * d_ff * 2
    layers = max(1, math.ceil(size / per_layer))
    rng = np.random.default_rng(0)
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (256, d_model))]
    for L in range(layers):
        p = f"model.layers.{L}"
        names += [(f"{p}.input_layernorm.weight", (d_model,)), (f"{p}.post_attention_layernorm.weight", (d_model,))]
        names += [(f"{p}.self_attn.{x}_proj.weight", (d_model, d_model)) for x in "qkvo"]
        names.append((f"{p}.block_sparse_moe.gate.weight", (n_exp, d_model)))
        for e in range(n_exp):
            q = f"{p}.block_sparse_moe.experts.{e}"
            names += [(f"{q}.w1.weight", (d_ff, d_model)), (f"{q}.w2.weight", (d_model, d_ff)),
                      (f"{q}.w3.weight", (d_ff, d_model))]
    names += [("model.norm.weight", (d_model,)), ("lm_head.weight", (256, d_model))]
    total = sum(int(np.prod(s)) * 2 for _, s in names)
    target = total / shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for n in names:
        if acc >= target and len(groups) < shards:
            groups.append([])
            acc = 0
        groups[-1].append(n)
        acc += int(np.prod(n[1])) * 2
    repo.mkdir(parents=True)
    weight_map = {}
    for i, g in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(repo / fname, g, rng)
        weight_map.update({n: fname for n, _ in g})
    (repo / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    (repo / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": d_model,
        "intermediate_size": d_ff, "num_hidden_layers": layers, "num_local_experts": n_exp,
        "num_experts_per_tok": 2, "num_attention_heads": max(1, d_model // 64),
        "num_key_value_heads": max(1, d_model // 64), "vocab_size": 256, "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16", "hidden_act": "silu"}, indent=1))


def build_gguf(repo: Path, size: float, d_model: int, d_ff: int) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_extract as be

    be.D_MODEL, be.D_FF = d_model, d_ff
    per_layer = 3 * be.N_EXP * d_model * d_ff // 32 * 18
    repo.mkdir(parents=True)
    be.build_model(repo / "model-q4_0.gguf", max(1, math.ceil(size / per_layer)))


def tree_bytes(paths: list[Path]) -> int:
    """Bytes allocated under `paths`, each inode once (the streamed pull commits by hard links: work/ and OUT
    share their files for a moment, on disk once)."""
    n, seen = 0, set()
    for root in paths:
        if not root.exists():
            continue
        for dirpath, _, files in os.walk(root):
            for f in files:
                try:
                    st = os.lstat(os.path.join(dirpath, f))
                except FileNotFoundError:
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    n += st.st_blocks * 512
    return n


class PeakDisk:
    """Samples the bytes allocated under some folders every 50 ms on a thread; ``peak`` is the largest sample."""

    def __init__(self, paths: list[Path]):
        self.paths, self.peak, self.stop = paths, 0, threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_bytes(self.paths))
            time.sleep(0.05)

    def __enter__(self) -> "PeakDisk":
        self.t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.t.join()
        self.peak = max(self.peak, tree_bytes(self.paths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mertools-bench-pull"))
    ap.add_argument("--kind", choices=["safetensors", "gguf"], default="safetensors")
    ap.add_argument("--size-gb", type=float, default=4.0, help="approximate expert bytes of the repo")
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-ff", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--shards", type=int, default=8, help="SafeTensors shard files")
    ap.add_argument("--keep", action="store_true", help="keep the repo and outputs")
    ap.add_argument("--no-whole", action="store_true", help="skip the download-all-then-extract pull")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from mertools import extract
    from mertools.hub import pull
    from mertools.hub.download import fetch
    from mertools.hub.remote import RepoSpec, add_index_shards, choose, list_files, resolve_commit

    d = args.dir
    if d.exists():
        shutil.rmtree(d)
    repo = d / "repo"
    t0 = time.perf_counter()
    if args.kind == "safetensors":
        build_safetensors(repo, args.size_gb * 1e9, args.d_model, args.d_ff, args.experts, args.shards)
    else:
        build_gguf(repo, args.size_gb * 1e9, args.d_model, args.d_ff)
    source_bytes = sum(p.stat().st_size for p in repo.iterdir())
    print(f"built {args.kind} repo: {source_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)

    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hubserver.py"), f"bench/model={repo}"],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()  # type: ignore[union-attr]
        os.environ.update({"HF_ENDPOINT": url, "HF_HOME": str(d / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
                           "HF_HUB_OFFLINE": "0"})
        spec = RepoSpec("bench/model")
        commit = resolve_commit(spec)
        listing = list_files(spec, commit)
        choice = choose(listing)
        if choice.index_needed:
            choice = add_index_shards(choice, listing, (repo / "model.safetensors.index.json").read_bytes(), "bench")
        need = sum(f.size for f in choice.files)
        two_largest = sum(sorted((f.size for f in choice.files), reverse=True)[:2])

        subprocess.run(["sync"], check=False)
        t = time.perf_counter()
        for f in choice.files:
            fetch(spec, commit, f, d / "download-only" / f.path)
        t_download = time.perf_counter() - t
        shutil.rmtree(d / "download-only")
        res: dict[str, object] = {"kind": args.kind, "source_bytes": need, "files": len(choice.files),
                                  "download_only_s": round(t_download, 3),
                                  "download_gb_per_s": round(need / t_download / 1e9, 3)}
        src = repo / choice.main if args.kind == "gguf" else repo
        try:
            subprocess.run(["sync"], check=False)
            t = time.perf_counter()
            r = extract(src, d / "convert-only", fsync=True)
            t_convert = time.perf_counter() - t
            out_bytes = tree_bytes([d / "convert-only"])
            shutil.rmtree(d / "convert-only")
        except Exception as exc:  # no SafeTensors source on this install
            res["convert"] = f"not measured: {exc}"
            print(json.dumps(res, indent=1))
            return
        subprocess.run(["sync"], check=False)
        area = d / "pull-area"
        area.mkdir()
        with PeakDisk([area]) as peak:
            t = time.perf_counter()
            pr = pull("bench/model", area / "out")
            t_pull = time.perf_counter() - t
        slower = max(t_download, t_convert)
        res.update({
            "convert_only_s": round(t_convert, 3), "experts": r.experts,
            "pull_s": round(t_pull, 3), "pull_vs_slower": round(t_pull / slower, 3), "goal_pull_vs_slower": 1.15,
            "streamed": bool(pr.extract.get("streamed")), "window": pr.extract.get("window"),
            "output_bytes": out_bytes, "peak_disk_bytes": peak.peak,
            "peak_vs_output_plus_two_sources": round(peak.peak / (out_bytes + two_largest), 3),
            "peak_vs_source": round(peak.peak / need, 3),
        })
        if args.kind == "safetensors" and not args.no_whole:
            from mertools.hub.convert import FolderConverter

            shutil.rmtree(area)
            area.mkdir()
            subprocess.run(["sync"], check=False)
            with PeakDisk([area]) as whole_peak:
                t = time.perf_counter()
                pull("bench/model", area / "out", converter=FolderConverter)
                t_whole = time.perf_counter() - t
            res.update({"whole_pull_s": round(t_whole, 3), "whole_peak_disk_bytes": whole_peak.peak,
                        "whole_peak_vs_output_plus_two_sources": round(
                            whole_peak.peak / (out_bytes + two_largest), 3)})
        print(json.dumps(res, indent=1))
        print(f"pull {t_pull:.2f} s = {t_pull / slower:.2f}x the slower of download-only {t_download:.2f} s and "
              f"convert-only {t_convert:.2f} s (goal <= 1.15); peak disk {peak.peak / 1e9:.2f} GB = "
              f"{peak.peak / (out_bytes + two_largest):.2f}x output + two largest source files (goal <= 1)")
    finally:
        server.terminate()
        server.wait()
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
